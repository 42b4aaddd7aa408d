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
from dataclasses import dataclass, fields, replace

import torch

from opdlab.chunks import FULL_ENTROPY, SCORE_CHUNK_ROWS, TOP_K, Scoring, student_chunk
from opdlab.heads import Workspace, head_logits
from opdlab.teachers.rows import DenseRows, TeacherRows, as_teacher_rows

# One name per per-position feature everywhere (TokenStats fields, `teachability/<name>/...` histograms,
# token bank and diagnostic bank columns), with the paper's symbol and meaning (docs/method.md §2).
# The last two are batch-normalised products, not TokenStats fields (`teachability_features`).
FEATURES = {
    "compatibility": ("C", "teacher mass on the student's top-K"),
    "disagreement": ("D", "forward KL on the union of both top-K sets, renormalised there"),
    "topk_entropy": ("H", "entropy of the student's renormalised top-K, / log K"),
    "teachability": ("D^L", "D̃·C̃: disagreement the student can take up"),
    "incompatibility": ("D^I", "D̃·(1-C̃): disagreement outside the student's top-K"),
}


@dataclass
class TokenStats:
    """Per response position statistics; every field is (N, L) (or (N, L, K)), zero where invalid."""

    valid: torch.Tensor  # (N, L) bool: the response mask
    student_token_logp: torch.Tensor  # log p_S(y_t)
    teacher_token_logp: torch.Tensor  # log p_T(y_t)
    compatibility: torch.Tensor  # C (with a top-k teacher: its lower bound, docs/method.md §2.6)
    disagreement: torch.Tensor  # D
    topk_entropy: torch.Tensor  # H
    # The top-K lists behind C, D, H: (N, L, K), only when a selector asks (`needs_topk_lists`); otherwise None,
    # so a step does not scatter and all-gather four (N, L, K) tensors nobody reads.
    student_topk_ids: torch.Tensor | None = None
    student_topk_logp: torch.Tensor | None = None
    teacher_topk_ids: torch.Tensor | None = None
    teacher_topk_logp: torch.Tensor | None = None
    student_entropy: torch.Tensor | None = None  # full-vocabulary entropy of p_S, when requested
    teacher_entropy: torch.Tensor | None = None  # full-vocabulary entropy of p_T, when requested
    forward_kl: torch.Tensor | None = None  # full-vocabulary KL(p_T || p_S), when requested
    reverse_kl: torch.Tensor | None = None  # full-vocabulary KL(p_S || p_T), when requested
    # C's upper bound; C itself where the teacher's distribution is known (the default when not given).
    compatibility_upper: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.compatibility_upper is None:
            self.compatibility_upper = self.compatibility

    @property
    def top_k(self) -> int | None:
        """K of the top-K lists, when they were computed."""
        return None if self.student_topk_ids is None else self.student_topk_ids.shape[-1]

    @staticmethod
    def cat(parts: list[TokenStats]) -> TokenStats:
        """Micro-batches' statistics stacked back into the batch's."""
        if len(parts) == 1:
            return parts[0]
        return replace(parts[0], **{f.name: torch.cat([getattr(p, f.name) for p in parts])
                                    for f in fields(parts[0]) if getattr(parts[0], f.name) is not None})

    def non_finite_models(self) -> list[str]:
        """The models ('student', 'teacher') that gave non-finite log-probs at valid positions; empty if none."""
        return [name for name, logp in (("student", self.student_token_logp), ("teacher", self.teacher_token_logp))
                if not bool(torch.isfinite(logp[self.valid]).all())]


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
