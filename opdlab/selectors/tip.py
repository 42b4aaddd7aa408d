"""TIP-style selectors from student entropy H̃ and disagreement D̃."""

from __future__ import annotations

import torch

from opdlab.scoring import TokenStats
from opdlab.selectors.base import (
    Normalization, TokenSelector, check_normalization, check_top_k, linear_quantiles, normalize_scores, soft_or,
)


class TipSelector(TokenSelector):
    """Soft-OR 1 - (1 - H̃)(1 - D̃) (= H̃ + D̃ - H̃·D̃): uncertain or disagreeing positions.

    Args:
        ratio: fraction of valid response tokens to keep, in (0, 1].
        top_k: K of the top-K sets behind H and D.
        normalization: batch normalisation of H and D: quantile (q05/q95), minmax, none.
        per_response_floor: keep at least one position of every non-empty response (see `TokenSelector`).
    """

    def __init__(self, ratio: float = 0.05, top_k: int = 16, normalization: Normalization = "quantile",
                 per_response_floor: bool = True) -> None:
        super().__init__(ratio, per_response_floor)
        self.top_k, self.normalization = check_top_k(top_k), check_normalization(normalization)

    def score(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        h = normalize_scores(stats.topk_entropy, stats.valid, self.normalization)
        d = normalize_scores(stats.disagreement, stats.valid, self.normalization)
        return soft_or(h, d)


class TipQ3Selector(TokenSelector):
    """"Q3-only": positions with H̃ <= median and D̃ >= median (confident but disagreeing).

    Medians are over the valid positions of the batch, linearly interpolated like the q05/q95 of the
    normalisation (numpy's `median`). Q3 positions score 1 + D̃ (ranked by disagreement) and all others
    0, so the budget is spent inside Q3 first; if Q3 is smaller than the budget, the rest is filled in
    position order (the global budget rule's tie-break).

    Args:
        ratio: fraction of valid response tokens to keep, in (0, 1].
        top_k: K of the top-K sets behind H and D.
        normalization: batch normalisation of H and D: quantile (q05/q95), minmax, none.
        per_response_floor: keep at least one position of every non-empty response (see `TokenSelector`).
    """

    def __init__(self, ratio: float = 0.05, top_k: int = 16, normalization: Normalization = "quantile",
                 per_response_floor: bool = True) -> None:
        super().__init__(ratio, per_response_floor)
        self.top_k, self.normalization = check_top_k(top_k), check_normalization(normalization)

    def score(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        valid = stats.valid
        h = normalize_scores(stats.topk_entropy, valid, self.normalization)
        d = normalize_scores(stats.disagreement, valid, self.normalization)
        if not valid.any():
            return torch.zeros_like(d)
        (h_median,), (d_median,) = linear_quantiles(h[valid], (0.5,)), linear_quantiles(d[valid], (0.5,))
        in_q3 = valid & (h <= h_median) & (d >= d_median)
        return in_q3.float() * (1 + d)
