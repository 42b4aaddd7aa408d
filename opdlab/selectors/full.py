"""`full`: every valid response position (the full-token OPD baseline)."""

from __future__ import annotations

import torch

from opdlab.scoring import TokenStats
from opdlab.selectors.base import TokenSelector


class FullSelector(TokenSelector):
    """Keep every valid position; `ratio` is fixed at 1."""

    teacher_needs = "none"

    def __init__(self) -> None:
        super().__init__(ratio=1.0)

    def score(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        return stats.valid.float()

    def select(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        return stats.valid.clone()

    @property
    def keeps_every_valid_position(self) -> bool:
        return True
