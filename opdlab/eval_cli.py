"""`opdlab eval`: sampled accuracy of a checkpoint on benchmark sets, the way papers report it.

k responses per problem at a temperature / top-p, through a rollout engine (static by default, vllm on a
GPU); per benchmark Avg@k, pass@k' (Chen et al.'s unbiased estimator), maj@k, mean response length, the
fraction cut at max_new_tokens and the fraction with no answer the verifier could read; the equal-weight mean
over benchmarks; mean ± std over evaluation seeds. Every response is appended to `responses.jsonl` as soon as
its batch is scored, so rerunning the same command after a crash continues where it stopped.

Definitions: opdlab/metrics.py and docs/evaluation.md.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from opdlab.console import OpdlabError
from opdlab.engines.base import RolloutEngine
from opdlab.metrics import benchmark_metrics, mean_std
from opdlab.tasks.base import Problem

RESPONSES, SETTINGS, RESULT, TABLE = "responses.jsonl", "eval.json", "result.json", "results.md"


class EvalError(OpdlabError, ValueError):
    """A bad evaluation input (options, benchmark files, a previous evaluation in the output folder)."""


@dataclass
class Benchmark:
    """One benchmark set.

    Args:
        name: its label in the tables and in responses.jsonl (e.g. math500, aime24).
        path: `toy:<name>` (a toy task's held-out test split; `toy:<name>:validation` for its validation split)
            or a file, folder or hub id read with `datasets` (parquet, JSON/JSONL, CSV, arrow).
        split: the split to read (single files have only "train").
        prompt_field: the field holding the problem (default: the first of prompt, problem, question, Problem).
        answer_field: the field holding the answer (default: the first of answer, reward_model.ground_truth,
            Answer, ground_truth, final_answer).
        verifier: `math` (math-verify: the last answer in the response, e.g. \\boxed{}, equals the reference),
            `exact` (stripped string equality), or `auto` (a toy task's own verifier; math otherwise).
        prompt_template: how each problem becomes a prompt; `{prompt}` is replaced by the problem, e.g.
            "{prompt}\\nPlease reason step by step, and put your final answer within \\\\boxed{}."
        limit: evaluate only the first this many problems (None: all).
    """

    name: str
    path: str
    split: str = "train"
    prompt_field: str | None = None
    answer_field: str | None = None
    verifier: Literal["auto", "math", "exact"] = "auto"
    prompt_template: str = "{prompt}"
    limit: int | None = None


@dataclass
class EvalOptions:
    """Sampled evaluation settings (shared by `opdlab eval` and `opdlab fit`'s evaluation after training).

    Args:
        benchmarks: the sets to evaluate on (see `Benchmark`); `opdlab fit` evaluates after training only when
            this is not empty.
        k: sampled responses per problem (Avg@k averages them; the paper uses 12-16).
        pass_at: the k' of pass@k' to report, each <= k (default: 1 and the powers of 2 up to k, and k).
        temperature: sampling temperature (0: greedy, then k must be 1).
        top_p: nucleus sampling threshold (1: none).
        max_new_tokens: response length limit (default: a toy task's own; required for other sets).
        max_prompt_len: longer prompts are cut from the left, with a warning.
        seeds: evaluation seeds; with several, every metric is reported as mean ± std over them.
        chat_template: wrap each prompt in the tokenizer's chat template (chat models).
        batch_size: problems per generation call (each sampled k times).
    """

    benchmarks: list[Benchmark] = field(default_factory=list)
    k: int = 8
    pass_at: list[int] | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int | None = None
    max_prompt_len: int = 2048
    seeds: list[int] = field(default_factory=lambda: [0])
    chat_template: bool = False
    batch_size: int = 32

    @classmethod
    def from_mapping(cls, data) -> EvalOptions:
        """The options of a YAML mapping or a jsonargparse Namespace, benchmarks given as mappings or Benchmarks
        (a TypeError names an unknown key)."""
        data = dict(data.as_dict() if hasattr(data, "as_dict") else data)
        data["benchmarks"] = [b if isinstance(b, Benchmark) else Benchmark(**dict(b)) for b in data.get("benchmarks") or []]
        return cls(**data)

    def check(self) -> list[int]:
        """Refuse impossible settings; the pass@k' list to report."""
        if self.k < 1:
            raise EvalError(f"k (responses per problem) must be >= 1, got {self.k}")
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise EvalError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.temperature == 0 and self.k > 1:
            raise EvalError(f"temperature 0 is greedy: its k={self.k} responses would be identical; use k=1, or a "
                            "temperature > 0 (e.g. 0.6)")
        if not 0 < self.top_p <= 1:
            raise EvalError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise EvalError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_prompt_len < 1 or self.batch_size < 1:
            raise EvalError(f"max_prompt_len and batch_size must be >= 1, got {self.max_prompt_len} and {self.batch_size}")
        if not self.seeds:
            raise EvalError("seeds is empty; give at least one evaluation seed, e.g. [0]")
        if len(set(self.seeds)) != len(self.seeds):
            raise EvalError(f"seeds repeat: {self.seeds}")
        names = [b.name for b in self.benchmarks]
        if len(set(names)) != len(names):
            raise EvalError(f"benchmark names repeat: {names}; give each set its own name")
        for b in self.benchmarks:
            if b.limit is not None and b.limit < 1:
                raise EvalError(f"benchmark {b.name!r}: limit must be >= 1 or null, got {b.limit}")
            if "{prompt}" not in b.prompt_template:
                raise EvalError(f"benchmark {b.name!r}: prompt_template must contain {{prompt}}, got {b.prompt_template!r}")
        if self.pass_at is None:
            return sorted({1, self.k, *(2**i for i in range(1, 8) if 2**i <= self.k)})
        bad = [p for p in self.pass_at if not 1 <= p <= self.k]
        if bad:
            raise EvalError(f"pass_at {bad} outside [1, k={self.k}]: pass@k' needs k' of the k responses; raise k "
                            f"or drop them")
        return sorted(set(self.pass_at))


class Verifier:
    """Checks a response against the reference answer and reads its answer key (for majority voting).
    A response the verifier cannot read is wrong and has no key; it never stops the evaluation."""

    def __init__(self, kind: str, task=None) -> None:
        self.kind, self.task = kind, task
        if kind == "math":
            try:
                import math_verify  # noqa: F401
            except ImportError as err:
                raise EvalError("verifier 'math' needs math-verify: pip install -e \".[math]\"") from err

    def check(self, response: str, answer: str) -> tuple[bool, str | None]:
        """(correct, answer key or None when no answer could be read)."""
        try:
            if self.task is not None:
                return bool(self.task.verify(response, answer)), self.task.answer_key(response)
            if self.kind == "exact":
                return response.strip() == answer.strip(), response.strip() or None
            from math_verify import parse

            from opdlab.tasks.math_answers import verify_math_answer

            parsed = parse(response)
            key = str(parsed[-1]) if parsed else None
            return (key is not None and verify_math_answer(response, answer)), key
        except Exception:  # noqa: BLE001 - an unreadable response is a wrong one, counted as unparsed
            return False, None


@dataclass
class LoadedBenchmark:
    spec: Benchmark
    problems: list[Problem]
    verifier: Verifier
    max_response_tokens: int | None


def load_benchmark(spec: Benchmark) -> LoadedBenchmark:
    """The problems of one set, read and checked before any model loads."""
    if spec.path.startswith("toy:"):
        from opdlab.toy import TOYS, make_task

        name, _, which = spec.path.removeprefix("toy:").partition(":")
        if name not in TOYS:
            raise EvalError(f"benchmark {spec.name!r}: unknown toy {name!r}; available: {', '.join(sorted(TOYS))}")
        if which not in ("", "test", "validation"):
            raise EvalError(f"benchmark {spec.name!r}: toy split must be test or validation, got {which!r}")
        task = make_task(TOYS[name], seed=0)
        problems = task.eval_problems() if which == "validation" else task.test_problems()
        verifier = Verifier(spec.verifier, task if spec.verifier == "auto" else None)
        limit_tokens = getattr(task, "max_response_tokens", len(problems[0].answer) + 2) if problems else None
    else:
        from opdlab.tasks.datasets_source import read_problems

        try:
            problems = read_problems(spec.path, spec.split, spec.prompt_field, spec.answer_field)
        except (ValueError, OSError, KeyError) as err:
            raise EvalError(f"benchmark {spec.name!r}: {err}") from None
        verifier = Verifier("math" if spec.verifier == "auto" else spec.verifier)
        limit_tokens = None
    if not problems:
        raise EvalError(f"benchmark {spec.name!r} ({spec.path}) holds no problems")
    problems = problems[: spec.limit] if spec.limit else problems
    if spec.prompt_template != "{prompt}":
        problems = [Problem(spec.prompt_template.replace("{prompt}", p.prompt), p.answer) for p in problems]
    return LoadedBenchmark(spec, problems, verifier, limit_tokens)


# ----------------------------------------------------------------------------- models
def load_model(model: str, dtype: str):
    """(model, tokenizer, what was loaded): a local HF directory or exported student, a run folder (its exported
    student), a Lightning checkpoint of an opdlab run (.ckpt: the base student plus the checkpoint's weights),
    `toy:<name>/<role>`, or a hub id where the network allows."""
    import torch

    from opdlab.models import load_causal_lm, load_tokenizer

    path = Path(model).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and (path / "student" / "config.json").is_file():
        path, model = path / "student", str(path / "student")  # a run folder: its exported student
    if path.is_file() and path.suffix == ".ckpt":
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        base = (checkpoint.get("hyper_parameters") or {}).get("student")
        if base is None or "state_dict" not in checkpoint:
            raise EvalError(f"{model} is not a checkpoint of an opdlab run (no hyper_parameters.student); pass an "
                            "opdlab run's checkpoints/*.ckpt, its exported student folder, or a model directory")
        net = load_causal_lm(base, dtype)
        state = {k.removeprefix("student."): v for k, v in checkpoint["state_dict"].items() if k.startswith("student.")}
        missing, _ = net.load_state_dict(state, strict=False)
        tied = {name for name in missing if name.endswith("lm_head.weight") and net.config.get_text_config().tie_word_embeddings}
        if set(missing) - tied:
            raise EvalError(f"{model} lacks {len(set(missing) - tied)} of the student's weights (e.g. "
                            f"{sorted(set(missing) - tied)[:2]}); is it a checkpoint of a run of {base}?")
        return net, load_tokenizer(base), f"{model} (weights on {base})"
    if path.is_file():
        raise EvalError(f"{model} is a file but not a Lightning checkpoint (.ckpt); pass a model directory, a run "
                        "folder, an opdlab run's .ckpt, toy:<name>/student or a hub id")
    return load_causal_lm(model, dtype), load_tokenizer(model), model


def pick_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"device {device!r} asked for, but torch sees no CUDA device here; use --device cpu or auto")
    return torch.device(device)


# ----------------------------------------------------------------------------- the output folder
def open_output(out_dir: Path, settings: dict, overwrite: bool) -> dict[tuple, list[dict]]:
    """Prepare `out_dir`; the complete problems a previous run of the same settings already scored, by
    (seed, benchmark, index). Different settings there are refused (or cleared with `overwrite`)."""
    from opdlab.runs import writable_folder

    writable_folder(out_dir, "--out_dir")
    stored = out_dir / SETTINGS
    if overwrite:
        for name in (RESPONSES, SETTINGS, RESULT, TABLE):
            (out_dir / name).unlink(missing_ok=True)
    elif stored.is_file():
        before = json.loads(stored.read_text())
        changed = [key for key in sorted(set(before) | set(settings)) if before.get(key) != settings.get(key)]
        if changed:
            key = changed[0]
            raise EvalError(f"{out_dir} holds an evaluation with other settings ({key}: {before.get(key)!r} there, "
                            f"{settings.get(key)!r} now); pass another --out_dir, or --overwrite to replace it")
    stored.write_text(json.dumps(settings, indent=2))
    return read_responses(out_dir / RESPONSES, settings["k"])


def read_responses(path: Path, k: int) -> dict[tuple, list[dict]]:
    """The problems with all k responses in `path`; the file is rewritten without partial ones (a crash
    between a batch's lines and the next)."""
    if not path.is_file():
        return {}
    groups: dict[tuple, list[dict]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the half-written last line of a killed run
        groups.setdefault((record["seed"], record["benchmark"], record["index"]), []).append(record)
    complete = {key: sorted(recs, key=lambda r: r["sample"])[:k] for key, recs in groups.items()
                if len({r["sample"] for r in recs}) >= k}
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for recs in complete.values():
            f.writelines(json.dumps(r) + "\n" for r in recs)
    tmp.replace(path)
    return complete


class Progress:
    """tqdm on a terminal; elsewhere (a log file, CI) a plain line at most every `every` seconds."""

    def __init__(self, total: int, initial: int, desc: str, every: float = 30.0) -> None:
        self.total, self.n, self.desc, self.every, self.last = total, initial, desc, every, 0.0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="problem", dynamic_ncols=True)

    def update(self, n: int, note: str = "") -> None:
        self.n += n
        if self.bar is not None:
            self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(n)
        elif time.monotonic() - self.last >= self.every or self.n == self.total:
            self.last = time.monotonic()
            print(f"{self.desc}: {self.n}/{self.total} problems ({self.n / max(self.total, 1):.0%}){' ' + note if note else ''}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- evaluation
def evaluate(model, tokenizer, engine: RolloutEngine, options: EvalOptions, out_dir: str | Path, label: str,
             overwrite: bool = False, command: str | None = None, loaded: list[LoadedBenchmark] | None = None) -> dict:
    """Sample, score and tabulate `model` (already on its device) on `options.benchmarks`; writes responses.jsonl,
    result.json and results.md into `out_dir` and returns the result. Resumes what `out_dir` already holds."""
    import torch

    from opdlab.engines.base import SamplingParams
    from opdlab.rollout import decode_responses, derive_seed, encode_prompts

    pass_ks = options.check()
    loaded = loaded if loaded is not None else [load_benchmark(b) for b in options.benchmarks]
    max_new = response_limits(options, loaded)
    out_dir = Path(out_dir)
    settings = {"model": label, "engine": type(engine).__name__, "benchmarks": [asdict(b) for b in options.benchmarks],
                "k": options.k, "temperature": options.temperature, "top_p": options.top_p, "max_new_tokens": max_new,
                "max_prompt_len": options.max_prompt_len, "chat_template": options.chat_template}
    done = open_output(out_dir, settings, overwrite)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.eval()
    engine.bind(model, eos, pad)
    engine.load_weights(model)
    total = len(options.seeds) * sum(len(b.problems) for b in loaded)
    progress = Progress(total, sum(1 for key in done if key[0] in options.seeds), "opdlab eval")
    generated, seconds = 0, 0.0
    with (out_dir / RESPONSES).open("a") as sink:
        for seed in options.seeds:
            for bench in loaded:
                name = bench.spec.name
                todo = [i for i in range(len(bench.problems)) if (seed, name, i) not in done]
                for start in range(0, len(todo), options.batch_size):
                    indices = todo[start : start + options.batch_size]
                    chunk = [bench.problems[i] for i in indices]
                    prompts = encode_prompts(tokenizer, [p.prompt for p in chunk], [p.answer for p in chunk],
                                             max_prompt_len=options.max_prompt_len, chat_template=options.chat_template)
                    params = SamplingParams(num_samples=options.k, max_new_tokens=max_new[name],
                                            temperature=options.temperature, top_p=options.top_p,
                                            seeds=[derive_seed(seed, name, i) for i in indices])
                    began = time.perf_counter()
                    with torch.no_grad():
                        rollout = engine.generate(prompts, params)
                    seconds += time.perf_counter() - began
                    generated += len(indices) * options.k
                    texts = decode_responses(tokenizer, rollout)
                    mask = rollout.response_mask.cpu()
                    ended = ((rollout.response_ids.cpu() == eos) & mask).any(dim=1)
                    lines = []
                    for row, text in enumerate(texts):
                        p, j = divmod(row, options.k)
                        correct, key = bench.verifier.check(text, chunk[p].answer)
                        record = {"seed": seed, "benchmark": name, "index": indices[p], "sample": j,
                                  "prompt": chunk[p].prompt, "answer": chunk[p].answer, "response": text,
                                  "correct": correct, "key": key, "length": int(mask[row].sum()),
                                  "truncated": not bool(ended[row])}
                        done.setdefault((seed, name, indices[p]), []).append(record)
                        lines.append(json.dumps(record) + "\n")
                    sink.writelines(lines)
                    sink.flush()
                    os.fsync(sink.fileno())
                    progress.update(len(indices), f"{name} seed {seed}")
    progress.close()
    result = tabulate(done, loaded, options, pass_ks)
    result.update(settings=settings, command=command, generated_now=generated,
                  seconds_per_response=(seconds / generated) if generated else None)
    (out_dir / RESULT).write_text(json.dumps(result, indent=2))
    (out_dir / TABLE).write_text(markdown_table(result, label) + "\n")
    return result


def response_limits(options: EvalOptions, loaded: list[LoadedBenchmark]) -> dict[str, int]:
    """max_new_tokens per benchmark: the option, or a toy task's own."""
    limits = {b.spec.name: options.max_new_tokens or b.max_response_tokens for b in loaded}
    missing = [name for name, n in limits.items() if n is None]
    if missing:
        raise EvalError(f"max_new_tokens is needed for {', '.join(missing)} (only toy tasks have their own); e.g. "
                        "--max_new_tokens 4096")
    return limits


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
    m, s = mean_std(values)
    return {"mean": m, "std": s}


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
    lines = [f"{label}: k={k} responses per problem, seeds {seeds}" + (" (mean ± std over seeds)" if several else ""),
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command
def eval_command(
    model: str | None = None,
    benchmarks: list[Benchmark] | None = None,
    k: int = 8,
    pass_at: list[int] | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int | None = None,
    max_prompt_len: int = 2048,
    seeds: list[int] = [0],  # noqa: B006 (jsonargparse reads the default)
    chat_template: bool = False,
    batch_size: int = 32,
    engine: RolloutEngine | None = None,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    device: str = "auto",
    out_dir: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Sampled accuracy of a checkpoint on benchmark sets: Avg@k, pass@k, maj@k, length, cut and unparsed
    responses, per benchmark and as the equal-weight mean (mean ± std over seeds). Rerunning the same command
    continues an interrupted evaluation.

    Args:
        model: what to evaluate: a model directory or exported student, an opdlab run folder (its exported
            student), an opdlab checkpoint (runs/.../checkpoints/last.ckpt), toy:<name>/student, or a hub id.
        benchmarks: the sets, each {name, path, split, prompt_field, answer_field, verifier, prompt_template, limit}
            (see configs/eval/); path `toy:add3` is the toy task's test split.
        k: sampled responses per problem.
        pass_at: the k' of pass@k' (each <= k; default 1, the powers of 2 up to k, and k).
        temperature: sampling temperature (0: greedy, with k=1).
        top_p: nucleus sampling (1: none).
        max_new_tokens: response length limit (default: a toy task's own; required otherwise).
        max_prompt_len: longer prompts keep their last this many tokens, with a warning.
        seeds: evaluation seeds (several: mean ± std over them).
        chat_template: wrap prompts in the tokenizer's chat template.
        batch_size: problems per generation call (each sampled k times).
        engine: the rollout engine: static (default), reference, vllm (pip install -e ".[vllm]"), or a plugin's.
        dtype: weights' dtype (bfloat16 on GPUs for real models).
        device: auto (cuda when there is one), cpu, cuda, cuda:1 ...
        out_dir: where responses.jsonl, result.json and results.md go (default: evals/<model folder name>).
        overwrite: discard what out_dir holds instead of continuing it.
    """
    from opdlab.engines.static import StaticCacheEngine

    if not model:
        raise EvalError("--model is required: a model directory, an opdlab run folder or checkpoint, "
                        "toy:<name>/student, or a hub id")
    options = EvalOptions(list(benchmarks or []), k, pass_at, temperature, top_p, max_new_tokens, max_prompt_len,
                          list(seeds), chat_template, batch_size)
    options.check()
    if not options.benchmarks:
        raise EvalError("no benchmarks given; e.g. --config configs/eval/toy.yaml, or --benchmarks "
                        "'[{name: add3, path: \"toy:add3\"}]'")
    loaded = [load_benchmark(b) for b in options.benchmarks]  # every file is read and checked before the model
    response_limits(options, loaded)
    if out_dir is None:
        name = model.replace(":", "_").replace("/", "_") if model.startswith("toy:") else Path(model.rstrip("/")).name
        out_dir = str(Path("evals") / (name or "model"))
    device_ = pick_device(device)
    net, tokenizer, label = load_model(model, dtype)
    net.to(device_)
    print(f"opdlab eval: {label} on {', '.join(b.spec.name for b in loaded)} "
          f"({sum(len(b.problems) for b in loaded)} problems x {options.k} samples x {len(options.seeds)} seed(s)) "
          f"-> {out_dir}", file=sys.stderr, flush=True)
    result = evaluate(net, tokenizer, engine or StaticCacheEngine(), options, out_dir, label, overwrite,
                      command="opdlab eval " + " ".join(sys.argv[2:]), loaded=loaded)
    print(markdown_table(result, label))
    per = result["seconds_per_response"]
    print(f"\nresponses: {Path(out_dir) / RESPONSES}; table: {Path(out_dir) / TABLE}"
          + (f"; {per * 1000:.1f} ms per sampled response" if per else ""))
    return result


def run_eval(argv: list[str]) -> None:
    """`opdlab eval ...`: jsonargparse turns `eval_command`'s signature and docstring into --help."""
    from jsonargparse import CLI

    from opdlab import plugins

    argv = plugins.expand_short_names(argv, {"--engine": "opdlab.rollout_engines"})
    CLI(eval_command, args=argv, prog="opdlab eval")  # an EvalError is one line from opdlab.cli.main
