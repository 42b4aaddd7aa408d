"""Loggers that keep a run's curves when it is resumed in its own folder (`opdlab fit --resume`).

Lightning's `CSVLogger` deletes `metrics.csv` when its folder already holds one ("Previous log files in
this directory will be deleted"), so a resumed run kept only the rows logged after the resume. opdlab's
`CSVLogger` keeps the earlier rows: at its first save it drops only the rows of the steps the resumed run
logs again (those after the checkpoint it resumed from), then appends as Lightning's does. `opdlab fit`
uses it wherever Lightning's is named (`--trainer.logger lightning.pytorch.loggers.CSVLogger`); it can
also be named directly (`--trainer.logger opdlab.loggers.CSVLogger`).
"""

from __future__ import annotations

import csv

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class ContinuingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, continuing an existing `metrics.csv` instead of deleting it."""

    def __init__(self, log_dir: str) -> None:
        self.continuing = False
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        """Keep the file; its header becomes the known keys, so that new rows append under it."""
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = sorted(csv.DictReader(file).fieldnames or [])
            self.continuing = True

    def save(self) -> None:
        if self.continuing and self.metrics:
            self.continuing = False
            first = min(int(row["step"]) for row in self.metrics)
            self.drop_rows_from(first)
        super().save()

    def drop_rows_from(self, step: int) -> None:
        """Remove the rows of `step` and later (logged before an interruption, after the last checkpoint)."""
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            fieldnames, rows = reader.fieldnames or [], list(reader)
        kept = [row for row in rows if row.get("step") in (None, "") or int(float(row["step"])) < step]
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(kept)


class CSVLogger(LightningCSVLogger):
    """Lightning's `CSVLogger` whose `metrics.csv` survives a resume in the same folder (rows before the
    resumed step are kept, the redone steps' rows are replaced)."""

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        # opdlab logs its own "step" metric (OPDModule.log_step); Lightning 2.6 casts it to int, 2.5
        # passes the float through, which would write "1.0" into the step column. Keep integer steps on both.
        super().log_metrics(metrics, None if step is None else int(step))

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
