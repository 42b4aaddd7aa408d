"""`random`: a uniformly random subset of positions (the budget-matched control)."""

from __future__ import annotations

import torch

from opdlab.scoring import TokenStats
from opdlab.selectors.base import TokenSelector


class RandomSelector(TokenSelector):
    """Uniform random scores from the step's seeded generator (the same seed keeps the same positions).

    Args:
        ratio: fraction of valid response tokens to keep, in (0, 1].
        per_response_floor: keep at least one position of every non-empty response (see `TokenSelector`).
    """

    teacher_needs = "none"

    def __init__(self, ratio: float = 0.05, per_response_floor: bool = True) -> None:
        super().__init__(ratio, per_response_floor)

    def score(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        # Drawn on the CPU so that a CPU generator gives the same subset on any device.
        return torch.rand(stats.valid.shape, generator=generator, device="cpu").to(stats.valid.device)
