"""Training callbacks: the fit summary, selection metrics, teachability histograms, sampled rollouts as text, the token bank."""

from opdlab.callbacks.histograms import TeachabilityHistograms
from opdlab.callbacks.samples import RolloutSamples
from opdlab.callbacks.selection import SelectionMetrics
from opdlab.callbacks.summary import FitSummary
from opdlab.callbacks.token_bank import TokenBank

__all__ = ["FitSummary", "RolloutSamples", "SelectionMetrics", "TeachabilityHistograms", "TokenBank"]
