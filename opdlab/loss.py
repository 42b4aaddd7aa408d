"""The loss pass: the LM heads applied to kept rows only, and the one reduction to a scalar.

The student head runs *with grad* on the M kept rows, so the logits memory of the loss is M x V rather
than N x L x V; the teacher head runs on the same rows without grad, and only when the divergence
needs full teacher logits.
"""

from __future__ import annotations

from typing import Literal

import torch
from collections.abc import Callable

from opdlab.divergences.base import Divergence, LossInputs
from opdlab.rollout import Rollout
from opdlab.scoring import TokenStats

LossNormalization = Literal["kept", "valid"]


def kept_token_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    keep: torch.Tensor,
    rollout: Rollout,
    stats: TokenStats,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_head: Callable[[torch.Tensor], torch.Tensor],
    divergence: Divergence,
) -> torch.Tensor:
    """(M,) per-token loss at the kept positions.

    Args:
        student_hidden: (N, L, H) response-predicting hidden states, with grad.
        teacher_hidden: (N, L, H_T) teacher hidden states, no grad.
        keep: (N, L) bool keep mask.
    """
    idx = keep.flatten().nonzero().squeeze(-1)  # (M,)
    student_logits = student_head(student_hidden.flatten(0, 1)[idx])  # (M, V) with grad
    teacher_logits = None
    if divergence.needs_teacher_logits:
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_hidden.flatten(0, 1)[idx])
    inputs = LossInputs(
        student_logits=student_logits,
        teacher_logits=teacher_logits,
        tokens=rollout.response_ids.flatten()[idx],
        sampling_logp=rollout.sampling_logp.flatten()[idx],
        teacher_token_logp=stats.teacher_token_logp.flatten()[idx],
    )
    return divergence.token_loss(inputs)


def reduce_token_loss(token_loss: torch.Tensor, denominator: float | torch.Tensor) -> torch.Tensor:
    """Sum of per-token losses divided by `denominator` — the only place losses are reduced.

    The caller picks the denominator (see `OPDModule(loss_normalization=...)`):
    - "kept": the number of kept tokens, so each step's loss is a mean over supervised tokens and its
      scale does not depend on the budget;
    - "valid": the number of valid response tokens, as when the reference code masks a token-mean loss;
      a 5% budget then scales gradients by ~0.05.
    In distributed or accumulated steps the denominator is the global count, so the result does not
    depend on how the batch is split. An empty selection gives 0 with the graph kept intact.
    """
    return token_loss.sum() / max(float(denominator), 1.0)
