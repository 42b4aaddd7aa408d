"""TA-OPD and its decompositions: scores built from D̃ (disagreement) and C̃ (compatibility).

TA-OPD (arXiv 2605.26844) keeps *learnable* disagreement: positions where teacher and student disagree
(high D) while the teacher puts its mass on the student's own top-K candidates (high C), so the student
can move there. D^I = D̃ · (1 - C̃) is the complementary, incompatible part.
"""

from __future__ import annotations

import torch

from opdlab.scoring import TokenStats
from opdlab.selectors.base import FeatureSelector, Normalization, normalize_scores, soft_or


def teachability_features(stats: TokenStats, normalization: Normalization = "quantile") -> dict[str, torch.Tensor]:
    """The features of `opdlab.scoring.FEATURES`, each (N, L) and zero at invalid positions.

    compatibility (C), disagreement (D) and topk_entropy (H) are the raw per-position values;
    teachability D^L = D̃ · C̃ and incompatibility D^I = D̃ · (1 - C̃) use the batch normalisation of the
    selectors, so callbacks see what selection saw.
    """
    d = normalize_scores(stats.disagreement, stats.valid, normalization)
    c = normalize_scores(stats.compatibility, stats.valid, normalization)
    valid = stats.valid.float()
    return {
        "compatibility": stats.compatibility * valid,
        "disagreement": stats.disagreement * valid,
        "topk_entropy": stats.topk_entropy * valid,
        "teachability": d * c,
        "incompatibility": d * (1 - c) * valid,
    }


class TeachabilitySelector(FeatureSelector):
    """TA-OPD: score D^L = D̃ · C̃ (learnable disagreement). Options: see `FeatureSelector`."""

    def score(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        return teachability_features(stats, self.normalization)["teachability"]


class IncompatibleSelector(FeatureSelector):
    """Score D^I = D̃ · (1 - C̃) (disagreement the student cannot easily follow)."""

    def score(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        return teachability_features(stats, self.normalization)["incompatibility"]


class CompatibilitySelector(FeatureSelector):
    """Score C̃ alone (teacher mass on the student's top-K)."""

    def score(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.normalized(stats.compatibility, stats)


class TeachabilityEntropySelector(FeatureSelector):
    """Soft-OR of H̃ and X, X = the normalised raw product D · C (not D̃ · C̃): 1 - (1 - H̃)(1 - X)."""

    def score(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        h = self.normalized(stats.topk_entropy, stats)
        x = self.normalized(stats.disagreement * stats.compatibility, stats)
        return soft_or(h, x)
