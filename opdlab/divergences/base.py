"""The Divergence interface: a per-token OPD loss at the kept positions.

A divergence sees only the M kept rows: student logits with grad, teacher logits without, the sampled
tokens, their sampling log-probs and the teacher's log-prob of each sampled token. It returns one loss
per row; `opdlab.loss.reduce_token_loss` is the single place where rows become a scalar.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass
class LossInputs:
    """The kept rows of one training step. M = number of kept positions, V = vocabulary."""

    student_logits: torch.Tensor  # (M, V), requires grad
    teacher_logits: torch.Tensor | None  # (M, V), no grad; None when `needs_teacher_logits` is False
    tokens: torch.Tensor  # (M,) sampled tokens
    sampling_logp: torch.Tensor  # (M,) log-prob of each token under the sampling policy
    teacher_token_logp: torch.Tensor  # (M,) log p_T(token), no grad


class Divergence(ABC):
    """Per-token loss between student and teacher at kept positions.

    Class attributes:
        needs_teacher_logits: False when the loss only needs the teacher's sampled-token log-prob, so the
            teacher's LM head is not applied again in the loss pass.
        nonnegative: True for true divergences (zero iff student == teacher, never negative); False for
            policy-gradient surrogates whose value can be negative.
    """

    needs_teacher_logits: ClassVar[bool] = True
    nonnegative: ClassVar[bool] = True

    @abstractmethod
    def token_loss(self, inputs: LossInputs) -> torch.Tensor:
        """(M,) loss per kept position, differentiable w.r.t. `inputs.student_logits`."""


def log_softmax_fp32(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-softmax in fp32 (bf16 log-probs lose ~3 significant digits)."""
    if temperature <= 0:
        raise ValueError(f"loss temperature must be > 0, got {temperature}")
    # -inf (masked vocabulary) becomes the most negative float: exp() is still exactly 0, but the
    # backward of 0 · (-inf - -inf) no longer produces NaN gradients.
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    return torch.log_softmax(scaled, dim=-1).clamp_min(torch.finfo(torch.float32).min)


def token_log_prob(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] in fp32, (M, V), (M,) -> (M,).

    Clamps only the gathered (M,) values, not the whole (M, V) log-softmax: the backward of a gather
    through log-softmax is onehot - softmax, where -inf logits contribute exp(-inf) = 0, so no NaN can
    arise; skipping the (M, V) clamp and its backward saves ~4 passes over the logits.
    """
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return logp.clamp_min(torch.finfo(torch.float32).min)


def masked_kl(logp_p: torch.Tensor, logp_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim with 0·log 0 = 0 (safe for -inf logits). (M, V) -> (M,)."""
    terms = logp_p.exp() * (logp_p - logp_q)
    return torch.where(torch.isneginf(logp_p), torch.zeros_like(terms), terms).sum(-1)
