"""Selectors: the contract every registered selector must meet, and hand-computed cases of docs/method.md §2.

The contract tests are parametrised over the registry (`opdlab.plugins.discover`), so an installed
plugin selector is tested by them too.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opdlab import plugins
from opdlab.scoring import TokenStats, Workspace, chunk_stats
from opdlab.selectors import (
    CompatibilitySelector,
    DivergenceSelector,
    EntropySelector,
    IncompatibleSelector,
    TeachabilityEntropySelector,
    TeachabilitySelector,
    TipQ3Selector,
    TipSelector,
    TokenSelector,
    apply_budget,
    budget_size,
    normalize_scores,
)
from opdlab.testing import (
    LENGTHS,
    check_all_masked,
    check_budget,
    check_deterministic,
    check_scores_finite,
    check_selector,
    make_selector,
    synthetic_stats,
    valid_mask,
)

SELECTORS = plugins.discover("opdlab.selectors")
# The contract helpers ship in opdlab.testing (plugin packages call them from their own tests); the
# statistics are built as a training step builds them for each selector.
def reference_budget(scores: torch.Tensor, valid: torch.Tensor, ratio: float) -> np.ndarray:
    """docs/method.md §2 in numpy: top ceil(ratio·N_valid) by score, ties by flat position, then one per response."""
    s = np.nan_to_num(scores.double().numpy(), nan=-np.inf).ravel()
    v = valid.numpy().ravel()
    idx = np.flatnonzero(v)
    keep = np.zeros_like(v)
    k = budget_size(ratio, idx.size)
    order = np.lexsort((idx, -s[idx]))[:k]  # primary key -score, then position
    keep[idx[order]] = True
    keep = keep.reshape(valid.shape)
    for row in range(valid.shape[0]):
        if valid[row].any() and not keep[row].any():
            cols = np.flatnonzero(valid[row].numpy())
            keep[row, cols[np.argmax(s.reshape(valid.shape)[row, cols])]] = True
    return keep


# --------------------------------------------------------------------------------------------- contract
@pytest.fixture(params=sorted(SELECTORS), ids=str)
def selector_cls(request) -> type[TokenSelector]:
    return SELECTORS[request.param].cls


@pytest.mark.parametrize("ratio", [0.05, 0.3, 1.0])
def test_contract_shape_subset_budget(selector_cls, ratio):
    valid = valid_mask()
    selector = make_selector(selector_cls, ratio)
    stats = synthetic_stats(selector, valid)
    keep = check_budget(selector, stats)
    if type(selector).select is TokenSelector.select:  # the shared budget rule: exact set, forced minimum included
        scores = selector.score(stats, generator=torch.Generator().manual_seed(3))
        assert np.array_equal(keep.numpy(), reference_budget(scores, valid, selector.ratio))


def test_contract_deterministic_under_seed(selector_cls):
    selector = make_selector(selector_cls, 0.3)
    check_deterministic(selector, synthetic_stats(selector, valid_mask()))


def test_contract_all_masked_batch(selector_cls):
    check_all_masked(selector_cls)


@pytest.mark.parametrize("case", ["random", "student_equals_teacher", "neg_inf_logits"])
def test_contract_scores_nan_free(selector_cls, case):
    selector = make_selector(selector_cls, 0.05)
    check_scores_finite(selector, synthetic_stats(selector, valid_mask(), same=case == "student_equals_teacher",
                                                  neg_inf=case == "neg_inf_logits"))


def test_contract_stats_are_built_as_in_training():
    """A selector that does not ask for the full entropies gets None there, as in `fit` (a plugin reading
    them used to pass these tests, whose stats always had them, and crash in training)."""
    stats = synthetic_stats(TeachabilitySelector(), valid_mask())
    assert stats.student_entropy is None and stats.teacher_entropy is None

    class NeedsEntropy(TeachabilitySelector):
        needs_full_entropy = True

        def score(self, stats, generator=None):
            return stats.student_entropy

    assert synthetic_stats(NeedsEntropy(), valid_mask()).student_entropy is not None
    check_selector(NeedsEntropy)

    class ReadsEntropyWithoutAsking(TeachabilitySelector):
        def score(self, stats, generator=None):
            return stats.student_entropy * 2

    with pytest.raises(TypeError):
        check_selector(ReadsEntropyWithoutAsking)


def test_registry_has_every_builtin():
    builtins = {name for name, p in SELECTORS.items() if p.package == "opdlab"}
    assert builtins == {
        "full", "random", "entropy", "divergence", "teachability", "incompatible", "compatibility", "tip", "tip_q3",
        "teachability_entropy",
    }


def test_invalid_arguments_fail_with_what_to_do():
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\], got 1.5"):
        TeachabilitySelector(ratio=1.5)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        EntropySelector(top_k=0)
    with pytest.raises(ValueError, match="normalization must be"):
        TipSelector(normalization="zscore")


# --------------------------------------------------------------------------------------------- C, D, H by hand
def stats_of(p_s: list[float], p_t: list[float], k: int) -> dict:
    """The statistics of one position whose student/teacher distributions are exactly p_s, p_t."""
    s_logits = torch.tensor([p_s]).log()
    t_logits = torch.tensor([p_t]).log()
    return chunk_stats(s_logits, t_logits, torch.tensor([0]), k, full_kl=True, work=Workspace(1))


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def test_compat_is_teacher_mass_on_student_topk():
    out = stats_of([0.4, 0.3, 0.2, 0.05, 0.05], [0.1, 0.5, 0.05, 0.3, 0.05], k=2)  # S = {0, 1}
    assert out["compatibility"].item() == pytest.approx(0.1 + 0.5, abs=1e-6)
    out = stats_of([0.4, 0.3, 0.2, 0.05, 0.05], [0.1, 0.5, 0.05, 0.3, 0.05], k=3)  # S = {0, 1, 2}
    assert out["compatibility"].item() == pytest.approx(0.65, abs=1e-6)
    out = stats_of([0.05, 0.05, 0.1, 0.4, 0.4], [0.5, 0.5, 0.0, 0.0, 0.0], k=2)  # disjoint: no teacher mass
    assert out["compatibility"].item() == pytest.approx(0.0, abs=1e-6)


def test_union_kl_partial_overlap():
    p_s = [0.4, 0.3, 0.2, 0.05, 0.05]
    p_t = [0.1, 0.5, 0.05, 0.3, 0.05]
    # K = 2: S = {0, 1}, T = {1, 3} overlap in token 1, U = {0, 1, 3}; both renormalised over U.
    u = [0, 1, 3]
    bar_t = [p_t[i] / sum(p_t[j] for j in u) for i in u]
    bar_s = [p_s[i] / sum(p_s[j] for j in u) for i in u]
    out = stats_of(p_s, p_t, k=2)
    assert out["disagreement"].item() == pytest.approx(kl(bar_t, bar_s), rel=1e-5)
    assert out["forward_kl"].item() == pytest.approx(kl(p_t, p_s), rel=1e-5)  # the full-vocabulary variant


def test_union_kl_identical_and_disjoint_sets():
    p = [0.5, 0.3, 0.1, 0.05, 0.05]
    assert stats_of(p, p, k=2)["disagreement"].item() == pytest.approx(0.0, abs=1e-7)
    p_s = [0.45, 0.45, 0.04, 0.03, 0.03]
    p_t = [0.03, 0.03, 0.04, 0.45, 0.45]  # S = {0, 1}, T = {3, 4}: U has 4 tokens
    u = [0, 1, 3, 4]
    bar_t = [p_t[i] / sum(p_t[j] for j in u) for i in u]
    bar_s = [p_s[i] / sum(p_s[j] for j in u) for i in u]
    assert stats_of(p_s, p_t, k=2)["disagreement"].item() == pytest.approx(kl(bar_t, bar_s), rel=1e-5)


def test_topk_entropy_is_normalised():
    assert stats_of([0.3, 0.3, 0.2, 0.1, 0.1], [0.2] * 5, k=2)["topk_entropy"].item() == pytest.approx(1.0, abs=1e-6)
    renorm = [3 / 8, 3 / 8, 2 / 8]  # top-3 of the same student, renormalised over S
    expected = -sum(p * math.log(p) for p in renorm) / math.log(3)
    top3 = stats_of([0.3, 0.3, 0.2, 0.1, 0.1], [0.2] * 5, k=3)["topk_entropy"].item()
    assert top3 == pytest.approx(expected, rel=1e-5)
    assert stats_of([0.3, 0.3, 0.2, 0.1, 0.1], [0.2] * 5, k=1)["topk_entropy"].item() == 0.0


# --------------------------------------------------------------------------------------------- normalisation
def np_quantile_norm(x: np.ndarray) -> np.ndarray:
    lo, hi = np.quantile(x, [0.05, 0.95])  # numpy's default method is linear interpolation
    return np.zeros_like(x) if hi - lo < 1e-12 else np.clip((x - lo) / (hi - lo), 0, 1)


def test_quantile_normalisation_by_hand():
    x = torch.arange(21.0)[None]  # q05 = 1 (position 0.05·20 = 1), q95 = 19
    valid = torch.ones_like(x, dtype=torch.bool)
    expected = ((x - 1) / 18).clamp(0, 1)
    torch.testing.assert_close(normalize_scores(x, valid), expected)
    # Interpolation between order statistics: 11 values, q05 at position 0.5, q95 at 9.5.
    x = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 20]])
    lo, hi = 0.5, 9 + 0.5 * 11
    valid = torch.ones_like(x, dtype=torch.bool)
    torch.testing.assert_close(normalize_scores(x, valid), ((x - lo) / (hi - lo)).clamp(0, 1))


def test_quantile_normalisation_matches_numpy_and_ignores_invalid():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 20, generator=gen).exp()
    valid = valid_mask(LENGTHS, 20)
    x_with_junk = torch.where(valid, x, torch.full_like(x, 1e6))  # invalid positions must not move quantiles
    out = normalize_scores(x_with_junk, valid)
    expected = np_quantile_norm(x[valid].double().numpy())
    np.testing.assert_allclose(out[valid].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert (out[~valid] == 0).all()


def test_normalisation_degenerate_spread_gives_zeros():
    valid = torch.ones(1, 21, dtype=torch.bool)
    assert (normalize_scores(torch.full((1, 21), 3.0), valid) == 0).all()
    # q95 == q05 although x varies: 19 equal values and two outliers.
    x = torch.tensor([[5.0] * 19 + [0.0, 100.0]])
    assert (normalize_scores(x, valid) == 0).all()
    assert (normalize_scores(torch.full((1, 21), 3.0), valid, "minmax") == 0).all()
    assert (normalize_scores(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool)) == 0).all()  # nothing valid


def test_minmax_and_none_variants():
    x = torch.tensor([[2.0, 4.0, 10.0, 99.0]])
    valid = torch.tensor([[True, True, True, False]])
    torch.testing.assert_close(normalize_scores(x, valid, "minmax"), torch.tensor([[0.0, 0.25, 1.0, 0.0]]))
    torch.testing.assert_close(normalize_scores(x, valid, "none"), torch.tensor([[2.0, 4.0, 10.0, 0.0]]))
    with pytest.raises(ValueError, match="normalization must be"):
        normalize_scores(x, valid, "zscore")


# --------------------------------------------------------------------------------------------- budget rule
def test_budget_ties_broken_by_flat_position_then_forced_minimum():
    valid = torch.ones(3, 4, dtype=torch.bool)
    keep = apply_budget(torch.zeros(3, 4), valid, ratio=0.25)  # k = 3: row 0's first three, rows 1-2 forced
    expected = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(keep, expected)
    scores = torch.tensor([[1.0, 2.0, 2.0], [2.0, 0.0, 0.0]])
    keep = apply_budget(scores, torch.ones(2, 3, dtype=torch.bool), ratio=0.5)  # k = 3: the 2s at flat 1, 2, 3
    assert torch.equal(keep, torch.tensor([[False, True, True], [True, False, False]]))


def test_budget_is_global_not_per_sequence():
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0], [1.0, 2.0, 0.0, 0.0]])
    valid = torch.tensor([[True] * 4, [True, True, False, False]])
    keep = apply_budget(scores, valid, ratio=0.5)  # k = 3, all in row 0; row 1 forced to its best (position 1)
    assert torch.equal(keep, torch.tensor([[True, True, True, False], [False, True, False, False]]))


def test_budget_without_per_response_floor_keeps_exactly_the_budget():
    """per_response_floor=False: exactly ceil(ratio · N_valid) positions, the globally best, so rows can
    get none (the same scores as test_budget_is_global_not_per_sequence: row 1 now gets nothing)."""
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0], [1.0, 2.0, 0.0, 0.0]])
    valid = torch.tensor([[True] * 4, [True, True, False, False]])
    keep = apply_budget(scores, valid, ratio=0.5, per_response_floor=False)
    assert torch.equal(keep, torch.tensor([[True, True, True, False], [False, False, False, False]]))
    short = torch.ones(40, 5, dtype=torch.bool)  # 40 five-token responses, 5%: 10 positions, not 40
    scores = torch.randn(40, 5, generator=torch.Generator().manual_seed(0))
    assert int(apply_budget(scores, short, 0.05).sum()) >= 40  # 10 best + the best of every row left out
    assert int(apply_budget(scores, short, 0.05, per_response_floor=False).sum()) == 10


@pytest.mark.parametrize("selector_cls", [TeachabilitySelector, EntropySelector])
def test_selector_honours_per_response_floor(selector_cls):
    """The budget rule's option belongs to the selector: per_response_floor=False reaches the shared select()."""
    selector = selector_cls(ratio=0.05, per_response_floor=False)
    stats = synthetic_stats(selector, torch.ones(40, 5, dtype=torch.bool))
    assert int(selector.select(stats, torch.Generator().manual_seed(0)).sum()) == 10
    floored = selector_cls(ratio=0.05).select(stats, torch.Generator().manual_seed(0))  # the default rule
    assert floored.any(1).all() and int(floored.sum()) >= 40


def test_budget_forced_minimum_never_picks_invalid_positions():
    scores = torch.tensor([[float("nan"), float("-inf"), 5.0], [9.0, 8.0, 7.0]])
    valid = torch.tensor([[False, True, False], [True, True, True]])  # row 0's only valid score is -inf
    keep = apply_budget(scores, valid, ratio=0.25)
    assert torch.equal(keep, torch.tensor([[False, True, False], [True, False, False]]))


def test_budget_size_ceil_is_robust_to_float_error():
    assert budget_size(0.05, 640) == 32  # 0.05 * 640 = 32.000000000000004 in floating point
    assert budget_size(0.1, 30) == 3
    assert budget_size(0.05, 641) == 33
    assert budget_size(0.05, 1) == 1
    assert budget_size(1.0, 17) == 17
    assert budget_size(0.05, 0) == 0


# --------------------------------------------------------------------------------------------- score formulas
def feature_stats(d: list[float], c: list[float], h: list[float], valid: list[bool] | None = None) -> TokenStats:
    """TokenStats of one row with hand-chosen D, C, H (the other fields are irrelevant to the scores)."""
    n = len(d)
    valid_t = torch.tensor([valid if valid is not None else [True] * n])
    zeros = torch.zeros(1, n)
    ids = torch.zeros(1, n, 2, dtype=torch.long)
    return TokenStats(
        valid=valid_t, student_token_logp=zeros, teacher_token_logp=zeros, student_entropy=zeros,
        teacher_entropy=zeros, compatibility=torch.tensor([c]), disagreement=torch.tensor([d]), topk_entropy=torch.tensor([h]),
        student_topk_ids=ids, student_topk_logp=ids.float(), teacher_topk_ids=ids, teacher_topk_logp=ids.float(),
        forward_kl=torch.tensor([d]) * 2,
    )


D = [0.2, 0.8, 0.5, 0.1, 0.9, 0.4]
C = [0.5, 0.25, 1.0, 0.9, 0.1, 0.6]
H = [0.3, 0.1, 0.7, 0.9, 0.2, 0.25]


def test_score_formulas_without_normalisation():
    stats = feature_stats(D, C, H)
    d, c, h = (torch.tensor([v]) for v in (D, C, H))
    cases = {
        TeachabilitySelector: d * c,
        IncompatibleSelector: d * (1 - c),
        CompatibilitySelector: c,
        EntropySelector: h,
        DivergenceSelector: d,
        TipSelector: h + d - h * d,
        TeachabilityEntropySelector: h + d * c - h * d * c,
    }
    for cls, expected in cases.items():
        torch.testing.assert_close(cls(normalization="none").score(stats), expected, msg=cls.__name__)
    full = DivergenceSelector(full_vocab=True, normalization="none")
    assert full.needs_full_kl
    torch.testing.assert_close(full.score(stats), 2 * d)


def test_score_formulas_with_quantile_normalisation():
    stats = feature_stats(D, C, H)
    nd, nc, nh = (torch.tensor(np_quantile_norm(np.array(v))[None], dtype=torch.float32) for v in (D, C, H))
    x = torch.tensor(np_quantile_norm(np.array(D) * np.array(C))[None], dtype=torch.float32)  # raw D·C, then normalised
    cases = {
        TeachabilitySelector: nd * nc,
        IncompatibleSelector: nd * (1 - nc),
        CompatibilitySelector: nc,
        EntropySelector: nh,
        DivergenceSelector: nd,
        TipSelector: nh + nd - nh * nd,
        TeachabilityEntropySelector: nh + x - nh * x,
    }
    for cls, expected in cases.items():
        torch.testing.assert_close(cls().score(stats), expected, msg=cls.__name__, atol=1e-6, rtol=1e-5)
    # X is the normalised raw product, which is not D̃·C̃ here.
    assert not torch.allclose(x, nd * nc, atol=1e-3)


def test_tip_q3_keeps_low_entropy_high_divergence():
    # Medians over 6 values are linearly interpolated (mean of the middle two), like numpy.median:
    # median D = (0.4 + 0.5) / 2 = 0.45, so position 5 (D = 0.4, H = 0.25) is not in Q3; with the lower
    # median (torch.median's 0.4) it would be.
    stats = feature_stats(D, C, H)
    scores = TipQ3Selector(normalization="none").score(stats)
    d, h = np.array(D), np.array(H)
    in_q3 = (h <= np.median(h)) & (d >= np.median(d))
    assert in_q3.tolist() == [False, True, False, False, True, False]
    torch.testing.assert_close(scores, torch.tensor(np.where(in_q3, 1 + d, 0.0)[None], dtype=torch.float32))
    keep = TipQ3Selector(ratio=0.5, normalization="none").select(stats)  # k = 3: two Q3 positions, then position 0
    assert keep.tolist() == [[True, True, False, False, True, False]]


def test_scores_ignore_invalid_positions():
    valid = [True, True, True, True, False, True]
    stats = feature_stats(D, C, H, valid)
    for cls in (TeachabilitySelector, IncompatibleSelector, TeachabilityEntropySelector, TipSelector, TipQ3Selector):
        scores = cls().score(stats)
        assert scores[0, 4] == 0, cls.__name__
        assert not cls(ratio=0.5).select(stats)[0, 4], cls.__name__


# ------------------------------------------------------------------------------ soft-OR keeps a true 1.0
@pytest.mark.parametrize("cls", [TipSelector, TeachabilityEntropySelector])
def test_soft_or_scores_keep_exact_ones_so_ties_break_by_position(cls, monkeypatch):
    """Rows whose first term is exactly 1 tie at 1.0 whatever the second term; `a + b - ab` rounded some
    of them to 0.99999994 (fp32), so the budget kept a later position before an earlier one."""
    from opdlab.selectors import base

    a = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.2]])  # (N=1, L=5)
    b = torch.tensor([[0.7, 0.1, 0.3, 0.9, 0.5]])
    assert base.soft_or(a, b)[0, :4].tolist() == [1.0] * 4
    calls = iter([a, b])
    monkeypatch.setattr(cls, "normalized", lambda self, x, stats: next(calls))
    valid = torch.ones(1, 5, dtype=torch.bool)
    stats = synthetic_stats(cls(), valid)
    scores = cls(ratio=0.4).score(stats)
    assert scores[0, :4].tolist() == [1.0] * 4
    keep = base.apply_budget(scores, valid, 0.4)
    assert keep[0].tolist() == [True, True, False, False, False], "ties at the top break by position"
