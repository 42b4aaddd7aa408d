"""`opdlab eval` on the shipped toy students: Avg@k / pass@k / maj@k at two temperatures, and the time per
sampled response with each rollout engine, side by side in one run.

    python benchmarks/eval_toys.py --output benchmarks/results/eval_toys.md
    python benchmarks/eval_toys.py --engines static reference vllm     # in an environment with vllm installed

Each cell is one `opdlab eval` process (a fresh output folder, one torch thread per process unless --threads),
run one after another; the time per response is generation only (model loading and scoring excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cell(toy: str, temperature: float, engine: str, k: int, limit: int | None, threads: int, out: Path) -> dict:
    bench = {"name": toy, "path": f"toy:{toy}"} | ({"limit": limit} if limit else {})
    cmd = [sys.executable, "-m", "opdlab.cli", "eval", "--model", f"toy:{toy}/student", "--benchmarks",
           json.dumps([bench]), "--k", str(k), "--temperature", str(temperature), "--engine", engine,
           "--out_dir", str(out), "--batch_size", "32"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    result = json.loads((out / "result.json").read_text())
    result["process_seconds"] = time.perf_counter() - started
    result["command"] = "opdlab " + " ".join(cmd[3:-2])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--toys", nargs="+", default=["add3", "scratch4"])
    p.add_argument("--temperatures", nargs="+", type=float, default=[1.0, 0.6])
    p.add_argument("--engines", nargs="+", default=["static", "reference"])
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="problems per set (default: the whole test split, 256)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", help="append the markdown here")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for toy in args.toys:
            for temperature in args.temperatures:
                for engine in args.engines:
                    out = Path(tmp) / f"{toy}_{temperature}_{engine}"
                    r = run_cell(toy, temperature, engine, args.k, args.limit, args.threads, out)
                    b = r["benchmarks"][toy]
                    rows.append((toy, temperature, engine, b, r))
                    print(f"{toy} T={temperature} {engine}: Avg@{args.k} {b['avg']['mean']:.3f} "
                          f"({r['seconds_per_response'] * 1000:.2f} ms/response)", flush=True)
    k = args.k
    lines = [f"## eval_toys — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             f"Machine: {platform.node()}, {os.cpu_count()} CPU threads, Python {platform.python_version()}; "
             f"{args.threads} torch thread(s) per process.",
             f"Command: `python benchmarks/eval_toys.py {' '.join(sys.argv[1:])}`",
             f"Each cell: `{rows[0][4]['command']}` with its toy, temperature and engine; k={k}; the toy's held-out "
             "test split (256 problems unless --limit).", "",
             f"| student | temperature | engine | problems | Avg@{k} | pass@1 | pass@{k} | maj@{k} | mean length | cut "
             "| ms per response |", "|" + "---|" * 11]
    for toy, temperature, engine, b, r in rows:
        lines.append(f"| toy:{toy}/student | {temperature:g} | {engine} | {b['problems']} | {b['avg']['mean']:.3f} "
                     f"| {b['pass@1']['mean']:.3f} | {b[f'pass@{k}']['mean']:.3f} | {b[f'maj@{k}']['mean']:.3f} "
                     f"| {b['length']['mean']:.1f} | {b['truncated']['mean']:.3f} "
                     f"| {r['seconds_per_response'] * 1000:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        with open(args.output, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
