"""The token bank: per-position features of training rollouts, written to CSV or Parquet for offline analysis."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal

import lightning as L
import torch

from opdlab.callbacks.histograms import check_every_n_steps, is_logging_step, step_record
from opdlab.scoring import FEATURES
from opdlab.selectors.base import Normalization, check_normalization
from opdlab.selectors.teachability import teachability_features

LOGP_COLUMNS = ("student_token_logp", "teacher_token_logp", "student_entropy", "teacher_entropy")
COLUMNS = ("step", "sequence", "position", "token_id", "kept", *FEATURES, *LOGP_COLUMNS)


def token_rows(record, step: int, normalization: Normalization = "quantile") -> dict[str, list]:
    """One row per valid response position of a `StepRecord`, as columns (name -> list of values)."""
    stats = record.stats
    seq, pos = stats.valid.nonzero(as_tuple=True)  # (R,), (R,) in sequence-major order
    features = teachability_features(stats, normalization)
    columns = {
        "step": [step] * seq.numel(),
        "sequence": seq,
        "position": pos,
        "token_id": record.rollout.response_ids[seq, pos],
        "kept": record.keep[seq, pos],
        **{name: features[name][seq, pos] for name in FEATURES},
        **{name: getattr(stats, name)[seq, pos] for name in LOGP_COLUMNS},
    }
    return {k: v.detach().cpu().tolist() if isinstance(v, torch.Tensor) else v for k, v in columns.items()}


class TokenBank(L.Callback):
    """Writes one row per valid response position of training rollouts, up to `max_rows` rows.

    Columns: step, sequence (index in the step's rollout batch), position (response token index),
    token_id, kept (selected for the loss), compatibility, disagreement, topk_entropy, teachability,
    incompatibility (`opdlab.scoring.FEATURES`, as in `TeachabilityHistograms`),
    student/teacher log-prob of the sampled token, student/teacher full-vocabulary entropy. Rows are
    appended as training goes (the file is complete up to the last logged step if a run dies) and the file
    is started afresh at each fit. Global rank 0 writes `path`; other ranks write `<stem>.rank<r><suffix>`.

    Args:
        path: output file (`.csv` or `.parquet`); parent folders are created.
        max_rows: stop writing after this many rows (a step that would cross it is cut).
        every_n_steps: write on the first optimizer step and then every n-th.
        format: csv, or parquet (needs `pyarrow`).
        normalization: normalisation of D and C behind teachability and incompatibility; default: the selector's own.
    """

    def __init__(
        self,
        path: str,
        max_rows: int = 100_000,
        every_n_steps: int = 1,
        format: Literal["csv", "parquet"] = "csv",
        normalization: Normalization | None = None,
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if format not in ("csv", "parquet"):
            raise ValueError(f"format must be 'csv' or 'parquet', got {format!r}")
        if format == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError as err:
                raise ImportError(
                    "TokenBank(format='parquet') needs pyarrow: `pip install pyarrow`, or use format='csv'"
                ) from err
        self.base_path, self.path, self.max_rows, self.format = Path(path), Path(path), max_rows, format
        self.every_n_steps = check_every_n_steps(every_n_steps)
        self.normalization = None if normalization is None else check_normalization(normalization)
        self.rows_written, self._last_step, self._writer, self._file = 0, -1, None, None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if hasattr(pl_module, "request_full_entropy"):
            pl_module.request_full_entropy()  # the student/teacher entropy columns
        self.close()
        self.rows_written, self._last_step, self.path = 0, -1, self.base_path
        if trainer.world_size > 1 and trainer.global_rank > 0:
            self.path = self.path.with_name(f"{self.path.stem}.rank{trainer.global_rank}{self.path.suffix}")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        record, step = step_record(outputs), trainer.global_step
        if record is None or step == self._last_step or not is_logging_step(step, self.every_n_steps):
            return
        if self.rows_written >= self.max_rows:
            return
        self._last_step = step
        normalization = self.normalization or getattr(getattr(pl_module, "selector", None), "normalization", "quantile")
        columns = token_rows(record, step, normalization)
        room = self.max_rows - self.rows_written
        columns = {k: v[:room] for k, v in columns.items()}
        n = len(columns["step"])
        if n:
            self._write(columns)
            self.rows_written += n

    def _write(self, columns: dict[str, list]) -> None:
        if self.format == "csv":
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "w", newline="")  # noqa: SIM115 - kept open across steps
                self._writer = csv.writer(self._file)
                self._writer.writerow(COLUMNS)
            self._writer.writerows(zip(*(columns[c] for c in COLUMNS), strict=True))
            self._file.flush()
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({c: columns[c] for c in COLUMNS})
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(str(self.path), table.schema)
        self._writer.write_table(table)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.close()

    def close(self) -> None:
        """Finish the file (a Parquet footer is written only here)."""
        if self._file is not None:
            self._file.close()
        elif self._writer is not None:
            self._writer.close()
        self._file = self._writer = None
