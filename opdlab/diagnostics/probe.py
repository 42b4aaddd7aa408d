"""Analyses that read a built `OPDModule` without training it: the selection statistics of given rollouts, as a
training step scores them, and a swap to another student checkpoint (the diagnostic's trained student).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from opdlab import step
from opdlab.heads import LogitHead
from opdlab.models import check_tokenizers_compatible, load_causal_lm, load_tokenizer
from opdlab.rollout import Rollout
from opdlab.scoring import TokenStats


@torch.no_grad()
def token_stats(module, rollout: Rollout, top_k: int | None = None, full_kl: bool | None = None,
                full_entropy: bool | None = None) -> TokenStats:
    """The selection statistics of every valid position of `rollout`, as a training step of `module` scores them
    (no grad; `opdlab diagnose`'s bank, benchmarks/disagreement_census.py). `top_k`, `full_kl` and `full_entropy`
    override what the selector asks for."""
    rows = rollout.response_mask.shape[0]
    plan = replace(module.plan(rows), micro_batches=(slice(0, rows),), shared_projection=False)
    plan = replace(plan, **{k: v for k, v in (("full_kl", full_kl), ("full_entropy", full_entropy)) if v is not None})
    hidden = module.hidden_states(rollout, plan, student_grad=False)
    return step.score(hidden, rollout, plan, module.student_head, plan.scoring(top_k or module.selector.top_k))


def replace_student(module, path: str) -> None:
    """Swap another checkpoint of the student (e.g. one trained elsewhere) into `module`, on the current student's
    device, in the module's student dtype: tokenizer and vocabulary checked against the loaded models, head and
    rollout engine rebuilt for it."""
    check_tokenizers_compatible(module.tokenizer, load_tokenizer(path))
    device = next(module.student.parameters()).device
    module.student = load_causal_lm(path, module.memory_options.student_dtype).to(device).eval()
    module.student_path = path
    module.student_head = LogitHead(module.student, module.placement.vocab_columns(module.student, module.tokenizer))
    module.bind_rollout_engine()
