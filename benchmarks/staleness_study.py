"""How stale rollouts change what OPD learns: final held-out accuracy and the area under the accuracy curve at maximum
staleness N = 0, 1, 2, 4, paired by seed against N = 0 (issue 37; the plan: benchmarks/results/staleness_study/PLAN.md).

    python benchmarks/staleness_study.py                              # the whole grid (hours on 2 cores)
    python benchmarks/staleness_study.py --tasks add3 --jobs 2        # one task, two runs at a time
    python benchmarks/staleness_study.py --report-only                # the tables from the runs finished so far

Every run is `opdlab fit --config <task config>` with the cell's selector, divergence and
`--model.pipeline.max_staleness N --model.pipeline.producer inline`: the rollouts trained at step t were sampled with
the weights of step max(t - N, 1). The inline producer trains exactly the losses of the `process` producer (a worker
process; tests/test_pipeline.py checks this step by step), without needing a second core per run, so the grid is about
learning, not speed (benchmarks/async_throughput.py is the speed). One torch thread per run. Runs already finished
(their summary.json exists) are skipped, so the script continues where it stopped.

Output: <out>/runs/<cell>/seed<S>/ (each run's folder), <out>/results.csv (one row per run), <out>/table.md (per cell:
final accuracy and AUC, mean over seeds, and the paired difference against N = 0 with a 95% t interval over seeds).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TASKS = {"add3": "configs/ta_opd.yaml", "mix4": "configs/ta_opd_mix4.yaml"}
SELECTORS = {"full": ["--model.selector", "full"], "ta5": []}  # ta5: the task config's TA-OPD at 5%
DIVERGENCES = ("forward_kl", "reverse_kl", "sampled_token")
STALENESS = (0, 1, 2, 4)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # Student t quantiles for 95% two-sided intervals


def run_one(out: Path, task: str, selector: str, divergence: str, n: int, seed: int, steps: int, val_every: int) -> dict:
    folder = out / "runs" / f"{task}-{selector}-{divergence}-N{n}" / f"seed{seed}"
    summary = folder / "summary.json"
    if not summary.exists():
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "opdlab.cli", "fit", "--config", str(REPO / TASKS[task]), *SELECTORS[selector],
               "--model.divergence", divergence, "--model.pipeline.max_staleness", str(n),
               "--model.pipeline.producer", "inline", "--seed_everything", str(seed),
               "--model.training.seed", str(seed), "--trainer.max_steps", str(steps),
               "--trainer.val_check_interval", str(val_every), "--trainer.callbacks", "[]",
               "--trainer.logger.init_args.save_dir", str(folder.parent), "--trainer.logger.init_args.name", "",
               "--trainer.logger.init_args.version", folder.name, "--stage_trace.enabled", "false"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        start = time.time()
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
        (folder / "log.txt").write_text(done.stdout[-20000:] + "\n--- stderr ---\n" + done.stderr[-20000:])
        if done.returncode != 0 or not summary.exists():
            return {"cell": folder.parent.name, "seed": seed, "error": done.stderr.strip().splitlines()[-1:]}
        print(f"{folder.parent.name} seed {seed}: {time.time() - start:.0f} s", flush=True)
    reading = json.loads(summary.read_text())
    curve = [(v["step"], v["accuracy"]) for v in reading["validations"]]
    return {"task": task, "selector": selector, "divergence": divergence, "N": n, "seed": seed,
            "final": reading["accuracy_after"], "auc": auc(curve), "before": reading["accuracy_before"],
            "train_seconds": reading["train_seconds"], "staleness_mean": reading.get("staleness_mean")}


def auc(curve: list[tuple[int, float]]) -> float:
    """Mean accuracy over training: the trapezoid area under accuracy(step) divided by the steps spanned."""
    curve = sorted(curve)
    if len(curve) < 2:
        return curve[0][1] if curve else float("nan")
    area = sum((s1 - s0) * (a0 + a1) / 2 for (s0, a0), (s1, a1) in itertools.pairwise(curve))
    return area / (curve[-1][0] - curve[0][0])


def paired(diffs: list[float]) -> str:
    """mean [95% t interval] of paired differences (percentage points)."""
    if not diffs:
        return "-"
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return f"{100 * mean:+.1f} (n=1)"
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    half = T975.get(len(diffs) - 1, 1.96) * sd / math.sqrt(len(diffs))
    return f"{100 * mean:+.1f} [{100 * (mean - half):+.1f}, {100 * (mean + half):+.1f}]"


def report(rows: list[dict], out: Path, steps: int) -> str:
    by = {(r["task"], r["selector"], r["divergence"], r["N"], r["seed"]): r for r in rows if "final" in r}
    lines = [f"# Staleness study: accuracy after {steps} steps and AUC, paired by seed against N = 0", "",
             ("Each cell: mean over seeds of the final held-out greedy accuracy and of the AUC (mean accuracy over the "
              "validations), and the paired difference against the same task, selector, divergence and seed at N = 0 "
              "(percentage points, 95% t interval over seeds). `python benchmarks/staleness_study.py --report-only`."),
             "",
             "| task | selector | divergence | N | seeds | final | Δ final vs N=0 | AUC | Δ AUC vs N=0 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task, selector, divergence, n in itertools.product(TASKS, SELECTORS, DIVERGENCES, STALENESS):
        cell = [by[k] for k in by if k[:4] == (task, selector, divergence, n)]
        if not cell:
            continue
        final = sum(r["final"] for r in cell) / len(cell)
        area = sum(r["auc"] for r in cell) / len(cell)
        base = {r["seed"]: r for k, r in by.items() if k[:4] == (task, selector, divergence, 0)}
        pairs = [(r, base[r["seed"]]) for r in cell if r["seed"] in base]
        d_final = paired([r["final"] - b["final"] for r, b in pairs]) if n else ""
        d_auc = paired([r["auc"] - b["auc"] for r, b in pairs]) if n else ""
        lines.append(f"| {task} | {selector} | {divergence} | {n} | {len(cell)} | {100 * final:.1f}% | {d_final} | "
                     f"{100 * area:.1f}% | {d_auc} |")
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    with open(out / "results.csv", "w", newline="") as f:
        fields = ["task", "selector", "divergence", "N", "seed", "final", "auc", "before", "train_seconds",
                  "staleness_mean"]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for key in sorted(by):
            writer.writerow({k: by[key].get(k) for k in fields})
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "staleness_study")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--selectors", nargs="+", default=list(SELECTORS), choices=list(SELECTORS))
    parser.add_argument("--divergences", nargs="+", default=list(DIVERGENCES), choices=list(DIVERGENCES))
    parser.add_argument("--staleness", nargs="+", type=int, default=list(STALENESS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run (default 100)")
    parser.add_argument("--val-every", type=int, default=20, help="validation interval in steps (default 20)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each; default 2)")
    parser.add_argument("--report-only", action="store_true", help="only the tables from finished runs")
    args = parser.parse_args()
    cells = list(itertools.product(args.tasks, args.seeds, args.selectors, args.divergences, args.staleness))
    if args.report_only:
        cells = [c for c in cells if (args.out / "runs" / f"{c[0]}-{c[2]}-{c[3]}-N{c[4]}" / f"seed{c[1]}" /
                                      "summary.json").exists()]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        rows = list(pool.map(lambda c: run_one(args.out, c[0], c[2], c[3], c[4], c[1], args.steps, args.val_every),
                             cells))
    failed = [r for r in rows if "error" in r]
    for r in failed:
        print(f"FAILED {r['cell']} seed {r['seed']}: {r['error']}", file=sys.stderr)
    print(report(rows, args.out, args.steps))


if __name__ == "__main__":
    main()
