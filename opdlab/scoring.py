"""Per-position teacher/student statistics for selection, chunked and without grad.

`compute_token_stats` takes final hidden states (never logits), applies each model's `LogitHead` to one
chunk of valid response rows at a time, and keeps only O(K) numbers per position, so no (N, L, V)
tensor is ever held. Definitions follow docs/method.md §2 (the TA-OPD paper's reference code):

- C  = sum_{v in S} p_T(v): teacher mass on the student's top-K set S, clamped to [0, 1] (exact).
- D  = KL(pbar_T || pbar_S) on the union U = S ∪ T of both top-K sets, each renormalised over U.
- H  = entropy of the student's top-K distribution renormalised over S, divided by log K.

The teacher arrives as `opdlab.teachers.TeacherRows`: exact logits (a local teacher, or a server's full
distribution: `chunk_stats`) or only its top-k log-probs (a served teacher: `top_logprob_chunk_stats`, where
C is a lower bound with its upper bound beside it and D uses the maximum-entropy completion, docs/method.md §2.6).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

from opdlab import maths
from opdlab.heads import Workspace, head_logits  # noqa: F401 (head_logits: imported from here too)
from opdlab.maths import masked_kl
from opdlab.teachers.rows import TeacherRows, TopLogprobs, as_teacher_rows

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
    compatibility_upper: torch.Tensor | None = None  # with a top-k teacher: C's upper bound (C is exact otherwise)

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


def logsumexp_entropy(
    z: torch.Tensor, top_value: torch.Tensor, top_id: torch.Tensor, work: Workspace, entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log-sum-exp and (when `entropy`) entropy of softmax(z), from one fused softmax into a reused buffer.

    The arg-max's probability is exp(0) / Z, so lse = max - log p_max; the entropy is lse - Σ p·z, where
    nansum drops the 0·(-inf) terms of impossible tokens. Two full passes after the softmax kernel (none
    without the entropy), no (R, V) allocation. z: (R, V) fp32 (left unchanged); top_value, top_id: (R,)
    row max and its id.
    """
    p = torch.ops.aten._softmax.out(z, -1, False, out=work.like("probs", z))  # (R, V)
    lse = top_value - p.gather(-1, top_id[:, None]).squeeze(-1).log()
    return lse, (lse - torch.nansum(p.mul_(z), -1)) if entropy else None


def student_features(s_logits: torch.Tensor, tokens: torch.Tensor, k: int, work: Workspace, full_entropy: bool):
    """The student's half of a chunk's statistics: top-K (values, ids), log-sum-exp, full entropy (or None),
    and the features that need no teacher (its token log-prob, H)."""
    s_top, s_ids = s_logits.topk(k, -1)  # sorted: s_top[:, 0] is the row max
    s_lse, s_entropy = logsumexp_entropy(s_logits, s_top[:, 0], s_ids[:, 0], work, full_entropy)
    s_top_logp = s_top - s_lse[:, None]
    out = {
        "student_token_logp": s_logits.gather(-1, tokens[:, None]).squeeze(-1) - s_lse,
        "topk_entropy": (
            maths.entropy_from_logp(torch.log_softmax(s_top_logp, -1)) / math.log(k) if k > 1 else torch.zeros_like(s_lse)
        ),
    }
    return s_top_logp, s_ids, s_lse, s_entropy, out


def chunk_stats(
    s_logits: torch.Tensor,
    t_logits: torch.Tensor,
    tokens: torch.Tensor,
    k: int,
    full_kl: bool,
    work: Workspace,
    full_entropy: bool = True,
    topk_lists: bool = False,
) -> dict:
    """All statistics of R rows from their fp32 logits (R, V) -> dict of (R,) / (R, K); inputs unchanged.

    Top-K and gathers read the logits directly (log p = logit - logsumexp), so each model's full
    vocabulary is streamed a handful of times and no (R, V) log-prob tensor is built. The optional
    full-vocabulary entropies (`full_entropy`) and KLs (`full_kl`) cost extra passes over the logits.
    """
    s_top_logp, s_ids, s_lse, s_entropy, out = student_features(s_logits, tokens, k, work, full_entropy)
    t_top, t_ids = t_logits.topk(k, -1)
    union = torch.cat([s_ids, t_ids], -1)  # (R, 2K)
    t_lse, t_entropy = logsumexp_entropy(t_logits, t_top[:, 0], t_ids[:, 0], work, full_entropy)
    s_union = s_logits.gather(-1, union) - s_lse[:, None]
    t_union = t_logits.gather(-1, union) - t_lse[:, None]
    out.update(
        teacher_token_logp=t_logits.gather(-1, tokens[:, None]).squeeze(-1) - t_lse,
        compatibility=t_union[:, :k].exp().sum(-1).clamp(0.0, 1.0),  # teacher mass on the student's top-K
        disagreement=maths.union_kl(s_union, t_union, s_ids, t_ids),
    )
    if topk_lists:
        out.update(student_topk_ids=s_ids, student_topk_logp=s_top_logp, teacher_topk_ids=t_ids,
                   teacher_topk_logp=t_top - t_lse[:, None])
    if full_entropy:
        out["student_entropy"], out["teacher_entropy"] = s_entropy, t_entropy
    if full_kl:  # optional: two more (R, V) temporaries per chunk
        s_logp, t_logp = s_logits - s_lse[:, None], t_logits - t_lse[:, None]
        out["forward_kl"] = masked_kl(t_logp, s_logp)
        out["reverse_kl"] = masked_kl(s_logp, t_logp)
    return out


def top_logprob_chunk_stats(
    s_logits: torch.Tensor,
    teacher: TopLogprobs,
    tokens: torch.Tensor,
    k: int,
    full_kl: bool,
    work: Workspace,
    full_entropy: bool = True,
    topk_lists: bool = False,
) -> dict:
    """`chunk_stats` when the teacher sent only its top-k log-probs and the sampled token's (docs/method.md §2.6).

    Exact: both token log-probs, H and the student's entropy. C (`compatibility`) is the lower bound Σ p_T over
    the student's top-K tokens whose teacher probability is known; `compatibility_upper` adds what the unknown
    ones can hold at most (each at most the k-th probability, together at most the tail mass). D uses the
    union of the student's top-K and the teacher's top-min(K, k), with the maximum-entropy completion
    (`TopLogprobs.unseen_logp`) for tokens the teacher did not send. The teacher's entropy is NaN (unknown).
    """
    if full_kl:
        raise ValueError("full-vocabulary KLs need the teacher's whole distribution; a teacher that sends its top-"
                         f"{teacher.top_k} log-probs cannot give them (docs/method.md §2.6)")
    if topk_lists and teacher.top_k < k:
        raise ValueError(f"the teacher's top-{k} lists need at least {k} log-probs per position, the teacher sends "
                         f"{teacher.top_k}")
    s_top_logp, s_ids, s_lse, s_entropy, out = student_features(s_logits, tokens, k, work, full_entropy)
    t_ids = teacher.ids[:, : min(k, teacher.top_k)]
    union = torch.cat([s_ids, t_ids], -1)  # (R, K + min(K, k))
    t_union, known = teacher.lookup(union)
    s_known = known[:, :k]
    lower = (t_union[:, :k].exp() * s_known).sum(-1).clamp(0.0, 1.0)
    unknown_room = torch.minimum(teacher.tail_mass(), (~s_known).sum(-1) * teacher.kth_probability())
    out.update(
        teacher_token_logp=teacher.lookup(tokens[:, None])[0][:, 0],
        compatibility=lower,
        compatibility_upper=(lower + unknown_room).clamp(0.0, 1.0),
        disagreement=maths.union_kl(s_logits.gather(-1, union) - s_lse[:, None], t_union, s_ids, t_ids),
    )
    if topk_lists:
        out.update(student_topk_ids=s_ids, student_topk_logp=s_top_logp, teacher_topk_ids=teacher.ids[:, :k],
                   teacher_topk_logp=teacher.logp[:, :k])
    if full_entropy:
        out["student_entropy"], out["teacher_entropy"] = s_entropy, torch.full_like(s_entropy, torch.nan)
    return out


def teacher_chunk_stats(s_logits: torch.Tensor, teacher: TeacherRows, tokens: torch.Tensor, k: int, full_kl: bool,
                        work: Workspace, full_entropy: bool = True, topk_lists: bool = False) -> dict:
    """A chunk's statistics from whatever the teacher gives: exact logits, or its top log-probs."""
    t_logits = teacher.logits(work)
    if t_logits is not None:
        return chunk_stats(s_logits, t_logits, tokens, k, full_kl, work, full_entropy, topk_lists)
    return top_logprob_chunk_stats(s_logits, teacher.top_logprobs, tokens, k, full_kl, work, full_entropy, topk_lists)


@torch.no_grad()
def compute_token_stats(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor | TeacherRows,
    tokens: torch.Tensor,
    response_mask: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_head: Callable[[torch.Tensor], torch.Tensor] | None,
    top_k: int = 16,
    chunk_size: int = 1024,
    full_kl: bool = False,
    full_entropy: bool = True,
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
        chunks.append(teacher_chunk_stats(s_logits, teacher[idx], tok_flat[idx], top_k, full_kl, work, full_entropy,
                                          topk_lists))
    return scatter_rows(chunks, rows, valid, top_k, full_kl, full_entropy, topk_lists,
                        bounds=teacher.top_logprobs is not None)


OPTIONAL = {"forward_kl": "full_kl", "reverse_kl": "full_kl", "student_entropy": "full_entropy",
            "teacher_entropy": "full_entropy", "student_topk_ids": "topk_lists", "student_topk_logp": "topk_lists",
            "teacher_topk_ids": "topk_lists", "teacher_topk_logp": "topk_lists", "compatibility_upper": "bounds"}


def scatter_rows(
    chunks: list[dict], rows: torch.Tensor, valid: torch.Tensor, k: int, full_kl: bool, full_entropy: bool = True,
    topk_lists: bool = False, bounds: bool = False,
) -> TokenStats:
    """Place per-row statistics back at their (N, L) positions, zeros elsewhere (`bounds`: the chunks come from
    a top-k teacher and carry `compatibility_upper`)."""
    n, length = valid.shape
    wanted = {"full_kl": full_kl, "full_entropy": full_entropy, "topk_lists": topk_lists, "bounds": bounds}
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
                                     "union_kl": "opdlab.maths:union_kl"})
