"""Per-position teacher/student statistics for selection, chunked and without grad.

`compute_token_stats` takes final hidden states (never logits), applies each model's `LogitHead` to one
chunk of valid response rows at a time, and keeps only O(K) numbers per position, so no (N, L, V)
tensor is ever held. Definitions follow docs/method.md §2 (the TA-OPD paper's reference code):

- C  = sum_{v in S} p_T(v): teacher mass on the student's top-K set S, clamped to [0, 1] (exact).
- D  = KL(pbar_T || pbar_S) on the union U = S ∪ T of both top-K sets, each renormalised over U.
- H  = entropy of the student's top-K distribution renormalised over S, divided by log K.

The teacher arrives as `opdlab.teachers.TeacherRows`, which computes its own half of each chunk's statistics
(exact for a local teacher or a server's whole distribution; with a server's top-k log-probs C is a lower bound
with its upper bound beside it and D uses the maximum-entropy completion, docs/method.md §2.6): nothing here
depends on where the teacher runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import torch

from opdlab.chunks import FULL_ENTROPY, SCORE_CHUNK_ROWS, TOP_K, Scoring, student_chunk
from opdlab.heads import Workspace, head_logits
from opdlab.teachers.rows import DenseRows, TeacherRows, as_teacher_rows
from opdlab.token_stats import FEATURES, TokenStats  # noqa: F401 (their stable path: opdlab.scoring)


def chunk_stats(s_logits: torch.Tensor, teacher: torch.Tensor | TeacherRows, tokens: torch.Tensor, k: int = TOP_K,
                full_kl: bool = False, work: Workspace | None = None, full_entropy: bool = FULL_ENTROPY,
                topk_lists: bool = False) -> dict:
    """All statistics of R rows -> dict of (R,) / (R, K): the student's half from its fp32 logits (R, V), the
    teacher's from its rows (`TeacherRows.chunk_stats`; a tensor is the teacher's exact (R, V) logits).
    Inputs unchanged."""
    teacher = teacher if isinstance(teacher, TeacherRows) else DenseRows(teacher)
    work = work if work is not None else Workspace(s_logits.shape[0])
    scoring = Scoring(k, full_kl, full_entropy, topk_lists)
    student, out = student_chunk(s_logits, tokens, scoring, work)
    out.update(teacher.chunk_stats(student, scoring, work))
    return out


@torch.no_grad()
def compute_token_stats(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor | TeacherRows,
    tokens: torch.Tensor,
    response_mask: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_head: Callable[[torch.Tensor], torch.Tensor] | None,
    top_k: int = TOP_K,
    chunk_size: int = SCORE_CHUNK_ROWS,
    full_kl: bool = False,
    full_entropy: bool = FULL_ENTROPY,
    topk_lists: bool = False,
) -> TokenStats:
    """Statistics at every valid response position.

    Args:
        student_hidden, teacher_hidden: (N, L, H) final hidden states that predict `tokens`. The teacher may
            instead be `TeacherRows` over the N · L positions (a served teacher; `teacher_head` unused).
        tokens: (N, L) sampled response tokens; response_mask: (N, L) bool.
        chunk_size: rows whose logits are materialised at once. Peak extra memory is about
            3 · chunk_size · V fp32 (both models' logits and one softmax buffer), whatever N · L is.
        full_kl, full_entropy: also compute the full-vocabulary KLs / entropies (None in the result
            otherwise). No built-in selector reads the entropies; the training step skips them unless
            a selector (`needs_full_entropy`) or a callback (`OPDModule.request_full_entropy`) asks.
        topk_lists: also return both models' top-K ids and log-probs, (N, L, K) each (None otherwise).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    valid = response_mask.bool()
    rows = valid.flatten().nonzero().squeeze(-1)  # (R,)
    s_flat = student_hidden.flatten(0, 1)
    teacher = as_teacher_rows(teacher_hidden, teacher_head)
    tok_flat = tokens.flatten()
    chunks = []
    work = Workspace(min(chunk_size, rows.numel()))
    for start in range(0, rows.numel(), chunk_size):
        idx = rows[start : start + chunk_size]
        s_logits = head_logits(student_head, s_flat[idx], work, "student")  # (R, V) fp32
        chunks.append(chunk_stats(s_logits, teacher[idx], tok_flat[idx], top_k, full_kl, work, full_entropy, topk_lists))
    return scatter_rows(chunks, rows, valid, top_k, full_kl, full_entropy, topk_lists)


OPTIONAL = {"forward_kl": "full_kl", "reverse_kl": "full_kl", "student_entropy": "full_entropy",
            "teacher_entropy": "full_entropy", "student_topk_ids": "topk_lists", "student_topk_logp": "topk_lists",
            "teacher_topk_ids": "topk_lists", "teacher_topk_logp": "topk_lists"}


def scatter_rows(
    chunks: list[dict], rows: torch.Tensor, valid: torch.Tensor, k: int, full_kl: bool,
    full_entropy: bool = FULL_ENTROPY, topk_lists: bool = False,
) -> TokenStats:
    """Place per-row statistics back at their (N, L) positions, zeros elsewhere."""
    n, length = valid.shape
    wanted = {"full_kl": full_kl, "full_entropy": full_entropy, "topk_lists": topk_lists}
    values = {}
    for f in fields(TokenStats):
        if f.name == "valid" or (f.name in OPTIONAL and not wanted[OPTIONAL[f.name]]):
            continue
        is_ids = f.name.endswith("_ids")
        width = (k,) if f.name.startswith(("student_topk", "teacher_topk")) else ()
        dense = torch.zeros(n * length, *width, dtype=torch.long if is_ids else torch.float32, device=valid.device)
        if chunks:
            dense[rows] = torch.cat([c[f.name] for c in chunks])
        values[f.name] = dense.view(n, length, *width)
    return TokenStats(valid=valid, **values)

# Moved in 0.2.0; the old paths warn and work until 0.3.0.
from opdlab._deprecation import moved_names  # noqa: E402

__getattr__ = moved_names(__name__, {"entropy_from_logp": "opdlab.maths:entropy_from_logp",
                                     "union_kl": "opdlab.maths:union_kl",
                                     "logsumexp_entropy": "opdlab.chunks:logsumexp_entropy"})
