"""The fixed-context diagnostic: statistics on synthetic data with known answers, and `opdlab diagnose` end
to end on the tiny checkpoints (bank, θ1 from a short run, re-scoring the same contexts, files)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import CONFIG_DIR, run_opdlab

from opdlab.diagnostics.stats import (
    bootstrap_tercile_gap,
    decile_means,
    ols,
    rank_bins,
    standardized_ols,
    tercile_gap,
    winsorize,
)

DIAGNOSE_CONFIGS = sorted((CONFIG_DIR / "diagnose").glob("*.yaml"))


# ------------------------------------------------------------------------------ statistics
def test_winsorize_clips_at_the_quantiles():
    rng = np.random.default_rng(0)
    x = rng.standard_cauchy(2001)
    for level in (0.01, 0.05):
        lo, hi = np.quantile(x, [level, 1 - level])
        w = winsorize(x, level)
        assert w.min() == pytest.approx(lo) and w.max() == pytest.approx(hi)
        inside = (x >= lo) & (x <= hi)
        np.testing.assert_array_equal(w[inside], x[inside])  # untouched between the quantiles
        assert (w[x < lo] == lo).all() and (w[x > hi] == hi).all()
        # about `level` of the data is clipped on each side
        assert abs((x < lo).mean() - level) < 2 / x.size
    np.testing.assert_array_equal(winsorize(x, 0.0), x)
    with pytest.raises(ValueError, match=r"in \[0, 0.5\)"):
        winsorize(x, 0.5)


def test_rank_bins_are_equal_sized_even_with_ties():
    x = np.array([0.0] * 50 + list(np.linspace(0.1, 1, 40)))  # many exact zeros, like D^L
    bins = rank_bins(np.argsort(x, kind="stable"), np.ones(x.size), 3)
    assert np.bincount(bins).tolist() == [30, 30, 30]
    assert x[bins == 2].min() >= x[bins == 1].max() >= x[bins == 0].max()


def test_tercile_gap_exact():
    x = np.arange(9.0)
    y = np.array([0, 0, 0, 5, 5, 5, 1, 1, 1.0])
    assert tercile_gap(x, y) == pytest.approx(1.0)
    assert tercile_gap(-x, y) == pytest.approx(-1.0)


def clustered_data(rng, n_clusters=150, per=12, effect=1.0):
    """x ~ U(0, 1), y = effect·x + cluster effect + noise: the true tercile gap is effect·(5/6 - 1/6)."""
    clusters = np.repeat(np.arange(n_clusters), per)
    x = rng.uniform(size=clusters.size)
    y = effect * x + rng.normal(0, 0.5, n_clusters)[clusters] + rng.normal(0, 0.5, clusters.size)
    return x, y, clusters


def test_bootstrap_interval_covers_the_true_tercile_gap():
    rng = np.random.default_rng(1)
    truth = 2.0 / 3.0
    x, y, clusters = clustered_data(rng)
    r = bootstrap_tercile_gap(x, y, clusters, draws=1000, seed=0)
    assert r.low < r.estimate < r.high
    assert r.low < truth < r.high
    assert r.draws == 1000 and r.se > 0
    # Over repeated data sets the 95% interval covers the truth most of the time.
    draws = [bootstrap_tercile_gap(*clustered_data(rng), draws=300, seed=i) for i in range(30)]
    assert np.mean([b.low < truth < b.high for b in draws]) >= 0.8


def test_cluster_bootstrap_is_wider_than_an_iid_one_with_cluster_noise():
    rng = np.random.default_rng(2)
    x, y, clusters = clustered_data(rng, n_clusters=40, per=30)
    clustered = bootstrap_tercile_gap(x, y, clusters, draws=400, seed=0)
    iid = bootstrap_tercile_gap(x, y, np.arange(x.size), draws=400, seed=0)
    assert clustered.estimate == iid.estimate
    assert (clustered.high - clustered.low) > (iid.high - iid.low)


def test_ols_recovers_exact_coefficients():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(200, 2))
    y = 1.0 + 2.0 * X[:, 0] - 3.0 * X[:, 1]
    fit = ols(y, X, np.arange(200) // 10, ["a", "b"])
    np.testing.assert_allclose(fit.coef, [2.0, -3.0], atol=1e-10)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.se_plain.max() < 1e-6 and fit.n_clusters == 20


def test_the_predictor_that_determines_gain_gets_the_top_standardised_coefficient():
    rng = np.random.default_rng(4)
    n = 3000
    clusters = np.arange(n) // 10
    cols = {name: rng.normal(size=n) for name in ("topk_entropy", "disagreement", "compatibility", "position", "teacher_entropy")}
    cols["topk_entropy_x_disagreement"] = cols["topk_entropy"] * cols["disagreement"]
    gain = 0.8 * cols["compatibility"] + 0.1 * cols["disagreement"] + rng.normal(0, 0.3, n)
    gain[:15] = 50.0  # a few outliers: winsorising keeps them from dominating
    for level in (0.01, 0.05):
        fit = standardized_ols(gain, cols, clusters, level)
        top = fit.names[int(np.argmax(np.abs(fit.coef)))]
        assert top == "compatibility"
        assert fit.coef[fit.names.index("compatibility")] > 5 * abs(fit.coef[fit.names.index("position")])
        assert (fit.se_cluster > 0).all() and (fit.se_plain > 0).all()


def test_cluster_robust_se_exceeds_plain_se_with_cluster_correlated_errors():
    rng = np.random.default_rng(5)
    clusters = np.repeat(np.arange(60), 50)
    x = rng.normal(size=60)[clusters] + 0.1 * rng.normal(size=clusters.size)  # x constant within clusters
    y = 0.5 * x + rng.normal(size=60)[clusters] + 0.1 * rng.normal(size=clusters.size)
    fit = ols(y, x[:, None], clusters, ["x"])
    assert fit.se_cluster[0] > 3 * fit.se_plain[0]


def test_decile_means_are_monotone_for_a_monotone_relation():
    x = np.linspace(0, 1, 1000)
    d = decile_means(x, 2 * x)
    assert d["count"].tolist() == [100] * 10
    assert np.all(np.diff(d["y_mean"]) > 0)
    np.testing.assert_allclose(d["y_mean"], 2 * d["x_mean"])


# ------------------------------------------------------------------------------ the command
def diagnose_args(tiny, out: Path, *extra: str) -> list[str]:
    return [
        "diagnose", "--teacher", tiny.teacher, "--student", tiny.student,
        "--source", "opdlab.tasks.AdditionTask", "--source.digits", "2", "--source.num_eval", "16",
        "--out_dir", str(out), "--bank.contexts", "24", "--bank.max_response_tokens", "4", "--bank.top_k", "4",
        "--bank.batch_size", "10", "--train.steps", "3", "--train.batch_size", "8", "--train.max_new_tokens", "4",
        "--train.lr", "1e-3", "--train.accelerator", "cpu", "--stats.bootstrap", "50", *extra,
    ]


@pytest.fixture(scope="module")
def diagnosed(tiny_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("diagnose") / "run"
    result = run_opdlab(diagnose_args(tiny_checkpoints, out))
    assert result.code == 0, result.err[-3000:]
    return out, result


def read_bank(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_diagnose_writes_bank_summary_and_plots(diagnosed):
    out, result = diagnosed
    for name in ("bank.pt", "bank.csv", "summary.json", "deciles.png", "terciles.png", "coefficients.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "student_after" / "config.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["command"].startswith("opdlab diagnose --teacher")
    assert summary["counts"]["contexts"] == 24
    rows = read_bank(out / "bank.csv")
    assert len(rows) == summary["counts"]["positions"] > 24
    assert {"disagreement", "compatibility", "topk_entropy", "teachability", "incompatibility", "teacher_entropy", "position", "forward_kl_base", "reverse_kl_base",
            "forward_kl_after", "forward_gain", "reverse_gain"} <= set(rows[0])
    for kind in ("forward", "reverse"):
        gaps = summary["terciles"][kind]
        assert set(gaps) == {"disagreement", "topk_entropy", "compatibility", "teachability", "incompatibility"}
        assert all(g["low"] <= g["high"] and g["draws"] == 50 for g in gaps.values())
        assert set(summary["terciles_winsorized"][kind]) == set(gaps)
        differences = summary["tercile_differences"][kind]
        assert set(differences) == {"teachability - disagreement", "teachability - incompatibility"}
        for name, d in differences.items():
            first, second = name.split(" - ")
            assert d["estimate"] == pytest.approx(gaps[first]["estimate"] - gaps[second]["estimate"])
            assert d["low"] <= d["high"] and d["draws"] == 50
        assert set(summary["tercile_differences_winsorized"][kind]) == set(differences)
        models = summary["ols"][kind]
        assert len(models) == 2
        for fits in models.values():
            assert set(fits) == {"winsor_0.01", "winsor_0.05"}
    raw, teach = summary["ols"]["forward"].values()
    assert list(raw["winsor_0.01"]["coefficients"]) == ["topk_entropy", "disagreement", "topk_entropy_x_disagreement", "compatibility", "position", "teacher_entropy"]
    assert list(teach["winsor_0.01"]["coefficients"]) == ["topk_entropy", "teachability", "incompatibility", "position", "teacher_entropy"]
    assert summary["theta1"]["trained"]["steps"] == 3
    assert summary["headline"].startswith("terciles and tercile_differences (plain mean G")
    assert isinstance(summary["sign_disagreements"], list)
    assert "headline: the plain tercile gaps" in result.out
    assert "scoring θ0" in result.err and "scoring θ1" in result.err  # tqdm progress bars


def test_gain_and_features_are_consistent(diagnosed):
    out, _ = diagnosed
    rows = read_bank(out / "bank.csv")
    for r in rows:
        base, after = float(r["forward_kl_base"]), float(r["forward_kl_after"])
        if r["included"] == "True":
            assert float(r["forward_gain"]) == pytest.approx((base - after) / base, rel=1e-4, abs=1e-5)
        d, c = float(r["disagreement_norm"]), float(r["compatibility_norm"])
        assert 0 <= d <= 1 and 0 <= c <= 1
        assert float(r["teachability"]) == pytest.approx(d * c, abs=1e-5)
        assert float(r["incompatibility"]) == pytest.approx(d * (1 - c), abs=1e-5)
        assert 0 <= float(r["compatibility"]) <= 1 + 1e-6


def test_student_after_rescores_the_same_frozen_contexts(diagnosed, tiny_checkpoints, tmp_path):
    """Reusing the bank with the exported θ1 reproduces the first run's θ0 and θ1 numbers exactly."""
    first, _ = diagnosed
    out = tmp_path / "again"
    result = run_opdlab(diagnose_args(
        tiny_checkpoints, out, "--bank.path", str(first / "bank.pt"), "--student_after", str(first / "student_after"),
    ))
    assert result.code == 0, result.err[-3000:]
    a, b = read_bank(first / "bank.csv"), read_bank(out / "bank.csv")
    assert [(r["context"], r["position"], r["token_id"]) for r in a] == [(r["context"], r["position"], r["token_id"]) for r in b]
    for key in ("forward_kl_base", "forward_kl_after", "reverse_kl_after", "teachability"):
        np.testing.assert_allclose([float(r[key]) for r in a], [float(r[key]) for r in b], rtol=1e-4, atol=1e-6)
    assert json.loads((out / "summary.json").read_text())["theta1"] == {"student_after": str(first / "student_after")}


def test_diagnose_help_documents_every_option():
    result = run_opdlab(["diagnose", "--help"])
    assert result.code == 0
    for option in ("--teacher", "--student", "--source", "--student_after", "--out_dir", "--bank.contexts",
                   "--bank.max_response_tokens", "--bank.top_k", "--bank.seed", "--bank.path", "--train.selector",
                   "--train.steps", "--train.lr", "--stats.winsorize", "--stats.bootstrap", "--stats.min_base_kl"):
        assert option in result.out, option


@pytest.mark.parametrize("config", DIAGNOSE_CONFIGS, ids=lambda p: p.name)
def test_diagnose_configs_parse(config):
    result = run_opdlab(["diagnose", "--config", str(config), "--print_config"])
    assert result.code == 0, result.err[-2000:]
    printed = yaml.safe_load(result.out)
    raw = yaml.safe_load(config.read_text())
    assert printed["teacher"] == raw["teacher"] and printed["bank"]["contexts"] == raw["bank"]["contexts"]


def test_diagnose_configs_exist():
    assert {p.name for p in DIAGNOSE_CONFIGS} >= {"add3.yaml", "spell2.yaml"}


def test_diagnose_option_errors_are_immediate_and_short_names_resolve():
    from conftest import run_opdlab

    bad = run_opdlab(["diagnose", "--bank.contexts", "0"])
    assert str(bad.code).startswith("opdlab: error: bank.contexts must be >= 1, got 0")
    typo = run_opdlab(["diagnose", "--train.selector", "teachabilty"])
    assert "did you mean 'teachability'" in str(typo.code).lower()
    ok = run_opdlab(["diagnose", "--train.selector", "teachability", "--print_config"])
    assert ok.code == 0, ok.err[-2000:]
    assert "opdlab.selectors.teachability.TeachabilitySelector" in ok.out


def test_paired_bootstrap_of_a_difference_of_tercile_gaps():
    import numpy as np

    from opdlab.diagnostics.stats import bootstrap_tercile_gap, bootstrap_tercile_gap_difference, tercile_gap

    rng = np.random.default_rng(0)
    n = 600
    clusters = np.repeat(np.arange(60), 10)
    good, noise = rng.normal(size=n), rng.normal(size=n)
    y = good + 0.5 * rng.normal(size=n)
    same = bootstrap_tercile_gap_difference(good, good, y, clusters, draws=200)
    assert same.estimate == 0 and same.low == same.high == 0  # paired: identical predictors, no spread at all
    diff = bootstrap_tercile_gap_difference(good, noise, y, clusters, draws=200)
    assert diff.estimate == pytest.approx(tercile_gap(good, y) - tercile_gap(noise, y))
    assert diff.low > 0  # the informative predictor separates gains better, and the interval says so
    unpaired = bootstrap_tercile_gap(good, y, clusters, draws=200)
    assert diff.high - diff.low < 2 * (unpaired.high - unpaired.low)


def test_a_bank_top_k_beyond_the_vocabulary_is_one_line_before_loading(tmp_path):
    result = run_opdlab(["diagnose", "--config", str(CONFIG_DIR / "diagnose" / "add3.yaml"), "--bank.top_k", "100",
                         "--out_dir", str(tmp_path / "d")])
    message = str(result.code)
    assert message.startswith("opdlab: error: bank.top_k=100 exceeds the vocabulary (16 tokens"), message
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------------------ the report
def synthetic_table(seed: int = 0, n: int = 3000) -> dict[str, np.ndarray]:
    """A bank where most positions gain more with higher teachability, but a few top-teachability positions
    lose a lot (G = -400: their KL grew 400-fold): the plain tercile gap is negative, the winsorised one positive."""
    rng = np.random.default_rng(seed)
    columns = {c: rng.random(n) for c in ("disagreement", "topk_entropy", "compatibility", "incompatibility",
                                          "position", "teacher_entropy")}
    columns["teachability"] = rng.random(n)
    columns["topk_entropy_x_disagreement"] = columns["topk_entropy"] * columns["disagreement"]
    gain = 0.5 * columns["teachability"] + 0.05 * rng.standard_normal(n)
    top = np.flatnonzero(columns["teachability"] > 0.9)[:10]
    gain[top] = -400.0
    return {**columns, "forward_gain": gain, "reverse_gain": gain.copy(), "included": np.ones(n, dtype=bool),
            "context": np.arange(n) // 10}


def report_of(table: dict) -> tuple[dict, str]:
    from opdlab.diagnostics.report import StatsOptions, format_report, gain_statistics

    result = gain_statistics(table, StatsOptions(bootstrap=50))
    counts = {"positions": len(table["context"]), "contexts": int(table["context"].max()) + 1,
              "included": int(table["included"].sum()), "mean_forward_gain": float(table["forward_gain"].mean())}
    return result, format_report(result, counts)


def test_the_report_names_its_headline_and_explains_a_sign_disagreement():
    from opdlab.diagnostics.report import sign_disagreements

    result, text = report_of(synthetic_table())
    plain = result["terciles"]["forward"]["teachability"]["estimate"]
    clipped = result["terciles_winsorized"]["forward"]["teachability"]["estimate"]
    assert plain < 0 < clipped  # the setting of the complaint: the two columns disagree in sign
    assert "headline: the plain tercile gaps (left; docs/method.md §3" in text
    assert "G winsorised at 0.01 (robustness check):" in text
    lines = text.splitlines()
    first = lines.index(next(line for line in lines if line.startswith("tercile gap of G_f")))
    block = lines[first:first + 7]
    notes = [line for line in block if line.strip().startswith("note:")]
    assert len(notes) == 1, block  # one line under the block, naming the predictor
    named = notes[0].removeprefix("  note: ").split(":")[0].split(", ")
    assert "teachability" in named and "opposite signs" in notes[0]
    assert "set by a few positions with extreme G" in notes[0]
    flipped = sign_disagreements(result)
    assert {"statistic": "terciles", "gain": "forward", "predictor": "teachability", "plain": plain,
            "winsorized": clipped} in flipped
    assert all(f["plain"] * f["winsorized"] < 0 for f in flipped)


def test_no_note_when_plain_and_winsorised_agree():
    table = synthetic_table()
    table["forward_gain"] = table["reverse_gain"] = 0.5 * table["teachability"] + 0.01 * table["position"]
    result, text = report_of(table)
    assert "headline:" in text and "note:" not in text


@pytest.mark.parametrize("options,says", [
    ({"winsorize": [0.6]}, "stats.winsorize levels must be in [0, 0.5)"),
    ({"winsorize": []}, "stats.winsorize is empty"),
    ({"min_base_kl": -1.0}, "stats.min_base_kl must be a finite number > 0"),
    ({"min_base_kl": 0.0}, "stats.min_base_kl must be a finite number > 0"),
    ({"bootstrap": 0}, "stats.bootstrap must be >= 1"),
])
def test_bad_statistics_options_are_refused_when_built(options, says):
    """Before the bank is sampled and θ1 trained (they failed after both, or ran with G = 0/0)."""
    from opdlab.diagnostics.report import StatsOptions

    with pytest.raises(ValueError, match=re.escape(says)):
        StatsOptions(**options)


@pytest.mark.parametrize("content", [b"hello\n", None, {"a": 1}])
def test_a_bank_path_that_is_not_a_bank_is_one_line(tmp_path, content):
    import torch

    from opdlab.diagnostics.bank import load_bank

    path = tmp_path / "bank.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save([] if content is None else content, path)
    with pytest.raises(ValueError, match=r"bank.path .* is not a bank that opdlab diagnose wrote"):
        load_bank(path)
