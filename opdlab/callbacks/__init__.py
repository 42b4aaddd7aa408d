"""Training callbacks: selection metrics, teachability histograms, the token bank."""

from opdlab.callbacks.selection import SelectionMetrics

__all__ = ["SelectionMetrics"]
