"""`opdlab compare`: side-by-side runs of configs that differ only in the selector (and its ratio).

    opdlab compare --fit_config [configs/ta_opd.yaml] --selectors [full,random,entropy,divergence,teachability] \
        --ratio 0.05 --seeds [0,1,2] --out_dir runs/compare/add3
    opdlab compare --fit_config [configs/ta_opd.yaml] --selectors [] --sweep_selector teachability \
        --sweep_ratios [0.01,0.05,0.1,0.3,1.0]

Each run is an `opdlab fit` subprocess over the base config(s) plus the selector overlay
`configs/selectors/<name>.yaml`, with `--model.selector.init_args.ratio`, `--seed_everything S
--model.training.seed S`, a step count, frequent validation and per-step logging. Curves are read back from the
run's `summary.json` (written by `opdlab fit`: every validation with its step and accuracy, the training wall
time) and its TensorBoard events (`train/kept_tokens` per step, `train/valid_tokens`). While a run trains, its
progress lines (`train 120/200 ...`, `val at step 120: ...`) are printed prefixed with the run's name; its
whole output is in `<run>/fit.log`. A finished run leaves `result.json` and is not rerun (unless
`--rerun true`), so an interrupted comparison resumes.

Outputs in `out_dir`: results.csv (one row per run), table.csv and table.md (mean ± std over seeds per
method, then the budget sweep; a method with one seed shows its mean alone, marked "(n=1)", and its std is
nan in the CSVs: the spread of one value is unknown, not zero), curves.csv (mean ± std accuracy and supervised
tokens so far at each validation), accuracy_vs_step.png and accuracy_vs_tokens.png (a panel per budget, full-token OPD in each)
and, with a sweep, sweep_vs_step.png and sweep_vs_tokens.png (a panel per swept selector).
"""

from __future__ import annotations

import csv
import inspect
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import numpy as np
import yaml

from opdlab import metrics
from opdlab.console import OpdlabError
from opdlab.diagnostics import plots
from opdlab.metrics import mean_std
from opdlab.runs import writable_folder

NO_RATIO = {"full"}  # overlays whose selector takes no ratio (always every valid token)
PROGRESS_LINES = ("train ", "val at step ")  # the lines of a run's output shown while it trains (opdlab fit's
# plain progress lines: its stdout is a pipe, not a terminal)
OUTPUT_LOCK = threading.Lock()  # runs in parallel (--jobs) print whole lines, one at a time


def say(line: str) -> None:
    """One line on stdout, whole: lines of runs in parallel never interleave mid-line."""
    with OUTPUT_LOCK:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


@dataclass(frozen=True)
class RunSpec:
    selector: str
    ratio: float
    seed: int

    @property
    def label(self) -> str:
        """The selector's short name (an overlay path's file stem)."""
        return Path(self.selector).stem if self.selector.endswith((".yaml", ".yml")) else self.selector

    @property
    def method(self) -> str:
        return self.label if self.label in NO_RATIO else f"{self.label}@{self.ratio:g}"

    @property
    def name(self) -> str:
        """Directory name of the method's runs."""
        return self.label if self.label in NO_RATIO else f"{self.label}_r{self.ratio:g}"


@dataclass
class RunResult:
    spec: RunSpec
    ok: bool
    val_steps: list[int] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    kept_tokens: float = float("nan")
    valid_tokens: float = float("nan")
    val_supervised_tokens: list[float] = field(default_factory=list)  # kept tokens so far, at each validation
    fit_seconds: float = float("nan")
    process_seconds: float = float("nan")
    error: str = ""
    eval_avg: float = float("nan")  # equal-weight mean Avg@k of the exported student (fit's --eval.*), if evaluated

    @property
    def before(self) -> float:
        return self.val_accuracy[0] if self.val_steps and self.val_steps[0] == 0 else float("nan")

    @property
    def final(self) -> float:
        return self.val_accuracy[-1] if self.val_accuracy else float("nan")

    @property
    def best(self) -> float:
        """Best validation accuracy after training started (step > 0)."""
        during = [a for s, a in zip(self.val_steps, self.val_accuracy, strict=True) if s > 0]
        return max(during) if during else float("nan")


def overlay_path(selector: str, overlays_dir: Path) -> Path:
    """A selector overlay YAML: a path as given, or `<overlays_dir>/<name>.yaml`."""
    path = Path(selector) if selector.endswith((".yaml", ".yml")) else overlays_dir / f"{selector}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in overlays_dir.glob("*.yaml"))
        raise FileNotFoundError(f"no selector overlay {path}; known in {overlays_dir}: {known}")
    return path


def fit_command(spec: RunSpec, configs: list[str], overlays_dir: Path, run_root: Path, steps: int,
                val_check_interval: int, extra_args: list[str], top_k: int | None = None) -> list[str]:
    """The `opdlab fit` command line of one run."""
    cmd = [sys.executable, "-m", "opdlab.cli", "fit"]
    for config in configs:
        cmd += ["--config", config]
    overlay = overlay_path(spec.selector, overlays_dir)
    cmd += ["--config", str(overlay)]
    if spec.label not in NO_RATIO:
        cmd += ["--model.selector.init_args.ratio", f"{spec.ratio:g}"]
    if top_k is not None and "top_k" in (yaml.safe_load(overlay.read_text())["model"]["selector"].get("init_args") or {}):
        cmd += ["--model.selector.init_args.top_k", str(top_k)]
    cmd += [
        "--seed_everything", str(spec.seed), "--model.training.seed", str(spec.seed),
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(val_check_interval),
        "--trainer.log_every_n_steps", "1",
        "--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.init_args.save_dir", str(run_root),
        "--trainer.logger.init_args.name", spec.name,
        "--trainer.logger.init_args.version", f"seed{spec.seed}",
    ]
    return cmd + list(extra_args)


def read_scalars(log_dir: Path) -> dict[str, list[float]]:
    """TensorBoard scalars of one run: tag -> values in the order they were written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    acc.Reload()
    return {tag: [e.value for e in sorted(acc.Scalars(tag), key=lambda e: e.wall_time)] for tag in acc.Tags()["scalars"]}


def supervised_so_far(kept_per_step: list[float], val_steps: list[int]) -> list[float]:
    """Tokens supervised before each validation: the sum of the first `step` logged `train/kept_tokens`.

    `compare` logs every step (`--trainer.log_every_n_steps 1`), so the i-th value is step i's count.
    """
    total = np.concatenate([[0.0], np.cumsum(kept_per_step)])
    return [float(total[min(s, len(kept_per_step))]) for s in val_steps]


def read_fit_summary(log_dir: Path) -> dict:
    """The `summary.json` `opdlab fit` writes in its run folder (steps, training seconds, every validation)."""
    path = log_dir / "summary.json"
    if not path.is_file():
        raise CompareError(f"{path} not found: the fit finished but wrote no summary.json (an opdlab older than "
                           "compare, or extra_args that move the run folder, e.g. another logger)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CompareError(f"{path} is not readable JSON ({err})") from None


def stream_fit(command: list[str], env: dict, log: Path, name: str) -> tuple[int, list[str]]:
    """Run one `opdlab fit`: its output (stdout and stderr, in order) goes to `log` line by line, and its
    progress lines are printed prefixed with `[name]` as they come. Returns the exit code and the output lines."""
    lines: list[str] = []
    with open(log, "w") as f:
        f.write(" ".join(command) + "\n\n")
        f.flush()
        # Line-buffered child output, so progress arrives when printed; universal newlines also split the
        # carriage-return updates of other tools' bars (weights loading) into lines.
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                              env={**env, "PYTHONUNBUFFERED": "1"}) as proc:
            for line in proc.stdout:
                line = line.rstrip("\n")
                lines.append(line)
                f.write(line + "\n")
                if line.startswith(PROGRESS_LINES):
                    say(f"[{name}] {line}")
            code = proc.wait()
    return code, lines


def run_one(spec: RunSpec, command: list[str], log_dir: Path, env: dict, rerun: bool, position: str = "",
            eval_settings: dict | None = None) -> RunResult:
    """Run (or reload) one fit; read its summary.json and TensorBoard events into a RunResult. `eval_settings`
    (the `eval_fingerprint` of the run's --eval file) is recorded in its result.json beside its evaluation."""
    done = log_dir / "result.json"
    if done.is_file() and not rerun:
        return result_from_json(json.loads(done.read_text()))
    if log_dir.exists():  # a rerun starts from an empty folder: old and new events must not mix
        shutil.rmtree(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    name = f"{spec.method} seed {spec.seed}"
    say(f"compare: starting {name}{position}: {log_dir}")
    started = time.perf_counter()
    code, output = stream_fit(command, env, log_dir / "fit.log", name)
    seconds = time.perf_counter() - started
    if code != 0:
        tail = [line for line in output if line.strip()][-5:]
        say(f"compare: {spec.name} seed {spec.seed} failed (exit {code}): {' | '.join(tail)}")
        return RunResult(spec, ok=False, process_seconds=seconds, error="\n".join(tail))
    try:
        summary = read_fit_summary(log_dir)
    except CompareError as err:
        say(f"compare: {spec.name} seed {spec.seed} failed: {err}")
        return RunResult(spec, ok=False, process_seconds=seconds, error=str(err))
    steps = [int(v["step"]) for v in summary["validations"]]
    val = [float("nan") if v["accuracy"] is None else float(v["accuracy"]) for v in summary["validations"]]
    scalars = read_scalars(log_dir)
    kept = scalars.get("train/kept_tokens", [])
    evaluated = log_dir / "eval" / "result.json"
    result = RunResult(
        spec, ok=True, val_steps=steps, val_accuracy=val, val_supervised_tokens=supervised_so_far(kept, steps),
        kept_tokens=sum(kept), valid_tokens=sum(scalars.get("train/valid_tokens", [])),
        fit_seconds=float(summary["train_seconds"]), process_seconds=round(seconds, 1),
        eval_avg=json.loads(evaluated.read_text())["mean"]["avg"]["mean"] if evaluated.is_file() else float("nan"),
    )
    record = {**asdict(result), "spec": asdict(spec), "command": settings(command)}
    if eval_settings is not None:
        record["eval_settings"] = eval_settings
    done.write_text(json.dumps(record, indent=2))
    return result


def settings(command: list[str]) -> list[str]:
    """What a run's result depends on: its `opdlab fit` arguments (not the Python that ran them)."""
    return command[command.index("fit"):]


def result_from_json(data: dict) -> RunResult:
    names = {f.name for f in fields(RunResult)}  # not the record's command and eval settings
    data = {k: v for k, v in data.items() if k in names}
    return RunResult(**{**data, "spec": RunSpec(**data["spec"])})


def check_saved_results(commands: dict[Path, list[str]], out: Path, eval_settings: dict | None = None) -> None:
    """Results already in `out` are reused only if they were made with the same settings; otherwise refuse
    (they would be tabulated as if made with these). With an evaluation, the same settings include what the
    eval settings file holds (its `eval_fingerprint`), not only its name: a file edited since is refused."""
    for log_dir, command in commands.items():
        done = log_dir / "result.json"
        if not done.is_file():
            continue
        try:
            record = json.loads(done.read_text())
        except json.JSONDecodeError:
            raise CompareError(f"{done} is not readable JSON (a run killed while writing it?); delete it to run "
                               "that run again, or pass --rerun") from None
        saved = record.get("command")
        if saved is not None and saved != settings(command):
            first = next((f"{a} vs {b}" for a, b in zip(saved, settings(command), strict=False) if a != b),
                         f"{len(saved)} vs {len(settings(command))} arguments")
            raise CompareError(f"{out} already holds a result of {log_dir.relative_to(out)} made with other settings "
                               f"(first difference, saved vs now: {first}); pass --rerun to run such runs again, or "
                               "choose another --out_dir")
        if eval_settings is not None and record.get("eval_settings", {}).get("sha256") != eval_settings["sha256"]:
            before = record.get("eval_settings")
            what = (f"first difference, saved vs now: {first_difference(before, eval_settings)}" if before else
                    "it records no eval settings: made by an older opdlab compare")
            raise CompareError(f"{out} already holds a result of {log_dir.relative_to(out)} evaluated with other eval "
                               f"settings than {eval_settings['file']} holds now ({what}); pass --rerun to run such "
                               "runs again, or choose another --out_dir")


def first_difference(saved: dict, now: dict) -> str:
    """The first differing entry of two `eval_fingerprint`s, e.g. `k: 8 vs 4` or `benchmark file add3: ... vs ...`."""
    for part, prefix in (("options", ""), ("benchmark_files", "benchmark file ")):
        a, b = saved.get(part, {}), now.get(part, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return f"{prefix}{key}: {json.dumps(a.get(key))} vs {json.dumps(b.get(key))}"
    return f"fingerprint {saved.get('sha256')} vs {now.get('sha256')}"


def summarize(results: list[RunResult]) -> list[dict]:
    """One row per method (selector, ratio): mean ± std over seeds."""
    rows = []
    for method in dict.fromkeys(r.spec.method for r in results):
        runs = [r for r in results if r.spec.method == method]
        ok = [r for r in runs if r.ok]
        row = {"method": method, "selector": runs[0].spec.selector, "ratio": runs[0].spec.ratio,
               "seeds": len(ok), "failed": len(runs) - len(ok)}
        for key, values in (
            ("before", [r.before for r in ok]), ("final", [r.final for r in ok]), ("best", [r.best for r in ok]),
            ("supervised_tokens", [r.kept_tokens for r in ok]),
            ("retained_ratio", [r.kept_tokens / r.valid_tokens if r.valid_tokens else float("nan") for r in ok]),
            ("fit_seconds", [r.fit_seconds for r in ok]), ("eval_avg", [r.eval_avg for r in ok]),
        ):
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std(values)
        rows.append(row)
    return rows


def plus_minus(row: dict, key: str, fmt: str) -> str:
    """`mean ± std` of a summarized column; `mean (n=1)` from one seed (a spread of one value is unknown)."""
    return metrics.plus_minus(row[key + "_mean"], row[key + "_std"], fmt, missing="nan")


def markdown_table(rows: list[dict]) -> str:
    evaluated = any(np.isfinite(r.get("eval_avg_mean", float("nan"))) for r in rows)
    head = ("| method | seeds | before | final val/accuracy | best val/accuracy | supervised tokens "
            "| retained ratio | fit wall time (s) |" + (" eval Avg@k |" if evaluated else ""))
    lines = [head, "|" + "---|" * (9 if evaluated else 8)]
    for r in rows:
        failed = f" ({r['failed']} failed)" if r["failed"] else ""
        lines.append(
            f"| {r['method']} | {r['seeds']}{failed} | {r['before_mean']:.3f} | {plus_minus(r, 'final', '.3f')} "
            f"| {plus_minus(r, 'best', '.3f')} | {r['supervised_tokens_mean']:,.0f} | {r['retained_ratio_mean']:.3f} "
            f"| {plus_minus(r, 'fit_seconds', '.1f')} |" + (f" {plus_minus(r, 'eval_avg', '.3f')} |" if evaluated else "")
        )
    return "\n".join(lines)


RANK_KEYS = {"final": "final_mean", "best": "best_mean", "eval": "eval_avg_mean"}


def ranked(rows: list[dict], rank_by: str | None) -> list[dict]:
    """Rows best first by `rank_by` (final or best validation accuracy, or the evaluation's Avg@k); as given
    when None."""
    if rank_by is None:
        return rows
    key = RANK_KEYS[rank_by]
    if rank_by == "eval" and rows and not any(np.isfinite(r[key]) for r in rows):
        raise CompareError("rank_by=eval, but no run was evaluated: pass eval_config (e.g. configs/eval/toy.yaml), "
                           "which runs `opdlab fit`'s evaluation of each exported student")
    return sorted(rows, key=lambda r: -r[key] if np.isfinite(r[key]) else float("inf"))


def mean_curves(results: list[RunResult], x: str = "step") -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """method -> (x, mean accuracy, std) over the seeds that share those validation steps.

    x: "step", or "tokens" (the seeds' mean number of supervised tokens before each validation; runs
    recorded before compare kept that count are left out).
    """
    curves = {}
    for method in dict.fromkeys(r.spec.method for r in results):
        runs = [r for r in results if r.spec.method == method and r.ok and r.val_steps
                and (x == "step" or len(r.val_supervised_tokens) == len(r.val_steps))]
        if not runs:
            continue
        steps = sorted(set.intersection(*(set(r.val_steps) for r in runs)))
        acc = np.array([[dict(zip(r.val_steps, r.val_accuracy, strict=True))[s] for s in steps] for r in runs])
        if x == "step":
            xs = np.array(steps, dtype=float)
        else:
            xs = np.array([[dict(zip(r.val_steps, r.val_supervised_tokens, strict=True))[s] for s in steps]
                           for r in runs]).mean(0)
        mean, std = np.array([mean_std(column) for column in acc.T], dtype=float).reshape(-1, 2).T
        curves[method] = (xs, mean, std)  # std: nan from one seed (no band drawn)
    return curves


def curve_panels(results: list[RunResult], by: str, x: str) -> dict[str, dict]:
    """Plot panels: one per budget (by="ratio"; `full` in each) or per selector (by="selector")."""
    if by == "ratio":
        fixed = [r for r in results if r.spec.label in NO_RATIO]
        keys = list(dict.fromkeys(r.spec.ratio for r in results if r.spec.label not in NO_RATIO)) or [None]
        groups = {(f"budget {k:g}" if k is not None else "all"): fixed + [r for r in results if r.spec.label not in NO_RATIO
                                                                          and r.spec.ratio == k] for k in keys}
    else:
        groups = {label: [r for r in results if r.spec.label == label] for label in dict.fromkeys(r.spec.label for r in results)}
    return {title: mean_curves(runs, x) for title, runs in groups.items()}


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def run_rows(results: list[RunResult]) -> list[dict]:
    return [{"method": r.spec.method, "selector": r.spec.selector, "ratio": r.spec.ratio, "seed": r.spec.seed,
             "ok": r.ok, "before": r.before, "final": r.final, "best": r.best, "supervised_tokens": r.kept_tokens,
             "valid_tokens": r.valid_tokens, "fit_seconds": r.fit_seconds, "process_seconds": r.process_seconds}
            for r in results]


def curve_rows(results: list[RunResult]) -> list[dict]:
    """Per method and validation step: mean ± std accuracy and the mean supervised tokens so far."""
    by_step, by_tokens = mean_curves(results, "step"), mean_curves(results, "tokens")
    return [{"method": m, "step": int(s), "mean": float(a), "std": float(d),
             "supervised_tokens": float(by_tokens[m][0][i]) if m in by_tokens else float("nan")}
            for m, (steps, mean, std) in by_step.items() for i, (s, a, d) in enumerate(zip(steps, mean, std, strict=True))]


def check_before_running(specs: list[RunSpec], overlays: Path, steps: int, val_check_interval: int, jobs: int,
                         seeds: list[int] = (), threads: int | None = None, top_k: int | None = None) -> None:
    """Every selector name, budget and count, checked before the first run starts (a typo or a bad budget
    found after minutes of runs wastes them)."""
    import difflib

    repeated = sorted({s for s in seeds if list(seeds).count(s) > 1})
    if repeated:  # one run per (method, seed): [0,0] would be tabulated as one seed, not the two asked for
        raise CompareError(f"seeds repeat: {list(seeds)} (seed {', '.join(map(str, repeated))}); a seed's run is the "
                           "same run, so give distinct seeds, e.g. [0,1,2]")
    for name, value in (("threads", threads), ("top_k", top_k)):
        if value is not None and value < 1:
            raise CompareError(f"{name} must be >= 1 (or null: the default), got {value}")
    if not overlays.is_dir() and any(not s.selector.endswith((".yaml", ".yml")) for s in specs):
        raise CompareError(f"overlays_dir {overlays} is not a folder: selector names are looked up there as "
                           "<name>.yaml (e.g. configs/selectors); pass --overlays_dir, or overlay files as selectors")
    known = sorted(p.stem for p in overlays.glob("*.yaml"))
    for spec in specs:
        if not spec.selector.endswith((".yaml", ".yml")) and spec.selector not in known:
            close = difflib.get_close_matches(spec.selector, known, n=2, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise CompareError(f"no selector {spec.selector!r} in {overlays} (known: {', '.join(known)}){hint}")
        if spec.selector.endswith((".yaml", ".yml")) and not Path(spec.selector).is_file():
            raise CompareError(f"selector overlay {spec.selector} does not exist")
        if not 0 < spec.ratio <= 1:
            raise CompareError(f"ratio must be in (0, 1] (the share of response tokens kept), got {spec.ratio:g}")
    for name, value in (("steps", steps), ("val_check_interval", val_check_interval), ("jobs", jobs)):
        if value < 1:
            raise CompareError(f"{name} must be >= 1, got {value}")


def as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def run_specs(selectors: list[str], ratio: float | list[float], seeds: list[int], sweep_selector: str | list[str] | None,
              sweep_ratios: list[float]) -> tuple[list[RunSpec], list[RunSpec]]:
    """(comparison runs, sweep runs); a run asked for twice (e.g. a sweep point equal to a comparison run,
    or `full` at several ratios) is one run."""
    ratios = as_list(ratio)
    # Seed-major order: an interrupted comparison has every method for its first seeds.
    main = [RunSpec(s, 1.0, seed) if RunSpec(s, 1.0, 0).label in NO_RATIO else RunSpec(s, r, seed)
            for seed in seeds for r in ratios for s in selectors]
    sweep = [RunSpec(s, r, seed) for seed in seeds for s in as_list(sweep_selector) for r in sweep_ratios]
    return list(dict.fromkeys(main)), list(dict.fromkeys(sweep))


def compare(
    fit_config: list[str] = ["configs/ta_opd.yaml"],  # noqa: B006 (jsonargparse reads the default)
    selectors: list[str] = ["full", "random", "entropy", "divergence", "teachability"],  # noqa: B006
    ratio: float | list[float] = 0.05,
    seeds: list[int] = [0, 1, 2],  # noqa: B006
    steps: int = 200,
    val_check_interval: int = 20,
    sweep_selector: str | list[str] | None = None,
    sweep_ratios: list[float] = [0.01, 0.05, 0.1, 0.3, 1.0],  # noqa: B006
    overlays_dir: str | None = None,
    out_dir: str = "runs/compare",
    jobs: int = 1,
    threads: int | None = None,
    extra_args: list[str] = [],  # noqa: B006
    rerun: bool = False,
    top_k: int | None = None,
    eval_config: str | None = None,
    rank_by: Literal["final", "best", "eval"] | None = None,
) -> list[dict]:
    """Run `opdlab fit` for every selector x seed (and a budget sweep), then tabulate and plot.

    Every run's progress lines are printed as it trains, prefixed with its method and seed.

    Args:
        fit_config: base `opdlab fit` config(s), applied in order before each selector overlay
            (`--config` is compare's own config file, as for every jsonargparse command).
        selectors: selector overlays to compare: names in `overlays_dir` (full, random, entropy,
            divergence, teachability, ...) or paths to overlay YAML files.
        ratio: budget of every selector that takes one (`full` always keeps every token); a list, e.g.
            `[0.05,0.1]`, compares every selector at each budget (`full` runs once).
        seeds: seeds of each method (`--seed_everything S --model.training.seed S`).
        steps: training steps per run (`--trainer.max_steps`).
        val_check_interval: validate every this many steps, for the accuracy curves.
        sweep_selector: also run this selector (or each of a list, e.g. `[teachability,random]`) at every
            ratio of `sweep_ratios` (a budget sweep).
        sweep_ratios: the ratios of the sweep.
        overlays_dir: directory of the selector overlays (default: `selectors/` next to the first fit config).
        out_dir: where runs, tables and plots go.
        jobs: runs at once (each is its own process; on a 2-core CPU keep 1 or 2).
        threads: torch threads per run (OMP_NUM_THREADS), e.g. 1 with jobs=2 on 2 cores.
        extra_args: more `opdlab fit` arguments for every run, e.g. `[--trainer.callbacks=[]]`.
        rerun: rerun runs that already have a result.json.
        top_k: K of the top-K features of every selector whose overlay sets one (default: the overlay's,
            8); e.g. 4 on the long toy, whose vocabulary has 19 characters.
        eval_config: an `opdlab eval` settings file (e.g. configs/eval/toy.yaml): every run evaluates its exported
            student with it after training (Avg@k, pass@k: <run>/eval/), and the table gains an "eval Avg@k" column.
            What the file holds (its options and the content of its benchmark files) is recorded in each run's
            result.json and the table header: a finished run evaluated under other settings is refused, not reused.
        rank_by: order the table's rows best first by final or best validation accuracy, or by the evaluation's
            Avg@k (`eval`, needs eval_config); default: the order of `selectors`.
    """
    invocation = command_line(dict(locals()))  # the arguments as given (for the table header), before any is rebound
    out = Path(out_dir)
    if not fit_config:
        raise CompareError("fit_config is empty: give the base `opdlab fit` config(s), e.g. [configs/ta_opd.yaml]")
    for config in fit_config:
        if not Path(config).is_file():
            what = "is a folder, not a file" if Path(config).is_dir() else "not found"
            raise CompareError(f"fit_config {config} {what}; give the base `opdlab fit` config(s), e.g. "
                               "[configs/ta_opd.yaml]")
    overlays = Path(overlays_dir) if overlays_dir else Path(fit_config[0]).parent / "selectors"
    main, sweep = run_specs(selectors, ratio, seeds, sweep_selector, sweep_ratios)
    specs = list(dict.fromkeys(main + sweep))
    if not specs:
        raise CompareError(f"nothing to run: selectors {selectors} x seeds {seeds} (and no sweep) is empty; "
                           "pass at least one selector and one seed")
    check_before_running(specs, overlays, steps, val_check_interval, jobs, seeds, threads, top_k)
    if rank_by == "eval" and eval_config is None:
        raise CompareError("rank_by=eval needs eval_config (e.g. configs/eval/toy.yaml): the runs are ranked by the "
                           "evaluation of their exported students")
    eval_settings = None
    if eval_config is not None:
        eval_settings = check_eval_config(eval_config)
        extra_args = [*extra_args, "--eval", eval_config]
    writable_folder(out, "--out_dir")
    if not rerun:
        check_saved_results({out / "runs" / spec.name / f"seed{spec.seed}": fit_command(
            spec, fit_config, overlays, out / "runs", steps, val_check_interval, extra_args, top_k) for spec in specs},
            out, eval_settings)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))

    def launch(spec: RunSpec) -> RunResult:
        log_dir = out / "runs" / spec.name / f"seed{spec.seed}"
        command = fit_command(spec, fit_config, overlays, out / "runs", steps, val_check_interval, extra_args, top_k)
        if eval_settings is not None and (rerun or not (log_dir / "result.json").is_file()):
            now = eval_fingerprint(eval_config)  # the fit reads the file when it starts, maybe hours after compare did
            if now["sha256"] != eval_settings["sha256"]:
                raise CompareError(f"eval_config {eval_config} changed while the comparison ran (saved vs now: "
                                   f"{first_difference(eval_settings, now)}); the runs finished before are kept: run "
                                   "the same compare again with --rerun, or restore the file")
        result = run_one(spec, command, log_dir, env, rerun, f" (run {specs.index(spec) + 1} of {len(specs)})",
                         eval_settings)
        say(f"compare: {spec.method} seed {spec.seed}: final {result.final:.3f} best {result.best:.3f} "
            f"({result.fit_seconds:.0f} s)")
        return result

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = dict(zip(specs, pool.map(launch, specs), strict=True))
    table = ranked(summarize([results[s] for s in main]), rank_by)
    sweep_table = ranked(summarize([results[s] for s in sweep]), rank_by)
    header = command_header(invocation, fit_config, started, sum(r.process_seconds for r in results.values() if r.ok),
                            eval_settings)
    write_outputs(out, results, main, sweep, table, sweep_table, header=header,
                  label=", ".join(Path(c).name for c in fit_config))
    failed = [f"{r.spec.method} seed {r.spec.seed}" for r in results.values() if not r.ok]
    if failed:  # after writing what did finish
        raise CompareError(f"{len(failed)} of {len(results)} runs failed ({', '.join(failed[:5])}); their logs are "
                           f"under {out / 'runs'}; the table in {out / 'table.md'} covers the runs that finished")
    return table + sweep_table


def check_eval_config(path: str) -> dict:
    """The evaluation settings every run will use: read and checked (its benchmark files too) before any run.
    Returns their `eval_fingerprint`."""
    from opdlab.evaluation import EvalError, load_benchmark

    options = read_eval_options(path)
    try:
        if not options.benchmarks:
            raise EvalError("it lists no benchmarks")
        options.check()
        for bench in options.benchmarks:
            load_benchmark(bench)
    except (TypeError, ValueError, OSError, EvalError) as err:
        raise CompareError(f"eval_config {path}: {err}") from None
    return eval_fingerprint(path)


def read_eval_options(path: str):
    """The `EvalOptions` of an `opdlab eval` settings file, or one line saying what is wrong with it."""
    from opdlab.evaluation import EvalOptions

    file = Path(path)
    if not file.is_file():
        what = "is a folder, not a file" if file.is_dir() else "not found"
        raise CompareError(f"eval_config {path} {what}; pass an `opdlab eval` settings file, e.g. configs/eval/toy.yaml")
    try:
        data = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise CompareError(f"eval_config {path} is not readable YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CompareError(f"eval_config {path} holds a {type(data).__name__}, not a mapping of eval settings "
                           "(benchmarks, k, temperature, ...); e.g. configs/eval/toy.yaml")
    try:
        return EvalOptions.from_mapping(data)
    except (TypeError, ValueError) as err:
        raise CompareError(f"eval_config {path}: {err}") from None


def eval_fingerprint(path: str) -> dict:
    """What an evaluation depends on besides the student: every option of the settings file as loaded
    (defaults filled in; comments and layout do not count) and the content of each benchmark's local file or
    folder (sha256; `toy:` sets are made by code and hub ids are not hashed: their names stand for them).
    `sha256` digests both; compare stores the fingerprint in each run's result.json and reuses a run's
    evaluation only under the same one."""
    import hashlib

    options = read_eval_options(path)
    settings = json.loads(json.dumps(asdict(options), default=str))
    files = {b.name: content_digest(b.path) for b in options.benchmarks}
    digest = hashlib.sha256(json.dumps({"options": settings, "benchmark_files": files}, sort_keys=True).encode())
    return {"file": str(path), "sha256": digest.hexdigest()[:16], "options": settings, "benchmark_files": files}


def content_digest(path: str) -> str:
    """sha256 of a benchmark's local file, or of a local folder's files (names and contents, in name order);
    for a `toy:` set or a hub id, the name itself."""
    import hashlib

    from opdlab.evaluation import hash_file_into

    local = Path(path)
    if path.startswith("toy:") or not local.exists():
        return f"name {path}"
    digest = hashlib.sha256()
    for file in sorted(p for p in ([local] if local.is_file() else local.rglob("*")) if p.is_file()):
        digest.update(str(file.relative_to(local)).encode() + b"\0")
        hash_file_into(digest, file)
    return digest.hexdigest()[:16]


class CompareError(OpdlabError, RuntimeError):
    """Some runs failed, or nothing was asked to run: `opdlab compare` exits non-zero."""


def command_line(arguments: dict) -> str:
    """The `opdlab compare` command line of these `compare` arguments (those that differ from the defaults):
    what the table header records, from the command line or from Python alike."""
    defaults = {name: p.default for name, p in inspect.signature(compare).parameters.items()}
    parts = ["opdlab compare"]
    for name, value in arguments.items():
        if name in defaults and value != defaults[name]:
            parts += [f"--{name}", shlex.quote(cli_value(value))]
    return " ".join(parts)


def cli_value(value) -> str:
    """A value as an option reads it: `[full,random]`, `0.05`, `true`, `null`; a list with an item YAML would
    read as something else (e.g. `--trainer.callbacks=[]`) as JSON."""
    if isinstance(value, (list, tuple)):
        items = [cli_value(v) for v in value]
        plain = all(re.fullmatch(r"[\w./@+-]+", i) and yaml.safe_load(i) == v for i, v in zip(items, value, strict=True))
        return f"[{','.join(items)}]" if plain else json.dumps(list(value))
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return str(value)


def command_header(command: str, config: list[str], started: float, run_seconds: float,
                   eval_settings: dict | None = None) -> str:
    evaluation = ""
    if eval_settings is not None:  # what the file held, not only its name (it may be edited later)
        o = eval_settings["options"]
        sets = ", ".join(f"{b['name']}" + (f" (first {b['limit']})" if b.get("limit") else "") for b in o["benchmarks"])
        evaluation = (f"eval settings: {eval_settings['file']} as it was: k={o['k']}, temperature={o['temperature']}, "
                      f"top_p={o['top_p']}, seeds {o['seeds']}, sets {sets}; fingerprint {eval_settings['sha256']}  \n")
    return (f"command: `{command}`  \n"
            f"base config: {', '.join(config)}  \n{evaluation}"
            f"machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs), python {platform.python_version()}  \n"
            f"date: {time.strftime('%Y-%m-%d %H:%M')}; runs took {run_seconds:.0f} s in all (process time, summed over "
            f"runs that may have run in parallel); this invocation {time.perf_counter() - started:.0f} s (finished runs "
            "are reloaded, not rerun)")


def write_outputs(out: Path, results: dict, main: list[RunSpec], sweep: list[RunSpec], table: list[dict],
                  sweep_table: list[dict], header: str, label: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", run_rows(list(results.values())))
    write_csv(out / "table.csv", table + sweep_table)
    write_csv(out / "curves.csv", curve_rows([results[s] for s in main + sweep]))
    text = ["# opdlab compare", "", header, ""]
    for name, specs, rows, by, what in (("accuracy", main, table, "ratio", "selectors"),
                                        ("sweep", sweep, sweep_table, "selector", "budget sweep")):
        if not rows:
            continue
        runs = [results[s] for s in specs]
        text += [f"## {what.capitalize()}", "", markdown_table(rows), ""]
        for x, xlabel in (("step", "step"), ("tokens", "supervised tokens (cumulative, symlog)")):
            panels = {t: c for t, c in curve_panels(runs, by, x).items() if c}
            if panels:
                seeds = len({r.spec.seed for r in runs})
                spread = "mean ± std over seeds" if seeds > 1 else "one seed: no spread"
                plots.plot_curves(panels, out / f"{name}_vs_{x}.png", f"{label}: {what}, val/accuracy ({spread})",
                                  xlabel=xlabel, xlog=x == "tokens")
                text += [f"![{what}: accuracy vs {x}]({name}_vs_{x}.png)", ""]
    (out / "table.md").write_text("\n".join(text))
    print("\n".join(text))


def run_compare(argv: list[str]) -> None:
    """`opdlab compare ...`: jsonargparse turns `compare`'s signature and docstring into --help."""
    from jsonargparse import CLI

    from opdlab.console import one_line_parser_class

    # a CompareError is one line from opdlab.cli.main; a value jsonargparse refuses, from the parser class
    CLI(compare, args=argv, prog="opdlab compare", parser_class=one_line_parser_class())
