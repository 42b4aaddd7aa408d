"""Per-method and paired (by seed) statistics of an `opdlab compare` folder: final and best accuracy, area under
the accuracy curve, accuracy at matched numbers of supervised tokens, and the paired differences of one method
minus each other one at the same budget, with percentile bootstrap intervals over seeds.

    python benchmarks/paired_report.py benchmarks/results/fair_toy_compare --reference teachability
    python benchmarks/paired_report.py benchmarks/results/fair_toy_compare --versus benchmarks/results/fair_toy_robust
    python benchmarks/paired_report.py benchmarks/results/fair_toy_compare --wide    # budgets as columns

With --versus, a second folder holding some of the same cells rerun with a rounding-level change (another thread
count, another commit): on the runs both folders have, each paired difference is classified in both folders (better: the 95% interval is above
zero; worse: below zero; not separated: it contains zero) and the verdict is said to hold when the classes agree.

Reads each run's `runs/<method>/seed<S>/result.json` (what `opdlab compare` writes: validation steps, accuracy,
supervised tokens so far), so it works on a comparison that is still being continued (runs not finished yet are
left out, and the table says how many seeds each cell has).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from opdlab.metrics import format_mean_std  # mean ± std of the finite values; one value: `mean (n=1)`

METRICS = ("final", "best", "auc")
trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz


def load_runs(folder: Path) -> list[dict]:
    runs = []
    for path in sorted(folder.glob("runs/*/seed*/result.json")):
        data = json.loads(path.read_text())
        if not data.get("ok") or not data.get("val_accuracy"):
            continue
        spec = data["spec"]
        label = Path(spec["selector"]).stem
        steps = np.array(data["val_steps"], dtype=float)
        acc = np.array(data["val_accuracy"], dtype=float)
        tokens = np.array(data.get("val_supervised_tokens") or [np.nan] * len(acc), dtype=float)
        runs.append({"selector": label, "ratio": 1.0 if label == "full" else float(spec["ratio"]), "seed": spec["seed"],
                     "steps": steps, "acc": acc, "tokens": tokens, **run_metrics(steps, acc)})
    return runs


def run_metrics(steps: np.ndarray, acc: np.ndarray) -> dict:
    """final accuracy, best after step 0, and the area under the accuracy curve over training divided by its
    length (the mean accuracy over the run, trapezoid rule)."""
    after = acc[steps > 0]
    span = steps[-1] - steps[0]
    auc = float(trapezoid(acc, steps) / span) if span > 0 else float(acc[-1])
    return {"final": float(acc[-1]), "best": float(after.max()) if after.size else float("nan"), "auc": auc}


def accuracy_at_tokens(run: dict, tokens: float) -> float:
    """The run's accuracy when it had supervised `tokens` tokens (linear between validations; nan beyond its end)."""
    if not np.isfinite(run["tokens"]).all() or tokens > run["tokens"][-1]:
        return float("nan")
    return float(np.interp(tokens, run["tokens"], run["acc"]))


def bootstrap(diffs: np.ndarray, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of `diffs` (resampling the seeds with replacement)."""
    if diffs.size < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, diffs.size, size=(resamples, diffs.size))].mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def report(runs: list[dict], reference: str) -> str:
    cells = group(runs)
    full = cells.get(("full", 1.0), {})
    lines = ["| method | budget | seeds | final | best | AUC | supervised tokens | full OPD's accuracy at those tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for (selector, ratio), by_seed in sorted(cells.items(), key=lambda kv: (kv[0][1] != 1.0, kv[0][1], kv[0][0])):
        rs = list(by_seed.values())
        spent = [r["tokens"][-1] for r in rs]
        matched = [accuracy_at_tokens(full[s], r["tokens"][-1]) for s, r in by_seed.items() if s in full]
        lines.append(f"| {selector} | {ratio:g} | {len(rs)} | {format_mean_std([r['final'] for r in rs])} | "
                     f"{format_mean_std([r['best'] for r in rs])} | {format_mean_std([r['auc'] for r in rs])} | "
                     f"{np.mean(spent):,.0f} | {format_mean_std(matched)} |")
    lines += ["", f"Paired differences, {reference} minus each method at the same budget (and minus full OPD), by seed: "
              "mean [95% bootstrap interval over seeds]", "",
              "| budget | versus | seeds | Δ final | Δ best | Δ AUC |", "|---|---|---|---|---|---|"]
    diffs = paired(cells, reference)
    for ratio, label in dict.fromkeys((k[0], k[1]) for k in diffs):
        parts = []
        for metric in METRICS:
            d, (lo, hi) = diffs[(ratio, label, metric)]
            parts.append(f"{d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]" if d.size else "–")
        lines.append(f"| {ratio:g} | {label} | {diffs[(ratio, label, METRICS[0])][0].size} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def matched_token_report(runs: list[dict]) -> str:
    """Each method's final accuracy minus full OPD's accuracy when full OPD had supervised as many tokens (by seed)."""
    cells = group(runs)
    full = cells.get(("full", 1.0), {})
    lines = ["Final accuracy minus full OPD's accuracy at the same number of supervised tokens, paired by seed: "
             "mean [95% bootstrap interval over seeds]", "", "| method | budget | seeds | Δ at matched tokens |",
             "|---|---|---|---|"]
    for (selector, ratio), by_seed in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if selector == "full":
            continue
        d = np.array([r["final"] - accuracy_at_tokens(full[s], r["tokens"][-1]) for s, r in by_seed.items() if s in full])
        d = d[np.isfinite(d)]
        lo, hi = bootstrap(d)
        lines.append(f"| {selector} | {ratio:g} | {d.size} | " + (f"{d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] |" if d.size else "– |"))
    return "\n".join(lines)


def group(runs: list[dict]) -> dict:
    cells = defaultdict(dict)  # (selector, ratio) -> seed -> run
    for r in runs:
        cells[(r["selector"], r["ratio"])][r["seed"]] = r
    return cells


def paired(cells: dict, reference: str) -> dict:
    """(ratio, versus label, metric) -> (differences by seed, interval), the reference minus each other method."""
    out = {}
    full = cells.get(("full", 1.0), {})
    for ratio in sorted({r for s, r in cells if s == reference}):
        ours = cells[(reference, ratio)]
        others = [(s, r) for s, r in cells if r == ratio and s != reference] + ([("full", 1.0)] if full else [])
        for selector, other_ratio in others:
            theirs = cells[(selector, other_ratio)]
            seeds = sorted(set(ours) & set(theirs))
            label = selector + ("" if other_ratio == ratio else " (all tokens)")
            for metric in METRICS:
                d = np.array([ours[s][metric] - theirs[s][metric] for s in seeds])
                out[(ratio, label, metric)] = (d, bootstrap(d))
    return out


def verdict(interval: tuple[float, float]) -> str:
    lo, hi = interval
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "too few seeds"
    return "better" if lo > 0 else "worse" if hi < 0 else "not separated"


def robustness_report(first: list[dict], second: list[dict], reference: str) -> str:
    """The paired differences of both folders side by side, and whether each verdict holds. Only the runs both
    folders have (same method, budget and seed) are compared, so the two columns differ by the rerun's change alone."""
    rerun = {(r["selector"], r["ratio"], r["seed"]) for r in second}
    first = [r for r in first if (r["selector"], r["ratio"], r["seed"]) in rerun]
    a, b = paired(group(first), reference), paired(group(second), reference)
    lines = [f"{reference} minus each method, in the first folder and in the rerun (mean [95% interval], seeds); "
             "verdict: better / worse / not separated (interval above, below or around zero)", "",
             "| budget | versus | metric | first | rerun | verdict first | verdict rerun | holds |",
             "|---|---|---|---|---|---|---|---|"]
    for key in sorted(set(a) & set(b), key=lambda k: (k[0], k[1], METRICS.index(k[2]))):
        cols = []
        for d, (lo, hi) in (a[key], b[key]):
            cols.append(f"{d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] ({d.size})" if d.size else "–")
        va, vb = verdict(a[key][1]), verdict(b[key][1])
        lines.append(f"| {key[0]:g} | {key[1]} | {key[2]} | {cols[0]} | {cols[1]} | {va} | {vb} | "
                     f"{'yes' if va == vb else '**no**'} |")
    return "\n".join(lines)


def wide_report(runs: list[dict], reference: str) -> str:
    """Budgets as columns: each method's mean final accuracy and AUC, then the reference minus each method (Δ final
    and Δ AUC with their intervals), the layout of docs/results.md."""
    cells = group(runs)
    ratios = sorted({r for s, r in cells if s != "full"})
    head = "| method | " + " | ".join(f"{r:g}" for r in ratios) + " |"
    rule = "|---|" + "---|" * len(ratios)
    full = cells.get(("full", 1.0), {})
    lines = [f"Mean final accuracy / AUC (seeds per cell in brackets); full OPD: "
             + (f"{np.mean([r['final'] for r in full.values()]):.3f} / {np.mean([r['auc'] for r in full.values()]):.3f} "
                f"({len(full)})" if full else "not run"), "", head, rule]
    for selector in sorted({s for s, _ in cells if s != "full"}):
        row = []
        for ratio in ratios:
            rs = list(cells.get((selector, ratio), {}).values())
            row.append(f"{np.mean([r['final'] for r in rs]):.3f} / {np.mean([r['auc'] for r in rs]):.3f} ({len(rs)})"
                       if rs else "–")
        lines.append(f"| {selector} | " + " | ".join(row) + " |")
    diffs = paired(cells, reference)
    for metric, name in (("final", "final accuracy"), ("auc", "AUC")):
        lines += ["", f"{reference} minus each method, Δ {name}: mean [95% bootstrap interval over seeds]", "", head, rule]
        for label in dict.fromkeys(k[1] for k in diffs):
            row = []
            for ratio in ratios:
                d, (lo, hi) = diffs.get((ratio, label, metric), (np.array([]), (np.nan, np.nan)))
                row.append("–" if not d.size else f"{d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]" if np.isfinite(lo)
                           else f"{d.mean():+.3f} ({d.size} seed)")
            lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path, help="an `opdlab compare` --out_dir")
    p.add_argument("--reference", default="teachability", help="the method whose paired differences are reported")
    p.add_argument("--versus", type=Path, default=None,
                   help="a second `opdlab compare` folder (a rerun of some cells); report whether each verdict holds")
    p.add_argument("--wide", action="store_true", help="budgets as columns (the layout of docs/results.md)")
    args = p.parse_args()
    runs = load_runs(args.folder)
    if not runs:
        raise SystemExit(f"no finished runs under {args.folder}/runs/*/seed*/result.json")
    if args.versus is not None:
        rerun = load_runs(args.versus)
        if not rerun:
            raise SystemExit(f"no finished runs under {args.versus}/runs/*/seed*/result.json")
        print(robustness_report(runs, rerun, args.reference))
        return
    if args.wide:
        print(wide_report(runs, args.reference))
        return
    print(report(runs, args.reference))
    print()
    print(matched_token_report(runs))


if __name__ == "__main__":
    main()
