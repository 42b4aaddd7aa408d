"""TA-OPD and its decompositions: scores built from D̃ (disagreement) and C̃ (compatibility).

TA-OPD (arXiv 2605.26844) keeps *learnable* disagreement: positions where teacher and student disagree
(high D) while the teacher puts its mass on the student's own top-K candidates (high C), so the student
can move there. D^I = D̃ · (1 - C̃) is the complementary, incompatible part.
"""

from __future__ import annotations

import torch

from opdlab.scoring import TokenStats
from opdlab.selectors.base import Normalization, TokenSelector, check_top_k, normalize_scores


class _DCSelector(TokenSelector):
    """Shared constructor of the D/C family (interface plumbing only, no behaviour)."""

    def __init__(self, ratio: float = 0.05, top_k: int = 16, normalization: Normalization = "quantile") -> None:
        super().__init__(ratio)
        self.top_k, self.normalization = check_top_k(top_k), normalization

    def _norm(self, x: torch.Tensor, stats: TokenStats) -> torch.Tensor:
        return normalize_scores(x, stats.valid, self.normalization)


class TeachabilitySelector(_DCSelector):
    """TA-OPD: score D^L = D̃ · C̃ (learnable disagreement)."""

    def score(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._norm(stats.union_kl, stats) * self._norm(stats.compat, stats)


class IncompatibleSelector(_DCSelector):
    """Score D^I = D̃ · (1 - C̃) (disagreement the student cannot easily follow)."""

    def score(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._norm(stats.union_kl, stats) * (1 - self._norm(stats.compat, stats)) * stats.valid


class CompatibilitySelector(_DCSelector):
    """Score C̃ alone (teacher mass on the student's top-K)."""

    def score(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._norm(stats.compat, stats)


class TeachabilityEntropySelector(_DCSelector):
    """Soft-OR of H̃ and X, X = the normalised raw product D · C (not D̃ · C̃): H̃ + X - H̃ · X."""

    def score(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        h = self._norm(stats.topk_entropy, stats)
        x = self._norm(stats.union_kl * stats.compat, stats)
        return h + x - h * x
