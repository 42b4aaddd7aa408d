"""How the torch thread count changes the quick start on a CPU: training time and the trained student's accuracy.

    python benchmarks/cpu_threads.py --output benchmarks/results/cpu_threads.md
    python benchmarks/cpu_threads.py --steps 200 --rounds 1          # the whole quick start, once per setting

Each setting is `opdlab fit --config configs/ta_opd.yaml` as its own process (the README's main job, cut to
`--steps` steps), with OMP_NUM_THREADS set to 1, to 2, or unset ("opdlab's choice": one thread for small models
on a CPU, `opdlab.module.choose_cpu_threads`). Rounds interleave the settings (this machine is shared and noisy,
so each ratio compares runs made minutes apart); the table reports the median training wall time from each run's
summary.json, its ratio to one thread, and every run's held-out accuracy after training (whether the thread count
changes the result: it changes the floating-point order of the matrix products, which on some CPUs changes the
sampled rollouts the way a different seed does).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from report import publish

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {"1 thread": "1", "2 threads": "2", "opdlab's choice (unset)": None}


def fit(threads: str | None, steps: int, folder: Path, name: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    command = [sys.executable, "-m", "opdlab.cli", "fit", "--config", str(REPO / "configs" / "ta_opd.yaml"),
               "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
               "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(folder),
               "--run_name", name]
    run = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{run.stderr[-3000:]}")
    return json.loads((folder / "ta_opd" / name / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per run (the quick start has 200)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per setting, interleaved")
    parser.add_argument("--output", help="append the markdown result here")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="opdlab_threads_"))
    seconds: dict[str, list[float]] = {s: [] for s in SETTINGS}
    accuracy: dict[str, list[float]] = {s: [] for s in SETTINGS}
    for r in range(args.rounds):
        order = list(SETTINGS)[r % len(SETTINGS):] + list(SETTINGS)[: r % len(SETTINGS)]
        for setting in order:
            summary = fit(SETTINGS[setting], args.steps, folder, f"r{r}_{SETTINGS[setting] or 'unset'}")
            seconds[setting].append(summary["train_seconds"])
            accuracy[setting].append(summary["accuracy_after"])
            print(f"round {r + 1}/{args.rounds} {setting}: {summary['train_seconds']:.1f} s, accuracy after "
                  f"{summary['accuracy_after']:.1%}", flush=True)
    one = statistics.median(seconds["1 thread"])
    rows = ["| OMP_NUM_THREADS | training wall time, each round | median | median / 1 thread's | accuracy after, each run |",
            "|---|---|---|---|---|"]
    for setting in SETTINGS:
        median = statistics.median(seconds[setting])
        rows.append(f"| {setting} | {', '.join(f'{t:.1f} s' for t in seconds[setting])} | {median:.1f} s | "
                    f"{median / one:.2f} | {', '.join(f'{a:.1%}' for a in accuracy[setting])} |")
    rows += ["", "Per round, the ratio of 2 threads to 1 thread (the load changes between rounds, less within one): "
             + ", ".join(f"{b / a:.2f}" for a, b in zip(seconds["1 thread"], seconds["2 threads"], strict=True))]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    publish("cpu_threads", f"{platform.node()}, {os.cpu_count()} CPU threads ({platform.processor() or platform.machine()}), "
            f"Python {platform.python_version()}, load average {load:.1f} at the end",
            f"`opdlab fit --config configs/ta_opd.yaml` cut to {args.steps} steps, {args.rounds} interleaved run(s) "
            "per setting, each its own process.\n", "\n".join(rows), args.output)


if __name__ == "__main__":
    main()
