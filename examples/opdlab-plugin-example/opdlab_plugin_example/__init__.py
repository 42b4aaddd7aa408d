"""An example opdlab plugin package: one token selector, registered through an entry point.

Importing this module has no side effects: it only defines the class. opdlab imports it when it
discovers the `opdlab.selectors` entry point declared in this package's pyproject.toml.
"""

from __future__ import annotations

from typing import Literal

import torch

from opdlab.selectors import TokenSelector, TokenStats, normalize_scores

__all__ = ["LowConfidenceSelector"]


class LowConfidenceSelector(TokenSelector):
    """Keep the positions where the student was least confident in the token it sampled.

    Score: normalised surprisal -log p_S(y_t) of the sampled token (higher = less confident = kept first).
    The budget rule (global top ceil(ratio · N_valid), ties by position, at least one per response) is
    inherited from `TokenSelector.select`.

    Args:
        ratio: fraction of valid response tokens to keep, in (0, 1].
        normalization: batch normalisation of the surprisal: quantile (q05/q95), minmax, none.
        per_response_floor: keep at least one position of every non-empty response (see `TokenSelector`).
    """

    top_k = 1  # uses no top-K feature: ask the scoring pass for the cheapest K

    def __init__(self, ratio: float = 0.05, normalization: Literal["quantile", "minmax", "none"] = "quantile",
                 per_response_floor: bool = True) -> None:
        super().__init__(ratio, per_response_floor)
        self.normalization = normalization

    def score(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        return normalize_scores(-stats.student_token_logp, stats.valid, self.normalization)
