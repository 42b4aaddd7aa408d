"""Callbacks: teachability histograms read back from the TensorBoard event file, the token bank, the CLI wiring."""

from __future__ import annotations

import csv

import lightning as L
import numpy as np
import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from opdlab import cli
from opdlab.callbacks import SelectionMetrics, TeachabilityHistograms, TokenBank
from opdlab.callbacks.histograms import FEATURES, is_logging_step
from opdlab.callbacks.token_bank import COLUMNS
from opdlab.data import PromptDataModule
from opdlab.module import OPDModule
from opdlab.selectors import TeachabilitySelector
from opdlab.tasks import AdditionTask

STEPS = 3


def fit_tiny(checkpoints, callbacks, logger, root) -> OPDModule:
    """A few OPD steps of the tiny random student against the tiny teacher."""
    module = OPDModule(
        student=checkpoints.student,
        teacher=checkpoints.teacher,
        selector=TeachabilitySelector(ratio=0.25, top_k=4),
        rollout=dict(max_new_tokens=4),
    )
    data = PromptDataModule(AdditionTask(digits=2, num_eval=4), batch_size=6, val_batch_size=4)
    trainer = L.Trainer(
        max_steps=STEPS, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks, log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
        limit_val_batches=0, inference_mode=False, default_root_dir=root,
    )
    trainer.fit(module, datamodule=data)
    return module


@pytest.fixture(scope="module")
def tensorboard_run(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("tb_run")
    logger = TensorBoardLogger(save_dir=root, name="tb")
    bank = root / "bank.csv"
    callbacks = [SelectionMetrics(), TeachabilityHistograms(every_n_steps=2), TokenBank(str(bank), max_rows=30)]
    fit_tiny(tiny_checkpoints, callbacks, logger, root)
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    return events, bank


def test_histograms_written_with_promised_tags(tensorboard_run):
    events, _ = tensorboard_run
    tags = set(events.Tags()["histograms"])
    expected = {f"teachability/{name}/{subset}" for name in ("compatibility", "disagreement", "topk_entropy", "teachability", "incompatibility") for subset in ("all", "kept")}
    assert tags == expected
    assert set(FEATURES) == {"compatibility", "disagreement", "topk_entropy", "teachability", "incompatibility"}
    for tag in expected:
        assert [e.step for e in events.Histograms(tag)] == [1, 3]  # every 2 steps: the first, then every second
    for step in range(2):
        everything = events.Histograms("teachability/compatibility/all")[step].histogram_value
        kept = events.Histograms("teachability/compatibility/kept")[step].histogram_value
        assert 0 < kept.num < everything.num  # a 25% budget keeps a strict subset
        assert 0.0 <= everything.min <= everything.max <= 1.0  # C is a probability mass
        d_l = events.Histograms("teachability/teachability/all")[step].histogram_value
        assert 0.0 <= d_l.min <= d_l.max <= 1.0


def test_selection_metrics_scalars(tensorboard_run):
    events, _ = tensorboard_run
    scalars = set(events.Tags()["scalars"])
    assert {"train/retained_ratio", "train/responses_with_kept", "rollout/len_mean"} <= scalars
    ratios = [e.value for e in events.Scalars("train/retained_ratio")]
    assert len(ratios) == STEPS and all(0.25 <= r <= 1.0 for r in ratios)
    assert all(e.value == 1.0 for e in events.Scalars("train/responses_with_kept"))


def test_token_bank_rows_and_columns(tensorboard_run):
    _, bank = tensorboard_run
    with open(bank) as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = list(reader)
    assert len(rows) == 30  # capped at max_rows: 6 responses x up to 4 tokens per step, 3 steps > 30
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(steps) and steps[0] == 1
    first = [r for r in rows if r["step"] == "1"]
    # Step 1 is complete: its D_L / D_I are D̃·C̃ / D̃·(1 − C̃) with the batch's q05/q95 normalisation.
    d, c = (np.array([float(r[k]) for r in first]) for k in ("disagreement", "compatibility"))
    d_n, c_n = norm(d), norm(c)
    np.testing.assert_allclose([float(r["teachability"]) for r in first], d_n * c_n, atol=1e-5)
    np.testing.assert_allclose([float(r["incompatibility"]) for r in first], d_n * (1 - c_n), atol=1e-5)
    kept = [r["kept"] == "True" for r in first]
    assert sum(kept) >= int(np.ceil(0.25 * len(first)))
    assert all(float(r["student_token_logp"]) <= 0 and float(r["teacher_entropy"]) >= 0 for r in rows)
    assert all(0 <= int(r["token_id"]) and 0 <= int(r["position"]) < 4 for r in rows)


def norm(x: np.ndarray) -> np.ndarray:
    lo, hi = np.quantile(x, [0.05, 0.95])
    return np.zeros_like(x) if hi - lo < 1e-12 else np.clip((x - lo) / (hi - lo), 0, 1)


def test_histograms_skip_silently_without_tensorboard(tiny_checkpoints, tmp_path):
    bank = tmp_path / "bank.csv"
    callbacks = [TeachabilityHistograms(every_n_steps=1), TokenBank(str(bank), max_rows=1000, every_n_steps=2)]
    fit_tiny(tiny_checkpoints, callbacks, CSVLogger(tmp_path), tmp_path)
    with open(bank) as f:
        assert {r["step"] for r in csv.DictReader(f)} == {"1", "3"}


def test_logging_steps():
    assert [s for s in range(1, 12) if is_logging_step(s, 5)] == [1, 6, 11]
    assert [s for s in range(4) if is_logging_step(s, 1)] == [1, 2, 3]


def test_token_bank_arguments(tmp_path):
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        TokenBank(str(tmp_path / "b.csv"), max_rows=0)
    with pytest.raises(ValueError, match="format must be"):
        TokenBank(str(tmp_path / "b.csv"), format="json")
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        TeachabilityHistograms(every_n_steps=0)


def test_token_bank_parquet(tiny_checkpoints, tmp_path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        with pytest.raises(ImportError, match="needs pyarrow"):
            TokenBank(str(tmp_path / "bank.parquet"), format="parquet")
        return
    path = tmp_path / "bank.parquet"
    fit_tiny(tiny_checkpoints, [TokenBank(str(path), max_rows=10, format="parquet")], False, tmp_path)
    table = pq.read_table(path)
    assert tuple(table.column_names) == COLUMNS and table.num_rows == 10


def test_cli_registers_histograms_by_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--print_config", "--teachability_histograms.every_n_steps", "7"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "teachability_histograms:" in out and "every_n_steps: 7" in out
