"""One constant per default (opdlab.chunks): K of the top-K sets, the scoring chunk and whether the full-vocabulary
entropies are computed are written once, and every option, function and doc that has a default uses it."""

from __future__ import annotations

import inspect

import pytest
from conftest import REPO_ROOT

from opdlab import plugins
from opdlab.chunks import FULL_ENTROPY, SCORE_CHUNK_ROWS, TOP_K, Scoring
from opdlab.diagnose import diagnose
from opdlab.diagnostics.bank import BankOptions
from opdlab.options import MemoryOptions
from opdlab.scoring import chunk_stats, compute_token_stats, scatter_rows


def default_of(function, name: str):
    return inspect.signature(function).parameters[name].default


def test_options_and_functions_take_the_one_default():
    assert MemoryOptions().chunk_size == SCORE_CHUNK_ROWS
    assert Scoring() == Scoring(TOP_K, False, FULL_ENTROPY, False)
    assert default_of(compute_token_stats, "top_k") == default_of(chunk_stats, "k") == TOP_K
    assert default_of(compute_token_stats, "chunk_size") == default_of(diagnose, "chunk_size") == SCORE_CHUNK_ROWS
    for function in (compute_token_stats, chunk_stats, scatter_rows):
        assert default_of(function, "full_entropy") is FULL_ENTROPY, function.__name__
    assert BankOptions().top_k == TOP_K


BUILT_IN = sorted(n for n, p in plugins.discover("opdlab.selectors").items() if p.package == plugins.BUILTIN_PACKAGE)


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_built_in_selector_defaults_to_the_one_k(name):
    selector = plugins.discover("opdlab.selectors")[name].cls()
    assert selector.top_k == TOP_K


def test_the_docs_state_the_defaults():
    method = (REPO_ROOT / "docs" / "method.md").read_text()
    assert f"with K = {TOP_K} by default (`top_k`)" in method
    assert f"`memory.chunk_size` rows, default {SCORE_CHUNK_ROWS}" in method
