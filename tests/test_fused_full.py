"""At ratio 1 the module scores and computes the loss in one projection per chunk; the update must equal
the two-pass path (score, select, loss on the kept rows)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from opdlab.data import PromptDataModule
from opdlab.divergences import ReverseKL, SampledTokenOPD
from opdlab.module import OPDModule
from opdlab.selectors import FullSelector, TeachabilitySelector
from opdlab.tasks import AdditionTask


def train(tiny_checkpoints, selector, divergence, fused: bool, steps: int = 3):
    losses, calls = [], []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))
            calls.append(pl_module.keeps_every_position([slice(0, 1)]))

    module = OPDModule(student=tiny_checkpoints.student, teacher=tiny_checkpoints.teacher, selector=selector,
                       divergence=divergence, optimizer=lambda p: torch.optim.SGD(p, lr=0.5), max_new_tokens=5)
    module.fuse_full_selection = fused
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[Record()], inference_mode=False)
    trainer.fit(module, datamodule=PromptDataModule(AdditionTask(digits=2, num_eval=8), batch_size=8, val_batch_size=8))
    return losses, calls, {k: v.detach().clone() for k, v in module.student.state_dict().items()}


@pytest.mark.parametrize("make_selector", [FullSelector, lambda: TeachabilitySelector(ratio=1.0, top_k=4)],
                         ids=["full", "teachability@1"])
@pytest.mark.parametrize("divergence", [ReverseKL, SampledTokenOPD])
def test_fused_ratio_one_step_equals_two_pass_step(tiny_checkpoints, make_selector, divergence):
    fused_losses, fused_calls, fused_weights = train(tiny_checkpoints, make_selector(), divergence(), fused=True)
    plain_losses, plain_calls, plain_weights = train(tiny_checkpoints, make_selector(), divergence(), fused=False)
    assert all(fused_calls) and not any(plain_calls)
    assert fused_losses == pytest.approx(plain_losses, rel=1e-5, abs=1e-7)
    for name, value in plain_weights.items():
        torch.testing.assert_close(fused_weights[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_sparse_budget_does_not_take_the_fused_path(tiny_checkpoints):
    module = OPDModule(student=tiny_checkpoints.student, teacher=tiny_checkpoints.teacher,
                       selector=TeachabilitySelector(ratio=0.5))
    assert not module.keeps_every_position([slice(0, 8)])
    module.selector = FullSelector()
    assert module.keeps_every_position([slice(0, 8)])
    assert not module.keeps_every_position([slice(0, 4), slice(4, 8)])  # micro-batches: two-pass path
