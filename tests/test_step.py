"""The step plan: one pure function decides how a training step runs; the module prints it at fit start."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import lightning as L
import pytest

from opdlab.data import PromptDataModule
from opdlab.module import OPDModule
from opdlab.selectors import FullSelector, TeachabilitySelector
from opdlab.step import micro_batches, plan_step
from opdlab.tasks import AdditionTask


def plan(rows=64, micro_batch_size=None, chunk_size=256, keeps_all=False, **kwargs):
    return plan_step(rows, micro_batch_size=micro_batch_size, chunk_size=chunk_size,
                     keeps_every_valid_position=keeps_all, full_kl=kwargs.get("full_kl", False),
                     full_entropy=kwargs.get("full_entropy", False), loss_denominator=kwargs.get("loss_denominator", "kept"),
                     shared_projection=kwargs.get("shared_projection", True))


def test_micro_batches_cover_the_rows_in_order():
    assert micro_batches(10, None) == (slice(0, 10),)
    assert micro_batches(10, 16) == (slice(0, 10),)
    assert micro_batches(10, 4) == (slice(0, 4), slice(4, 8), slice(8, 10))
    assert micro_batches(0, 4) == (slice(0, 0),)


@pytest.mark.parametrize(("micro_batch_size", "keeps_all", "shared"), [
    (None, True, True),    # ratio 1 in one micro-batch: scoring and loss share the projection
    (None, False, False),  # a sparse budget: score, select, then the loss on the kept rows
    (16, True, False),     # several micro-batches: the keep mask spans them, so two passes
])
def test_shared_projection_only_for_ratio_one_in_one_micro_batch(micro_batch_size, keeps_all, shared):
    p = plan(micro_batch_size=micro_batch_size, keeps_all=keeps_all)
    assert p.shared_projection is shared
    assert p.reuse_student_graph is (micro_batch_size is None)
    assert not plan(keeps_all=True, shared_projection=False).shared_projection  # the switch tests compare with


def test_chunk_sizes_follow_the_one_knob():
    p = plan(chunk_size=256)
    assert (p.score_chunk_rows, p.loss_chunk_rows, p.store_rows) == (256, 64, 512)
    assert plan(chunk_size=2).loss_chunk_rows == 1  # never zero rows


def test_plan_is_pure_and_described_in_one_line():
    assert plan(full_entropy=True) == plan(full_entropy=True)
    text = plan(rows=64, micro_batch_size=16, full_kl=True, loss_denominator="valid").describe()
    assert text.startswith("step plan: 64 rollout rows in 4 micro-batches") and "\n" not in text
    assert "/ valid tokens" in text and "full-vocabulary KLs" in text
    assert "share one projection" in plan(keeps_all=True).describe()


def test_module_plan_reads_selector_and_options(tiny_checkpoints):
    module = OPDModule(student=tiny_checkpoints.student, teacher=tiny_checkpoints.teacher,
                       selector=TeachabilitySelector(ratio=0.5), memory={"chunk_size": 32, "micro_batch_size": 4},
                       training={"loss_normalization": "valid"})
    p = module.plan(8)
    assert p.micro_batches == (slice(0, 4), slice(4, 8)) and not p.shared_projection
    assert (p.score_chunk_rows, p.loss_denominator) == (32, "valid")
    module.selector = FullSelector()
    module.memory_options.micro_batch_size = None
    assert module.plan(8).shared_projection
    module.student_head = SimpleNamespace(is_plain_linear=False)  # as a FSDP2-sharded head reports
    assert not module.plan(8).shared_projection


def test_fit_prints_the_plan_once_at_the_start(tiny_checkpoints, tmp_path, caplog):
    module = OPDModule(student=tiny_checkpoints.student, teacher=tiny_checkpoints.teacher,
                       selector=TeachabilitySelector(ratio=0.5, top_k=4), rollout={"max_new_tokens": 3, "num_samples": 2})
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path, inference_mode=False)
    with caplog.at_level(logging.INFO):
        trainer.fit(module, datamodule=PromptDataModule(AdditionTask(digits=2, num_eval=8), batch_size=4))
    plans = [r.getMessage() for r in caplog.records if "step plan:" in r.getMessage()]
    assert plans == [f"opdlab: {module.plan(8).describe()}"]  # 4 prompts x 2 samples, printed once
