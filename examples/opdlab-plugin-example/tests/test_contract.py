"""The plugin's own tests: opdlab's contract checks, importable from an installed opdlab."""

from opdlab.testing import check_selector
from opdlab_plugin_example import LowConfidenceSelector


def test_low_confidence_meets_the_selector_contract():
    check_selector(LowConfidenceSelector)
