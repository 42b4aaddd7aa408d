"""Collectives for a data-parallel OPD step: global selection and global token counts.

Every function is the identity in a single process, so the single-device path runs the same code.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over ranks (a new tensor; `x` is untouched)."""
    out = x.detach().clone()
    if world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def gather_rows(x: torch.Tensor, pad_value: float | int = 0) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Concatenate every rank's (N_r, L_r, ...) tensor along dim 0, padding dim 1 to the largest L_r.

    Returns the global tensor and each rank's (row offset, row count), to cut this rank's part back out.
    """
    if world_size() == 1:
        return x, [(0, x.shape[0])]
    shape = torch.tensor(list(x.shape[:2]), device=x.device)
    shapes = [torch.zeros_like(shape) for _ in range(world_size())]
    dist.all_gather(shapes, shape)
    n_max = max(int(s[0]) for s in shapes)
    l_max = max(int(s[1]) for s in shapes)
    padded = x.new_full((n_max, l_max, *x.shape[2:]), pad_value)
    padded[: x.shape[0], : x.shape[1]] = x
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded.contiguous())
    counts = [int(s[0]) for s in shapes]
    offsets = [sum(counts[:r]) for r in range(len(counts))]
    return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)]), list(zip(offsets, counts, strict=True))


def gather_stats(stats):
    """TokenStats of the whole data-parallel batch, and this rank's (row offset, row count, length).

    Selection must see every rank's positions: the budget and the score normalisation are global.
    """
    from dataclasses import fields, replace

    if world_size() == 1:
        return stats, (0, stats.valid.shape[0], stats.valid.shape[1])
    gathered, spans = {}, None
    for f in fields(stats):
        value = getattr(stats, f.name)
        if value is not None:
            gathered[f.name], spans = gather_rows(value)
    offset, count = spans[rank()]
    return replace(stats, **gathered), (offset, count, stats.valid.shape[1])
