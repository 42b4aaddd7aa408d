"""LoRA vs full fine-tuning at a Qwen3-0.6B-shaped student (random weights, CPU): memory of a training step and
bytes/seconds of the vllm engine's weight sync.

    python benchmarks/lora_memory.py                       # everything, into benchmarks/results/lora_memory.md
    python benchmarks/lora_memory.py memory --rank 32      # one measurement, as JSON (rank 0: full fine-tuning)
    python benchmarks/lora_memory.py sync --rank 32        # vllm weight sync (needs vllm: run with .venv-vllm)

memory: the student's half of a training step as `OPDModule` runs it (forward to the final hidden states,
the LM head on the kept rows, backward, AdamW step), without the rollout and the teacher, which do not depend
on how the student is trained. Each configuration runs in a fresh process; peak memory is the process's peak
resident set (ru_maxrss) and the optimizer state is the bytes of AdamW's tensors after the step.
sync: one `VLLMEngine.push_weights` after a step: the whole model (full fine-tuning) against the adapter
(LoRA: the base was pushed once before), with the bytes the engine sends.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

# Qwen3-0.6B's shape (config.json of Qwen/Qwen3-0.6B): 596M parameters, tied embeddings.
SHAPE = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
             num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
             tie_word_embeddings=True)
ROWS, LENGTH, KEPT = 4, 64, 0.25  # rollout rows, tokens per row, share of positions whose loss is computed
RANKS = (8, 32, 128)


def student(rank: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**SHAPE)).train()
    if rank:
        from opdlab.adapters import AdapterOptions, apply_adapter

        apply_adapter(model, AdapterOptions(rank=rank), "qwen3-0.6b-shape")
    return model


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure_memory(rank: int) -> dict:
    from opdlab.heads import LogitHead
    from opdlab.models import final_hidden_states

    torch.set_num_threads(1)
    model = student(rank)
    built = rss_gib()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, SHAPE["vocab_size"], (ROWS, LENGTH))
    start = time.perf_counter()
    hidden = final_hidden_states(model, ids, torch.ones_like(ids))
    keep = torch.rand(ROWS, LENGTH - 1) < KEPT
    logits = LogitHead(model)(hidden[:, :-1][keep])
    loss = torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:][keep])  # a stand-in for the divergence
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - start
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    return {"rank": rank, "trainable": sum(p.numel() for p in params), "total": sum(p.numel() for p in model.parameters()),
            "optimizer_state_bytes": state, "peak_gib": rss_gib(), "after_build_gib": built, "step_seconds": seconds}


def measure_sync(rank: int) -> dict:
    from opdlab.engines.vllm_engine import VLLMEngine

    torch.set_num_threads(1)
    model = student(rank).eval()
    engine = VLLMEngine(enforce_eager=True, max_model_len=256, kv_cache_gb=0.25)
    engine.bind(model, eos_token_id=0, pad_token_id=0)
    engine.load_weights(model)  # the first sync: the base (and the adapter), or the whole model
    with torch.no_grad():  # a step's update
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 1e-3)
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        engine.load_weights(model)
        seconds.append(time.perf_counter() - start)
    return {"rank": rank, "serves_adapter": engine.serves_adapter, "bytes_per_step": engine.sync_bytes,
            "seconds_per_step": sorted(seconds)[1]}


def run(kind: str, rank: int, python: str) -> dict:
    out = subprocess.run([python, __file__, kind, "--rank", str(rank)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(vllm_python: str | None) -> str:
    memory = [run("memory", rank, sys.executable) for rank in (0, *RANKS)]
    full = memory[0]
    lines = ["# LoRA vs full fine-tuning at a Qwen3-0.6B-shaped student (CPU, random weights)", "",
             f"`python benchmarks/lora_memory.py` (commit of this file; 1 torch thread). The student's half of a step "
             f"({ROWS} rows x {LENGTH} tokens, {KEPT:.0%} of positions kept for the loss, AdamW), each in a fresh "
             "process. LoRA targets the attention and MLP projections (the default), alpha = 2 x rank.", "",
             "| student | trainable params | AdamW state | vs full | peak RSS | step s |", "|---|---|---|---|---|---|"]
    for m in memory:
        name = "full fine-tuning" if not m["rank"] else f"LoRA rank {m['rank']}"
        ratio = full["optimizer_state_bytes"] / m["optimizer_state_bytes"]
        lines.append(f"| {name} | {m['trainable'] / 1e6:.2f}M | {m['optimizer_state_bytes'] / 2**20:,.1f} MiB | "
                     f"{f'{ratio:,.0f}x smaller' if m['rank'] else '-'} | {m['peak_gib']:.2f} GiB | {m['step_seconds']:.1f} |")
    if vllm_python:
        sync = [run("sync", rank, vllm_python) for rank in (0, 32)]
        lines += ["", f"vllm engine weight sync after a step (`{vllm_python} benchmarks/lora_memory.py sync --rank R`; "
                  "vLLM CPU build, float32, median of 3):", "",
                  "| student | what is sent | bytes per step | seconds per step |", "|---|---|---|---|"]
        for s in sync:
            what = "the adapter (vLLM LoRA)" if s["serves_adapter"] else "the whole model"
            name = "full fine-tuning" if not s["rank"] else f"LoRA rank {s['rank']}"
            lines.append(f"| {name} | {what} | {s['bytes_per_step'] / 2**20:,.1f} MiB | {s['seconds_per_step']:.2f} |")
        lines.append(f"\nAdapter sync: {sync[0]['bytes_per_step'] / sync[1]['bytes_per_step']:,.0f}x fewer bytes than "
                     "the full model.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", nargs="?", choices=("memory", "sync", "all"), default="all")
    parser.add_argument("--rank", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    parser.add_argument("--vllm_python", default=".venv-vllm/bin/python", help="a python with vllm ('' to skip)")
    parser.add_argument("--out", default="benchmarks/results/lora_memory.md")
    args = parser.parse_args()
    if args.kind == "memory":
        print(json.dumps(measure_memory(args.rank)))
    elif args.kind == "sync":
        print(json.dumps(measure_sync(args.rank)))
    else:
        text = report(args.vllm_python if args.vllm_python and Path(args.vllm_python).exists() else None)
        Path(args.out).write_text(text)
        print(text)


if __name__ == "__main__":
    main()
