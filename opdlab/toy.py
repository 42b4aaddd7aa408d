"""The embedded toy default: a character tokenizer and a Qwen2 teacher/student trained by opdlab itself.

`opdlab toy` trains both models on a verifiable task with a fixed seed, gates them on held-out accuracy
(teacher >= 95%, student 20-60%: a student with room to learn from a teacher that knows the answer) and
caches real HF checkpoints under `$OPDLAB_CACHE` (default `~/.cache/opdlab`). Nothing is downloaded.

The default builds (add3, spell2 and scratch4, seed 0) ship inside the package (`opdlab/toy_checkpoints/`):
floating-point training differs between machines, thread counts and accelerators, so a build made on
first use was not the same everywhere (a GPU build overshot the student's gate). `toy:<name>/<role>`
resolves to the shipped files when they exist; `opdlab toy --name <name>` rebuilds into the cache and
compares the result with the shipped build.

Each build's `build.json` lists its files with their sizes and sha256; a toy is checked against it when it is
used (a damaged cached build is rebuilt, a damaged shipped one refused in one line). Builds are written whole by
whichever process builds (whatever its torch.distributed rank) and renamed into place in one step.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import json
import math
import os
import shutil
import signal
import socket
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

from opdlab.console import OpdlabError
from opdlab.evaluation.greedy import greedy_accuracy  # the module, not the package: evaluation/benchmarks uses toy
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


class ToyError(OpdlabError, RuntimeError):
    """A toy folder that cannot be used or replaced: one line naming the folder, what is wrong and what to do."""


ROLES = ("teacher", "student")
MODEL_FILES = ("config.json", "model.safetensors")  # every role's checkpoint has these ...
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # ... and these


def build_toy(name: str = "add3", cache_dir: str | Path | None = None, seed: int = 0, force: bool = False) -> Path:
    """Train, gate and cache the toy teacher and student; returns the toy's directory.

    The directory holds `teacher/` and `student/` (HF checkpoints with the tokenizer) and `build.json`, which
    records every file's size and sha256 (`toy_problem` checks them before a toy is used). A build is written to
    a temporary directory beside the target, checked complete, and renamed into place, so the target is either
    absent or a whole build. Every process that builds writes every file (no rank skips its saves). Builds of
    one toy take a file lock: a second process waits for the first and reuses its result; where the file system
    has no working lock, both build and the first rename wins. A cached build found damaged (build.json names
    this toy) is rebuilt; a folder opdlab cannot tell it built is refused, never deleted. A build stopped by
    SIGTERM removes its temporary directory; those left by killed builds are removed by the next build.
    """
    if name not in TOYS:
        raise ValueError(f"unknown toy {name!r}; available: {sorted(TOYS)}")
    spec = TOYS[name]
    target = Path(cache_dir or cache_root() / "toy") / build_name(name, seed)
    if not force and toy_problem(target, name, seed) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(target) as locked, removed_on_sigterm():
        problem = toy_problem(target, name, seed)
        if problem is None and not force:
            return target  # another process built it while this one waited
        if target.exists() or target.is_symlink():
            if not built_by_opdlab(target, name, seed):
                why = problem or "build.json does not name this toy"
                raise ToyError(f"toy folder {target} is not an intact opdlab build ({why}) and opdlab cannot tell that "
                               "it built it; delete or move it, then run again to build the toy there")
            if problem is not None:
                print(f"opdlab: toy folder {target} is damaged ({problem}); rebuilding it", flush=True)
        remove_stale_builds(target, locked)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-build-{build_tag()}-", dir=target.parent))
        try:
            report = train_toy(name, spec, seed, tmp)
            report["files"] = file_manifest(tmp)
            missing = [f"{role}/{file}" for role in ROLES for file in (*MODEL_FILES, *TOKENIZER_FILES)
                       if f"{role}/{file}" not in report["files"]]
            if missing:  # never rename an incomplete build into place
                raise ToyError(f"the build of toy {name} in {tmp} wrote no {', '.join(missing)}; nothing was cached; "
                               "report this with the build log")
            (tmp / "build.json").write_text(json.dumps(report, indent=2))
            install(tmp, target, name, seed, force)
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
        save_role(model, tokenizer, out / role)
    return report


def install(tmp: Path, target: Path, name: str, seed: int, force: bool) -> None:
    """Rename the finished build `tmp` to `target`. A target found intact now is kept unless `force`: another
    process built it meanwhile (without a working lock) and may be reading it, so both use the same files. A
    damaged (or forced) target is first renamed aside, then removed."""
    old = None
    if target.exists() or target.is_symlink():
        if not force and toy_problem(target, name, seed) is None:
            return
        old = target.parent / f".{target.name}-old-{build_tag()}-{os.urandom(4).hex()}"
        target.rename(old)
    try:
        tmp.rename(target)
    except OSError:
        if toy_problem(target, name, seed) is not None:
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()


def save_role(model, tokenizer, out: Path) -> None:
    """One role's HF checkpoint (config, generation config, weights, tokenizer), written by this process
    whatever its rank: `save_pretrained` writes config and weights only on rank 0 once torch.distributed is
    initialized, so a toy built by another rank had tokenizer files only. The files are those `save_pretrained`
    writes on rank 0 (tests/test_toy_builds.py compares them)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model.config.dtype = str(model.dtype).removeprefix("torch.")  # as save_pretrained records them
    model.config.architectures = [type(model).__name__]
    save_file({key: value.detach().contiguous() for key, value in model.state_dict().items()},
              out / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(out)
    if model.can_generate():
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def file_manifest(folder: Path) -> dict[str, dict]:
    """{path relative to `folder`: {"size", "sha256"}} of every file under it, build.json and hidden files
    excepted, in sorted order."""
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel != "build.json" and not any(part.startswith(".") for part in rel.split("/")):
            files[rel] = {"size": path.stat().st_size, "sha256": sha256(path)}
    return files


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_VERIFIED: dict[str, tuple] = {}  # folder -> the file sizes and times it was found intact with (hash once)


def toy_problem(path: Path, name: str, seed: int) -> str | None:
    """What is wrong with the toy folder `path` (build `name`, `seed`), in a few words; None when intact.

    Checks build.json, then every file it records (size, then sha256, hashed once per process while the
    files' sizes and times stay the same) and that each role has its config, weights and tokenizer. Builds of
    older opdlab versions (no file list) are checked by their files: present, config.json with a model type,
    weights whose safetensors header matches their size.
    """
    path = Path(path)
    if not path.is_dir():
        return "it does not exist" if not path.exists() else "it is not a folder"
    report, problem = read_build_json(path)
    if problem is not None:
        return problem
    if report.get("name") != name or report.get("seed") != seed:
        return f"build.json is for toy {report.get('name')!r} seed {report.get('seed')!r}"
    required = [f"{role}/{file}" for role in ROLES for file in (*MODEL_FILES, *TOKENIZER_FILES)]
    files = report.get("files")
    if files is None:
        return legacy_problem(path, required)
    if not isinstance(files, dict):
        return "build.json's file list is not a mapping"
    for rel in required:
        if rel not in files:
            return f"build.json lists no {rel}"
    stats = []
    for rel, entry in files.items():
        file = path / rel
        if not file.is_file():
            return f"{rel} is missing"
        stat = file.stat()
        if stat.st_size != entry.get("size"):
            return f"{rel} has {stat.st_size} bytes, build.json records {entry.get('size')}"
        stats.append((rel, stat.st_size, stat.st_mtime_ns, stat.st_ino))
    key, stamp = str(path.resolve()), (tuple(stats), (path / "build.json").stat().st_mtime_ns)
    if _VERIFIED.get(key) == stamp:
        return None
    for rel, entry in files.items():
        if sha256(path / rel) != entry.get("sha256"):
            return f"{rel} does not match its sha256 in build.json"
    _VERIFIED[key] = stamp
    return None


def read_build_json(path: Path) -> tuple[dict, str | None]:
    try:
        report = json.loads((path / "build.json").read_text())
    except FileNotFoundError:
        return {}, "build.json is missing"
    except (OSError, UnicodeDecodeError, ValueError):
        return {}, "build.json is not valid JSON"
    return (report, None) if isinstance(report, dict) else ({}, "build.json is not valid JSON")


def legacy_problem(path: Path, required: list[str]) -> str | None:
    """The check of a build without a file list (an older opdlab): every required file present and sound."""
    for rel in required:
        if not (path / rel).is_file():
            return f"{rel} is missing"
    for role in ROLES:
        try:
            if "model_type" not in json.loads((path / role / "config.json").read_text()):
                return f"{role}/config.json has no model_type"
        except (OSError, UnicodeDecodeError, ValueError):
            return f"{role}/config.json is not valid JSON"
        weights = path / role / "model.safetensors"
        try:
            with open(weights, "rb") as f:
                header_size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_size)) if 0 < header_size < 1 << 27 else None
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError):
            return f"{role}/model.safetensors is truncated or not a safetensors file"
        if weights.stat().st_size != 8 + header_size + end:
            return f"{role}/model.safetensors is truncated or not a safetensors file"
    return None


def built_by_opdlab(path: Path, name: str, seed: int) -> bool:
    """Whether opdlab built the folder `path` for this toy, so that it may replace it: a folder whose
    build.json names the toy and seed (a build renames build.json into place with the rest)."""
    report, problem = read_build_json(path)
    ours = problem is None and (report.get("name"), report.get("seed")) == (name, seed)
    return ours and path.is_dir() and not path.is_symlink()


def build_tag() -> str:
    """Who builds: the machine and process, in the names of temporary folders."""
    return f"{socket.gethostname().replace('-', '_') or 'host'}-{os.getpid()}"


def remove_stale_builds(target: Path, locked: bool) -> None:
    """Remove temporary folders of `target`'s builds that no process uses: those of this machine whose process
    has ended, those of older opdlab versions (no machine in the name) while holding the lock, and any older
    than a day. Another machine's may belong to a build still running (a per-machine lock on a shared cache)."""
    host = socket.gethostname().replace("-", "_") or "host"
    for stale in target.parent.glob(f".{target.name}-*"):
        if not stale.is_dir() or stale.is_symlink():
            continue
        parts = stale.name[len(target.name) + 2:].split("-")
        if len(parts) == 4 and parts[0] in ("build", "old"):
            dead = parts[1] == host and parts[2].isdigit() and not process_alive(int(parts[2]))
        else:
            dead = locked
        try:
            dead = dead or time.time() - stale.stat().st_mtime > 86400
        except OSError:
            continue
        if dead:
            shutil.rmtree(stale, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid < 1 << 22  # another user's process (or a pid no process can have)
    return True


@contextmanager
def build_lock(target: Path):
    """An exclusive lock on `target`'s build (a lock file beside it), announced when it has to wait; yields
    whether it holds one. A file system without working locks (some network file systems) yields False: the
    build still only renames a complete folder into place, and the first rename wins."""
    with open(target.parent / f".{target.name}.lock", "w") as f:
        locked = True
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"toy: another process is building {target.name}; waiting for it to finish", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # ENOLCK, EOPNOTSUPP: no locks on this file system
            locked = False
        try:
            yield locked
        finally:
            if locked:
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
    package has one for this seed, else the cached build (trained on first use, rebuilt when damaged). Either is
    checked against its build.json first; a damaged shipped build is refused in one line."""
    body = spec.removeprefix("toy:")
    name, _, role = body.partition("/")
    if role not in ("teacher", "student"):
        raise ValueError(f"toy model spec must be 'toy:<name>/teacher' or 'toy:<name>/student', got {spec!r}")
    seed = int(os.environ.get("OPDLAB_TOY_SEED", "0"))
    shipped = shipped_toy(name, seed)
    if shipped is not None:
        problem = toy_problem(shipped, name, seed)
        if problem is not None:
            raise ToyError(f"toy folder {shipped} (shipped with opdlab) is damaged ({problem}); reinstall opdlab to "
                           "restore it (from a git checkout: git checkout -- opdlab/toy_checkpoints)")
        return shipped / role
    target = cache_root() / "toy" / build_name(name, seed) if name in TOYS else None
    if target is not None and not target.exists() and not target.is_symlink():
        from opdlab.runs import writable_folder

        what = "OPDLAB_CACHE" if "OPDLAB_CACHE" in os.environ else "the toy cache (set OPDLAB_CACHE to move it)"
        writable_folder(cache_root() / "toy", what)
        print(f"opdlab: building toy {name!r} (seed {seed}) once; it is cached in {cache_root() / 'toy'}", flush=True)
    return build_toy(name, seed=seed) / role
