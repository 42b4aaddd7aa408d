"""`StageTrace`: a timeline of every training step's stages (rollout, forward, score, select, loss, optimizer) and of
each validation, written as a Chrome / Perfetto trace: `trace.json` in the run folder (`trace.rank<r>.json` for
ranks other than 0). Open it at ui.perfetto.dev or chrome://tracing.

The file is the trace format's JSON array of complete ("X") events, one per line, written as the run goes: a run
that fails or is interrupted leaves every finished step in the file (the format accepts a missing closing bracket,
and the end of a run adds it). Times are microseconds of wall-clock time (the Unix epoch), so a resumed run
continues the same file on the same timeline; the stages are measured on `time.perf_counter()` and placed on it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L


class StageTrace(L.Callback):
    """Args:
        enabled: write the trace (one line per stage of every step: about 1 kB per step).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.file = self.path = None
        self.offset = time.time() - time.perf_counter()  # perf_counter seconds -> Unix seconds
        self.rank = 0
        self.validation_start: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = trainer.log_dir if trainer.logger is not None else None
        if not self.enabled or folder is None or trainer.fast_dev_run:
            return
        rank = self.rank = trainer.global_rank
        self.path = Path(folder) / ("trace.json" if rank == 0 else f"trace.rank{rank}.json")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        resumed = self.path.is_file() and self.path.stat().st_size > 0
        self.file = open(self.path, "a" if resumed else "w", encoding="utf-8")  # noqa: SIM115 - open for the whole fit
        if resumed:  # a resumed run continues its own file: reopen the array its last end closed
            self.reopen_array()
        else:
            self.file.write("[\n")
        self.offset = time.time() - time.perf_counter()
        self.emit("process_name", time.perf_counter(), None, {"name": f"rank {rank}"}, phase="M")

    def reopen_array(self) -> None:
        """Drop the closing bracket a finished run wrote, so that new events join the same array."""
        self.file.close()
        text = self.path.read_text(encoding="utf-8").rstrip().removesuffix("]").rstrip()
        self.path.write_text(text + ("\n" if text.endswith(("[", ",")) else ",\n"), encoding="utf-8")
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def emit(self, name: str, start: float, seconds: float | None, args: dict | None = None, phase: str = "X",
             thread: str = "trainer") -> None:
        event = {"name": name, "ph": phase, "ts": round((start + self.offset) * 1e6, 1), "pid": self.rank, "tid": thread}
        if seconds is not None:
            event["dur"] = round(seconds * 1e6, 1)
        if args:
            event["args"] = args
        self.file.write(json.dumps(event) + ",\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = outputs.get("record") if isinstance(outputs, dict) else None
        if self.file is None or record is None or not record.spans:
            return
        step = trainer.global_step + (0 if "loss" in outputs else 1)  # counted from 1, as logged (a skipped update too)
        first, end = record.spans[0][1], max(start + seconds for _, start, seconds in record.spans)
        self.emit(f"step {step}", first, end - first, {"step": step})
        for name, start, seconds in record.spans:
            self.emit(name, start, seconds, {"step": step})
        taken = getattr(record, "taken", None)
        if taken is not None and taken.produced.seconds > 0:  # where and when the producer generated these rollouts
            produced = taken.produced
            self.emit("generate", produced.start, produced.seconds,
                      {"step": step, "policy_version": produced.version, "staleness": taken.staleness},
                      thread=produced.worker)
        self.file.flush()

    def on_validation_start(self, trainer, pl_module) -> None:
        self.validation_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.file is not None and self.validation_start is not None:
            self.emit("validation", self.validation_start, time.perf_counter() - self.validation_start,
                      {"step": trainer.global_step})
            self.file.flush()

    def close(self) -> None:
        """End the array (the last event's comma is allowed by the trace format's readers, and dropped here)."""
        if self.file is None:
            return
        self.file.close()
        self.file = None
        text = self.path.read_text(encoding="utf-8").rstrip()
        self.path.write_text(text.removesuffix(",") + "\n]\n", encoding="utf-8")

    def on_fit_end(self, trainer, pl_module) -> None:
        self.close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.close()
