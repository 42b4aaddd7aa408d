"""The output folder of an evaluation: what it holds (responses.jsonl, eval.json, result.json, results.md), whether
a new evaluation continues it or starts fresh (`plan_output`, checked before any model loads), the stored
responses read back and checked (`read_responses`), and the sink that writes each scored batch as it comes
(`ResponseSink`), replacing an earlier evaluation only once the new one has its first responses."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from opdlab.evaluation.fingerprints import benchmark_fingerprint
from opdlab.evaluation.options import EvalError, EvalOptions
from opdlab.evaluation.settings import json_kind, short
from opdlab.tasks.base import Problem

if TYPE_CHECKING:
    from opdlab.engines.base import RolloutEngine
    from opdlab.evaluation.benchmarks import LoadedBenchmark

RESPONSES, SETTINGS, RESULT, TABLE = "responses.jsonl", "eval.json", "result.json", "results.md"
PARTIAL = RESPONSES + ".partial"  # a fresh evaluation's first responses, before they replace the folder's
RECORD_FIELDS = {"seed": int, "benchmark": str, "index": int, "sample": int, "prompt": str, "answer": str,
                 "response": str, "correct": bool, "key": (str, type(None)), "length": int, "truncated": bool}
SETTINGS_FORMAT = 2  # eval.json: 2 records the model's and the benchmarks' content fingerprints
NOT_COMPARED = ("model",)  # the label: the same model under another path is the same model


@dataclass
class OutputPlan:
    """What an evaluation does with `out_dir`: continue the responses there (`done`), or start fresh
    (`fresh`: new responses go to responses.jsonl.partial and replace the folder's files once the first batch
    is written; until then an earlier evaluation there stays as it was)."""

    out_dir: Path
    settings: dict
    done: dict[tuple, list[dict]]
    fresh: bool


def first_difference(before, now, where: str = "") -> tuple[str, object, object] | None:
    """(key path, value there, value now) of the first difference of two JSON values, or None."""
    if isinstance(before, dict) and isinstance(now, dict):
        for key in [*before, *(k for k in now if k not in before)]:
            if key in NOT_COMPARED and not where:
                continue
            found = first_difference(before.get(key), now.get(key), f"{where}.{key}" if where else key)
            if found:
                return found
        return None
    if isinstance(before, list) and isinstance(now, list) and len(before) == len(now):
        for i, (a, b) in enumerate(zip(before, now, strict=True)):
            found = first_difference(a, b, f"{where}[{i}]")
            if found:
                return found
        return None
    return None if before == now else (where, before, now)


REPLACE = ("pass --overwrite true to replace it (it is kept until the new evaluation has its first responses), or "
           "another --out_dir")
START_AGAIN = "pass --overwrite true to start the evaluation again, or another --out_dir"


def plan_output(out_dir: str | Path, settings: dict, overwrite: bool,
                problems: dict[str, list[Problem]] | None = None) -> OutputPlan:
    """Check `out_dir` against these settings without changing what it holds (it is created if missing):
    continue an evaluation made with the same settings by the same model, start fresh where there is none, and
    refuse, in one line naming the difference, responses made otherwise or by an unknown model (`overwrite`:
    start fresh anyway). `problems` (benchmark name -> problems) checks each stored response against them."""
    from opdlab.runs import writable_folder

    out_dir = writable_folder(out_dir, "--out_dir")
    responses = out_dir / RESPONSES
    if overwrite:
        return OutputPlan(out_dir, settings, {}, fresh=True)
    before = stored_settings(out_dir / SETTINGS)
    has_results = responses.is_file() and responses.stat().st_size > 0 or (out_dir / RESULT).is_file()
    if not has_results:
        return OutputPlan(out_dir, settings, {}, fresh=True)
    check_same_evaluation(out_dir, before, settings)
    done = read_responses(responses, settings["k"], problems)
    return OutputPlan(out_dir, settings, done, fresh=not responses.is_file())


def stored_settings(stored: Path) -> dict | None:
    """The settings an earlier evaluation recorded in eval.json (None: there is none); a damaged one is refused."""
    if not stored.is_file():
        return None
    try:
        before = json.loads(stored.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EvalError(f"{stored} is damaged ({err}), so what made the responses next to it is unknown; "
                        f"{REPLACE}") from None
    if not isinstance(before, dict):
        raise EvalError(f"{stored} holds {json_kind(before)}, not the settings of an evaluation; "
                        f"{REPLACE}")
    return before


def check_same_evaluation(out_dir: Path, before: dict | None, settings: dict) -> None:
    """The results in `out_dir` were made by the same model (by content) with the same settings and benchmark
    content, or are refused in one line naming the first difference."""
    responses = out_dir / RESPONSES
    if before is None:
        what = RESPONSES if responses.is_file() and responses.stat().st_size > 0 else RESULT
        raise EvalError(f"{out_dir} holds {what} but no {SETTINGS} (the record of the model and settings that made "
                        f"them), so they cannot be told apart from this model's; {REPLACE}")
    if "model_fingerprint" not in before:
        raise EvalError(f"{out_dir} holds an evaluation made by an earlier opdlab that did not record which model "
                        f"made it (no model_fingerprint in {SETTINGS}); {REPLACE}")
    difference = first_difference(before, settings)
    if difference is None:
        return
    key, was, now = difference
    if key == "model_fingerprint":
        raise EvalError(f"{out_dir} holds the responses of another model (fingerprint {short(was)} there, "
                        f"{short(now)} now: {settings.get('model')} is not the model that made them, even if "
                        f"it lies at the same path); {REPLACE}")
    if key.startswith("benchmark_fingerprints."):
        name = key.partition(".")[2]
        raise EvalError(f"{out_dir} holds responses to another version of benchmark {name!r} (its problems, "
                        f"answers or prompts changed since; content {short(was)} there, {short(now)} now); {REPLACE}")
    raise EvalError(f"{out_dir} holds an evaluation with other settings ({key}: {short(was)} there, {short(now)} "
                    f"now); {REPLACE}")


def read_responses(path: Path, k: int, problems: dict[str, list[Problem]] | None = None) -> dict[tuple, list[dict]]:
    """The problems with all k responses in `path`, by (seed, benchmark, index); a torn last line (a run killed
    while writing it) is left out, any other damage refused naming the file and line."""
    if not path.is_file():
        return {}
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise EvalError(f"{path} is not text ({err}); {START_AGAIN}") from None
    lines = text.split("\n")
    torn = lines[-1] != ""  # no line break after the last line: a write that was cut
    groups: dict[tuple, dict[int, dict]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) and torn:
                continue  # the half-written last line of a killed run
            raise EvalError(f"{where} is not JSON ({err.msg}); {START_AGAIN}") from None
        check_record(record, where, k, problems)
        name, index, sample = record["benchmark"], record["index"], record["sample"]
        group = groups.setdefault((record["seed"], name, index), {})
        if sample in group:
            raise EvalError(f"{where} repeats sample {sample} of {name!r} problem {index} (seed {record['seed']}); "
                            f"{START_AGAIN}")
        group[sample] = record
    return {key: [group[j] for j in range(k)] for key, group in groups.items() if len(group) == k}


def check_record(record: object, where: str, k: int, problems: dict[str, list[Problem]] | None) -> None:
    """One line of responses.jsonl is a response record as `evaluate` writes it (every field of its type, sample
    in 0..k-1) to a problem of these benchmarks, or is refused naming `where`."""
    if not isinstance(record, dict):
        raise EvalError(f"{where} holds {json_kind(record)}, not a response record; {START_AGAIN}")
    for name, kind in RECORD_FIELDS.items():
        if name not in record:
            raise EvalError(f"{where} has no {name!r} field (a response record has {', '.join(RECORD_FIELDS)}); "
                            f"{START_AGAIN}")
        value = record[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            expected = ("text or null" if name == "key" else
                        {int: "an integer", str: "text", bool: "true or false"}[kind])
            raise EvalError(f"{where}: {name!r} is {short(value)}, not {expected}; {START_AGAIN}")
    name, index, sample = record["benchmark"], record["index"], record["sample"]
    if problems is not None:
        if name not in problems:
            raise EvalError(f"{where} is a response to benchmark {name!r}, which this evaluation does not have "
                            f"({', '.join(problems)}); {START_AGAIN}")
        if not 0 <= index < len(problems[name]):
            raise EvalError(f"{where}: index {index} is outside benchmark {name!r}'s {len(problems[name])} "
                            f"problems; {START_AGAIN}")
        problem = problems[name][index]
        if (record["prompt"], record["answer"]) != (problem.prompt, problem.answer):
            raise EvalError(f"{where} answers another problem than {name!r} problem {index} "
                            f"({short(record['prompt'])} there, {short(problem.prompt)} in the benchmark); "
                            f"{START_AGAIN}")
    if not 0 <= sample < k:
        raise EvalError(f"{where}: sample {sample} is outside 0..{k - 1} (k={k}); {START_AGAIN}")
    if record["length"] < 0:
        raise EvalError(f"{where}: length {record['length']} is negative; {START_AGAIN}")


def replace_file(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file: a reader sees the old content or the new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


class ResponseSink:
    """Appends scored responses (each batch written and synced before the next). Continuing: to responses.jsonl,
    first rewritten without incomplete problems. Fresh: to responses.jsonl.partial, which replaces the folder's
    responses.jsonl, eval.json and results (`swap_in`) once the first batch is on disk, so a run that fails before
    its first responses leaves an earlier evaluation as it was."""

    def __init__(self, plan: OutputPlan) -> None:
        self.plan, out = plan, plan.out_dir
        if plan.fresh:
            self.file = (out / PARTIAL).open("w")
        else:
            replace_file(out / RESPONSES, "".join(json.dumps(r) + "\n" for recs in plan.done.values() for r in recs))
            self.file = (out / RESPONSES).open("a")
        self.swapped = not plan.fresh

    def write(self, records: list[dict]) -> None:
        self.file.writelines(json.dumps(r) + "\n" for r in records)
        self.file.flush()
        os.fsync(self.file.fileno())
        if not self.swapped:
            self.swap_in()

    def swap_in(self) -> None:
        """The new responses become the folder's: stale results and settings go first (a crash in between leaves
        responses without eval.json, which the next run refuses rather than misreads), then the rename."""
        out = self.plan.out_dir
        for name in (RESULT, TABLE, SETTINGS):
            (out / name).unlink(missing_ok=True)
        (out / PARTIAL).replace(out / RESPONSES)  # the open file follows its new name
        replace_file(out / SETTINGS, json.dumps(self.plan.settings, indent=2))
        self.swapped = True

    def close(self) -> None:
        self.file.close()
        if not self.swapped:  # failed before its first responses: the folder keeps what it held
            (self.plan.out_dir / PARTIAL).unlink(missing_ok=True)


def eval_settings(label: str, fingerprint: str, engine: RolloutEngine, options: EvalOptions,
                  loaded: list[LoadedBenchmark], max_new: dict[str, int], dtype: str) -> dict:
    """What made the responses: the model (its content fingerprint), the engine and dtype, every setting that
    changes a response, and the benchmarks' content. Responses are reused only where all of it is the same."""
    return {"format": SETTINGS_FORMAT, "model": label, "model_fingerprint": fingerprint, "dtype": dtype,
            "engine": type(engine).__name__, "benchmarks": [asdict(b.spec) for b in loaded],
            "benchmark_fingerprints": {b.spec.name: benchmark_fingerprint(b) for b in loaded},
            "k": options.k, "temperature": options.temperature, "top_p": options.top_p, "max_new_tokens": max_new,
            "max_prompt_len": options.max_prompt_len, "chat_template": options.chat_template}
