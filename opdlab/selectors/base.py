"""The TokenSelector interface, score normalisation, and the global budget rule.

A selector turns `TokenStats` into a score per position (higher = keep first); `apply_budget` is the
one place that turns scores into a keep mask (docs/method.md §2.4):

- the budget is global over the rollout batch: keep the top ceil(ratio · N_valid) valid positions;
- ties are broken by flat position (sequence-major, then position), via a stable sort;
- then every non-empty response that got nothing keeps its best-scoring position.
Unkept positions stay in the context; they only get no loss.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import torch

from opdlab import maths
from opdlab.chunks import TOP_K
from opdlab.token_stats import TokenStats

Normalization = Literal["quantile", "minmax", "none"]


def budget_size(ratio: float, n_valid: int) -> int:
    """ceil(ratio · n_valid), robust to float error (0.05 · 640 is 32, not 33)."""
    return min(n_valid, math.ceil(round(ratio * n_valid, 6)))


def normalize_scores(x: torch.Tensor, valid: torch.Tensor, method: Normalization = "quantile") -> torch.Tensor:
    """Normalise x over the valid positions of the batch; invalid positions become 0.

    quantile: clip((x - q05) / (q95 - q05), 0, 1) with linearly interpolated quantiles;
    minmax: (x - min) / (max - min); none: x unchanged. A spread below 1e-12 gives all zeros.
    """
    check_normalization(method)
    x, valid = x.float(), valid.bool()
    values = x[valid]
    if method == "none" or values.numel() == 0:
        return torch.where(valid, x, torch.zeros_like(x))
    lo, hi = maths.linear_quantiles(values, (0.05, 0.95)) if method == "quantile" else (values.min(), values.max())
    spread = hi - lo
    if spread < 1e-12:
        return torch.zeros_like(x)
    return torch.where(valid, ((x - lo) / spread).clamp(0.0, 1.0), torch.zeros_like(x))


def soft_or(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a OR b for scores in [0, 1]: 1 - (1 - a)(1 - b). Equal to a + b - ab, but a true 1 stays exactly 1
    (a + b - ab rounds 1 + 0.3 - 0.3 to 0.99999994 in fp32, and ties at the top would then be broken by
    rounding instead of by position as the budget rule promises)."""
    return 1 - (1 - a) * (1 - b)


def apply_budget(
    scores: torch.Tensor, valid: torch.Tensor, ratio: float, per_response_floor: bool = True
) -> torch.Tensor:
    """Keep mask (N, L) of the top ceil(ratio · N_valid) valid positions, plus (with `per_response_floor`,
    the rule of docs/method.md §2.4) the best position of every non-empty row that got none."""
    valid = valid.bool()
    # NaN and -inf scores rank last among valid positions, but still above invalid ones.
    lowest = torch.finfo(torch.float32).min
    scores = scores.float().nan_to_num(nan=lowest, neginf=lowest).masked_fill(~valid, float("-inf"))
    flat_valid = valid.flatten()
    rows = flat_valid.nonzero().squeeze(-1)  # (R,) flat indices, in position order
    keep = torch.zeros_like(flat_valid)
    k = budget_size(ratio, rows.numel())
    if k > 0:
        order = torch.sort(scores.flatten()[rows], descending=True, stable=True).indices[:k]
        keep[rows[order]] = True
    keep = keep.view_as(valid)
    if not per_response_floor:
        return keep
    starved = valid.any(1) & ~keep.any(1)  # (N,) non-empty responses that got nothing
    if starved.any():
        # argmax returns the first maximum, so ties again go to the earliest position.
        best = scores[starved].argmax(1)
        keep[starved.nonzero().squeeze(-1), best] = True
    return keep


class TokenSelector(ABC):
    """Chooses which response positions receive the OPD loss.

    Subclasses implement `score`; `select` applies the shared budget rule. Class attributes tell the
    scoring pass what to compute: `top_k` (K of the top-K features), `needs_full_kl` and
    `needs_full_entropy` (the full-vocabulary KLs / entropies: extra passes over every chunk's logits),
    `needs_topk_lists` (both models' top-K ids and log-probs per position, (N, L, K) each: gathered across ranks
    every step, so None unless asked). `teacher_needs` says what of the teacher the scores read, so a teacher
    placement that cannot give it is refused before training (`opdlab.teachers.signal`).

    Args:
        ratio: fraction of valid response tokens to keep, in (0, 1].
        per_response_floor: also keep the best position of every non-empty response that got none (the
            budget rule of docs/method.md §2.4, the default). With short responses this dominates small
            budgets (4-5-token toy answers: "5%" keeps ~20%); False keeps exactly ceil(ratio · valid
            tokens) over the batch, so some responses get no loss at all.
    """

    top_k: int = TOP_K
    needs_full_kl: ClassVar[bool] = False
    needs_full_entropy: ClassVar[bool] = False
    needs_topk_lists: ClassVar[bool] = False

    def __init__(self, ratio: float = 1.0, per_response_floor: bool = True) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}; e.g. 0.05 keeps 5% of response tokens")
        self.ratio, self.per_response_floor = ratio, per_response_floor

    @property
    def teacher_needs(self) -> str:
        """What of the teacher the scores read: "none", "token", "topk" (the top-K features C and D, which a
        teacher sending its top-k log-probs approximates) or "full" (full-vocabulary statistics). Default:
        "full" when the selector asks for full-vocabulary KLs or entropies, else "topk". A class attribute of
        the same name overrides it."""
        return "full" if self.needs_full_kl or self.needs_full_entropy else "topk"

    @property
    def keeps_every_valid_position(self) -> bool:
        """Whether `select` keeps every valid position whatever the scores (ratio 1 under the shared budget
        rule): the training step then computes the loss in the scoring pass (`opdlab.step.StepPlan`). A
        selector that overrides `select` must override this too."""
        return self.ratio >= 1.0 and type(self).select is TokenSelector.select

    @abstractmethod
    def score(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N, L) scores; higher is kept first. Values at invalid positions are ignored."""

    def select(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N, L) bool keep mask, a subset of `stats.valid`."""
        return apply_budget(self.score(stats, generator), stats.valid, self.ratio, self.per_response_floor)


class FeatureSelector(TokenSelector):
    """Shared constructor of the selectors scored from the top-K features (C, D, H of docs/method.md §2),
    each normalised over the batch (§2.1).

    Args:
        ratio: fraction of valid response tokens to keep, in (0, 1].
        top_k: K of the student/teacher top-K sets behind the features.
        normalization: batch normalisation of each feature: quantile (q05/q95, the paper's), minmax, none.
        per_response_floor: keep at least one position of every non-empty response (see `TokenSelector`).
    """

    def __init__(self, ratio: float = 0.05, top_k: int = TOP_K, normalization: Normalization = "quantile",
                 per_response_floor: bool = True) -> None:
        super().__init__(ratio, per_response_floor)
        self.top_k, self.normalization = check_top_k(top_k), check_normalization(normalization)

    def normalized(self, x: torch.Tensor, stats: TokenStats) -> torch.Tensor:
        return normalize_scores(x, stats.valid, self.normalization)


def check_normalization(method: str) -> str:
    if method not in ("quantile", "minmax", "none"):
        raise ValueError(f"normalization must be 'quantile', 'minmax' or 'none', got {method!r}")
    return method


def check_top_k(top_k: int) -> int:
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    return top_k

# Moved in 0.2.0; the old path warns and works until 0.3.0.
from opdlab._deprecation import moved_names  # noqa: E402

__getattr__ = moved_names(__name__, {"linear_quantiles": "opdlab.maths:linear_quantiles"})
