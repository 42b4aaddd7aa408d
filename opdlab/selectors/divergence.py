"""`divergence`: keep the positions of largest raw teacher-student disagreement (D̃)."""

from __future__ import annotations

import torch

from opdlab.chunks import TOP_K
from opdlab.scoring import TokenStats
from opdlab.selectors.base import Normalization, TokenSelector, check_normalization, check_top_k, normalize_scores


class DivergenceSelector(TokenSelector):
    """Score D̃, the union top-K forward KL; `full_vocab=True` uses the full-vocabulary KL(p_T || p_S).

    Args:
        ratio: fraction of valid response tokens to keep, in (0, 1].
        top_k: K of the student/teacher top-K sets whose union D is computed on.
        full_vocab: score the full-vocabulary forward KL instead of the union top-K KL.
        normalization: batch normalisation of D: quantile (q05/q95, the paper's), minmax, none.
        per_response_floor: keep at least one position of every non-empty response (see `TokenSelector`).
    """

    def __init__(
        self, ratio: float = 0.05, top_k: int = TOP_K, full_vocab: bool = False, normalization: Normalization = "quantile",
        per_response_floor: bool = True,
    ) -> None:
        super().__init__(ratio, per_response_floor)
        self.top_k, self.full_vocab = check_top_k(top_k), full_vocab
        self.normalization = check_normalization(normalization)

    @property
    def needs_full_kl(self) -> bool:  # type: ignore[override]
        return self.full_vocab

    def score(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.full_vocab and stats.forward_kl is None:
            raise ValueError("full_vocab=True needs TokenStats with forward_kl: compute_token_stats(..., full_kl=True)")
        raw = stats.forward_kl if self.full_vocab else stats.disagreement
        return normalize_scores(raw, stats.valid, self.normalization)
