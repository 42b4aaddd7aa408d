"""At ratio 1 the step plan shares one projection per chunk between scoring and loss; the update must
equal the two-pass path (score, select, loss on the kept rows)."""

from __future__ import annotations

from dataclasses import replace

import lightning as L
import pytest
import torch

from opdlab.data import PromptDataModule
from opdlab.divergences import ReverseKL, SampledTokenOPD
from opdlab.module import OPDModule
from opdlab.selectors import FullSelector, TeachabilitySelector
from opdlab.tasks import AdditionTask


def train(tiny_checkpoints, selector, divergence, shared: bool, steps: int = 3):
    losses, calls = [], []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))
            calls.append(outputs["record"].plan.shared_projection)

    module = OPDModule(
        student=tiny_checkpoints.student,
        teacher=tiny_checkpoints.teacher,
        selector=selector,
        divergence=divergence,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
        rollout=dict(max_new_tokens=5),
    )
    if not shared:  # the same step with the plan's shared projection turned off
        plan = module.plan
        module.plan = lambda rows: replace(plan(rows), shared_projection=False)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[Record()], inference_mode=False)
    trainer.fit(module, datamodule=PromptDataModule(AdditionTask(digits=2, num_eval=8), batch_size=8, val_batch_size=8))
    return losses, calls, {k: v.detach().clone() for k, v in module.student.state_dict().items()}


@pytest.mark.parametrize("make_selector", [FullSelector, lambda: TeachabilitySelector(ratio=1.0, top_k=4)],
                         ids=["full", "teachability@1"])
@pytest.mark.parametrize("divergence", [ReverseKL, SampledTokenOPD])
def test_shared_projection_step_equals_two_pass_step(tiny_checkpoints, make_selector, divergence):
    fused_losses, fused_calls, fused_weights = train(tiny_checkpoints, make_selector(), divergence(), shared=True)
    plain_losses, plain_calls, plain_weights = train(tiny_checkpoints, make_selector(), divergence(), shared=False)
    assert all(fused_calls) and not any(plain_calls)
    assert fused_losses == pytest.approx(plain_losses, rel=1e-5, abs=1e-7)
    for name, value in plain_weights.items():
        torch.testing.assert_close(fused_weights[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_module_plans_the_shared_projection_for_ratio_one_selectors(tiny_checkpoints):
    module = OPDModule(student=tiny_checkpoints.student, teacher=tiny_checkpoints.teacher,
                       selector=TeachabilitySelector(ratio=0.5))
    assert not module.plan(8).shared_projection
    module.selector = TeachabilitySelector(ratio=1.0)
    assert module.plan(8).shared_projection
    module.selector = FullSelector()
    assert module.plan(8).shared_projection
    module.memory_options.micro_batch_size = 4
    assert not module.plan(8).shared_projection  # micro-batches: the two-pass path
