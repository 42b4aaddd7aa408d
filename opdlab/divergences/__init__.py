"""OPD divergences: one interface (`Divergence`), one small class per loss.

Public API (docs/api.md): the names in `__all__`, importable from `opdlab.divergences`.
"""

from opdlab.divergences.base import Divergence, LossInputs
from opdlab.divergences.full_vocab import ForwardKL, GeneralizedJSD, ReverseKL, SkewKL, TotalVariation
from opdlab.divergences.sampled_token import SampledTokenOPD
from opdlab.maths import log_softmax_fp32

__all__ = [
    "Divergence", "ForwardKL", "GeneralizedJSD", "LossInputs", "ReverseKL", "SampledTokenOPD", "SkewKL",
    "TotalVariation", "log_softmax_fp32",
]
