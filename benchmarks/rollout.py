"""Rollout speed of the engines (reference loop, static cache, vLLM) side by side in one process.

    python benchmarks/rollout.py                                  # CPU: toy and vocab-151,936 random pair
    python benchmarks/rollout.py --sizes qwen3-0.6b --new-tokens 32 --rounds 2   # the 0.6B shape on CPU
    python benchmarks/rollout.py --device cuda --sizes toy vocab151k qwen3-0.6b  # a GPU (bf16 generation)
    python benchmarks/rollout.py --device cuda --sizes qwen3-0.6b --full-step    # + whole OPD steps

Each engine generates the same prompts with the same per-prompt seeds; EOS is disabled so every row runs
`--new-tokens` steps and the per-step time is comparable (ms/step = rollout wall time / new tokens, the
prefill included). Rounds rotate the engines' order; medians are reported, with each engine's ratio to the
reference and to the static engine, of wall time and of process CPU time (on a shared machine the CPU-time
ratio is the steadier one). vLLM's start-up (building the engine, loading the weights, compiling) is paid
once per fit and reported apart. `--full-step` also times whole OPD training steps (rollout, forwards,
scoring, loss, optimizer) at that size with each engine, a teacher of `--teacher-size`, bf16-mixed on CUDA,
and the stage breakdown. Models are random-init (no hub): the `qwen3-*` sizes are Qwen3-0.6B / 1.7B shapes.
The vllm engine is timed where the vllm package is installed (see README: GPU and vLLM).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from report import publish
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from opdlab.engines import ReferenceEngine, SamplingParams, StaticCacheEngine, VLLMEngine
from opdlab.engines.vllm_engine import vllm_available
from opdlab.models import load_tokenizer
from opdlab.rollout import encode_prompts
from opdlab.tasks import AdditionTask
from opdlab.toy import build_char_tokenizer

SIZES = {  # name -> (model factory kwargs, default prompts per batch)
    "toy": ({"kind": "toy"}, 128),
    "vocab151k": ({"kind": "qwen2", "vocab_size": 151936, "hidden_size": 256, "num_hidden_layers": 2,
                   "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}, 16),
    "qwen3-0.6b": ({"kind": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "num_hidden_layers": 28,
                    "intermediate_size": 3072, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                    "tie_word_embeddings": True}, 16),
    "qwen3-1.7b": ({"kind": "qwen3", "vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 28,
                    "intermediate_size": 6144, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                    "tie_word_embeddings": True}, 16),
}
ENGINES = {"reference": ReferenceEngine, "static": StaticCacheEngine, "vllm": VLLMEngine}


def build_model(size: str, tokenizer, device: torch.device, seed: int = 0):
    """A random-init model of `size` (the toy: the cached toy:add3 student)."""
    spec = dict(SIZES[size][0])
    kind = spec.pop("kind")
    if kind == "toy":
        from opdlab.models import load_causal_lm

        return load_causal_lm("toy:add3/student").to(device).eval()
    torch.manual_seed(seed)
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if kind == "qwen2" else (Qwen3Config, Qwen3ForCausalLM)
    config = config_cls(**spec, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=tokenizer.bos_token_id)
    with torch.device(device):
        return model_cls(config).eval()


def prompt_batch(tokenizer, n: int):
    problems = [AdditionTask(digits=3).problem_at(i) for i in range(n)]
    # Ragged widths: some prompts lose their first characters, so padding and positions are exercised.
    return encode_prompts(tokenizer, [p.prompt[i % 3 :] for i, p in enumerate(problems)], [p.answer for p in problems])


def make_engine(name: str, args, max_model_len: int | None = None):
    if name != "vllm":
        return ENGINES[name]()
    return VLLMEngine(enforce_eager=args.vllm_eager or None, max_model_len=max_model_len)


def time_rollouts(size: str, args, device: torch.device) -> dict:
    tokenizer = load_tokenizer("toy:add3/student") if size == "toy" else build_char_tokenizer()
    model = build_model(size, tokenizer, device)
    n = args.batch_size or SIZES[size][1]
    prompts = prompt_batch(tokenizer, n)
    # Within the model's positions (the toy has 64; vLLM's rotary tables end there, the other engines' do not).
    tokens = min(args.new_tokens, model.config.max_position_embeddings - prompts.input_ids.shape[1])
    params = SamplingParams(max_new_tokens=tokens, temperature=1.0, seeds=list(range(n)))
    engines, startup = {}, {}
    seconds: dict[str, list[float]] = {name: [] for name in args.engines}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in args.engines}
    names = list(args.engines)
    # On CUDA as in bf16-mixed training: autocast, so the engines' copies are built in bf16.
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for name in names:
            start = time.perf_counter()
            engines[name] = make_engine(name, args, prompts.input_ids.shape[1] + tokens)
            engines[name].bind(model, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id)  # EOS never: full length
            engines[name].load_weights(model)
            startup[name] = time.perf_counter() - start
        for name in names:  # warm-up (the static engine compiles and captures its graph here on CUDA)
            start = time.perf_counter()
            for _ in range(args.warmup):
                engines[name].generate(prompts, params)
            startup[name] += time.perf_counter() - start
        for rnd in range(args.rounds):
            for name in names[rnd % len(names):] + names[: rnd % len(names)]:
                sync(device)
                start, cpu_start = time.perf_counter(), time.process_time()
                engines[name].generate(prompts, params)
                sync(device)
                seconds[name].append(time.perf_counter() - start)
                cpu_seconds[name].append(time.process_time() - cpu_start)
            print(f"# {size} round {rnd + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in seconds.items()), flush=True)
    del engines, model  # (and vLLM's instance with them) before the next size or the full steps
    gc.collect()
    med = {name: statistics.median(v) for name, v in seconds.items()}
    cpu = {name: statistics.median(v) for name, v in cpu_seconds.items()}
    return {"size": size, "rows": n, "tokens": tokens, "median_s": med, "median_cpu_s": cpu,
            "startup_s": startup}


def rollout_rows(r: dict) -> list[str]:
    """One table row per engine: ms per decode step, tokens/s, and ratios to reference and static."""
    med, cpu, tokens = r["median_s"], r["median_cpu_s"], r["rows"] * r["tokens"]
    rows = []
    for name in med:
        ratio = lambda base: f"{med[base] / med[name]:.2f}x ({cpu[base] / cpu[name]:.2f}x)" if base in med else "-"  # noqa: E731
        rows.append(f"| {r['size']} | {r['rows']} x {r['tokens']} | {name} | {1000 * med[name] / r['tokens']:.2f} | "
                    f"{tokens / med[name]:,.0f} | {ratio('reference')} | {ratio('static')} | {r['startup_s'][name]:.1f} |")
    return rows


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_full_steps(size: str, args, device: torch.device) -> list[str]:
    """Whole OPD steps with each engine: Lightning-driven, stage seconds from the module's timer."""
    import lightning as L

    from opdlab.data import PromptDataModule
    from opdlab.divergences import SampledTokenOPD
    from opdlab.module import OPDModule
    from opdlab.selectors import FullSelector

    tokenizer = build_char_tokenizer()
    root = Path(tempfile.mkdtemp(prefix="opdlab_rollout_bench_"))
    paths = {}
    for role, which, seed in (("student", size, 1), ("teacher", args.teacher_size, 2)):
        paths[role] = str(root / role)
        build_model(which, tokenizer, torch.device("cpu"), seed).save_pretrained(paths[role])
        tokenizer.save_pretrained(paths[role])
    rows = []
    for name in args.engines:
        module = OPDModule(
            student=paths["student"],
            teacher=paths["teacher"],
            selector=FullSelector(),
            divergence=SampledTokenOPD(),
            rollout_engine=make_engine(name, args, 64 + args.new_tokens),
            optimizer=lambda p: torch.optim.Adam(p, lr=1e-6, betas=(0.9, 0.98), weight_decay=0.1),
            rollout=dict(max_new_tokens=args.new_tokens),
            memory=dict(teacher_dtype="bfloat16" if device.type == "cuda" else "float32", chunk_size=1024),
        )
        module.configure_model()
        module.rollout_engine.bind(module.student, -1, tokenizer.pad_token_id)  # full-length responses
        records = []

        class Clock(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                sync(device)
                self.start = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                sync(device)
                records.append({"step": time.perf_counter() - self.start, **outputs["record"].seconds})

        trainer = L.Trainer(
            max_steps=args.warmup + args.steps, accelerator=device.type, devices=1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            num_sanity_val_steps=0, callbacks=[Clock()], precision="bf16-mixed" if device.type == "cuda" else "32-true",
        )
        trainer.fit(module, datamodule=PromptDataModule(AdditionTask(digits=3), batch_size=SIZES[size][1]))
        timed = records[args.warmup:]
        med = {k: statistics.median(r.get(k, 0.0) for r in timed) for k in ("step", "rollout", "forward", "score",
                                                                             "select", "loss", "optimizer")}
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        rows.append((name, med, peak))
        del module, trainer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    lines = ["| engine | step s | rollout s | forward s | score s | loss s | optimizer s | peak GB |",
             "|---|---|---|---|---|---|---|---|"]
    for name, med, peak in rows:
        lines.append(f"| {name} | {med['step']:.3f} | {med['rollout']:.3f} ({100 * med['rollout'] / med['step']:.0f}%) | "
                     f"{med['forward']:.3f} | {med['score']:.3f} | {med['loss']:.3f} | {med['optimizer']:.3f} | {peak:.1f} |")
    steps = {name: med["step"] for name, med, _ in rows}
    ratios = ", ".join(f"reference / {name}: {steps['reference'] / s:.2f}x" for name, s in steps.items()
                       if name != "reference" and "reference" in steps)
    lines.append(f"\nfull OPD step, {ratios} ({size} student, {args.teacher_size} teacher, "
                 f"{SIZES[size][1]} prompts x {args.new_tokens} tokens, sampled-token loss, medians of {args.steps} steps)")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["toy", "vocab151k"], choices=list(SIZES))
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch-size", type=int, help="prompts per rollout (default: 128 for toy, 16 otherwise)")
    p.add_argument("--new-tokens", type=int, default=64, help="response tokens per row (EOS disabled)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--full-step", action="store_true", help="also time whole OPD steps (see the docstring)")
    p.add_argument("--teacher-size", default="qwen3-1.7b", choices=list(SIZES))
    p.add_argument("--steps", type=int, default=3, help="timed OPD steps per engine with --full-step")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--engines", nargs="+", choices=list(ENGINES),
                   default=[name for name in ENGINES if name != "vllm" or vllm_available()],
                   help="engines to time (default: all, vllm where it is installed)")
    p.add_argument("--vllm-eager", action="store_true", help="vLLM without torch.compile / CUDA graphs")
    p.add_argument("--output", help="append the markdown result here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", r"Found \d+ module\(s\) in eval mode")
    device = torch.device(args.device)

    lines = ["| size | rows x new tokens | engine | ms/step | tok/s | reference / engine, wall (CPU time) | "
             "static / engine, wall (CPU time) | start-up s |", "|---|---|---|---|---|---|---|---|"]
    for size in args.sizes:
        lines += rollout_rows(time_rollouts(size, args, device))
    if args.full_step:
        lines += ["", *time_full_steps(args.sizes[-1], args, device)]
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "no GPU"
    publish("rollout",
            f"{platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads (torch "
            f"uses {torch.get_num_threads()}), {gpu}, torch {torch.__version__}.",
            f"Engines {', '.join(args.engines)} (static: compiled CUDA graph on CUDA, eager on CPU; vllm: "
            f"{'eager' if args.vllm_eager else 'compiled'}, colocated), same prompts and seeds, EOS disabled, generation "
            f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}; medians of {args.rounds} rotating rounds after "
            f"{args.warmup} warm-up rollout(s) each; start-up = build + first weights + warm-up.\n",
            "\n".join(lines), args.output)


if __name__ == "__main__":
    main()
