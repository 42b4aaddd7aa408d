"""Per-position teacher/student statistics for selection, chunked and without grad.

`compute_token_stats` takes final hidden states (never logits), applies each model's `LogitHead` to one
chunk of valid response rows at a time, and keeps only O(K) numbers per position, so no (N, L, V)
tensor is ever held. Definitions follow DESIGN.md §2 (TA-OPD reference code):

- C  = sum_{v in S} p_T(v): teacher mass on the student's top-K set S, clamped to [0, 1] (exact).
- D  = KL(pbar_T || pbar_S) on the union U = S ∪ T of both top-K sets, each renormalised over U.
- H  = entropy of the student's top-K distribution renormalised over S, divided by log K.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from collections.abc import Callable

EPS = 1e-12


@dataclass
class TokenStats:
    """Per response position statistics; every field is (N, L) (or (N, L, K)), zero where invalid."""

    valid: torch.Tensor  # (N, L) bool: the response mask
    student_token_logp: torch.Tensor  # log p_S(y_t)
    teacher_token_logp: torch.Tensor  # log p_T(y_t)
    student_entropy: torch.Tensor  # full-vocabulary entropy of p_S
    teacher_entropy: torch.Tensor  # full-vocabulary entropy of p_T
    compat: torch.Tensor  # C
    union_kl: torch.Tensor  # D
    topk_entropy: torch.Tensor  # H
    student_topk_ids: torch.Tensor  # (N, L, K)
    student_topk_logp: torch.Tensor  # (N, L, K)
    teacher_topk_ids: torch.Tensor  # (N, L, K)
    teacher_topk_logp: torch.Tensor  # (N, L, K)
    forward_kl: torch.Tensor | None = None  # full-vocabulary KL(p_T || p_S), when requested
    reverse_kl: torch.Tensor | None = None  # full-vocabulary KL(p_S || p_T), when requested

    @property
    def top_k(self) -> int:
        return self.student_topk_ids.shape[-1]


def kl_from_logp(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) over the last dim from log-probs; 0·log 0 = 0 so -inf logits are safe."""
    terms = logp_a.exp() * (logp_a - logp_b)
    return torch.where(logp_a > float("-inf"), terms, torch.zeros_like(terms)).sum(-1)


def entropy_from_logp(logp: torch.Tensor) -> torch.Tensor:
    return kl_from_logp(logp, torch.zeros_like(logp)).neg()


def union_kl(
    s_logp: torch.Tensor, t_logp: torch.Tensor, s_ids: torch.Tensor, t_ids: torch.Tensor
) -> torch.Tensor:
    """KL(pbar_T || pbar_S) restricted to U = S ∪ T and renormalised. (R, V), (R, K) -> (R,)."""
    dup = (t_ids[:, :, None] == s_ids[:, None, :]).any(-1)  # teacher ids already in S
    union = torch.cat([s_ids, t_ids], -1)  # (R, 2K)
    member = torch.cat([torch.ones_like(dup), ~dup], -1)
    p_t = t_logp.gather(-1, union).exp() * member
    p_s = s_logp.gather(-1, union).exp() * member
    p_t = p_t / p_t.sum(-1, keepdim=True).clamp_min(EPS)
    p_s = p_s / p_s.sum(-1, keepdim=True).clamp_min(EPS)
    terms = p_t * (p_t.clamp_min(EPS).log() - p_s.clamp_min(EPS).log())
    return (terms * member).sum(-1)


def row_stats(s_logits: torch.Tensor, t_logits: torch.Tensor, tokens: torch.Tensor, k: int, full_kl: bool) -> dict:
    """All statistics of R rows from their logits (R, V) -> dict of (R,) / (R, K), in fp32."""
    s_logp = torch.log_softmax(s_logits.float(), -1)
    t_logp = torch.log_softmax(t_logits.float(), -1)
    s_top_logp, s_top_ids = s_logp.topk(k, -1)
    t_top_logp, t_top_ids = t_logp.topk(k, -1)
    s_top_norm = torch.log_softmax(s_top_logp, -1)
    out = {
        "student_token_logp": s_logp.gather(-1, tokens[:, None]).squeeze(-1),
        "teacher_token_logp": t_logp.gather(-1, tokens[:, None]).squeeze(-1),
        "student_entropy": entropy_from_logp(s_logp),
        "teacher_entropy": entropy_from_logp(t_logp),
        "compat": t_logp.gather(-1, s_top_ids).exp().sum(-1).clamp(0.0, 1.0),
        "union_kl": union_kl(s_logp, t_logp, s_top_ids, t_top_ids),
        "topk_entropy": entropy_from_logp(s_top_norm) / math.log(k) if k > 1 else torch.zeros_like(s_top_logp[:, 0]),
        "student_topk_ids": s_top_ids,
        "student_topk_logp": s_top_logp,
        "teacher_topk_ids": t_top_ids,
        "teacher_topk_logp": t_top_logp,
    }
    if full_kl:
        out["forward_kl"] = kl_from_logp(t_logp, s_logp)
        out["reverse_kl"] = kl_from_logp(s_logp, t_logp)
    return out


@torch.no_grad()
def compute_token_stats(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    tokens: torch.Tensor,
    response_mask: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_head: Callable[[torch.Tensor], torch.Tensor],
    top_k: int = 16,
    chunk_size: int = 1024,
    full_kl: bool = False,
) -> TokenStats:
    """Statistics at every valid response position.

    Args:
        student_hidden, teacher_hidden: (N, L, H) final hidden states that predict `tokens`.
        tokens: (N, L) sampled response tokens; response_mask: (N, L) bool.
        chunk_size: rows whose logits are materialised at once (peak extra memory ~ 2 · chunk · V fp32).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    valid = response_mask.bool()
    rows = valid.flatten().nonzero().squeeze(-1)  # (R,)
    s_flat = student_hidden.flatten(0, 1)
    t_flat = teacher_hidden.flatten(0, 1)
    tok_flat = tokens.flatten()
    chunks = []
    for start in range(0, rows.numel(), chunk_size):
        idx = rows[start : start + chunk_size]
        chunks.append(row_stats(student_head(s_flat[idx]), teacher_head(t_flat[idx]), tok_flat[idx], top_k, full_kl))
    return _scatter_rows(chunks, rows, valid, top_k, full_kl)


def _scatter_rows(chunks: list[dict], rows: torch.Tensor, valid: torch.Tensor, k: int, full_kl: bool) -> TokenStats:
    """Place per-row statistics back at their (N, L) positions, zeros elsewhere."""
    n, length = valid.shape
    values = {}
    for f in fields(TokenStats):
        if f.name == "valid" or (f.name in ("forward_kl", "reverse_kl") and not full_kl):
            continue
        is_ids = f.name.endswith("_ids")
        width = (k,) if f.name.startswith(("student_topk", "teacher_topk")) else ()
        dense = torch.zeros(n * length, *width, dtype=torch.long if is_ids else torch.float32, device=valid.device)
        if chunks:
            dense[rows] = torch.cat([c[f.name] for c in chunks])
        values[f.name] = dense.view(n, length, *width)
    return TokenStats(valid=valid, **values)
