"""Full-distribution divergences (the GKD family), per token over the vocabulary, in fp32.

All take a loss `temperature` (logits are divided by it before the softmax; independent of the rollout
temperature) and return (M,) from (M, V) logits.
"""

from __future__ import annotations

import math

import torch

from opdlab.divergences.base import Divergence, LossInputs, checked_loss_temperature
from opdlab.divergences.hand_grad import hand_grad_loss  # KL / JSD with hand-written logit gradients
from opdlab.maths import log_softmax_fp32, masked_kl, tail_bucket_forward_kl


def _pair(inputs: LossInputs, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    teacher = log_softmax_fp32(inputs.teacher_logits.detach(), temperature)  # the teacher is a constant
    return log_softmax_fp32(inputs.student_logits, temperature), teacher


class ForwardKL(Divergence):
    """KL(p_T || p_S): mass-covering (the supervised-KD direction).

    With a teacher that sends only its top-k log-probs (a served teacher), the KL over those tokens plus one
    tail bucket for all others (`opdlab.maths.tail_bucket_forward_kl`); that needs loss temperature 1 (the
    teacher's distribution cannot be re-tempered from its top-k)."""

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = checked_loss_temperature(temperature)

    @property
    def teacher_needs(self) -> str:
        return "topk" if self.temperature == 1.0 else "full"

    def token_loss(self, inputs: LossInputs) -> torch.Tensor:
        top = inputs.teacher_top_logprobs
        if inputs.teacher_logits is None and top is not None:
            return tail_bucket_forward_kl(log_softmax_fp32(inputs.student_logits), top.ids, top.logp, top.known)
        return hand_grad_loss(inputs.student_logits, inputs.teacher_logits, "forward_kl",
                              temperature=self.temperature)



class ReverseKL(Divergence):
    """KL(p_S || p_T): mode-seeking, the usual on-policy distillation objective."""

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = checked_loss_temperature(temperature)

    def token_loss(self, inputs: LossInputs) -> torch.Tensor:
        return hand_grad_loss(inputs.student_logits, inputs.teacher_logits, "reverse_kl",
                              temperature=self.temperature)



class GeneralizedJSD(Divergence):
    """Generalized Jensen-Shannon divergence with TRL's `generalized_jsd_loss` semantics.

    beta = 0 gives KL(T || S), beta = 1 gives KL(S || T); otherwise beta·KL(T || M) + (1 - beta)·KL(S || M)
    with M = beta·T + (1 - beta)·S.
    """

    def __init__(self, beta: float = 0.5, temperature: float = 1.0) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.beta, self.temperature = beta, checked_loss_temperature(temperature)

    def token_loss(self, inputs: LossInputs) -> torch.Tensor:
        kind = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(self.beta, "jsd")
        return hand_grad_loss(inputs.student_logits, inputs.teacher_logits, kind, self.beta, self.temperature)



class SkewKL(Divergence):
    """Skew KL of DistiLLM: KL(p_T || α p_T + (1 - α) p_S); `reverse=True` gives KL(p_S || α p_S + (1 - α) p_T)."""

    def __init__(self, alpha: float = 0.1, reverse: bool = False, temperature: float = 1.0) -> None:
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        self.alpha, self.reverse, self.temperature = alpha, reverse, checked_loss_temperature(temperature)

    def token_loss(self, inputs: LossInputs) -> torch.Tensor:
        s, t = _pair(inputs, self.temperature)
        p, q = (s, t) if self.reverse else (t, s)
        if self.alpha == 0.0:
            return masked_kl(p, q)
        mix = torch.logsumexp(torch.stack([p + math.log(self.alpha), q + math.log(1 - self.alpha)]), dim=0)
        return masked_kl(p, mix)


class TotalVariation(Divergence):
    """Total variation distance 0.5 · Σ |p_T - p_S|."""

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = checked_loss_temperature(temperature)

    def token_loss(self, inputs: LossInputs) -> torch.Tensor:
        s, t = _pair(inputs, self.temperature)
        return 0.5 * (t.exp() - s.exp()).abs().sum(-1)
