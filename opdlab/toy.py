"""The embedded toy default: a character tokenizer and a Qwen2 teacher/student trained by opdlab itself.

`opdlab toy` trains both models on a verifiable task with a fixed seed, gates them on held-out accuracy
(teacher >= 95%, student 20-60%: a student with room to learn from a teacher that knows the answer) and
caches real HF checkpoints under `$OPDLAB_CACHE` (default `~/.cache/opdlab`). Nothing is downloaded.

The default builds (add3, spell2 and scratch4, seed 0) ship inside the package (`opdlab/toy_checkpoints/`):
floating-point training differs between machines, thread counts and accelerators, so a build made on
first use was not the same everywhere (a GPU build overshot the student's gate). `toy:<name>/<role>`
resolves to the shipped files when they exist; `opdlab toy --name <name>` rebuilds into the cache and
compares the result with the shipped build.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from opdlab.evaluation import greedy_accuracy
from opdlab.rollout import PromptBatch, Rollout, sample_rollouts
from opdlab.tasks.addition import CHARSET
from opdlab.tasks.base import PromptSource

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]


@dataclass(frozen=True)
class ModelSpec:
    hidden: int
    layers: int
    ffn: int
    heads: int = 4
    kv_heads: int = 2
    lr: float = 1.5e-3
    max_steps: int = 800
    stop_at: float = 1.0  # stop training once held-out accuracy reaches this
    gate: tuple[float, float] = (0.0, 1.0)  # accepted held-out accuracy range


@dataclass(frozen=True)
class ToySpec:
    task: dict
    teacher: ModelSpec
    student: ModelSpec
    batch_size: int = 128
    eval_every: int = 25
    version: int = 1  # bump to invalidate caches when the recipe changes
    extra: dict = field(default_factory=dict)
    task_class: str = "opdlab.tasks.AdditionTask"  # a PromptSource with `problem_at(index)`
    # Per-role constructor arguments added to `task` when pre-training that role, e.g. the spelling a
    # role is taught; they may change only the task's `demonstration`, never its prompts or verifier.
    role_task: dict = field(default_factory=dict)


TOYS: dict[str, ToySpec] = {
    # Reversed 3-digit addition (docs/method.md §5): ~2.6M-param teacher, ~0.5M-param student.
    "add3": ToySpec(
        task={"digits": 3},
        teacher=ModelSpec(hidden=256, layers=4, ffn=512, max_steps=1200, stop_at=0.97, gate=(0.95, 1.0)),
        student=ModelSpec(hidden=128, layers=2, ffn=512, max_steps=600, stop_at=0.30, gate=(0.20, 0.60)),
    ),
    # Reversed 2-digit addition: builds in well under a minute, for tests.
    "add2": ToySpec(
        task={"digits": 2},
        teacher=ModelSpec(hidden=128, layers=2, ffn=256, max_steps=800, stop_at=0.97, gate=(0.95, 1.0)),
        student=ModelSpec(hidden=64, layers=2, ffn=128, max_steps=2000, stop_at=0.30, gate=(0.20, 0.60)),
    ),
    # Spelled reversed 2-digit addition (opdlab.tasks.spelled_addition): every digit may be written as a
    # digit or a letter. The teacher answers in digits (from contexts spelled at random); the student was
    # taught a letter at answer position 0, either spelling (50/50) at 1 and a digit at 2, so the two
    # disagree learnably (position 1, carries) and incompatibly (position 0). Builds in ~1-2 min.
    "spell2": ToySpec(
        task={"digits": 2},
        task_class="opdlab.tasks.SpelledAdditionTask",
        role_task={
            "teacher": {"letter_prob": [0.0, 0.0, 0.0], "context_letter_prob": 0.5},
            "student": {"letter_prob": [1.0, 0.5, 0.0]},
        },
        teacher=ModelSpec(hidden=128, layers=2, ffn=256, max_steps=1000, stop_at=0.97, gate=(0.95, 1.0)),
        student=ModelSpec(hidden=64, layers=2, ffn=128, max_steps=2000, stop_at=0.30, gate=(0.20, 0.60)),
    ),
    # Scratchpad addition (opdlab.tasks.scratchpad): 47-token responses of column-by-column work ending in the
    # answer, the long-response toy. The student was taught to write step 0 with its operands swapped (always)
    # and step 1 swapped half the time, both valid: the teacher's operand digits there lie outside the
    # student's top candidates at step 0 (incompatible) and inside them at step 1 (learnable), besides its
    # sum/carry errors (learnable). Builds in ~4 min on 2 cores (the teacher is most of it).
    "scratch4": ToySpec(
        task={"digits": 4},
        task_class="opdlab.tasks.ScratchpadAdditionTask",
        role_task={"teacher": {"swap_prob": 0.0}, "student": {"swap_prob": [1.0, 0.5, 0.0, 0.0]}},
        batch_size=64,
        teacher=ModelSpec(hidden=256, layers=4, ffn=512, max_steps=600, stop_at=0.97, gate=(0.95, 1.0)),
        student=ModelSpec(hidden=128, layers=2, ffn=512, max_steps=800, stop_at=0.25, gate=(0.20, 0.60)),
    ),
    # The fair long-response toy (issue 22): scratch4's task with a style instead of a foreign spelling. Each
    # response writes every step's carry after 'c' or after '=' (`4+8+0=2c1|` or `4+8+0=2=1|`), one style per
    # response; the teacher was shown both (half each), the student only '=' (its own). So the teacher writes the
    # student's spelling too, is unsure of the style only at the first step's mark, and follows the response's
    # style after that; the student is weaker because it is smaller and trained less (a capacity gap). Earlier
    # builds that varied the operand order instead left the teacher 50/50 at every step's first operand (it
    # never learnt to follow a response's order): benchmarks/results/fair_toy.md.
    "mix4": ToySpec(
        task={"digits": 4},
        task_class="opdlab.tasks.ScratchpadAdditionTask",
        role_task={"teacher": {"carry_mark_prob": 0.5}, "student": {"carry_mark_prob": 1.0}},
        batch_size=64,
        # Trained past 97% accuracy (stop_at > 1: all max_steps): following a response's style lowers the loss,
        # not the error rate, so a teacher stopped at 97% may not have learnt it yet.
        teacher=ModelSpec(hidden=256, layers=4, ffn=512, max_steps=700, stop_at=1.01, gate=(0.95, 1.0)),
        student=ModelSpec(hidden=128, layers=2, ffn=512, max_steps=800, stop_at=0.25, gate=(0.20, 0.60)),
    ),
}


def build_name(name: str, seed: int) -> str:
    """The folder of one toy build (cached or shipped): name, recipe version, seed."""
    return f"{name}-v{TOYS[name].version}-seed{seed}"


def cache_root() -> Path:
    return Path(os.environ.get("OPDLAB_CACHE", Path.home() / ".cache" / "opdlab")).expanduser()


def build_char_tokenizer(charset: str = CHARSET) -> PreTrainedTokenizerFast:
    """A character-level HF tokenizer (WordLevel + per-character split) that saves and reloads offline."""
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *charset])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        padding_side="left",  # lost on reload unless given to the constructor
    )


def make_qwen2(spec: ModelSpec, tokenizer: PreTrainedTokenizerFast, max_len: int = 64) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=spec.hidden, num_hidden_layers=spec.layers,
        intermediate_size=spec.ffn, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=max_len, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    return Qwen2ForCausalLM(config)


def evaluate_accuracy(model, tokenizer, task: PromptSource, max_new_tokens: int | None = None,
                      batch_size: int = 256) -> float:
    """Greedy accuracy (the task's verifier) on its held-out problems; responses up to `max_new_tokens`
    (default: the task's `max_response_tokens` where it has one, else 8)."""
    max_new_tokens = max_new_tokens or getattr(task, "max_response_tokens", 8)

    def generate(prompts: PromptBatch) -> Rollout:
        return sample_rollouts(model, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id,
                               max_new_tokens=max_new_tokens, temperature=0.0)

    return greedy_accuracy(generate, tokenizer, task, batch_size)


def make_task(spec: ToySpec, seed: int, role: str | None = None) -> PromptSource:
    """The toy's task; with `role`, constructed with that role's pre-training arguments too."""
    module, _, name = spec.task_class.rpartition(".")
    task_class = getattr(importlib.import_module(module), name)
    return task_class(**spec.task, **(spec.role_task.get(role, {}) if role else {}), seed=seed)


def demonstration(task: PromptSource, index: int) -> tuple[str, str, str]:
    """(prompt, context answer, target answer) of pre-training example `index`.

    Tasks with several correct answer spellings define `demonstration` (see SpelledAdditionTask); for the
    others the context and the target are both the reference answer.
    """
    if hasattr(task, "demonstration"):
        return task.demonstration(index)
    problem = task.problem_at(index)
    return problem.prompt, problem.answer, problem.answer


def supervised_batch(tokenizer, task: PromptSource, start: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids of prompt+answer+EOS and labels that score only the answer and EOS.

    The input holds the context spelling of the answer and the labels its target spelling (the same
    for tasks with one spelling): label t is predicted from the prompt and context characters before t.
    """
    ids, labels = [], []
    for i in range(batch_size):
        prompt, context, target = demonstration(task, start + i)
        prompt_ids = tokenizer(prompt)["input_ids"]
        eos = [tokenizer.eos_token_id]
        ids.append(prompt_ids + tokenizer(context)["input_ids"] + eos)
        labels.append([-100] * len(prompt_ids) + tokenizer(target)["input_ids"] + eos)
    return torch.tensor(ids), torch.tensor(labels)  # fixed widths: every problem has the same length


def train_supervised(model, tokenizer, task: PromptSource, spec: ModelSpec, toy: ToySpec, desc: str) -> tuple[float, int]:
    """Train with cross-entropy until held-out accuracy reaches `spec.stop_at` or `spec.max_steps`."""
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, spec.max_steps) / spec.max_steps))
    )
    accuracy, step = 0.0, 0
    bar = tqdm(range(1, spec.max_steps + 1), desc=desc, leave=False)
    for step in bar:
        ids, labels = supervised_batch(tokenizer, task, (step - 1) * toy.batch_size, toy.batch_size)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % toy.eval_every == 0 or step == spec.max_steps:
            model.eval()
            accuracy = evaluate_accuracy(model, tokenizer, task)
            model.train()
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy:.2f}")
            if accuracy >= spec.stop_at:
                break
    bar.close()
    return accuracy, step


def build_toy(name: str = "add3", cache_dir: str | Path | None = None, seed: int = 0, force: bool = False) -> Path:
    """Train, gate and cache the toy teacher and student; returns the toy's directory.

    The directory holds `teacher/` and `student/` (HF checkpoints with the tokenizer) and `build.json`.
    A build is written to a temporary directory and renamed into place, so an interrupted build never
    leaves a half-written cache. Builds of one toy take a file lock: a second process waits for the first
    and reuses its result; a build stopped by SIGTERM removes its temporary directory, and temporary
    directories left by killed builds are removed by the next one.
    """
    if name not in TOYS:
        raise ValueError(f"unknown toy {name!r}; available: {sorted(TOYS)}")
    spec = TOYS[name]
    target = Path(cache_dir or cache_root() / "toy") / build_name(name, seed)
    if (target / "build.json").exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(target), removed_on_sigterm():
        if (target / "build.json").exists() and not force:
            return target  # another process built it while this one waited
        for stale in target.parent.glob(f".{target.name}-*"):  # left by killed builds (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            report = train_toy(name, spec, seed, tmp)
            (tmp / "build.json").write_text(json.dumps(report, indent=2))
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def train_toy(name: str, spec: ToySpec, seed: int, out: Path) -> dict:
    """Train and gate both models of a toy into `out`/{teacher,student}; returns the build report."""
    tokenizer = build_char_tokenizer(getattr(make_task(spec, seed), "charset", CHARSET))
    report = {"name": name, "seed": seed, "spec": asdict(spec)}
    for role in ("teacher", "student"):
        mspec: ModelSpec = getattr(spec, role)
        task = make_task(spec, seed, role)
        torch.manual_seed(seed + (0 if role == "teacher" else 1))
        model = make_qwen2(mspec, tokenizer)
        t0 = time.perf_counter()
        accuracy, steps = train_supervised(model, tokenizer, task, mspec, spec, desc=f"toy {name}: {role}")
        lo, hi = mspec.gate
        report[role] = {"accuracy": accuracy, "steps": steps, "seconds": round(time.perf_counter() - t0, 1),
                        "params": sum(p.numel() for p in model.parameters())}
        print(f"toy {name}: {role} reached {accuracy:.1%} held-out accuracy in {steps} steps "
              f"({report[role]['seconds']} s)")
        if not lo <= accuracy <= hi:
            raise RuntimeError(
                f"toy {name}: {role} accuracy {accuracy:.1%} is outside its gate [{lo:.0%}, {hi:.0%}] "
                f"(seed {seed}); try another --seed or report this with the build log"
            )
        model.save_pretrained(out / role)
        tokenizer.save_pretrained(out / role)
    return report


@contextmanager
def build_lock(target: Path):
    """An exclusive lock on `target`'s build (a lock file beside it), announced when it has to wait."""
    with open(target.parent / f".{target.name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"toy: another process is building {target.name}; waiting for it to finish", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def removed_on_sigterm():
    """Turn SIGTERM into SystemExit while building, so `finally` blocks remove temporary files (the
    default action ends the process at once). Only the main thread can install signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


SHIPPED = Path(__file__).resolve().parent / "toy_checkpoints"


def shipped_toy(name: str, seed: int) -> Path | None:
    """The build of `name` (seed) that ships inside the package, if there is one: the default toys are the
    same files on every machine and accelerator, so their numbers reproduce anywhere."""
    path = SHIPPED / build_name(name, seed) if name in TOYS else None
    return path if path is not None and (path / "build.json").is_file() else None


def resolve_toy_path(spec: str) -> Path:
    """`toy:<name>/<role>` (role: teacher or student) -> checkpoint directory: the shipped build when the
    package has one for this seed, else the cached build (trained on first use)."""
    body = spec.removeprefix("toy:")
    name, _, role = body.partition("/")
    if role not in ("teacher", "student"):
        raise ValueError(f"toy model spec must be 'toy:<name>/teacher' or 'toy:<name>/student', got {spec!r}")
    seed = int(os.environ.get("OPDLAB_TOY_SEED", "0"))
    shipped = shipped_toy(name, seed)
    if shipped is not None:
        return shipped / role
    if name in TOYS and not (cache_root() / "toy" / build_name(name, seed) / "build.json").exists():
        from opdlab.runs import writable_folder

        what = "OPDLAB_CACHE" if "OPDLAB_CACHE" in os.environ else "the toy cache (set OPDLAB_CACHE to move it)"
        writable_folder(cache_root() / "toy", what)
        print(f"opdlab: building toy {name!r} (seed {seed}) once; it is cached in {cache_root() / 'toy'}", flush=True)
    return build_toy(name, seed=seed) / role
