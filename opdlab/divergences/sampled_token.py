"""The paper's loss: sampled-token OPD as a PPO-clipped policy-gradient surrogate.

Per kept token the advantage is A_t = -λ (log π_θ(y_t) - log π_T(y_t)), detached, and the loss is
-min(r_t A_t, clip(r_t, 1 - ε_low, 1 + ε_high) A_t) with r_t = π_θ(y_t) / π_old(y_t) (TA-OPD, arXiv
2605.26844: λ = 1, ε_low = 0.2, ε_high = 0.28, no entropy bonus, no KL penalty). Its gradient in
expectation is that of the reverse KL(π_θ || π_T), using only the teacher's sampled-token log-prob.
"""

from __future__ import annotations

import torch

from opdlab.divergences.base import Divergence, LossInputs
from opdlab.maths import token_log_prob


class SampledTokenOPD(Divergence):
    """PPO-clipped sampled-token OPD.

    Args:
        coef: λ, the advantage scale.
        clip_low, clip_high: ε_low and ε_high of the ratio clip.
    """

    needs_teacher_logits = False
    nonnegative = False

    def __init__(self, coef: float = 1.0, clip_low: float = 0.2, clip_high: float = 0.28) -> None:
        if clip_low < 0 or clip_high < 0:
            raise ValueError(f"clip_low and clip_high must be >= 0, got {clip_low} and {clip_high}")
        self.coef, self.clip_low, self.clip_high = coef, clip_low, clip_high

    def token_loss(self, inputs: LossInputs) -> torch.Tensor:
        logp = token_log_prob(inputs.student_logits, inputs.tokens)  # (M,)
        advantage = -self.coef * (logp.detach() - inputs.teacher_token_logp.detach().float())
        advantage = torch.nan_to_num(advantage, nan=0.0, posinf=0.0, neginf=0.0)
        ratio = torch.exp(logp - inputs.sampling_logp.detach().float())
        clipped = ratio.clamp(1 - self.clip_low, 1 + self.clip_high)
        return -torch.minimum(ratio * advantage, clipped * advantage)
