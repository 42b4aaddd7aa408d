"""Token-selection policies: one interface (`TokenSelector`), one small class per policy.

Public API (docs/api.md): the names in `__all__`, importable from `opdlab.selectors`.
"""

from opdlab.scoring import TokenStats
from opdlab.selectors.base import FeatureSelector, TokenSelector, apply_budget, budget_size, normalize_scores
from opdlab.selectors.divergence import DivergenceSelector
from opdlab.selectors.entropy import EntropySelector
from opdlab.selectors.full import FullSelector
from opdlab.selectors.random_tokens import RandomSelector
from opdlab.selectors.teachability import (
    CompatibilitySelector,
    IncompatibleSelector,
    TeachabilityEntropySelector,
    TeachabilitySelector,
)
from opdlab.selectors.tip import TipQ3Selector, TipSelector

__all__ = [
    "CompatibilitySelector", "DivergenceSelector", "EntropySelector", "FeatureSelector", "FullSelector",
    "IncompatibleSelector",
    "RandomSelector", "TeachabilityEntropySelector", "TeachabilitySelector", "TipQ3Selector", "TipSelector",
    "TokenSelector", "TokenStats", "apply_budget", "budget_size", "normalize_scores",
]
