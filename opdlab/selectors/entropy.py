"""`entropy`: keep positions where the student is most uncertain among its top-K (H̃)."""

from __future__ import annotations

import torch

from opdlab.scoring import TokenStats
from opdlab.selectors.base import FeatureSelector


class EntropySelector(FeatureSelector):
    """Score H̃: normalised entropy of the student's renormalised top-K distribution (options: see
    `FeatureSelector`)."""

    teacher_needs = "none"  # the student's top-K alone

    def score(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.normalized(stats.topk_entropy, stats)
