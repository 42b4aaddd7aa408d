"""OPD divergences: one interface (`Divergence`), one small class per loss."""

from opdlab.divergences.base import Divergence, LossInputs
from opdlab.divergences.full_vocab import ForwardKL, GeneralizedJSD, ReverseKL, SkewKL, TotalVariation
from opdlab.divergences.sampled_token import SampledTokenOPD

__all__ = [
    "Divergence", "ForwardKL", "GeneralizedJSD", "LossInputs", "ReverseKL", "SampledTokenOPD", "SkewKL",
    "TotalVariation",
]
