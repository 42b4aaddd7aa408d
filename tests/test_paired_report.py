"""benchmarks/paired_report.py: the statistics behind the fair-toy verdicts (docs/results.md), on hand-made runs."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paired_report.py"
spec = importlib.util.spec_from_file_location("paired_report", SCRIPT)
pr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pr)


def write_run(folder: Path, selector: str, ratio: float, seed: int, acc: list[float], tokens_per_step: float) -> None:
    steps = [0, 100, 200]
    name = "full" if selector == "full" else f"{selector}_r{ratio}"
    run = folder / "runs" / name / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({
        "ok": True, "spec": {"selector": f"configs/selectors/{selector}.yaml", "ratio": ratio, "seed": seed},
        "val_steps": steps, "val_accuracy": acc, "val_supervised_tokens": [s * tokens_per_step for s in steps]}))


@pytest.fixture
def folder(tmp_path):
    # full OPD: 0.2 -> 0.6 -> 1.0 with 100 tokens a step; teachability 5%: 0.2 -> 0.5 -> 0.8 (+0.01 * seed),
    # random 5%: flat 0.2 except seed 2 (0.3 at the end); 5 tokens a step for both.
    for seed in range(3):
        write_run(tmp_path, "full", 1.0, seed, [0.2, 0.6, 1.0], 100)
        write_run(tmp_path, "teachability", 0.05, seed, [0.2, 0.5, 0.8 + 0.01 * seed], 5)
        write_run(tmp_path, "random", 0.05, seed, [0.2, 0.2, 0.3 if seed == 2 else 0.2], 5)
    return tmp_path


def test_run_metrics_are_the_trapezoid_mean_and_the_best_after_step_zero():
    m = pr.run_metrics(np.array([0.0, 100, 200]), np.array([0.9, 0.5, 0.7]))
    assert m == {"final": 0.7, "best": 0.7, "auc": pytest.approx((0.7 + 0.6) / 2)}


def test_accuracy_at_matched_tokens_interpolates_and_is_nan_beyond_the_run(folder):
    full = [r for r in pr.load_runs(folder) if r["selector"] == "full"][0]
    assert pr.accuracy_at_tokens(full, 1000) == pytest.approx(0.2 + 0.4 * 1000 / 10_000)
    assert np.isnan(pr.accuracy_at_tokens(full, 30_000))


def test_paired_differences_are_by_seed_with_an_interval_that_contains_the_mean(folder):
    diffs = pr.paired(pr.group(pr.load_runs(folder)), "teachability")
    d, (lo, hi) = diffs[(0.05, "random", "final")]
    np.testing.assert_allclose(d, [0.6, 0.61, 0.52])
    assert lo <= d.mean() <= hi and lo >= 0.52 - 1e-12 and hi <= 0.61 + 1e-12
    d_full, interval = diffs[(0.05, "full (all tokens)", "final")]
    np.testing.assert_allclose(d_full, [-0.2, -0.19, -0.18])
    assert pr.verdict(interval) == "worse" and pr.verdict(diffs[(0.05, "random", "final")][1]) == "better"


def test_verdict_classes():
    assert pr.verdict((0.1, 0.3)) == "better"
    assert pr.verdict((-0.3, -0.1)) == "worse"
    assert pr.verdict((-0.1, 0.2)) == "not separated"
    assert pr.verdict((float("nan"), float("nan"))) == "too few seeds"


def test_robustness_report_says_which_verdicts_flip(folder, tmp_path_factory):
    rerun = tmp_path_factory.mktemp("rerun")
    for seed in range(3):  # the rerun: random now ties teachability in every seed
        write_run(rerun, "teachability", 0.05, seed, [0.2, 0.5, 0.8 + 0.01 * seed], 5)
        write_run(rerun, "random", 0.05, seed, [0.2, 0.5, 0.8 + 0.01 * (2 - seed)], 5)
    text = pr.robustness_report(pr.load_runs(folder), pr.load_runs(rerun), "teachability")
    final = next(line for line in text.splitlines() if line.startswith("| 0.05 | random | final |"))
    assert "| better | not separated | **no** |" in final
    assert final.count("(3)") == 2


def test_robustness_report_compares_the_seeds_both_folders_have(folder, tmp_path_factory):
    rerun = tmp_path_factory.mktemp("rerun")
    for seed in range(2):  # seeds 0 and 1 only: the first folder's seed 2 (random 0.3 at the end) is left out
        write_run(rerun, "teachability", 0.05, seed, [0.2, 0.5, 0.8 + 0.01 * seed], 5)
        write_run(rerun, "random", 0.05, seed, [0.2, 0.2, 0.2], 5)
    text = pr.robustness_report(pr.load_runs(folder), pr.load_runs(rerun), "teachability")
    final = next(line for line in text.splitlines() if line.startswith("| 0.05 | random | final |"))
    assert final.count("+0.605 [") == 2 and final.count("(2)") == 2 and final.endswith("| yes |")
    assert "full" not in text  # only comparisons present in both folders


def test_command_line_prints_the_tables_and_refuses_an_empty_folder(folder, tmp_path_factory):
    out = subprocess.run([sys.executable, str(SCRIPT), str(folder)], capture_output=True, text=True, check=True).stdout
    assert "| teachability | 0.05 | 3 |" in out and "Δ at matched tokens" in out
    # teachability's final (~0.81) minus full OPD's accuracy at 1,000 tokens (0.24)
    assert "| teachability | 0.05 | 3 | +0.570" in out
    empty = tmp_path_factory.mktemp("empty")
    done = subprocess.run([sys.executable, str(SCRIPT), str(empty)], capture_output=True, text=True)
    assert done.returncode != 0 and "no finished runs" in done.stderr


def test_wide_report_puts_budgets_in_columns(folder):
    text = pr.wide_report(pr.load_runs(folder), "teachability")
    # full OPD: final 1.0; AUC ((0.2 + 0.6) / 2 + (0.6 + 1.0) / 2) / 2 = 0.6
    assert "full OPD: 1.000 / 0.600 (3)" in text
    row = next(line for line in text.splitlines() if line.startswith("| teachability |"))
    final, auc = (float(x) for x in row.split("|")[2].split("(")[0].split("/"))
    assert final == pytest.approx(0.81, abs=6e-4)
    assert auc == pytest.approx(0.5025, abs=6e-4)  # (0.35 + (0.5 + 0.8 + 0.01 seed) / 2) / 2, over seeds 0-2
    final_rows = text.split("Δ final accuracy")[1].split("Δ AUC")[0]
    assert "| random | +0.577 [" in final_rows and "| full (all tokens) | -0.190 [" in final_rows


def test_the_report_uses_opdlabs_mean_std_and_marks_a_single_seed(tmp_path):
    from opdlab import metrics

    assert not hasattr(pr, "mean_std") and pr.format_mean_std is metrics.format_mean_std  # one arithmetic
    write_run(tmp_path, "full", 1.0, 0, [0.2, 0.6, 1.0], 100)
    for seed in range(2):
        write_run(tmp_path, "teachability", 0.05, seed, [0.2, 0.5, 0.8 + 0.1 * seed], 5)
    text = pr.report(pr.load_runs(tmp_path), "teachability")
    assert "| full | 1 | 1 | 1.000 (n=1) |" in text, text  # one seed: the mean alone, not ± 0.000
    assert "| teachability | 0.05 | 2 | 0.850 ± 0.071 |" in text, text
