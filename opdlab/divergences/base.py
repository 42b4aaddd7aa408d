"""The Divergence interface: a per-token OPD loss at the kept positions.

A divergence sees only the M kept rows: student logits with grad, teacher logits without, the sampled
tokens, their sampling log-probs and the teacher's log-prob of each sampled token. It returns one loss
per row; `opdlab.loss.head_loss` sums them into the step's scalar with the module's normalisation.

`teacher_needs` declares what of the teacher the loss reads, so a teacher placement that cannot give it
(a server sending its top-k log-probs) is refused before training (`opdlab.teachers.check_teacher_needs`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:  # annotations only: the interface imports no teacher code
    from opdlab.teachers.rows import TopLogprobs
    from opdlab.teachers.signal import TeacherNeed


@dataclass
class LossInputs:
    """The kept rows of one training step. M = number of kept positions, V = vocabulary."""

    student_logits: torch.Tensor  # (M, V), requires grad
    teacher_logits: torch.Tensor | None  # (M, V), no grad; None when `needs_teacher_logits` is False
    tokens: torch.Tensor  # (M,) sampled tokens
    sampling_logp: torch.Tensor  # (M,) log-prob of each token under the sampling policy
    teacher_token_logp: torch.Tensor  # (M,) log p_T(token), no grad
    # A top-k teacher (teacher_logits None): its top-k log-probs and the sampled token's, (M, k + 1); see
    # `teacher_needs`. None with a teacher that gives logits.
    teacher_top_logprobs: TopLogprobs | None = None


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

    @property
    def teacher_needs(self) -> TeacherNeed:
        """What of the teacher this loss reads: "token" (its log-prob of the sampled token), "topk" (its top-k
        log-probs are enough: with a top-k teacher `teacher_logits` is None and `teacher_top_logprobs` is set) or
        "full" (its whole distribution, `teacher_logits`). Default: "full" with `needs_teacher_logits`, else
        "token". A class attribute of the same name overrides it."""
        return "full" if self.needs_teacher_logits else "token"

    @abstractmethod
    def token_loss(self, inputs: LossInputs) -> torch.Tensor:
        """(M,) loss per kept position, differentiable w.r.t. `inputs.student_logits`."""


def checked_loss_temperature(temperature: float) -> float:
    """A divergence's loss temperature (its softmax temperature, separate from the rollout's), checked where
    the divergence is built, before any model loads."""
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature (the loss's softmax temperature, not the rollout's) must be a number > 0, "
                         f"got {temperature}")
    return temperature

# Moved in 0.2.0 (the pure maths live in opdlab.maths); the old paths warn and work until 0.3.0.
from opdlab._deprecation import moved_names  # noqa: E402

__getattr__ = moved_names(__name__, {"log_softmax_fp32": "opdlab.maths:log_softmax_fp32",
                                     "token_log_prob": "opdlab.maths:token_log_prob",
                                     "masked_kl": "opdlab.maths:masked_kl"})
