"""Training callbacks: selection metrics, teachability histograms, the token bank."""

from opdlab.callbacks.histograms import TeachabilityHistograms
from opdlab.callbacks.selection import SelectionMetrics
from opdlab.callbacks.token_bank import TokenBank

__all__ = ["SelectionMetrics", "TeachabilityHistograms", "TokenBank"]
