"""`opdlab eval`: sampled accuracy of a checkpoint on benchmark sets, the way papers report it.

k responses per problem at a temperature / top-p, through a rollout engine (static by default, vllm on a
GPU); per benchmark Avg@k, pass@k' (Chen et al.'s unbiased estimator), maj@k, mean response length, the
fraction cut at max_new_tokens and the fraction with no answer the verifier could read; the equal-weight mean
over benchmarks; mean ± std over evaluation seeds. Every response is appended to `responses.jsonl` as soon as
its batch is scored, so rerunning the same command after a crash continues where it stopped. Stored responses
are reused only for the same model, known by the content of its files (not its path), with the same settings and
benchmark content (eval.json records them); anything else is refused, or replaced with --overwrite, whose old
files stay until the new evaluation has written its first responses.

Definitions: opdlab/metrics.py and docs/evaluation.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from opdlab.console import OpdlabError, error_exit, one_line_parser_class, signal_name, stop_signals
from opdlab.engines.base import RolloutEngine
from opdlab.metrics import benchmark_metrics, mean_std
from opdlab.progress import Progress
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
        data = data.as_dict() if hasattr(data, "as_dict") else data
        if not isinstance(data, dict):
            kind = "a list" if isinstance(data, list) else f"a single value ({data!r})"
            raise EvalError(f"evaluation settings must be a mapping of options (k: 8, benchmarks: [...], ...), "
                            f"got {kind}")
        data = dict(data)
        benchmarks = data.get("benchmarks") or []
        if not isinstance(benchmarks, list):
            raise EvalError(f"benchmarks must be a list of {{name, path, ...}} entries, got a "
                            f"{type(benchmarks).__name__}")
        bad = [b for b in benchmarks if not isinstance(b, (dict, Benchmark)) and not hasattr(b, "as_dict")]
        if bad:
            raise EvalError(f"each benchmark must be a mapping {{name: ..., path: ...}}, got {bad[0]!r}")
        data["benchmarks"] = [b if isinstance(b, Benchmark) else
                              Benchmark(**dict(b.as_dict() if hasattr(b, "as_dict") else b)) for b in benchmarks]
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
            if not isinstance(b.name, str) or not b.name.strip():
                raise EvalError(f"a benchmark has an empty name ({b.path}); give each set a name, e.g. math500")
            if not isinstance(b.path, str) or not b.path.strip():
                raise EvalError(f"benchmark {b.name!r}: path is empty; give a file, a folder, toy:<name> or a hub id")
            if b.path.startswith("toy:") and b.split != "train":
                raise EvalError(f"benchmark {b.name!r}: a toy set takes its split in the path ({b.path}:validation, "
                                f"or {b.path} for the test split), not split={b.split!r}; drop split")
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
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".ckpt")
RUN_MARKERS = ("hparams.yaml", "config.yaml", "summary.json", "metrics.csv")  # files `opdlab fit` writes in a run


@dataclass
class ModelSource:
    """What `--model` names, resolved and checked before any weights load.

    kind: `dir` (a model directory: a local one, an exported student, a toy's), `adapter` (a peft LoRA adapter
    folder, e.g. the exported student of a `--model.student_adapter` run: `base` plus the adapter, merged at load),
    `ckpt` (a Lightning checkpoint of an opdlab run: `base` plus its weights) or `hub` (a hub id). `path` is the directory or file (the hub id for
    `hub`); `tokenizer` what the tokenizer loads from; `label` the name in tables and eval.json.
    """

    kind: str
    path: str
    tokenizer: str
    label: str
    base: str | None = None
    checkpoint: dict | None = field(default=None, repr=False)


def is_run_folder(path: Path) -> bool:
    return path.is_dir() and (any((path / name).is_file() for name in RUN_MARKERS) or (path / "checkpoints").is_dir())


def newest_checkpoints(folder: Path) -> list[Path]:
    """The .ckpt files of a folder, last.ckpt first, then the newest."""
    found = sorted(folder.glob("*.ckpt"), key=lambda p: (p.name != "last.ckpt", -p.stat().st_mtime))
    return found


def has_weights(folder: Path) -> bool:
    return any(p.suffix in WEIGHT_SUFFIXES and p.is_file() for p in folder.iterdir())


def adapter_source(path: Path, model: str) -> ModelSource:
    """A peft adapter folder: its base (adapter_config.json's base_model_name_or_path) must be loadable; the
    tokenizer is the folder's own (an opdlab export saves it there) or its base's."""
    from opdlab.adapters import read_adapter_config
    from opdlab.models import TOKENIZER_FILES, resolve_model_path

    try:
        base = read_adapter_config(path, f"--model {model}").get("base_model_name_or_path")
    except ValueError as err:
        raise EvalError(str(err)) from None
    if not isinstance(base, str) or not base:
        raise EvalError(f"--model {model} is a peft adapter without a base model (no base_model_name_or_path in its "
                        f"{ADAPTER_CONFIG}); set it to the base model's directory or hub id")
    resolve_model_path(base)  # a base that is gone is refused here, in one line
    tokenizer = str(path) if any((path / f).is_file() for f in TOKENIZER_FILES) else base
    return ModelSource("adapter", str(path), tokenizer, f"{model} (LoRA adapter on {base})", base=base)


ADAPTER_CONFIG = "adapter_config.json"


def is_model_folder(path: Path) -> bool:
    """A model directory (config.json) or a peft adapter folder (adapter_config.json)."""
    return (path / "config.json").is_file() or (path / ADAPTER_CONFIG).is_file()


def resolve_model(model: str) -> ModelSource:
    """`--model` resolved: a run folder to its student/, a checkpoint opened (not its weights loaded), and every
    path that cannot be a model refused in one line that says what to pass instead."""
    from opdlab.models import resolve_model_path

    if not model or not model.strip():
        raise EvalError("--model is empty; pass a model directory, an opdlab run folder or checkpoint, "
                        "toy:<name>/student, or a hub id")
    if model.startswith("toy:"):
        path = resolve_model_path(model)
        return ModelSource("dir", path, path, model)
    path = Path(model).expanduser()
    if not path.exists():
        resolved = resolve_model_path(model)  # a missing local path is refused there; a hub id is checked
        return ModelSource("hub", resolved, resolved, model)
    if path.is_dir():
        if (path / "config.json").is_file():
            if not has_weights(path):
                raise EvalError(f"--model {model} has a config.json but no weight files (*.safetensors, *.bin); "
                                "copy the weights next to it, or pass the folder that holds them")
            return ModelSource("dir", str(path), str(path), model)
        if (path / ADAPTER_CONFIG).is_file():
            return adapter_source(path, model)
        if is_model_folder(path / "student"):  # a run folder: its exported student
            return resolve_model(str(path / "student"))
        checkpoints = newest_checkpoints(path) or (newest_checkpoints(path / "checkpoints")
                                                   if (path / "checkpoints").is_dir() else [])
        if is_run_folder(path):
            hint = (f"evaluate one of its checkpoints instead, e.g. --model {checkpoints[0]}" if checkpoints else
                    "it has no checkpoints either (the run may have stopped before its first save); evaluate "
                    "another run, or finish this one with `opdlab fit ... --resume`")
            raise EvalError(f"--model {model} is an opdlab run folder without an exported student (student/ is "
                            f"written when `opdlab fit` finishes); {hint}")
        if checkpoints:
            run = path.parent
            export = f"the run's exported student (--model {run / 'student'}) or " if (run / "student").is_dir() else ""
            raise EvalError(f"--model {model} is a folder of checkpoints, not a model; pass {export}one checkpoint, "
                            f"e.g. --model {checkpoints[0]}")
        raise EvalError(f"--model {model} is a folder but not a model (no config.json), not an opdlab run folder "
                        "(no student/) and holds no checkpoints; pass a model directory, a run folder, a run's "
                        ".ckpt, toy:<name>/student or a hub id")
    if path.suffix == ".ckpt":
        checkpoint = read_checkpoint(path, model)
        base = (checkpoint.get("hyper_parameters") or {}).get("student")
        if not isinstance(base, str) or not isinstance(checkpoint.get("state_dict"), dict):
            raise EvalError(f"{model} is not a checkpoint of an opdlab run (no hyper_parameters.student); pass an "
                            "opdlab run's checkpoints/*.ckpt, its exported student folder, or a model directory")
        resolve_model_path(base)  # the base student must still be there (its config and tokenizer are used)
        return ModelSource("ckpt", str(path), base, f"{model} (weights on {base})", base=base, checkpoint=checkpoint)
    if path.suffix in WEIGHT_SUFFIXES or path.name == "config.json":
        raise EvalError(f"--model {model} is one file of a model; pass the folder that holds it (--model "
                        f"{path.parent})")
    raise EvalError(f"{model} is a file but not a Lightning checkpoint (.ckpt); pass a model directory, a run "
                    "folder, an opdlab run's .ckpt, toy:<name>/student or a hub id")


def read_checkpoint(path: Path, model: str) -> dict:
    """A Lightning checkpoint, memory-mapped (its tensors are read when used); a damaged one in one line."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 - a cut or damaged file fails in many ways (zip, pickle, EOF)
        reason = " ".join(str(err).split()).partition(". ")[0][:160] or type(err).__name__  # its first sentence
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        others = [p for p in newest_checkpoints(path.parent) if p != path]
        alternatives = [f"the run's exported student (--model {run / 'student'})"] if (run / "student").is_dir() else []
        alternatives += [f"another checkpoint (--model {others[0]})"] if others else []
        instead = f"; evaluate {' or '.join(alternatives)}" if alternatives else ""
        raise EvalError(f"--model {model} cannot be read as a checkpoint ({path.stat().st_size} bytes; {reason}): "
                        f"it is damaged or was cut short (a copy or save that did not finish){instead}") from None
    if not isinstance(checkpoint, dict):
        raise EvalError(f"{model} is not a checkpoint of an opdlab run (it holds a {type(checkpoint).__name__}); pass "
                        "an opdlab run's checkpoints/*.ckpt, its exported student folder, or a model directory")
    return checkpoint


def check_chat_template(tokenizer, label: str, prompt: str) -> None:
    """`--chat_template true` needs a tokenizer with a chat template that works: checked on the first prompt,
    before any weights load (a base model's tokenizer has none)."""
    if not getattr(tokenizer, "chat_template", None):
        raise EvalError(f"--chat_template true, but the tokenizer of {label} has no chat template (none in its "
                        "tokenizer_config.json or chat_template.jinja): it is a base model's; drop --chat_template "
                        "(or set chat_template: false in the eval config), or evaluate a chat model")
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    except Exception as err:  # noqa: BLE001 - a template is a program (Jinja): it fails in many ways
        raise EvalError(f"the chat template of {label} fails on the first prompt ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:160]}); fix the template, or drop --chat_template") from None


def load_source(source: ModelSource, dtype: str):
    """(model, tokenizer) of a resolved source: the weights load here."""
    from opdlab.models import load_causal_lm, load_tokenizer

    if source.kind == "adapter":
        return merged_adapter(source, dtype), load_tokenizer(source.tokenizer)
    if source.kind != "ckpt":
        return load_causal_lm(source.path, dtype), load_tokenizer(source.tokenizer)
    net = load_causal_lm(source.base, dtype)
    adapter = (source.checkpoint.get("opdlab") or {}).get("adapter")
    if adapter:  # a LoRA run's checkpoint: the adapter's weights on the base, merged
        from opdlab.adapters import AdapterOptions, apply_adapter, merged_copy

        apply_adapter(net, AdapterOptions(rank=adapter["r"], alpha=adapter["lora_alpha"],
                                          target_modules=adapter["target_modules"]), source.base)
    state = {k.removeprefix("student."): v for k, v in source.checkpoint["state_dict"].items() if k.startswith("student.")}
    missing, _ = net.load_state_dict(state, strict=False)
    if adapter:
        missing = [name for name in missing if ".lora_" in name]
        if missing:
            raise EvalError(f"{source.path} lacks {len(missing)} of its LoRA adapter's weights (e.g. {missing[:2]})")
        return merged_copy(net), load_tokenizer(source.base)
    tied = {name for name in missing if name.endswith("lm_head.weight") and net.config.get_text_config().tie_word_embeddings}
    if set(missing) - tied:
        raise EvalError(f"{source.path} lacks {len(set(missing) - tied)} of the student's weights (e.g. "
                        f"{sorted(set(missing) - tied)[:2]}); is it a checkpoint of a run of {source.base}?")
    return net, load_tokenizer(source.base)


def merged_adapter(source: ModelSource, dtype: str):
    """The base model with a peft adapter folder loaded (`PeftModel.from_pretrained`) and merged into its weights."""
    from opdlab.adapters import INSTALL_HINT, peft_available
    from opdlab.models import load_causal_lm

    if not peft_available():
        raise EvalError(f"--model {source.path} is a peft adapter; loading it needs the peft package: {INSTALL_HINT}")
    from peft import PeftModel

    base = load_causal_lm(source.base, dtype)
    try:
        return PeftModel.from_pretrained(base, source.path).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as err:  # shapes or layer names of another base model
        raise EvalError(f"the adapter {source.path} does not fit its base {source.base} "
                        f"({type(err).__name__}: {' '.join(str(err).split())[:200]}); was it made for another model?") from None


def load_model(model: str, dtype: str):
    """(model, tokenizer, what was loaded): a local HF directory or exported student, a run folder (its exported
    student), a Lightning checkpoint of an opdlab run (.ckpt: the base student plus the checkpoint's weights),
    `toy:<name>/<role>`, or a hub id where the network allows."""
    source = resolve_model(model)
    net, tokenizer = load_source(source, dtype)
    return net, tokenizer, source.label


def pick_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"device {device!r} asked for, but torch sees no CUDA device here; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise EvalError(f"device {device!r} is not a device torch knows; use auto, cpu, cuda or cuda:<index>") from None


# ----------------------------------------------------------------------------- which model: by content
OWN_FILES = ("responses.jsonl", "eval.json", "result.json", "results.md")
NOT_MODEL_SUFFIXES = (".md", ".png", ".jpg", ".jpeg", ".gif", ".partial", ".tmp")


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, streamed in 1 MiB blocks (about a second per GB)."""
    return hash_file_into(hashlib.sha256(), path).hexdigest()


def hash_file_into(digest, path: Path):
    """Feed a file's bytes to `digest` in 1 MiB blocks (never the whole file in memory); returns `digest`."""
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest


def folder_sha256(folder: Path, weights: bool = True) -> str:
    """sha256 over the names and contents of a model folder's files (weights, config, tokenizer, chat
    template, code): not its subfolders, documentation, hidden files or an evaluation written into it.
    `weights=False` leaves the weight files out (a checkpoint's base: its weights are replaced)."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if (not path.is_file() or path.name.startswith(".") or path.name in OWN_FILES
                or path.suffix.lower() in NOT_MODEL_SUFFIXES or path.name.upper().startswith("LICENSE")
                or (not weights and path.suffix in WEIGHT_SUFFIXES)):
            continue
        digest.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def hub_revision(name: str) -> str | None:
    """The commit of a hub model in the local hub cache (what from_pretrained loads), or None if not there."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json")
    return Path(found).parent.name if isinstance(found, str) else None


def base_fingerprint(base: str, weights: bool = False) -> str | None:
    """A checkpoint's base student: its config and tokenizer files (its weights are the checkpoint's); an
    adapter's base (`weights`): its weights too."""
    from opdlab.models import resolve_model_path

    path = Path(resolve_model_path(base))
    if path.is_dir():
        return folder_sha256(path, weights=weights)
    revision = hub_revision(base)
    return f"{base}@{revision}" if revision else None


def model_fingerprint(source: ModelSource) -> str | None:
    """`sha256:<hex>` of what the model is made of, not where it lies: a re-exported student or a folder replaced
    in place gets another. A directory: its files; a checkpoint: the student's tensors in it and its base's
    config and tokenizer files; a hub id: the cached commit (None while it is not in the cache)."""
    digest = hashlib.sha256()
    if source.kind == "dir":
        digest.update(b"dir\0" + folder_sha256(Path(source.path)).encode())
    elif source.kind == "adapter":  # the adapter's files and its base's, weights included
        base = base_fingerprint(source.base, weights=True)
        if base is None:
            return None
        digest.update(b"adapter\0" + folder_sha256(Path(source.path)).encode() + b"\0" + base.encode())
    elif source.kind == "ckpt":
        base = base_fingerprint(source.base)
        if base is None:
            return None
        digest.update(b"ckpt\0" + tensors_sha256(source.checkpoint["state_dict"], "student.").encode()
                      + b"\0" + base.encode())
    else:
        revision = hub_revision(source.path)
        if revision is None:
            return None
        digest.update(f"hub\0{source.path}@{revision}".encode())
    return "sha256:" + digest.hexdigest()


def tensors_sha256(state: dict, prefix: str = "") -> str:
    """sha256 over the names, dtypes, shapes and bytes of the tensors whose names start with `prefix`."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(k for k in state if k.startswith(prefix)):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}\0{flat.dtype}\0{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def weights_fingerprint(model) -> str:
    """The fingerprint of a model in memory (its tensors), where its files are not known."""
    return "sha256:" + hashlib.sha256(b"weights\0" + tensors_sha256(model.state_dict()).encode()).hexdigest()


def benchmark_fingerprint(bench: LoadedBenchmark) -> str:
    """sha256 of the problems as evaluated (after limit and prompt template): an edited benchmark file (or a
    changed toy task) is another benchmark, even under the same path."""
    rows = json.dumps([[p.prompt, p.answer] for p in bench.problems], ensure_ascii=False)
    return "sha256:" + hashlib.sha256(rows.encode()).hexdigest()


def default_out_dir(model: str, source: ModelSource) -> Path:
    """Where an evaluation goes without --out_dir: `<run>/eval` for a run folder or its exported student (where
    `opdlab fit --eval.*` writes), `<run>/eval-<name>` for a run's checkpoint, `evals/toy_<name>_<role>` for a toy,
    `evals/<owner>_<name>` for a hub id, and `evals/<name>-<hash of the absolute path>` for any other path,
    so two models never share a folder."""
    if source.kind == "hub" or model.startswith("toy:"):
        return Path("evals") / model.replace(":", "_").replace("/", "_")
    path = Path(source.path).resolve()
    if source.kind in ("dir", "adapter") and path.name == "student" and is_run_folder(path.parent):
        return path.parent / "eval"
    if source.kind == "ckpt" and path.parent.name == "checkpoints" and is_run_folder(path.parent.parent):
        return path.parent.parent / f"eval-{path.stem}"
    return Path("evals") / f"{path.stem or 'model'}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


# ----------------------------------------------------------------------------- the output folder
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


def short(value: object) -> str:
    if isinstance(value, str) and value.startswith("sha256:"):
        return repr(value.removeprefix("sha256:")[:12])
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def plan_output(out_dir: str | Path, settings: dict, overwrite: bool,
                problems: dict[str, list[Problem]] | None = None) -> OutputPlan:
    """Check `out_dir` against these settings without changing what it holds (it is created if missing):
    continue an evaluation made with the same settings by the same model, start fresh where there is none, and
    refuse, in one line naming the difference, responses made otherwise or by an unknown model (`overwrite`:
    start fresh anyway). `problems` (benchmark name -> problems) checks each stored response against them."""
    from opdlab.runs import writable_folder

    out_dir = writable_folder(out_dir, "--out_dir")
    responses, stored = out_dir / RESPONSES, out_dir / SETTINGS
    again = ("pass --overwrite true to replace it (it is kept until the new evaluation has its first responses), or "
             "another --out_dir")
    if overwrite:
        return OutputPlan(out_dir, settings, {}, fresh=True)
    before = None
    if stored.is_file():
        try:
            before = json.loads(stored.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise EvalError(f"{stored} is damaged ({err}), so what made the responses next to it is unknown; "
                            f"{again}") from None
        if not isinstance(before, dict):
            raise EvalError(f"{stored} holds {json_kind(before)}, not the settings of an evaluation; "
                            f"{again}")
    has_results = responses.is_file() and responses.stat().st_size > 0 or (out_dir / RESULT).is_file()
    if not has_results:
        return OutputPlan(out_dir, settings, {}, fresh=True)
    if before is None:
        what = RESPONSES if responses.is_file() and responses.stat().st_size > 0 else RESULT
        raise EvalError(f"{out_dir} holds {what} but no {SETTINGS} (the record of the model and settings that made "
                        f"them), so they cannot be told apart from this model's; {again}")
    if "model_fingerprint" not in before:
        raise EvalError(f"{out_dir} holds an evaluation made by an earlier opdlab that did not record which model "
                        f"made it (no model_fingerprint in {SETTINGS}); {again}")
    difference = first_difference(before, settings)
    if difference is not None:
        key, was, now = difference
        if key == "model_fingerprint":
            raise EvalError(f"{out_dir} holds the responses of another model (fingerprint {short(was)} there, "
                            f"{short(now)} now: {settings.get('model')} is not the model that made them, even if "
                            f"it lies at the same path); {again}")
        if key.startswith("benchmark_fingerprints."):
            name = key.partition(".")[2]
            raise EvalError(f"{out_dir} holds responses to another version of benchmark {name!r} (its problems, "
                            f"answers or prompts changed since; content {short(was)} there, {short(now)} now); {again}")
        raise EvalError(f"{out_dir} holds an evaluation with other settings ({key}: {short(was)} there, {short(now)} "
                        f"now); {again}")
    done = read_responses(responses, settings["k"], problems)
    return OutputPlan(out_dir, settings, done, fresh=not responses.is_file())


def read_responses(path: Path, k: int, problems: dict[str, list[Problem]] | None = None) -> dict[tuple, list[dict]]:
    """The problems with all k responses in `path`, by (seed, benchmark, index); a torn last line (a run killed
    while writing it) is left out, any other damage refused naming the file and line."""
    if not path.is_file():
        return {}
    again = "pass --overwrite true to start the evaluation again, or another --out_dir"
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise EvalError(f"{path} is not text ({err}); {again}") from None
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
            raise EvalError(f"{where} is not JSON ({err.msg}); {again}") from None
        if not isinstance(record, dict):
            raise EvalError(f"{where} holds {json_kind(record)}, not a response record; {again}")
        for name, kind in RECORD_FIELDS.items():
            if name not in record:
                raise EvalError(f"{where} has no {name!r} field (a response record has {', '.join(RECORD_FIELDS)}); "
                                f"{again}")
            value = record[name]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                expected = ("text or null" if name == "key" else
                            {int: "an integer", str: "text", bool: "true or false"}[kind])
                raise EvalError(f"{where}: {name!r} is {short(value)}, not {expected}; {again}")
        name, index, sample = record["benchmark"], record["index"], record["sample"]
        if problems is not None:
            if name not in problems:
                raise EvalError(f"{where} is a response to benchmark {name!r}, which this evaluation does not have "
                                f"({', '.join(problems)}); {again}")
            if not 0 <= index < len(problems[name]):
                raise EvalError(f"{where}: index {index} is outside benchmark {name!r}'s {len(problems[name])} "
                                f"problems; {again}")
            problem = problems[name][index]
            if (record["prompt"], record["answer"]) != (problem.prompt, problem.answer):
                raise EvalError(f"{where} answers another problem than {name!r} problem {index} "
                                f"({short(record['prompt'])} there, {short(problem.prompt)} in the benchmark); {again}")
        if not 0 <= sample < k:
            raise EvalError(f"{where}: sample {sample} is outside 0..{k - 1} (k={k}); {again}")
        if record["length"] < 0:
            raise EvalError(f"{where}: length {record['length']} is negative; {again}")
        group = groups.setdefault((record["seed"], name, index), {})
        if sample in group:
            raise EvalError(f"{where} repeats sample {sample} of {name!r} problem {index} (seed {record['seed']}); "
                            f"{again}")
        group[sample] = record
    return {key: [group[j] for j in range(k)] for key, group in groups.items() if len(group) == k}


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


# ----------------------------------------------------------------------------- evaluation
def eval_settings(label: str, fingerprint: str, engine: RolloutEngine, options: EvalOptions,
                  loaded: list[LoadedBenchmark], max_new: dict[str, int], dtype: str) -> dict:
    """What made the responses: the model (its content fingerprint), the engine and dtype, every setting that
    changes a response, and the benchmarks' content. Responses are reused only where all of it is the same."""
    return {"format": SETTINGS_FORMAT, "model": label, "model_fingerprint": fingerprint, "dtype": dtype,
            "engine": type(engine).__name__, "benchmarks": [asdict(b.spec) for b in loaded],
            "benchmark_fingerprints": {b.spec.name: benchmark_fingerprint(b) for b in loaded},
            "k": options.k, "temperature": options.temperature, "top_p": options.top_p, "max_new_tokens": max_new,
            "max_prompt_len": options.max_prompt_len, "chat_template": options.chat_template}


def evaluate(model, tokenizer, engine: RolloutEngine, options: EvalOptions, out_dir: str | Path, label: str,
             overwrite: bool = False, command: str | None = None, loaded: list[LoadedBenchmark] | None = None,
             plan: OutputPlan | None = None, fingerprint: str | None = None) -> dict:
    """Sample, score and tabulate `model` (already on its device) on `options.benchmarks`; writes responses.jsonl,
    result.json and results.md into `out_dir` and returns the result. Resumes what `out_dir` already holds when
    it was made by the same model (by content) with the same settings. `plan`: `plan_output`'s, when the caller
    checked the folder before loading the model; `fingerprint`: the model's (default: of the folder `label`
    names, else of the weights in memory)."""
    import torch

    from opdlab.engines.base import SamplingParams
    from opdlab.rollout import decode_responses, derive_seed, encode_prompts

    pass_ks = options.check()
    loaded = loaded if loaded is not None else [load_benchmark(b) for b in options.benchmarks]
    max_new = response_limits(options, loaded)
    if options.chat_template:
        check_chat_template(tokenizer, label, loaded[0].problems[0].prompt)
    warn_lost_characters(tokenizer, label, loaded)
    if plan is None:
        if fingerprint is None:
            folder = Path(label)
            fingerprint = (model_fingerprint(resolve_model(label))
                           if folder.is_dir() and is_model_folder(folder) else weights_fingerprint(model))
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        settings = eval_settings(label, fingerprint, engine, options, loaded, max_new, dtype)
        plan = plan_output(out_dir, settings, overwrite, {b.spec.name: b.problems for b in loaded})
    out_dir, settings, done = plan.out_dir, plan.settings, plan.done
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.eval()
    engine.bind(model, eos, pad)
    engine.load_weights(model)
    total = len(options.seeds) * sum(len(b.problems) for b in loaded)
    progress = Progress(total, sum(1 for key in done if key[0] in options.seeds), "opdlab eval")
    generated, seconds = 0, 0.0
    sink = ResponseSink(plan)
    try:
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
                    records = []
                    for row, text in enumerate(texts):
                        p, j = divmod(row, options.k)
                        correct, key = bench.verifier.check(text, chunk[p].answer)
                        records.append({"seed": seed, "benchmark": name, "index": indices[p], "sample": j,
                                        "prompt": chunk[p].prompt, "answer": chunk[p].answer, "response": text,
                                        "correct": correct, "key": key, "length": int(mask[row].sum()),
                                        "truncated": not bool(ended[row])})
                    sink.write(records)
                    for record in records:
                        done.setdefault((seed, name, record["index"]), []).append(record)
                    progress.update(len(indices), f"{name} seed {seed}")
    finally:
        progress.close()
        sink.close()
    result = tabulate(done, loaded, options, pass_ks)
    result.update(settings=settings, command=command, generated_now=generated,
                  seconds_per_response=(seconds / generated) if generated else None)
    replace_file(out_dir / RESULT, json.dumps(result, indent=2))
    replace_file(out_dir / TABLE, markdown_table(result, label) + "\n")
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
    """Mean and std over seeds; the std of one seed is unknown: null in result.json (strict JSON has no NaN)."""
    m, s = mean_std(values)
    return {"mean": m, "std": s if math.isfinite(s) else None}


def warn_lost_characters(tokenizer, label: str, loaded: list) -> None:
    """Once per benchmark: prompts (with their prompt_template) holding characters the tokenizer cannot represent;
    the model cannot read them (fit and validate say the same of training data)."""
    import warnings

    from opdlab.data import lost_characters

    for bench in loaded:
        found = lost_characters(tokenizer, [p.prompt for p in bench.problems])
        if found:
            warnings.warn(f"benchmark {bench.spec.name!r}: the tokenizer of {label} cannot represent the characters "
                          f"{found[0][:20]!r} of prompts such as {found[1][:60]!r} (the data or its prompt_template): "
                          "the model cannot read them; check the data, the prompt_template or the tokenizer",
                          stacklevel=2)


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
    continues an interrupted evaluation (only of the same model, by the content of its files, with the same
    settings and benchmark content).

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
        out_dir: where responses.jsonl, result.json and results.md go (default: <run>/eval for a run folder or
            its student/, <run>/eval-<name> for a run's checkpoint, evals/toy_<name>_<role> for a toy,
            evals/<owner>_<name> for a hub id, else evals/<name>-<hash of its path>).
        overwrite: replace what out_dir holds instead of continuing it (the old files stay until the new
            evaluation has its first responses).
    """
    from opdlab.engines.static import StaticCacheEngine
    from opdlab.models import load_tokenizer

    if not model:
        raise EvalError("--model is required: a model directory, an opdlab run folder or checkpoint, "
                        "toy:<name>/student, or a hub id")
    options = EvalOptions(list(benchmarks or []), k, pass_at, temperature, top_p, max_new_tokens, max_prompt_len,
                          list(seeds), chat_template, batch_size)
    options.check()
    if not options.benchmarks:
        raise EvalError("no benchmarks given; e.g. --config configs/eval/toy.yaml, or --benchmarks "
                        "'[{name: add3, path: \"toy:add3\"}]'")
    # Everything that can be checked is, before any weights load and before the output folder changes.
    loaded = [load_benchmark(b) for b in options.benchmarks]  # every file is read and checked before the model
    max_new = response_limits(options, loaded)
    source = resolve_model(model)
    tokenizer = load_tokenizer(source.tokenizer)
    if options.chat_template:
        check_chat_template(tokenizer, source.label, loaded[0].problems[0].prompt)
    device_ = pick_device(device)
    engine = engine or StaticCacheEngine()
    chosen = out_dir is not None
    out = Path(out_dir) if chosen else default_out_dir(model, source)
    fingerprint = model_fingerprint(source)  # None for a hub model not yet in the cache: after it loads
    problems = {b.spec.name: b.problems for b in loaded}
    plan = None
    if fingerprint is not None:
        plan = plan_output(out, eval_settings(source.label, fingerprint, engine, options, loaded, max_new, dtype),
                           overwrite, problems)
    print(f"opdlab eval: {source.label} on {', '.join(b.spec.name for b in loaded)} "
          f"({sum(len(b.problems) for b in loaded)} problems x {options.k} samples x {len(options.seeds)} seed(s)) "
          f"-> {out}" + ("" if chosen else " (the default for this model; --out_dir to choose)"),
          file=sys.stderr, flush=True)
    net, _ = load_source(source, dtype)
    if plan is None:
        fingerprint = model_fingerprint(source) or weights_fingerprint(net)
        plan = plan_output(out, eval_settings(source.label, fingerprint, engine, options, loaded, max_new, dtype),
                           overwrite, problems)
    net.to(device_)
    given = sys.argv[2:]  # this command's options, for eval.json and for the line that continues it
    command = "opdlab eval " + " ".join(given)
    received: list[int] = []  # (a Ctrl-C before the handlers are set is Python's own: reported as Ctrl-C)
    try:
        with stop_signals() as received:
            result = evaluate(net, tokenizer, engine, options, out, source.label, overwrite, command=command,
                              loaded=loaded, plan=plan)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: what is written stays, and the same command continues from it
        import shlex
        import signal

        signum = received[0] if received else signal.SIGINT
        # without --overwrite: continuing must not replace what this run wrote
        args = [a for i, a in enumerate(given) if not (a.startswith("--overwrite") or
                                                       (i and given[i - 1] == "--overwrite" and not a.startswith("-")))]
        error_exit(f"stopped by {signal_name(signum)}; the responses generated so far are kept in {out / RESPONSES}",
                   prog="opdlab eval", code=128 + signum,
                   hint=f"continue the evaluation with: opdlab eval {shlex.join(args)}")
    print(markdown_table(result, source.label))
    run = Path(source.path) if source.kind != "hub" else None
    run = run.parent if run is not None and run.name == "student" else run
    note = sampling_note(result, run_greedy_accuracy(run) if run is not None and run.is_dir() else None)
    per = result["seconds_per_response"]
    print(("\n" + note if note else "") + f"\nresponses: {out / RESPONSES}; table: {out / TABLE}"
          + (f"; {per * 1000:.1f} ms per sampled response" if per else ""))
    return result


def check_config_files(argv: list[str], option: str = "--config") -> None:
    """Each `option` file (`opdlab eval --config`, `opdlab fit --eval`) exists and holds a YAML mapping of evaluation
    settings, or is refused in one line naming it (jsonargparse would print its usage and the file's content, or
    only "Unexpected config")."""
    import yaml

    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(option + "="):
            value = arg.partition("=")[2]
        else:
            continue
        example = f"e.g. {option} configs/eval/toy.yaml"
        path = Path(value).expanduser()
        if not path.exists():
            if value.lstrip().startswith("{"):
                continue  # settings given inline: jsonargparse reads them
            raise EvalError(f"{option} {value} not found; pass an evaluation settings file, {example}")
        if not path.is_file():
            raise EvalError(f"{option} {value} is a folder; pass an evaluation settings file, {example}")
        try:
            data = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            reason = getattr(err, "problem", None) or " ".join(str(err).split())[:120]
            raise EvalError(f"{option} {value} is not valid YAML{where}: {reason}") from None
        if data is None:
            raise EvalError(f"{option} {value} is empty (no settings in it); pass an evaluation settings file, {example}")
        if not isinstance(data, dict):
            kind = "a list" if isinstance(data, list) else f"a single value ({short(data)})"
            raise EvalError(f"{option} {value}: the top level must be a mapping of evaluation settings (k: 8, "
                            f"benchmarks: [...], ...), but it is {kind}; see configs/eval/toy.yaml")


def json_kind(value: object) -> str:
    """What a JSON value is, in JSON's words: 'null', 'a JSON array', 'a JSON string', ..."""
    names = {type(None): "null", list: "a JSON array", str: "a JSON string", bool: "a JSON boolean",
             int: "a JSON number", float: "a JSON number", dict: "a JSON object"}
    return names.get(type(value), f"a JSON {type(value).__name__}")


def replacing_lists(argv: list[str], key: str) -> list[str]:
    """`key` (a list of benchmark entries) given on the command line replaces the config file's list: jsonargparse
    would merge the two entry by entry, so a config's `limit: 32` silently stayed on a benchmark the command line
    named. An empty list first makes it a replacement (`key+` still appends)."""
    out: list[str] = []
    for arg in argv:
        if arg == key or arg.startswith(key + "="):
            out += [key, "[]"]
        out.append(arg)
    return out


def run_eval(argv: list[str]) -> None:
    """`opdlab eval ...`: jsonargparse turns `eval_command`'s signature and docstring into --help."""
    from jsonargparse import CLI

    from opdlab import plugins

    argv = plugins.expand_short_names(argv, {"--engine": "opdlab.rollout_engines"})
    check_config_files(argv)
    argv = replacing_lists(argv, "--benchmarks")
    CLI(eval_command, args=argv, prog="opdlab eval", parser_class=one_line_parser_class())  # an EvalError: one line
