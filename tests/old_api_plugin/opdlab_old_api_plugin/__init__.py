"""A selector and a divergence written against opdlab 0.1.0's CONTRIBUTING.md, imports included. Do not update
them to the current API: their point is to be old."""

import torch
from opdlab.divergences import Divergence, LossInputs
from opdlab.divergences.base import log_softmax_fp32  # 0.1.0's path (moved to opdlab.maths in 0.2.0)
from opdlab.models import LogitHead  # noqa: F401 - 0.1.0's path (moved to opdlab.heads in 0.2.0)
from opdlab.scoring import TokenStats
from opdlab.selectors import TokenSelector, normalize_scores


class LowConfidenceSelector(TokenSelector):
    """Keep the tokens the student was least sure of."""

    top_k = 1

    def __init__(self, ratio: float = 0.05) -> None:
        super().__init__(ratio)

    def score(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        return normalize_scores(-stats.student_token_logp, stats.valid)


class PlainReverseKL(Divergence):
    """KL(student || teacher) per kept row, by plain autograd."""

    def token_loss(self, inputs: LossInputs) -> torch.Tensor:
        s = log_softmax_fp32(inputs.student_logits)
        t = log_softmax_fp32(inputs.teacher_logits.detach())
        return (s.exp() * (s - t)).sum(-1)
