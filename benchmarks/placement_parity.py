"""Teacher placements on a device (issue 36): a served teacher's first-step loss equals the local teacher's.

    python benchmarks/placement_parity.py --device cuda                     # on a GPU: static and vllm engines
    python benchmarks/placement_parity.py --device cpu --engines static    # the CPU dry mode (tests run it)

Tiny random checkpoints (a Qwen3 student, a Qwen2 teacher, the character tokenizer; fp32, head_dim 32 for
vLLM's CPU attention) are written to a temporary folder. For each rollout engine (static; vllm, SKIPPED when
`import vllm` fails), each student (full fine-tuning; LoRA rank 8, SKIPPED without peft) and each divergence
(reverse_kl: the server sends the whole vocabulary, `top_logprobs="full"`, dense rows; sampled_token: its top-20,
sparse rows), ONE training step runs twice from the same seed: with the teacher as a model in this process
(`local`) and with the same teacher served by the test suite's loopback stand-in for vLLM's server
(tests/fake_vllm.py: the same weights in fp32 on this machine's CPU, in threads of this process). The student and
the rollout engine run on --device, so on a GPU the served rows are parsed on the CPU and must reach the
student's device: the case that once broke. The served step must ask the server, and its loss must equal the
local one: |served - local| <= 1e-4 * max(1, |local|).

Both runs generate their own rollouts; when a vllm rollout differs between them (vLLM's kernels need not be
bitwise repeatable), the served step is run again on the local run's rollout and the row says so.

Prints a markdown table (engine, student, divergence, local loss, served loss, |diff|, status) and the largest
|diff|; --out writes the same as JSON (with the table's lines under "table"). Exit status: 0 when every pair that
ran is equal within the tolerance, 1 when one differs or a step raised, 2 for bad options.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # fake_vllm: the suite's stand-in for vLLM's OpenAI-compatible server

ENGINES = ("static", "vllm")
STUDENTS = ("full", "lora")
DIVERGENCES = ("reverse_kl", "sampled_token")
RTOL = 1e-4
SEED = 0
MAX_NEW_TOKENS = 6
PROMPTS = 8  # prompts per step (one sample each)
MAX_LEN = 64  # prompt + response, within every model's positions and the server's max_model_len
# Tiny shapes (the character tokenizer's 16 tokens); head_dim 32: vLLM's CPU attention refuses 16. Wider initial
# weights than transformers' 0.02: peaked distributions, losses near 4, so a wrong teacher row moves the loss
# (a teacher head scaled by 1.001 moves it by ~5e-3, 10x the tolerance).
STUDENT = {"kind": "qwen3", "initializer_range": 0.2, "hidden_size": 64, "num_hidden_layers": 2,
           "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}
TEACHER = {"kind": "qwen2", "initializer_range": 0.4, "hidden_size": 64, "num_hidden_layers": 2,
           "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}


def build_models(root: Path) -> tuple[str, str]:
    """A random-init Qwen3 student and Qwen2 teacher in fp32, each saved with the character tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from opdlab.toy import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    paths = []
    for name, shape, seed in (("student", STUDENT, 1), ("teacher", TEACHER, 2)):
        spec = dict(shape)
        config_cls, model_cls = (Qwen3Config, Qwen3ForCausalLM) if spec.pop("kind") == "qwen3" else \
            (Qwen2Config, Qwen2ForCausalLM)
        config = config_cls(**spec, vocab_size=len(tokenizer), max_position_embeddings=MAX_LEN,
                            tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
        torch.manual_seed(seed)
        path = root / name
        model_cls(config).to(torch.float32).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    return paths[0], paths[1]


def make_engine(name: str):
    from opdlab.engines import StaticCacheEngine, VLLMEngine

    if name == "static":
        return StaticCacheEngine()
    # one small instance; the local and served runs share it (opdlab keeps vLLM instances per architecture)
    return VLLMEngine(enforce_eager=True, max_model_len=MAX_LEN, gpu_memory_utilization=0.2, kv_cache_gb=0.25)


def make_divergence(name: str):
    from opdlab.divergences import ReverseKL, SampledTokenOPD

    return ReverseKL() if name == "reverse_kl" else SampledTokenOPD()


def make_placement(divergence: str):
    from opdlab.teachers import VLLMServerTeacher

    # reverse KL needs the teacher's whole distribution; the sampled-token loss only the sampled token's log-prob
    return VLLMServerTeacher(top_logprobs="full" if divergence == "reverse_kl" else 20)


def first_step(root: Path, device: str, student: str, teacher: str, engine: str, adapter: bool, divergence: str,
               placement=None, replay=None) -> dict:
    """One training step (`trainer.fit`, max_steps 1) from SEED: its loss, its rollout (on the CPU, to compare)
    and where the student and the rollout were."""
    import lightning as L
    import torch

    from opdlab.adapters import AdapterOptions
    from opdlab.data import PromptDataModule
    from opdlab.module import OPDModule
    from opdlab.tasks import AdditionTask

    L.seed_everything(SEED, verbose=False)
    module = OPDModule(student=student, teacher=teacher, teacher_placement=placement,
                       divergence=make_divergence(divergence), rollout_engine=make_engine(engine),
                       student_adapter=AdapterOptions(rank=8) if adapter else AdapterOptions(),
                       optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
                       rollout={"max_new_tokens": MAX_NEW_TOKENS})
    seen: dict = {}
    generate = module.rollout

    def rollout(prompts, greedy=False, seeds=None):
        out = replay if replay is not None and not greedy else generate(prompts, greedy=greedy, seeds=seeds)
        if not greedy:
            seen.setdefault("rollout", out)
            seen.setdefault("student_device", str(next(module.student.parameters()).device))
        return out

    module.rollout = rollout

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if "loss" in outputs:
                seen["loss"] = float(outputs["loss"])

    trainer = L.Trainer(max_steps=1, accelerator=device, devices=1, precision="32-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Record()],
                        default_root_dir=root / "runs")
    trainer.fit(module, datamodule=PromptDataModule(AdditionTask(digits=2), batch_size=PROMPTS))
    if "loss" not in seen:
        raise RuntimeError("the first step took no optimizer step (a non-finite loss?)")
    r = seen["rollout"]
    return {"loss": seen["loss"], "student_device": seen["student_device"], "rollout_device": str(r.input_ids.device),
            "rollout": r, "tokens": r.input_ids.detach().cpu(), "mask": r.response_mask.detach().cpu()}


def same_rollout(a: dict, b: dict) -> bool:
    import torch

    return torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["mask"], b["mask"])


def case(root: Path, device: str, models: tuple[str, str], server, engine: str, student_kind: str,
         divergence: str) -> dict:
    student, teacher = models
    row = {"engine": engine, "student": student_kind, "divergence": divergence}
    start = time.perf_counter()
    try:
        local = first_step(root, device, student, teacher, engine, student_kind == "lora", divergence)
        before = server.answered
        served = first_step(root, device, student, server.url, engine, student_kind == "lora", divergence,
                            make_placement(divergence))
        row["rollout"] = "same"
        if not same_rollout(local, served):
            if engine == "static":  # seeded per prompt on the student's own device: must repeat exactly
                raise RuntimeError("the static engine's rollouts differ between two runs from the same seed")
            served = first_step(root, device, student, server.url, engine, student_kind == "lora", divergence,
                                make_placement(divergence), replay=local["rollout"])
            row["rollout"] = "replayed (vllm's two rollouts differed)"
        requests = server.answered - before
        if requests == 0:
            raise RuntimeError("the served step sent the server no request")
        diff = abs(served["loss"] - local["loss"])
        limit = RTOL * max(1.0, abs(local["loss"]))
        row.update(local=local["loss"], served=served["loss"], diff=diff, limit=limit, requests=requests,
                   student_device=served["student_device"], rollout_device=served["rollout_device"])
        ok = math.isfinite(diff) and diff <= limit
        row["status"] = "PASSED" if ok else "FAILED"
        if not ok:
            row["reason"] = f"|diff| {diff:.3g} > {limit:.3g}"
    except Exception as err:  # noqa: BLE001 - one case's error is its row; the others still run
        lines = [line for line in traceback.format_exception_only(type(err), err) if line.strip()]
        row.update(status="ERROR", reason=lines[-1].strip().splitlines()[0][:300])
        traceback.print_exc()
    row["seconds"] = time.perf_counter() - start
    return row


def skipped(engine: str, student_kind: str, reason: str) -> list[dict]:
    return [{"engine": engine, "student": student_kind, "divergence": d, "status": "SKIPPED", "reason": reason}
            for d in DIVERGENCES]


def missing(module: str) -> str | None:
    """Why `module` cannot be imported here (None when it can)."""
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    try:
        __import__(module)
    except Exception as err:  # noqa: BLE001 - a broken install skips like a missing one, with its reason
        return f"import {module} failed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    return None


def table(rows: list[dict]) -> list[str]:
    def num(row, key, fmt):
        return format(row[key], fmt) if key in row else "-"

    lines = ["| engine | student | divergence | local loss | served loss | abs diff | status |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        status = row["status"] + (f": {row['reason']}" if row.get("reason") else "")
        if row.get("rollout", "same") != "same":
            status += f" ({row['rollout']})"
        lines.append(f"| {row['engine']} | {row['student']} | {row['divergence']} | {num(row, 'local', '.7f')} | "
                     f"{num(row, 'served', '.7f')} | {num(row, 'diff', '.2e')} | {status.replace('|', '/')} |")
    return lines


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="placement_parity", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the student, the local teacher and the rollout engine run (default cpu); the "
                        "served teacher is always on this machine's CPU")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help=f"comma-separated rollout engines among {', '.join(ENGINES)} (default: both)")
    p.add_argument("--out", type=Path, help="also write the rows, the largest |diff| and the table as JSON here")
    args = p.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in args.engines if e not in ENGINES]
    if bad or not args.engines:
        p.error(f"--engines {','.join(args.engines) or '(none)'}: expected a comma-separated list of "
                f"{', '.join(ENGINES)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no CUDA device")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")  # Lightning's advice on workers and logging: not this script's subject
    import lightning  # noqa: F401 - (it sets its loggers' levels on import: quieten them after)
    import torch
    from fake_vllm import FakeVLLM

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(1)  # tiny models: one thread beats several (the server's threads share them too)
    torch.set_float32_matmul_precision("highest")  # fp32 on both sides: no TF32 on a GPU
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="placement_parity_") as tmp:
        models = build_models(Path(tmp))
        with FakeVLLM(models[1], max_logprobs=-1, max_model_len=MAX_LEN) as server:
            for engine in args.engines:
                engine_missing = missing("vllm") if engine == "vllm" else None
                for student_kind in STUDENTS:
                    reason = engine_missing or (missing("peft") if student_kind == "lora" else None)
                    if reason and student_kind == "lora" and not engine_missing:
                        reason += (" (gpu_acceptance: build the wheelhouse with `build_wheelhouse.sh wheelhouse peft` "
                                   "and pass --require peft)")
                    if reason:
                        rows += skipped(engine, student_kind, reason)
                        continue
                    for divergence in DIVERGENCES:
                        row = case(Path(tmp), args.device, models, server, engine, student_kind, divergence)
                        print(f"placement_parity: {engine} {student_kind} {divergence}: {row['status']} "
                              f"in {row['seconds']:.1f} s" + (f" ({row['reason']})" if row.get("reason") else ""),
                              flush=True)
                        rows.append(row)
    ran = [row for row in rows if "diff" in row]
    worst = max((row["diff"] for row in ran), default=None)
    passed = all(row["status"] in ("PASSED", "SKIPPED") for row in rows)
    devices = sorted({f"student {row['student_device']}, rollout {row['rollout_device']}" for row in ran})
    lines = table(rows)
    summary = (f"{sum(row['status'] == 'PASSED' for row in rows)} of {len(rows)} pairs equal within "
               f"{RTOL:g} x max(1, abs(local)); largest abs diff "
               + (f"{worst:.2e}" if worst is not None else "not measured")
               + f"; {'; '.join(devices) or 'no step ran'}; served teacher: fake vLLM server on the CPU")
    print("\n".join(lines), flush=True)
    print(f"\n{summary}\nplacement_parity: {'PASSED' if passed else 'FAILED'} in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "device": args.device, "engines": args.engines, "tolerance": f"{RTOL:g} * max(1, abs(local))",
            "max_diff": worst, "passed": passed, "summary": summary, "seconds": time.perf_counter() - started,
            "python": platform.python_version(), "torch": torch.__version__, "rows": rows, "table": lines,
        }, indent=1))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
