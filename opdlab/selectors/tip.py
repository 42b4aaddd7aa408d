"""TIP-style selectors from student entropy H̃ and disagreement D̃."""

from __future__ import annotations

import torch

from opdlab.maths import linear_quantiles
from opdlab.scoring import TokenStats
from opdlab.selectors.base import FeatureSelector, soft_or


class TipSelector(FeatureSelector):
    """Soft-OR 1 - (1 - H̃)(1 - D̃) (= H̃ + D̃ - H̃·D̃): uncertain or disagreeing positions (options: see
    `FeatureSelector`)."""

    def score(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        return soft_or(self.normalized(stats.topk_entropy, stats), self.normalized(stats.disagreement, stats))


class TipQ3Selector(FeatureSelector):
    """"Q3-only": positions with H̃ <= median and D̃ >= median (confident but disagreeing).

    Medians are over the valid positions of the batch, linearly interpolated like the q05/q95 of the
    normalisation (numpy's `median`). Q3 positions score 1 + D̃ (ranked by disagreement) and all others
    0, so the budget is spent inside Q3 first; if Q3 is smaller than the budget, the rest is filled in
    position order (the global budget rule's tie-break). Options: see `FeatureSelector`.
    """

    def score(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        valid = stats.valid
        h, d = self.normalized(stats.topk_entropy, stats), self.normalized(stats.disagreement, stats)
        if not valid.any():
            return torch.zeros_like(d)
        (h_median,), (d_median,) = linear_quantiles(h[valid], (0.5,)), linear_quantiles(d[valid], (0.5,))
        in_q3 = valid & (h <= h_median) & (d >= d_median)
        return in_q3.float() * (1 + d)
