"""The head loss: the LM heads applied to the supervised rows chunk by chunk, returning the step's scalar.

`head_loss` is the one operation between hidden states and the loss value. It projects M rows through
the student's LM head one chunk at a time, computes each chunk's per-token loss *and its gradients* at
once (the fused-linear-loss idea of Liger-Kernel and Cut-Cross-Entropy), frees the chunk's logits, and
returns `scale · Σ_i loss_i` as a scalar whose backward only rescales the gradients already computed.
The loss memory is one chunk of logits, not M x V.

With `scoring` set (ratio-1 selection, where the keep mask is the response mask before any score
exists) the same projection also yields the selection statistics of every row, so nothing is
projected twice: the step plan calls this the shared projection (`StepPlan.shared_projection`).

The caller (`opdlab.module.OPDModule`) picks the rows and the scale; see `StepPlan`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from opdlab.chunks import Scoring
from opdlab.divergences.base import Divergence, LossInputs
from opdlab.heads import LogitHead, Workspace
from opdlab.rollout import Rollout
from opdlab.scoring import chunk_stats
from opdlab.teachers.rows import TeacherRows, as_teacher_rows

Head = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class KeptRows:
    """The response positions one loss covers, gathered once in flat (sequence-major) order."""

    index: torch.Tensor  # (M,) flat positions in the (N, L) grid
    student: torch.Tensor  # (M, H) student hidden states (with grad for the loss)
    teacher: torch.Tensor | TeacherRows  # (M, H_T) a local teacher's hidden states (no grad), or its M rows
    tokens: torch.Tensor  # (M,) sampled tokens
    sampling_logp: torch.Tensor  # (M,)
    teacher_token_logp: torch.Tensor | None  # (M,); None: taken from the teacher logits (with `scoring`)


def kept_rows(mask: torch.Tensor, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor | TeacherRows,
              rollout: Rollout, teacher_token_logp: torch.Tensor | None = None) -> KeptRows:
    """The rows of (N, L) `mask` from (N, L, H) hidden states (the teacher's, or its `TeacherRows` over the
    N · L positions) and the rollout's (N, L) tensors."""
    index = mask.flatten().nonzero().squeeze(-1)
    teacher = teacher_hidden[index] if isinstance(teacher_hidden, TeacherRows) else teacher_hidden.flatten(0, 1)[index]
    return KeptRows(
        index=index, student=student_hidden.flatten(0, 1)[index], teacher=teacher,
        tokens=rollout.response_ids.flatten()[index], sampling_logp=rollout.sampling_logp.flatten()[index],
        teacher_token_logp=None if teacher_token_logp is None else teacher_token_logp.flatten()[index],
    )


@dataclass
class HeadLoss:
    loss: torch.Tensor  # scalar: scale · Σ token losses; backward rescales the gradients computed in forward
    token_losses: torch.Tensor  # (M,) per-row losses, detached (for logging and tests)
    stats: list[dict] = field(default_factory=list)  # per-chunk statistics, with `scoring`


def head_loss(
    rows: KeptRows,
    student_head: Head,
    teacher_head: Head,
    divergence: Divergence,
    scale: float | torch.Tensor = 1.0,
    chunk_rows: int = 64,
    store_rows: int = 0,
    scoring: Scoring | None = None,
) -> HeadLoss:
    """`scale · Σ_i loss_i` over `rows`, with the gradients to the hidden rows and the head taken here.

    Args:
        rows: the supervised rows (`kept_rows`); `rows.student` carries the graph to the student.
        scale: the normalisation (the caller's denominator rule and world-size factor).
        chunk_rows: rows whose logits exist at once. A loss chunk holds ~10 (rows, V) fp32 tensors
            (logits, log-softmaxes, the divergence's terms and their gradients), against 3 for a scoring
            chunk, so the module uses a quarter of its scoring chunk here.
        store_rows: when M <= store_rows, keep every chunk's logit gradient (M x V) and take the head's
            gradients with one matmul each after the last chunk instead of one per chunk: the LM head weight
            (V x H, the largest tensor the loss reads) is then streamed 2 + chunks times rather than 3·chunks.
        scoring: also compute the selection statistics of every row from the same logits (ratio 1).

    The hand-written path needs a local plain-linear head (`LogitHead.is_plain_linear`); a sharded head
    (FSDP2 DTensor weight) or any other callable goes through autograd, all rows at once, so its own
    backward hooks (gradient reduce-scatter) run in backward as usual.
    """
    plain = isinstance(student_head, LogitHead) and student_head.is_plain_linear and rows.index.numel() > 0
    rows = replace(rows, teacher=as_teacher_rows(rows.teacher, teacher_head))
    return (chunked_head_loss if plain else autograd_head_loss)(
        rows, student_head, teacher_head, divergence, scale, chunk_rows, store_rows, scoring)


def loss_inputs(rows: KeptRows, chunk: slice, student_logits: torch.Tensor, teacher: dict, stats: dict | None) -> LossInputs:
    """The divergence's inputs for `chunk` of `rows`; `teacher`: what the teacher's rows give it (`loss_fields`)."""
    return LossInputs(
        student_logits=student_logits,
        tokens=rows.tokens[chunk],
        sampling_logp=rows.sampling_logp[chunk],
        teacher_token_logp=stats["teacher_token_logp"] if stats is not None else rows.teacher_token_logp[chunk],
        **teacher,
    )


def scored(logits: torch.Tensor, teacher: TeacherRows, tokens: torch.Tensor, scoring: Scoring, work: Workspace) -> dict:
    """A chunk's selection statistics from the loss's own student logits (the shared projection)."""
    return chunk_stats(logits.detach().float(), teacher, tokens, scoring.top_k, scoring.full_kl, work,
                       scoring.full_entropy, scoring.topk_lists)


def chunked_head_loss(rows: KeptRows, head: LogitHead, teacher_head: Head | None, divergence: Divergence, scale,
                      chunk_rows: int, store_rows: int, scoring: Scoring | None) -> HeadLoss:
    """The hand-written path: per chunk pre = h Wᵀ + b, z = post-processing(pre), dpre by autograd on the
    chunk alone; dh = dpre W and dW = dpreᵀ h by hand (written into one buffer, not allocated per chunk)."""
    hidden, (weight, _) = rows.student.detach(), head.linear_parts()
    params = head.parameters()
    m, chunk_rows = hidden.shape[0], max(1, chunk_rows)
    store = m <= store_rows and m > chunk_rows
    work = Workspace(min(chunk_rows, m))
    token_losses = torch.empty(m, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden)
    grad_params = [torch.empty_like(p) for p in params]
    stored, stats = None, []
    for start in range(0, m, chunk_rows):
        chunk = slice(start, start + chunk_rows)
        # The teacher logits live in a reused buffer: safe because this chunk's gradients are complete
        # (in chunk_loss_and_logit_grad) before the next chunk overwrites it.
        teacher = rows.teacher[chunk]
        losses, d_pre, chunk_stat = chunk_loss_and_logit_grad(rows, chunk, head, hidden[chunk], teacher,
                                                              divergence, scale, scoring, work)
        token_losses[chunk] = losses
        if chunk_stat is not None:
            stats.append(chunk_stat)
        if store:
            if stored is None:
                stored = d_pre.new_empty(m, d_pre.shape[1])
            stored[chunk] = d_pre
        else:
            head_backward(head, weight, params, d_pre, hidden[chunk], grad_hidden[chunk], grad_params, add=start > 0)
        del d_pre  # the chunk's (R, V) gradient is gone before the next chunk's logits exist
    if store:
        head_backward(head, weight, params, stored, hidden, grad_hidden, grad_params, add=False)
    value = (token_losses.sum() * scale).to(torch.float32)
    loss = PrecomputedGradients.apply(value, GradientStore(grad_hidden, grad_params), rows.student, *params)
    return HeadLoss(loss, token_losses, stats)


def chunk_loss_and_logit_grad(rows: KeptRows, chunk: slice, head: LogitHead, hidden: torch.Tensor,
                              teacher: TeacherRows, divergence: Divergence, scale,
                              scoring: Scoring | None, work: Workspace) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
    """One chunk: its (R,) losses, d(scale · Σ losses)/dpre (R, V) where pre = h Wᵀ + b are the logits
    before the model's post-processing, and (with `scoring`) its statistics from the same logits. Its
    logits are freed on return."""
    teacher_fields = teacher.loss_fields(divergence.needs_teacher_logits, work)
    weight, bias = head.linear_parts()
    with torch.no_grad():
        pre = F.linear(hidden, weight, bias)  # (R, V)
    with torch.enable_grad():
        pre.requires_grad_(True)
        logits = head.postprocess(pre)
        stat = None
        if scoring is not None:
            stat = scored(logits, teacher, rows.tokens[chunk], scoring, work)
        losses = divergence.token_loss(loss_inputs(rows, chunk, logits, teacher_fields, stat))
        total = losses.sum() * scale
        d_pre = torch.autograd.grad(total, pre)[0] if total.requires_grad else torch.zeros_like(pre)
    return losses.detach(), d_pre, stat


@torch.no_grad()
def head_backward(head: LogitHead, weight: torch.Tensor, params: Sequence[torch.Tensor], d_pre: torch.Tensor,
                  hidden: torch.Tensor, grad_hidden: torch.Tensor, grad_params: list[torch.Tensor], add: bool) -> None:
    """Write dh = dpre W into `grad_hidden`, and dW = dpreᵀ h, db = Σ dpre into (`add`: onto) `grad_params`.

    In place: no (V, H) temporary unless the dtypes differ (mixed precision: the product in the autocast
    dtype, accumulated in the parameter's). Writing zeroes the rows a narrowed head (num_columns) never
    touches.
    """
    grad_hidden.copy_(torch.mm(d_pre, weight.to(d_pre.dtype)))
    h = hidden.to(d_pre.dtype)
    for p, acc in zip(params, grad_params, strict=True):
        rows_of = acc[: d_pre.shape[1]]
        if not add and rows_of.shape[0] < acc.shape[0]:
            acc[rows_of.shape[0] :].zero_()
        if p is head.proj.weight:
            if d_pre.dtype == acc.dtype:
                rows_of.addmm_(d_pre.t(), h) if add else torch.mm(d_pre.t(), h, out=rows_of)
            else:
                product = torch.mm(d_pre.t(), h)
                rows_of.add_(product) if add else rows_of.copy_(product)
        elif p is head.proj.bias:
            rows_of.add_(d_pre.sum(0).to(acc.dtype)) if add else rows_of.copy_(d_pre.sum(0))
        else:  # pragma: no cover - head_loss admits plain nn.Linear heads only
            raise TypeError("head_loss: a head parameter that is neither its weight nor its bias")


@dataclass
class GradientStore:
    """The gradients `chunked_head_loss` computed in forward, handed to backward once."""

    hidden: torch.Tensor | None
    params: list[torch.Tensor] | None


class PrecomputedGradients(torch.autograd.Function):
    """A scalar whose gradients were computed in forward: backward multiplies them by the upstream
    gradient, in place (no second (V, H) tensor), and hands them over."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, store: GradientStore, hidden: torch.Tensor, *params: torch.Tensor):
        ctx.store = store
        return value

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        store = ctx.store
        if store.params is None:
            raise RuntimeError("head_loss: a second backward through the same loss; its gradients were computed "
                               "once in forward and already handed over (compute the loss again instead)")
        grads = [t.mul_(grad_out.to(t.dtype)) for t in (store.hidden, *store.params)]  # each in its own dtype
        store.hidden = store.params = None
        return None, None, *grads


def autograd_head_loss(rows: KeptRows, head: Head, teacher_head: Head, divergence: Divergence, scale,
                       chunk_rows: int, store_rows: int, scoring: Scoring | None) -> HeadLoss:
    """Plain autograd over all rows at once (sharded or custom heads, or no rows)."""
    logits = head(rows.student)
    with torch.no_grad():
        teacher = rows.teacher.loss_fields(divergence.needs_teacher_logits)
    stats = [scored(logits, rows.teacher, rows.tokens, scoring, Workspace(rows.index.numel()))] if scoring else []
    losses = divergence.token_loss(loss_inputs(rows, slice(None), logits, teacher, stats[0] if stats else None))
    return HeadLoss(losses.sum() * scale, losses.detach(), stats)
