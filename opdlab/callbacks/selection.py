"""Per-step selection and rollout metrics: how much of each rollout got supervised."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from opdlab.callbacks.histograms import step_record


DEGENERATE_SHARE = 0.9  # a score that is exactly 0 at this share of valid positions or more selects by position
THRESHOLD_SPREAD = 0.01  # C (in [0, 1]) with q95 - q05 below this: its quantile normalisation is a threshold


class SelectionMetrics(L.Callback):
    """Logs, every training step:

    - `train/retained_ratio`: kept / valid response tokens;
    - `train/kept_tokens`, `train/valid_tokens`: the counts behind it;
    - `train/responses_with_kept`: fraction of non-empty responses with at least one kept token;
    - `rollout/len_mean`, `rollout/len_max`: response lengths in tokens (EOS included);
    - `select/score_zero_share`: share of valid positions whose selector score is exactly 0 (a normalised feature
      with no spread over the batch: the budget then falls to ties, broken by position);
    - `select/compatibility_q05`, `select/compatibility_q95`: the batch quantiles of C behind its normalisation.

    Warns once when a selector's normalised feature is degenerate on this data: its score is exactly 0 at 90% of
    valid positions (the budget is then filled by position order), or it reads C̃ under quantile normalisation and
    C's q95 − q05 is below 0.01 (C ≈ 1 nearly everywhere, as on the mix4 toy: C̃ becomes a threshold that gives 0 to
    every position whose C is even slightly lower, docs/results.md §8).
    """

    def __init__(self) -> None:
        self.warned_degenerate = self.warned_threshold = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        record = step_record(outputs)
        if record is None:
            return
        valid, keep = record.stats.valid, record.keep
        lengths = valid.sum(1).float()
        non_empty = lengths > 0
        n_valid = valid.sum().clamp_min(1)
        with_kept = (keep.any(1) & non_empty).sum() / non_empty.sum().clamp_min(1)
        pl_module.log_dict(
            {
                "train/retained_ratio": keep.sum() / n_valid,
                "train/kept_tokens": keep.sum().float(),
                "train/valid_tokens": valid.sum().float(),
                "train/responses_with_kept": with_kept.float(),
                "rollout/len_mean": lengths.mean(),
                "rollout/len_max": lengths.max(),
            },
            batch_size=valid.shape[0],
        )
        self.log_score_spread(trainer, pl_module, record)

    def log_score_spread(self, trainer: L.Trainer, pl_module: L.LightningModule, record) -> None:
        """The selector's score and C over this rank's valid positions (see the class docstring)."""
        from opdlab.maths import linear_quantiles
        from opdlab.selectors import TokenSelector

        selector, stats = getattr(pl_module, "selector", None), record.stats
        valid = stats.valid.bool()
        if not valid.any():
            return
        metrics = {}
        if stats.compatibility is not None:
            c = stats.compatibility[valid].float()
            q05, q95 = linear_quantiles(c, (0.05, 0.95))
            metrics.update({"select/compatibility_q05": q05, "select/compatibility_q95": q95})
            if reads_normalised_c(selector) and float(q95 - q05) < THRESHOLD_SPREAD and not self.warned_threshold:
                self.warned_threshold = True
                rank_zero_warn(f"{type(selector).__name__}: C's q05/q95 over the batch are {float(q05):.4f}/{float(q95):.4f} "
                               f"in step {trainer.global_step}: the quantile normalisation turns C into a threshold (C̃ = 0 "
                               f"for every position whose C is below {float(q05):.4f}, however slightly), so the score drops "
                               "positions the teacher would still teach (docs/results.md §8). Consider normalization: "
                               "minmax; TensorBoard: select/*")
        # Scored selectors under the shared budget rule only (a plugin that overrides `select` may not score at all);
        # ratio 1 keeps everything whatever the scores.
        if isinstance(selector, TokenSelector) and type(selector).select is TokenSelector.select and selector.ratio < 1:
            with torch.no_grad():
                scores = selector.score(stats, torch.Generator().manual_seed(0))  # never the global RNG
            zero = float((scores[valid] == 0).float().mean())
            metrics["select/score_zero_share"] = torch.tensor(zero)
            if zero >= DEGENERATE_SHARE and not self.warned_degenerate:
                self.warned_degenerate = True
                spread = (f"; C's q05/q95 over the batch are {float(metrics['select/compatibility_q05']):.4f}/"
                          f"{float(metrics['select/compatibility_q95']):.4f}" if "select/compatibility_q05" in metrics else "")
                rank_zero_warn(f"{type(selector).__name__}: the score is exactly 0 at {zero:.0%} of valid response "
                               f"positions in step {trainer.global_step}{spread}: a normalised feature has (almost) no "
                               "spread over the batch, so the budget is filled by position order among ties, not by "
                               "the score. Try normalization: minmax, another selector, or check the features in "
                               "TensorBoard (select/score_zero_share, teachability/ histograms)")
        if metrics:
            pl_module.log_dict(metrics, batch_size=int(valid.shape[0]))


def reads_normalised_c(selector) -> bool:
    """Whether the selector's score reads the quantile-normalised C̃ (teachability and its C-based variants)."""
    from opdlab.selectors.teachability import CompatibilitySelector, IncompatibleSelector, TeachabilitySelector

    return isinstance(selector, (TeachabilitySelector, IncompatibleSelector, CompatibilitySelector)) \
        and getattr(selector, "normalization", None) == "quantile"
