"""TensorBoard histograms of the teachability features, over all valid and over kept positions."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from opdlab.scoring import FEATURES
from opdlab.selectors.base import Normalization, check_normalization
from opdlab.selectors.teachability import teachability_features


def step_record(outputs):
    """The `StepRecord` a training step returned (`outputs["record"]`), or None."""
    return outputs.get("record") if isinstance(outputs, dict) else None


def is_logging_step(step: int, every_n_steps: int) -> bool:
    """True on optimizer steps 1, n + 1, 2n + 1, ...: the first step, then every n-th."""
    return step >= 1 and (step - 1) % every_n_steps == 0


def check_every_n_steps(every_n_steps: int) -> int:
    if every_n_steps < 1:
        raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
    return every_n_steps


class TeachabilityHistograms(L.Callback):
    """Every `every_n_steps` optimizer steps, histograms of C, D, H, D^L = D̃·C̃ and D^I = D̃·(1−C̃).

    Tags: `teachability/<feature>/all` (every valid response position of the step's rollout batch) and
    `teachability/<feature>/kept` (the positions the selector kept), feature in compatibility (C),
    disagreement (D), topk_entropy (H), teachability (D^L), incompatibility (D^I) (`opdlab.scoring.FEATURES`).
    C, D, H are raw; D̃ and C̃ are normalised over the batch exactly as the selectors do. Written only when
    a TensorBoard logger is configured (silently skipped otherwise), from global rank 0's batch.

    Args:
        every_n_steps: log on the first optimizer step and then every n-th (1, n + 1, 2n + 1, ...).
        normalization: normalisation of D and C behind D^L and D^I; default: the selector's own
            (`selector.normalization`), else quantile.
    """

    def __init__(self, every_n_steps: int = 50, normalization: Normalization | None = None) -> None:
        self.every_n_steps = check_every_n_steps(every_n_steps)
        self.normalization = None if normalization is None else check_normalization(normalization)
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._last_step = -1

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        record, step = step_record(outputs), trainer.global_step
        if record is None or step == self._last_step or not is_logging_step(step, self.every_n_steps):
            return
        writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not writers or not trainer.is_global_zero:
            return
        self._last_step = step  # once per optimizer step, even with gradient accumulation
        normalization = self.normalization or getattr(getattr(pl_module, "selector", None), "normalization", "quantile")
        features = teachability_features(record.stats, normalization)
        subsets = {"all": record.stats.valid, "kept": record.keep & record.stats.valid}
        for name in FEATURES:
            for subset, mask in subsets.items():
                values = features[name][mask].detach().float().cpu()
                if values.numel() == 0:
                    continue
                for writer in writers:
                    writer.add_histogram(f"teachability/{name}/{subset}", values, global_step=step)
