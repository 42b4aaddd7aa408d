"""Row slices of one rollout batch: micro-batches for the forward/backward, and the matching slices
and concatenations of `Rollout` and `TokenStats` (all (N, ...) tensors are cut along N)."""

from __future__ import annotations

from dataclasses import fields, replace

import torch

from opdlab.rollout import Rollout
from opdlab.scoring import TokenStats


def micro_batches(n: int, size: int | None) -> list[slice]:
    """Row slices of at most `size` rows covering n rows (one slice when size is None)."""
    size = n if size is None else size
    return [slice(i, min(i + size, n)) for i in range(0, n, size)] or [slice(0, 0)]


def rollout_rows(rollout: Rollout, rows: slice) -> Rollout:
    return replace(
        rollout, input_ids=rollout.input_ids[rows], attention_mask=rollout.attention_mask[rows],
        response_mask=rollout.response_mask[rows], sampling_logp=rollout.sampling_logp[rows],
        answers=rollout.answers[rows],
    )


def stats_rows(stats: TokenStats, rows: slice) -> TokenStats:
    return replace(stats, **{f.name: getattr(stats, f.name)[rows] for f in fields(stats) if getattr(stats, f.name) is not None})


def cat_stats(parts: list[TokenStats]) -> TokenStats:
    if len(parts) == 1:
        return parts[0]
    return replace(parts[0], **{
        f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(parts[0]) if getattr(parts[0], f.name) is not None
    })


def non_finite_models(stats: TokenStats) -> str | None:
    """Which models gave non-finite log-probs at valid positions ('student', 'teacher', both), or None."""
    valid = stats.valid
    bad = [name for name, logp in (("student", stats.student_token_logp), ("teacher", stats.teacher_token_logp))
           if not bool(torch.isfinite(logp[valid]).all())]
    return " and ".join(bad) or None
