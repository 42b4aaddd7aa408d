"""What an evaluation reports: the metrics per benchmark and seed, and mean ± std over seeds and over
benchmarks (`tabulate`, definitions in opdlab/metrics.py and docs/evaluation.md); the markdown table
(`markdown_table`) and the note under it on sampled versus greedy accuracy (`sampling_note`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from opdlab.metrics import benchmark_metrics, mean_std

if TYPE_CHECKING:
    from opdlab.evaluation.benchmarks import LoadedBenchmark
    from opdlab.evaluation.options import EvalOptions


def tabulate(done: dict[tuple, list[dict]], loaded: list[LoadedBenchmark], options: EvalOptions,
             pass_ks: list[int]) -> dict:
    """Per benchmark and seed the metrics; per benchmark and over benchmarks (equal weight) mean and std."""
    per_seed: dict[str, dict[int, dict]] = {}
    for bench in loaded:
        name = bench.spec.name
        for seed in options.seeds:
            problems = []
            for i in range(len(bench.problems)):
                recs = done[(seed, name, i)]
                problems.append({"correct": [r["correct"] for r in recs], "keys": [r["key"] for r in recs],
                                 "lengths": [r["length"] for r in recs], "truncated": [r["truncated"] for r in recs],
                                 "parsed": [r["key"] is not None for r in recs]})
            per_seed.setdefault(name, {})[seed] = benchmark_metrics(problems, pass_ks)
    metrics = list(next(iter(next(iter(per_seed.values())).values())))
    benchmarks = {}
    for name, seeds in per_seed.items():
        benchmarks[name] = {"problems": len(next(b.problems for b in loaded if b.spec.name == name)),
                            **{m: summary([seeds[s][m] for s in options.seeds]) for m in metrics}}
    overall = {m: summary([sum(per_seed[n][s][m] for n in per_seed) / len(per_seed) for s in options.seeds])
               for m in metrics}
    return {"k": options.k, "seeds": list(options.seeds), "metrics": metrics, "benchmarks": benchmarks,
            "mean": overall, "per_seed": {n: {str(s): v for s, v in d.items()} for n, d in per_seed.items()}}


def summary(values: list[float]) -> dict:
    """Mean and std over seeds; the std of one seed is unknown: null in result.json (strict JSON has no NaN)."""
    m, s = mean_std(values)
    return {"mean": m, "std": s if math.isfinite(s) else None}


METRIC_NAMES = {"avg": "Avg@{k}", "length": "length", "truncated": "cut", "unparsed": "no answer"}


def markdown_table(result: dict, label: str) -> str:
    k, several = result["k"], len(result["seeds"]) > 1
    metrics = result["metrics"]
    header = ["benchmark", "problems", *(METRIC_NAMES.get(m, m).format(k=k) for m in metrics)]

    def cell(stat: dict, metric: str) -> str:
        if metric == "length":
            text = f"{stat['mean']:.1f}" + (f" ± {stat['std']:.1f}" if several else "")
        else:
            text = f"{stat['mean']:.1%}" + (f" ± {stat['std']:.1%}" if several else "")
        return text

    rows = [[name, str(b["problems"]), *(cell(b[m], m) for m in metrics)] for name, b in result["benchmarks"].items()]
    if len(rows) > 1:
        rows.append(["mean (equal weight)", "", *(cell(result["mean"][m], m) for m in metrics)])
    seeds = ", ".join(map(str, result["seeds"]))
    settings = result.get("settings") or {}
    sampled = (f" sampled at temperature {settings['temperature']:g}, top_p {settings['top_p']:g}"
               if "temperature" in settings else "")
    title = f"{label}: k={k} responses per problem{sampled}, seeds {seeds}"
    lines = [title + (" (mean ± std over seeds)" if several else ""),
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def sampling_note(result: dict, greedy: float | None = None) -> str | None:
    """One line under the table: what Avg@k is, and why it is below greedy accuracy when sampling is hot; with
    `greedy` (a run's own greedy held-out accuracy, `run_greedy_accuracy`), the two side by side."""
    k, temperature = result["k"], (result.get("settings") or {}).get("temperature")
    if not temperature:
        return None  # greedy: Avg@1 is the greedy accuracy
    what = "one response" if k == 1 else f"{k} responses"
    mean = (result.get("mean") or {}).get("avg", {}).get("mean")
    side = (f" Side by side: greedy {greedy:.1%} (the fit's held-out prompts, summary.json) vs sampled Avg@{k} "
            f"{mean:.1%} (these benchmarks)." if greedy is not None and isinstance(mean, float) else "")
    return (f"Avg@{k} is the mean accuracy of {what} per problem sampled at temperature {temperature:g}; it is "
            f"expected to be below the greedy accuracy (what `opdlab fit` prints as 'student accuracy'; here: "
            f"--temperature 0 --k 1), more so the higher the temperature.{side}")


def run_greedy_accuracy(folder: Path) -> float | None:
    """The greedy held-out accuracy an opdlab run reached (`accuracy_after` of its summary.json), or None."""
    try:
        value = json.loads((folder / "summary.json").read_text()).get("accuracy_after")
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
