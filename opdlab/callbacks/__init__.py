"""Training callbacks: selection metrics, teachability histograms, sampled rollouts as text, the token bank."""

from opdlab.callbacks.histograms import TeachabilityHistograms
from opdlab.callbacks.samples import RolloutSamples
from opdlab.callbacks.selection import SelectionMetrics
from opdlab.callbacks.token_bank import TokenBank

__all__ = ["RolloutSamples", "SelectionMetrics", "TeachabilityHistograms", "TokenBank"]
