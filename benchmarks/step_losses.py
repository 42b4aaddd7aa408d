"""The training loss of every step of short `opdlab fit` runs on the toy, for checking that a change leaves
training bit-identical (or seeing where it stops being so).

    python benchmarks/step_losses.py                       # 50 steps of each configuration, ~1.5-2 min on 2 cores
    python benchmarks/step_losses.py --steps 10 --configs ta_opd reverse_kl
    python benchmarks/versus_commit.py --base 75a2816 --rounds 1 -- $PWD/benchmarks/step_losses.py

Configurations, each `opdlab fit --config configs/ta_opd.yaml` (the README's main job: the add3 toy, local
teacher) with `--trainer.max_steps N --seed_everything 0 --trainer.limit_val_batches 0` (no validation: the
fit's validations before and after training are skipped too), a CSV logger writing every step, one torch thread:
- `ta_opd`: as is (TA-OPD, teachability at 5%, reverse KL);
- `full`: `--config configs/selectors/full.yaml` (full-token OPD);
- `reverse_kl`: `--model.divergence reverse_kl` (the divergence by its short name, with its defaults);
- `served`: `ta_opd` with `--model.teacher <url> --model.teacher_placement.top_logprobs full`: the add3 teacher
  behind the test suite's loopback stand-in for vLLM's server (tests/fake_vllm.py), sending every token's
  log-prob (reverse KL needs the whole distribution). Skipped, with a line, where the checkout has no
  tests/fake_vllm.py.
The configs' own divergence is reverse KL, so `reverse_kl` differs from `ta_opd` only in how the divergence is
named (a short name with its defaults): its losses equal ta_opd's while the two paths agree.

Each configuration runs in its own process (this script again, with --child), against the opdlab that
`import opdlab` finds here and that checkout's configs/ and tests/: under versus_commit.py that is the base
tree's (versus_commit sets PYTHONPATH). For a commit from before this script existed, give versus_commit the
script's absolute path: both sides then run this copy, each with its own opdlab.

The last table has a row per (configuration, step) with the step's `train/loss`, `train/grad_norm` and
`train/kept_tokens` as the run logged them (float32 values, printed in full, never in exponent notation), so
versus_commit.py matches rows on the text columns and gives head/base 1.00 for identical numbers; identical
runs print identical tables. A first table gives each configuration's wall time (not compared).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from importlib import metadata
from pathlib import Path

from report import publish

CONFIGS = {
    "ta_opd": [],
    "full": ["--config", "{tree}/configs/selectors/full.yaml"],
    "reverse_kl": ["--model.divergence", "reverse_kl"],
    "served": ["--model.teacher", "{server}", "--model.teacher_placement.top_logprobs", "full"],
}
COLUMNS = {"loss": "train/loss", "grad norm": "train/grad_norm", "kept tokens": "train/kept_tokens"}


def opdlab_tree() -> Path:
    """The checkout whose opdlab this interpreter imports (without importing it)."""
    spec = importlib.util.find_spec("opdlab")
    if spec is None or spec.origin is None:
        sys.exit("step_losses: opdlab is not importable (install it, or set PYTHONPATH to a checkout)")
    return Path(spec.origin).resolve().parent.parent


def fit_args(name: str, tree: Path, workdir: Path, steps: int, server: str = "") -> list[str]:
    extra = [a.format(tree=tree, server=server) for a in CONFIGS[name]]
    return ["fit", "--config", str(tree / "configs" / "ta_opd.yaml"), *extra, "--seed_everything", "0",
            "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
            "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.logger", "opdlab.loggers.CSVLogger",
            "--trainer.logger.init_args.save_dir", str(workdir / "runs"),
            "--trainer.logger.init_args.name", name]


def child(name: str, workdir: Path, steps: int) -> int:
    """One configuration's fit, in this process (the way the tests run the command: `opdlab.cli.main`)."""
    import torch

    torch.set_num_threads(1)
    from opdlab.cli import main

    tree = opdlab_tree()
    sys.argv = ["opdlab"]
    if name != "served":
        main(fit_args(name, tree, workdir, steps))
        return 0
    sys.path.insert(0, str(tree / "tests"))
    from fake_vllm import FakeVLLM

    from opdlab.models import resolve_model_path

    with FakeVLLM(resolve_model_path("toy:add3/teacher")) as server:
        main(fit_args(name, tree, workdir, steps, server.url))
    return 0


def full(value: str) -> str:
    """A logged number in full, positional (versus_commit reads a cell's leading number: no exponents)."""
    number = Decimal(repr(float(value)))  # the float's shortest exact repr, as digits
    return str(int(number)) if number == number.to_integral_value() else format(number, "f")


def read_metrics(workdir: Path, name: str) -> dict[int, dict[str, str]]:
    files = sorted((workdir / "runs" / name).rglob("metrics.csv"))
    if not files:
        return {}
    rows: dict[int, dict[str, str]] = {}
    with open(files[-1], newline="") as f:
        for row in csv.DictReader(f):
            if row.get(COLUMNS["loss"]):
                rows[int(float(row["step"]))] = row
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=50, help="optimizer steps per configuration")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--output", help="append the markdown result here")
    p.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        sys.exit(child(args.child, args.workdir, args.steps))

    tree = opdlab_tree()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(tree), *filter(None, [os.environ.get("PYTHONPATH")])]))
    results, seconds, notes = {}, {}, []
    with tempfile.TemporaryDirectory(prefix="step-losses-") as tmp:
        workdir = Path(tmp)
        for name in args.configs:
            if name == "served" and not (tree / "tests" / "fake_vllm.py").is_file():
                notes.append(f"served: skipped ({tree / 'tests' / 'fake_vllm.py'} not found)")
                continue
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", name, "--workdir", tmp,
                                   "--steps", str(args.steps)], cwd=tmp, env=env, capture_output=True, text=True,
                                  check=False)
            seconds[name] = time.perf_counter() - start
            results[name] = read_metrics(workdir, name)
            if proc.returncode != 0 or len(results[name]) != args.steps:
                sys.exit(f"step_losses: {name} failed (exit {proc.returncode}, {len(results[name])} of {args.steps} "
                         f"steps logged):\n{(proc.stdout + proc.stderr)[-3000:]}")
            print(f"# {name}: {args.steps} steps in {seconds[name]:.1f} s", flush=True)

    timing = ["| configuration | wall s | loss at step 1 | loss at last step |", "|---|---|---|---|"]
    for name, rows in results.items():
        timing.append(f"| {name} | {seconds[name]:.1f} | {full(rows[min(rows)][COLUMNS['loss']])} | "
                      f"{full(rows[max(rows)][COLUMNS['loss']])} |")
    lines = ["| configuration | step | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for name, rows in results.items():
        for step in sorted(rows):
            cells = [full(rows[step][c]) if rows[step].get(c) else "–" for c in COLUMNS.values()]
            lines.append(f"| {name} | step {step} | " + " | ".join(cells) + " |")
    setting = (f"opdlab from {tree}; configs/ta_opd.yaml (toy add3), {args.steps} steps, seed 0, no validation, "
               f"1 torch thread; torch {metadata.version('torch')}.\n" + "".join(f"{n}\n" for n in notes))
    publish("step_losses", f"{platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}", setting,
            "\n".join(timing) + "\n\n" + "\n".join(lines), args.output)


if __name__ == "__main__":
    main()
