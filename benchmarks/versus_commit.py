"""One benchmark at a base commit and at the working tree, alternating, side by side with ratios.

    python benchmarks/versus_commit.py --base 8d4a775 --rounds 2 -- benchmarks/loss_memory.py --tokens 1024
    python benchmarks/versus_commit.py --base 8d4a775 -- benchmarks/step_throughput.py --rounds 4 --threads 1

Each version runs its *own* copy of the benchmark script (the base from a temporary `git worktree`, with
`PYTHONPATH` pointing there, so it imports the base's opdlab), the versions alternate round by round
(base first in odd rounds, the working tree first in even ones), and each run's last markdown table is
read back. Rows are matched on their text columns; every numeric column gets the median over rounds
of each version and head/base. This machine is shared and noisy: only ratios within one invocation mean
anything.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from report import publish

ROOT = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"^\**(-?[0-9][0-9,]*\.?[0-9]*)x?\**")


def last_table(text: str) -> tuple[list[str], list[list[str]]]:
    """(header cells, rows of cells) of the last markdown table in `text`."""
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    if not tables:
        raise ValueError("the benchmark printed no markdown table")
    header, _, *rows = tables[-1]
    return header, rows


def number(cell: str) -> float | None:
    """The leading number of a cell ("1,554", "0.70x (0.67x)", "**8.9x**"), or None for text."""
    match = NUMBER.match(cell)
    return float(match.group(1).replace(",", "")) if match else None


def run_version(tree: Path, script: str, args: list[str], out: Path) -> tuple[list[str], list[list[str]]]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(tree / "benchmarks")]))
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(tree / script), *args, "--output", str(out)]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"versus_commit: {' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return last_table(out.read_text())


def compare_tables(header: list[str], runs: dict[str, list[list[list[str]]]], key_names: list[str] | None = None,
                   column_names: list[str] | None = None) -> str:
    """A markdown table: the key columns (default: the text ones), then per numeric column (default: all
    the others) base, head and head/base."""
    first = runs["base"][0]
    for name in (key_names or []) + (column_names or []):
        if name not in header:
            sys.exit(f"versus_commit: no column {name!r} in the benchmark's table; it has {header}")
    numeric_anywhere = [i for i in range(len(header)) if any(number(row[i]) is not None for row in first)]
    keys = ([header.index(n) for n in key_names] if key_names
            else [i for i in range(len(header)) if i not in numeric_anywhere])
    numeric = ([header.index(n) for n in column_names] if column_names
               else [i for i in numeric_anywhere if i not in keys])
    cols = [header[i] for i in keys]
    for i in numeric:
        cols += [f"{header[i]} base", f"{header[i]} head", "head/base"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    index = {version: [{tuple(r[i] for i in keys): r for r in table} for table in tables]
             for version, tables in runs.items()}
    for row in first:
        key = tuple(row[i] for i in keys)
        cells = list(key)
        for i in numeric:
            med = {}
            for version in ("base", "head"):
                values = [number(t[key][i]) for t in index[version] if key in t and number(t[key][i]) is not None]
                med[version] = statistics.median(values) if values else float("nan")
            ratio = med["head"] / med["base"] if med["base"] else float("nan")
            cells += [f"{med['base']:,.3g}", f"{med['head']:,.3g}", f"{ratio:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="commit (or ref) to compare the working tree against")
    p.add_argument("--rounds", type=int, default=2, help="runs of each version, alternating")
    p.add_argument("--keys", help="comma-separated columns that identify a row (default: the text columns)")
    p.add_argument("--columns", help="comma-separated numeric columns to compare (default: all the others)")
    p.add_argument("--output", help="append the markdown result here")
    p.add_argument("benchmark", nargs=argparse.REMAINDER, help="-- script.py [its arguments]")
    args = p.parse_args()
    command = args.benchmark[1:] if args.benchmark[:1] == ["--"] else args.benchmark
    if not command:
        p.error("give the benchmark after --, e.g. -- benchmarks/loss_memory.py --tokens 1024")
    script, bench_args = command[0], command[1:]
    base_sha = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="opdlab-base-") as tmp:
        base_tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), base_sha], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            runs: dict[str, list] = {"base": [], "head": []}
            header = None
            for r in range(args.rounds):
                order = ("base", "head") if r % 2 == 0 else ("head", "base")
                for version in order:
                    tree = base_tree if version == "base" else ROOT
                    header, rows = run_version(tree, script, bench_args, Path(tmp) / f"{version}.md")
                    runs[version].append(rows)
                    print(f"versus_commit: round {r + 1}/{args.rounds} {version} done", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, check=False)
    head_sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.strip()
    publish("versus_commit", f"{os.uname().nodename}, {os.cpu_count()} CPUs",
            f"Benchmark: `{' '.join(command)}`; base {base_sha}, head {head_sha}{' + uncommitted changes' if dirty else ''}; "
            f"{args.rounds} alternating rounds, medians.\n", compare_tables(header, runs, args.keys and args.keys.split(","),
                                                         args.columns and args.columns.split(",")), args.output)


if __name__ == "__main__":
    main()
