"""`entropy`: keep positions where the student is most uncertain among its top-K (H̃)."""

from __future__ import annotations

import torch

from opdlab.scoring import TokenStats
from opdlab.selectors.base import Normalization, TokenSelector, check_normalization, check_top_k, normalize_scores


class EntropySelector(TokenSelector):
    """Score H̃: normalised entropy of the student's renormalised top-K distribution.

    Args:
        ratio: fraction of valid response tokens to keep, in (0, 1].
        top_k: K of the student top-K set whose entropy H is.
        normalization: batch normalisation of H: quantile (q05/q95, the paper's), minmax, none.
        per_response_floor: keep at least one position of every non-empty response (see `TokenSelector`).
    """

    def __init__(self, ratio: float = 0.05, top_k: int = 16, normalization: Normalization = "quantile",
                 per_response_floor: bool = True) -> None:
        super().__init__(ratio, per_response_floor)
        self.top_k, self.normalization = check_top_k(top_k), check_normalization(normalization)

    def score(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        return normalize_scores(stats.topk_entropy, stats.valid, self.normalization)
