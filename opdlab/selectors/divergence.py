"""`divergence`: keep the positions of largest raw teacher-student disagreement (D̃)."""

from __future__ import annotations

import torch

from opdlab.scoring import TokenStats
from opdlab.selectors.base import Normalization, TokenSelector, check_top_k, normalize_scores


class DivergenceSelector(TokenSelector):
    """Score D̃, the union top-K forward KL; `full_vocab=True` uses the full-vocabulary KL(p_T || p_S)."""

    def __init__(
        self, ratio: float = 0.05, top_k: int = 16, full_vocab: bool = False, normalization: Normalization = "quantile"
    ) -> None:
        super().__init__(ratio)
        self.top_k, self.full_vocab, self.normalization = check_top_k(top_k), full_vocab, normalization

    @property
    def needs_full_kl(self) -> bool:  # type: ignore[override]
        return self.full_vocab

    def score(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        raw = stats.forward_kl if self.full_vocab else stats.union_kl
        return normalize_scores(raw, stats.valid, self.normalization)
