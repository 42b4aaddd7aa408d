"""Bytes a training step all-gathers for global selection (`opdlab.distributed.gather_stats`), per rank, under 2
processes (gloo, CPU), with and without the top-K lists (`needs_topk_lists`), at a real step's shapes.

    python benchmarks/gather_bytes.py --rows 32 --length 4096 --top-k 16

Counts the bytes every `torch.distributed.all_gather` call of `gather_stats` receives on rank 0 (a count, not a
timing: the same on any machine).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def stats_of(rows: int, length: int, k: int, topk_lists: bool):
    from opdlab.scoring import TokenStats

    valid = torch.ones(rows, length, dtype=torch.bool)
    dense = {name: torch.zeros(rows, length) for name in ("student_token_logp", "teacher_token_logp", "compatibility",
                                                          "disagreement", "topk_entropy")}
    if topk_lists:
        dense.update(student_topk_ids=torch.zeros(rows, length, k, dtype=torch.long),
                     student_topk_logp=torch.zeros(rows, length, k),
                     teacher_topk_ids=torch.zeros(rows, length, k, dtype=torch.long),
                     teacher_topk_logp=torch.zeros(rows, length, k))
    return TokenStats(valid=valid, **dense)


def worker(rank: int, world: int, init: str, args, out) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from opdlab.distributed import gather_stats

    received = {"bytes": 0}
    real = dist.all_gather

    def counting(parts, tensor, *a, **kw):
        received["bytes"] += sum(p.numel() * p.element_size() for p in parts)
        return real(parts, tensor, *a, **kw)

    dist.all_gather = counting
    for lists in (True, False):
        received["bytes"] = 0
        gather_stats(stats_of(args.rows, args.length, args.top_k, lists))
        if rank == 0:
            out[lists] = received["bytes"]
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=32, help="rollout rows per rank (prompts x samples)")
    p.add_argument("--length", type=int, default=4096, help="response length")
    p.add_argument("--top-k", type=int, default=16)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = mp.Manager().dict()
        mp.spawn(worker, args=(2, f"file://{os.path.join(tmp, 'init')}", args, out), nprocs=2, join=True)
    before, after = out[True], out[False]
    print(f"rows {args.rows} x length {args.length} per rank, K {args.top_k}, 2 processes: rank 0 receives "
          f"{before / 2**20:.1f} MiB per step with the top-K lists, {after / 2**20:.1f} MiB without "
          f"({before / after:.1f}x less)")


if __name__ == "__main__":
    main()
