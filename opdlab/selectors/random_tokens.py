"""`random`: a uniformly random subset of positions (the budget-matched control)."""

from __future__ import annotations

import torch

from opdlab.scoring import TokenStats
from opdlab.selectors.base import TokenSelector


class RandomSelector(TokenSelector):
    """Uniform random scores from the step's seeded generator."""

    def score(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.rand(stats.valid.shape, generator=generator, device="cpu").to(stats.valid.device)
