"""A progress bar that counts optimizer steps: `train 120/200`, the loss, nothing else.

Lightning's bar counts batches of an epoch; opdlab streams prompts and stops at `max_steps`, so the
default shows `Epoch 0/-2` and a `v_num` that means nothing here.

When stdout is not a terminal (redirected to a file, a pipe, CI, `opdlab compare`'s runs), a bar would
write a line of carriage returns and escape codes per refresh; there the bar prints plain lines instead:

    train 40/200 train/loss=0.123 val/accuracy=0.350 [31 s, 0.78 s/step]
    val at step 40: val/accuracy=0.350

a `train` line at the first step, every ~10% of `max_steps`, at least every `plain_interval` seconds and at
the last step (`opdlab.progress.line_due`, which `opdlab eval`'s progress shares); a `val` line after each
validation inside fit; no per-batch validation lines.
"""

from __future__ import annotations

import sys
import time

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from opdlab.progress import is_interactive, line_due

__all__ = ["StepProgressBar", "format_metrics", "is_interactive"]


class StepProgressBar(TQDMProgressBar):
    """Steps out of `max_steps` (resumed runs start where they were), with the logged progress-bar metrics.

    Args:
        plain_interval: when stdout is not a terminal, the most seconds between two plain `train` lines.
        plain_fraction: ... and a line every this share of `max_steps` (0.1: ten lines in a run), besides the
            first and last steps.
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False,
                 plain_interval: float = 30.0, plain_fraction: float = 0.1) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self.plain_interval, self.plain_fraction = plain_interval, plain_fraction
        self.plain_started = self.plain_last_time = 0.0
        self.plain_first_step, self.plain_last_step = 0, -1

    @property
    def plain(self) -> bool:
        """Plain lines instead of a bar: stdout (where the bars write) is not a terminal."""
        return not is_interactive(sys.stdout)

    # No bar drawn when stdout is not a terminal: every bar Lightning makes is a disabled (silent) one.
    def init_sanity_tqdm(self) -> Tqdm:
        return Tqdm(disable=True) if self.plain else super().init_sanity_tqdm()

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(disable=True) if self.plain else super().init_train_tqdm()

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True) if self.plain else super().init_validation_tqdm()

    def init_test_tqdm(self) -> Tqdm:
        return Tqdm(disable=True) if self.plain else super().init_test_tqdm()

    def init_predict_tqdm(self) -> Tqdm:
        return Tqdm(disable=True) if self.plain else super().init_predict_tqdm()

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.plain_started = self.plain_last_time = time.monotonic()
        self.plain_first_step, self.plain_last_step = trainer.global_step, trainer.global_step

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        self.train_progress_bar.initial = trainer.global_step
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description("train")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.plain:
            if self.is_enabled and self.plain_line_due(trainer.global_step, trainer.max_steps):
                self.print_plain_train_line(trainer, pl_module)
            return
        bar = self.train_progress_bar
        if bar is not None and self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar once

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if self.plain and self.is_enabled and trainer.state.fn == "fit" and not trainer.sanity_checking:
            metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k.startswith("val")}
            if metrics:
                print(f"val at step {trainer.global_step}: {format_metrics(metrics)}", flush=True)

    def plain_line_due(self, step: int, max_steps: int) -> bool:
        """A plain line at this step: the first and the last, every `plain_fraction` of the run, or after
        `plain_interval` seconds without one (never twice for a step: a skipped step does not advance)."""
        return line_due(step, max_steps, first=self.plain_first_step, last=self.plain_last_step,
                        last_time=self.plain_last_time, interval=self.plain_interval, fraction=self.plain_fraction)

    def print_plain_train_line(self, trainer, pl_module) -> None:
        step, now = trainer.global_step, time.monotonic()
        total = f"/{trainer.max_steps}" if trainer.max_steps > 0 else ""
        elapsed, done = now - self.plain_started, step - self.plain_first_step
        rate = f", {elapsed / done:.2f} s/step" if done > 0 else ""
        metrics = format_metrics(self.get_metrics(trainer, pl_module))
        print(f"train {step}{total}{' ' + metrics if metrics else ''} [{elapsed:.0f} s{rate}]", flush=True)
        self.plain_last_time, self.plain_last_step = now, step

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


def format_metrics(metrics: dict) -> str:
    """`name=value` pairs, numbers as the bar writes them."""
    return " ".join(f"{k}={Tqdm.format_num(v) if isinstance(v, (int, float)) else v}" for k, v in metrics.items())
