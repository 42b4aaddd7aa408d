"""The vllm engine with a LoRA student: the base is pushed once, then only the adapter after every step
(vLLM's LoRA path); an adapter vLLM cannot serve (an adapted lm_head) is merged instead, said in one line.
Run in .venv-vllm: `pytest -m vllm tests/test_vllm_lora.py`."""

from __future__ import annotations

import pytest
import torch
from test_lora import check_generates_with_the_current_student, data, trainer
from test_vllm_engine import needs_vllm, wide_checkpoints  # noqa: F401 - the fixture

from opdlab.adapters import AdapterOptions
from opdlab.engines.vllm_engine import VLLMEngine
from opdlab.module import OPDModule

pytest.importorskip("peft")
pytestmark = [pytest.mark.vllm, needs_vllm]


def fitted(checkpoints, **adapter) -> OPDModule:
    student, teacher = checkpoints
    module = OPDModule(student=student, teacher=teacher, rollout_engine=VLLMEngine(enforce_eager=True),
                       optimizer=lambda params: torch.optim.AdamW(params, lr=0.05), rollout=dict(max_new_tokens=4),
                       student_adapter=AdapterOptions(**{"rank": 8, **adapter}))
    trainer(2).fit(module, datamodule=data())
    return module


def test_vllm_serves_the_adapter_of_the_last_step(wide_checkpoints):  # noqa: F811
    module = fitted(wide_checkpoints)
    engine = module.rollout_engine
    assert engine.serves_adapter and engine.lora_request is not None
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in module.student.named_parameters() if ".lora_" in n)
    assert engine.sync_bytes == adapter_bytes  # after a step only the adapter moves
    check_generates_with_the_current_student(module)


def test_vllm_merges_an_adapter_it_cannot_serve(wide_checkpoints):  # noqa: F811
    with pytest.warns(UserWarning, match=r"do not take an adapter on \['lm_head'\]; serving .* merged"):
        module = fitted(wide_checkpoints, target_modules=["q_proj", "lm_head"])
    assert not module.rollout_engine.serves_adapter
    check_generates_with_the_current_student(module)
