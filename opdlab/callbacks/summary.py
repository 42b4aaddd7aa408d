"""The numbers `opdlab fit` prints when it finishes, collected as the run goes."""

from __future__ import annotations

import time

import lightning as L

from opdlab.callbacks.histograms import step_record


class FitSummary(L.Callback):
    """Steps, training wall time, response tokens per second, and the student's held-out accuracy before
    and after training (and the teacher's). The accuracy before training is kept in checkpoints, so a
    resumed run reports the one its first part measured.

    The accuracies are those of the latest validation (`val/accuracy`, `val/teacher_accuracy`); the one
    before training comes from a validation at step 0 outside `fit` (what `opdlab fit` runs first).
    """

    def __init__(self) -> None:
        self.before: float | None = None
        self.accuracy, self.accuracy_step, self.teacher = float("nan"), -1, None
        self.response_tokens, self.started, self.seconds = 0, None, 0.0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        if "val/accuracy" in metrics:
            self.accuracy, self.accuracy_step = float(metrics["val/accuracy"]), trainer.global_step
            if self.before is None and trainer.global_step == 0 and not trainer.training:
                self.before = self.accuracy
        if "val/teacher_accuracy" in metrics:
            self.teacher = float(metrics["val/teacher_accuracy"])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        record = step_record(outputs)
        if record is not None:  # valid response tokens sampled in training, this process
            self.response_tokens += int(record.rollout.response_mask.sum())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.started is not None:
            self.seconds = time.perf_counter() - self.started

    def lines(self, steps: int, after: float) -> list[str]:
        before = f"{self.before:.1%}" if self.before is not None else "n/a"
        teacher = f"   (teacher {self.teacher:.1%})" if self.teacher is not None else ""
        return [
            (f"steps: {steps}   training wall time: {self.seconds:.1f} s   "
             f"response tokens/s: {self.response_tokens / max(self.seconds, 1e-9):.0f}"),
            f"student accuracy: before {before} -> after {after:.1%}{teacher}",
        ]

    def state_dict(self) -> dict:
        return {"before": self.before}

    def load_state_dict(self, state_dict: dict) -> None:
        self.before = state_dict.get("before", self.before)
