"""`TokenStats`: the per-position statistics a scoring pass gives the selectors (the selectors' interface type), and
`FEATURES`, the one name of each feature everywhere. Computed by `opdlab.scoring`; only torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

# One name per per-position feature everywhere (TokenStats fields, `teachability/<name>/...` histograms,
# token bank and diagnostic bank columns), with the paper's symbol and meaning (docs/method.md §2).
# The last two are batch-normalised products, not TokenStats fields (`teachability_features`).
FEATURES = {
    "compatibility": ("C", "teacher mass on the student's top-K"),
    "disagreement": ("D", "forward KL on the union of both top-K sets, renormalised there"),
    "topk_entropy": ("H", "entropy of the student's renormalised top-K, / log K"),
    "teachability": ("D^L", "D̃·C̃: disagreement the student can take up"),
    "incompatibility": ("D^I", "D̃·(1-C̃): disagreement outside the student's top-K"),
}


@dataclass
class TokenStats:
    """Per response position statistics; every field is (N, L) (or (N, L, K)), zero where invalid."""

    valid: torch.Tensor  # (N, L) bool: the response mask
    student_token_logp: torch.Tensor  # log p_S(y_t)
    teacher_token_logp: torch.Tensor  # log p_T(y_t)
    compatibility: torch.Tensor  # C (with a top-k teacher: its lower bound, docs/method.md §2.6)
    disagreement: torch.Tensor  # D
    topk_entropy: torch.Tensor  # H
    # The top-K lists behind C, D, H: (N, L, K), only when a selector asks (`needs_topk_lists`); otherwise None,
    # so a step does not scatter and all-gather four (N, L, K) tensors nobody reads.
    student_topk_ids: torch.Tensor | None = None
    student_topk_logp: torch.Tensor | None = None
    teacher_topk_ids: torch.Tensor | None = None
    teacher_topk_logp: torch.Tensor | None = None
    student_entropy: torch.Tensor | None = None  # full-vocabulary entropy of p_S, when requested
    teacher_entropy: torch.Tensor | None = None  # full-vocabulary entropy of p_T, when requested
    forward_kl: torch.Tensor | None = None  # full-vocabulary KL(p_T || p_S), when requested
    reverse_kl: torch.Tensor | None = None  # full-vocabulary KL(p_S || p_T), when requested
    # C's upper bound; C itself where the teacher's distribution is known (the default when not given).
    compatibility_upper: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.compatibility_upper is None:
            self.compatibility_upper = self.compatibility

    @property
    def top_k(self) -> int | None:
        """K of the top-K lists, when they were computed."""
        return None if self.student_topk_ids is None else self.student_topk_ids.shape[-1]

    @staticmethod
    def cat(parts: list[TokenStats]) -> TokenStats:
        """Micro-batches' statistics stacked back into the batch's."""
        if len(parts) == 1:
            return parts[0]
        return replace(parts[0], **{f.name: torch.cat([getattr(p, f.name) for p in parts])
                                    for f in fields(parts[0]) if getattr(parts[0], f.name) is not None})

    def non_finite_models(self) -> list[str]:
        """The models ('student', 'teacher') that gave non-finite log-probs at valid positions; empty if none."""
        return [name for name, logp in (("student", self.student_token_logp), ("teacher", self.teacher_token_logp))
                if not bool(torch.isfinite(logp[self.valid]).all())]
