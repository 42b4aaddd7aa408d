"""TIP-style selectors from student entropy H̃ and disagreement D̃."""

from __future__ import annotations

import torch

from opdlab.scoring import TokenStats
from opdlab.selectors.base import Normalization, TokenSelector, check_top_k, normalize_scores


class TipSelector(TokenSelector):
    """Soft-OR H̃ + D̃ - H̃ · D̃: uncertain or disagreeing positions."""

    def __init__(self, ratio: float = 0.05, top_k: int = 16, normalization: Normalization = "quantile") -> None:
        super().__init__(ratio)
        self.top_k, self.normalization = check_top_k(top_k), normalization

    def score(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        h = normalize_scores(stats.topk_entropy, stats.valid, self.normalization)
        d = normalize_scores(stats.union_kl, stats.valid, self.normalization)
        return h + d - h * d


class TipQ3Selector(TipSelector):
    """"Q3-only": positions with H̃ <= median and D̃ >= median (confident but wrong).

    Q3 positions score 1 + D̃ (ranked by disagreement) and all others 0, so the budget is spent inside
    Q3 first; if Q3 is smaller than the budget, the rest is filled in position order.
    """

    def score(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        h = normalize_scores(stats.topk_entropy, stats.valid, self.normalization)
        d = normalize_scores(stats.union_kl, stats.valid, self.normalization)
        if not stats.valid.any():
            return torch.zeros_like(d)
        in_q3 = stats.valid & (h <= h[stats.valid].median()) & (d >= d[stats.valid].median())
        return in_q3.float() * (1 + d)
