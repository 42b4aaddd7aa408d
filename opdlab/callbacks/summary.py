"""The numbers `opdlab fit` prints when it finishes, collected as the run goes, and written to the run
folder as `summary.json` (what `opdlab compare` reads)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import lightning as L

from opdlab.callbacks.histograms import step_record


class FitSummary(L.Callback):
    """Steps, training wall time, response tokens per second, and the student's held-out accuracy before
    and after training (and the teacher's). The accuracy before training is kept in checkpoints, so a
    resumed run reports the one its first part measured.

    The accuracies are those of the latest validation (`val/accuracy`, `val/teacher_accuracy`); the one
    before training comes from a validation at step 0 outside `fit` (what `opdlab fit` runs first).

    At the end of training, rank 0 writes `<run log_dir>/summary.json` (see `as_dict`), and writes it again
    after each later validation (`opdlab fit` validates once more when the last step was not validated), so
    the file ends with the accuracy after training. Every validation is listed with the optimizer step it
    followed (TensorBoard logs a validation inside fit at the step before).

    What `opdlab fit` prints at the end (`lines`) is the reading the file holds (`reading`: one dict, computed
    once per write), each number rounded for print from the file's own value (the file keeps full precision),
    so the two never disagree.
    """

    FILENAME = "summary.json"

    def __init__(self) -> None:
        self.before: float | None = None
        self.accuracy, self.accuracy_step, self.teacher = float("nan"), -1, None
        self.response_tokens, self.started, self.seconds = 0, None, 0.0
        self.kept_tokens = 0  # of response_tokens, those the selector kept (the loss's positions)
        self.steps_here = 0  # optimizer steps trained by this process (0 for a resume of a finished run)
        self.budget: float | None = None  # the selector's ratio, and whether it keeps one token per response
        self.floor = False
        self.validations: list[tuple[int, float]] = []  # (global step, val/accuracy) of every validation
        self.trained = False  # on_train_end was reached: summary.json is (re)written from then on
        self.path: Path | None = None  # where summary.json was written
        self.reading: dict | None = None  # what it holds (the last one written): what `lines` prints
        self.rollout_seconds = 0.0  # the trainer's time in rollouts: generating them (synchronous) or waiting
        self.pipeline: tuple[int, str] | None = None  # an asynchronous run's (max staleness, producer)
        self.staleness: list[int] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        if "val/accuracy" in metrics:
            self.accuracy, self.accuracy_step = float(metrics["val/accuracy"]), trainer.global_step
            if self.before is None and trainer.global_step == 0 and not trainer.training:
                self.before = self.accuracy
            self.validations.append((trainer.global_step, self.accuracy))
        if "val/teacher_accuracy" in metrics:
            self.teacher = float(metrics["val/teacher_accuracy"])
        if self.trained:  # the validation `opdlab fit` runs after training: the accuracy after
            self.write(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()
        selector = getattr(pl_module, "selector", None)
        ratio = getattr(selector, "ratio", None)
        self.budget = float(ratio) if isinstance(ratio, (int, float)) else None
        self.floor = bool(getattr(selector, "per_response_floor", False))
        pipeline = getattr(pl_module, "pipeline", None)
        self.pipeline = (pipeline.max_staleness, pipeline.producer.name) if pipeline is not None else None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        record = step_record(outputs)
        self.steps_here += 1
        if record is not None:  # valid response tokens sampled in training, this process
            self.response_tokens += int(record.rollout.response_mask.sum())
            self.kept_tokens += int((record.keep.bool() & record.rollout.response_mask.bool()).sum())
            taken = getattr(record, "taken", None)
            # an asynchronous step waits for its rollouts and, publishing its weights, for the producer to take the
            # previous ones (an inline producer generates there): both count
            self.rollout_seconds += (taken.waited + record.seconds.get("publish", 0.0) if taken is not None
                                     else record.seconds.get("rollout", 0.0))
            if taken is not None:
                self.staleness.append(taken.staleness)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.started is not None:
            self.seconds = time.perf_counter() - self.started
        self.trained = True
        self.write(trainer)

    @property
    def tokens_per_second(self) -> float:
        return self.response_tokens / max(self.seconds, 1e-9)

    @property
    def kept_share(self) -> float | None:
        """The share of sampled response tokens that got the loss (this process's steps)."""
        return self.kept_tokens / self.response_tokens if self.response_tokens else None

    def as_dict(self, steps: int) -> dict:
        """What summary.json holds; accuracies are fractions (null when not measured)."""
        return {
            "steps": steps,
            "train_seconds": self.seconds,  # training only (this process's part of a resumed run)
            "response_tokens": self.response_tokens,
            "response_tokens_per_second": self.tokens_per_second,  # from the same seconds
            "kept_tokens": self.kept_tokens,  # response tokens the selector kept (the loss's positions)
            "kept_token_share": finite_or_none(self.kept_share),
            # The trainer's time in rollouts (generating them, or with max_staleness >= 1 waiting for the producer)
            "rollout_seconds": self.rollout_seconds,
            "rollout_share": finite_or_none(self.rollout_seconds / self.seconds if self.seconds else None),
            "max_staleness": self.pipeline[0] if self.pipeline else 0,
            "producer": self.pipeline[1] if self.pipeline else None,
            "staleness_mean": finite_or_none(sum(self.staleness) / len(self.staleness) if self.staleness else None),
            "accuracy_before": finite_or_none(self.before),
            "accuracy_after": finite_or_none(self.accuracy),
            "accuracy_after_step": self.accuracy_step if self.accuracy_step >= 0 else None,
            "teacher_accuracy": finite_or_none(self.teacher),
            "validations": [{"step": step, "accuracy": finite_or_none(acc)} for step, acc in self.validations],
        }

    def write(self, trainer: L.Trainer) -> Path | None:
        """`summary.json` in the run folder (the folder the student is exported to), on rank 0; atomic, so a
        reader never sees half a file. Every rank calls it (the run folder is agreed on collectively)."""
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero or trainer.fast_dev_run:  # a dry run writes nothing
            return None
        folder.mkdir(parents=True, exist_ok=True)
        path, partial = folder / self.FILENAME, folder / f".{self.FILENAME}.partial"
        reading = self.as_dict(trainer.global_step)
        partial.write_text(json.dumps(reading, indent=2) + "\n")
        os.replace(partial, path)
        self.path, self.reading = path, reading
        return path

    def lines(self, steps: int | None = None) -> list[str]:
        """What `opdlab fit` prints at the end: the reading summary.json holds (the last one written), each number
        rounded from the file's value. Where nothing was written (a dry run), a reading of `steps` made now."""
        reading = self.reading if self.reading is not None else self.as_dict(steps or 0)
        teacher = reading["teacher_accuracy"]
        if self.steps_here:
            timing = (f"steps: {reading['steps']}   training wall time: {reading['train_seconds']:.1f} s   "
                      f"response tokens/s: {reading['response_tokens_per_second']:.0f}")
        else:
            timing = f"steps: {reading['steps']} (all trained before this resume: this process trained none)"
        return [
            timing,
            *([self.kept_line(reading)] if reading["kept_token_share"] is not None else []),
            *([self.rollout_line(reading)] if self.steps_here and reading.get("rollout_share") is not None else []),
            f"student accuracy: before {percent(reading['accuracy_before'])} -> after "
            f"{percent(reading['accuracy_after'])}{f'   (teacher {percent(teacher)})' if teacher is not None else ''}",
            ("  (greedy decoding on the held-out prompts; `opdlab eval` reports Avg@k over sampled responses, "
             "lower at temperature 1)"),
            *([f"summary (JSON) in {self.path}"] if self.path is not None else []),
        ]

    def rollout_line(self, reading: dict) -> str:
        """How much of the training time the trainer spent on rollouts: generating them itself, or waiting for an
        asynchronous producer."""
        share = f"{reading['rollout_share']:.1%} of training wall time"
        if self.pipeline is None:
            return (f"rollouts took {share} (synchronous; --model.pipeline.max_staleness 1 generates the next step's "
                    "while this one trains: docs/runs.md)")
        return (f"trainer waited for rollouts {share} (for the producer's rollouts and weight updates; max staleness "
                f"{self.pipeline[0]}, producer {self.pipeline[1]}; mean staleness {reading['staleness_mean']:.2f} "
                "steps)")

    def kept_line(self, reading: dict) -> str:
        """The share of response tokens trained on (the reading's), and why it exceeds the budget when the floor
        raised it."""
        share = reading["kept_token_share"] or 0.0
        line = f"trained on {share:.1%} of {reading['response_tokens']} sampled response tokens"
        if self.budget is not None and self.budget < 1:
            line += f" (selector budget {self.budget:.0%}"
            if self.floor and share > self.budget * 1.05:
                line += ("; the floor of one kept token per response raises it on short responses, and "
                         "per_response_floor: false keeps the budget exactly: docs/method.md §2.4")
            line += ")"
        return line

    def state_dict(self) -> dict:
        return {"before": self.before, "validations": [list(v) for v in self.validations]}

    def load_state_dict(self, state_dict: dict) -> None:
        """A resumed run keeps the accuracy before training and the validations of its first part."""
        self.before = state_dict.get("before", self.before)
        self.validations = [(int(s), float(a)) for s, a in state_dict.get("validations", [])] or self.validations


def percent(fraction: float | None) -> str:
    """An accuracy of summary.json as printed: a percentage with one decimal, or n/a where not measured."""
    return f"{fraction:.1%}" if fraction is not None else "n/a"


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN: an accuracy not measured (or NaN) is null."""
    return float(value) if value is not None and math.isfinite(value) else None
