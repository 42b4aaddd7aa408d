"""The loss pass: the LM heads applied to kept rows only, and the one reduction to a scalar.

The student head runs *with grad* on the M kept rows, so the logits memory of the loss is M x V rather
than N x L x V; the teacher head runs on the same rows without grad, and only when the divergence
needs full teacher logits. When M exceeds `chunk_size`, the kept rows go through `ChunkedRowLoss`:
each chunk's loss *and its gradient* are computed in the forward pass and its logits freed at once
(the fused-linear-loss idea of Liger/Cut-Cross-Entropy), so the loss memory is one chunk, not M x V.

`score_and_loss_all_rows` is the ratio-1 path: when every valid position is kept anyway, the scoring
statistics and the loss share one projection per chunk, so nothing is multiplied twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from opdlab.divergences.base import Divergence, LossInputs
from opdlab.rollout import Rollout
from opdlab.scoring import TokenStats, Workspace, chunk_stats, head_logits, scatter_rows

LossNormalization = Literal["kept", "valid"]
LogitsLoss = Callable[[torch.Tensor, slice], torch.Tensor]  # (R, V) student logits with grad, their slice -> (R,)


def kept_token_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    keep: torch.Tensor,
    rollout: Rollout,
    stats: TokenStats,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_head: Callable[[torch.Tensor], torch.Tensor],
    divergence: Divergence,
    chunk_size: int = 256,
    store_rows: int = 0,
) -> torch.Tensor:
    """(M,) per-token loss at the kept positions, in flat (sequence-major) order.

    Args:
        student_hidden: (N, L, H) response-predicting hidden states, with grad.
        teacher_hidden: (N, L, H_T) teacher hidden states, no grad.
        keep: (N, L) bool keep mask.
        chunk_size: kept rows whose logits exist at once; beyond it the loss is computed chunk by chunk.
            A loss chunk holds ~10 (rows, V) fp32 tensors (logits, log-softmaxes, the divergence's terms
            and their gradients) against 3 for a scoring chunk, so a quarter of the scoring chunk size
            keeps both passes at the same peak (measured: 8,192 tokens at 5%, 1.54 GB -> 0.46 GB, same time).
        store_rows: when the kept rows are chunked and M <= store_rows, keep each row's logit gradient
            (one M x V tensor in the logits' dtype) and take the head's gradients in backward with two
            matmuls over all M rows, instead of two per chunk: the LM head weight (V x H, the largest
            tensor the loss reads) is then streamed 2 + 2·chunks times rather than 4·chunks. 0 never stores.
    """
    idx = keep.flatten().nonzero().squeeze(-1)  # (M,)
    tokens = rollout.response_ids.flatten()[idx]
    sampling_logp = rollout.sampling_logp.flatten()[idx]
    teacher_token_logp = stats.teacher_token_logp.flatten()[idx]
    teacher_rows = teacher_hidden.flatten(0, 1)[idx]

    def logits_loss(student_logits: torch.Tensor, rows: slice) -> torch.Tensor:
        teacher_logits = None
        if divergence.needs_teacher_logits:
            with torch.no_grad():
                teacher_logits = teacher_head(teacher_rows[rows])
        inputs = LossInputs(
            student_logits=student_logits,  # (R, V) with grad
            teacher_logits=teacher_logits,
            tokens=tokens[rows],
            sampling_logp=sampling_logp[rows],
            teacher_token_logp=teacher_token_logp[rows],
        )
        return divergence.token_loss(inputs)

    student_rows = student_hidden.flatten(0, 1)[idx]  # (M, H), with grad
    if idx.numel() <= chunk_size or not chunkable(student_head):
        return logits_loss(student_head(student_rows), slice(None))
    store = idx.numel() <= store_rows and student_head.is_plain_linear
    return ChunkedRowLoss.apply(logits_loss, student_head, chunk_size, store, student_rows,
                                *student_head.parameters())


def chunkable(head: Callable) -> bool:
    """Whether `ChunkedRowLoss` can see every trainable tensor `head` reads (a local LogitHead)."""
    from opdlab.models import LogitHead

    return isinstance(head, LogitHead) and (head.is_plain_linear or not head.parameters())


class ChunkedRowLoss(torch.autograd.Function):
    """Per-row losses of (M, H) hidden rows, chunk by chunk, each chunk's logits freed before the next.

    forward(logits_loss, head, chunk_size, store, hidden, *params) -> (M,) losses, where logits_loss(z,
    rows) builds the (R,) loss of one chunk from its student logits z = head(h) (R, V). The head's
    matmul is differentiated by hand (pre = h Wᵀ + b; z = post-processing(pre); dh = dpre W,
    dW = dpreᵀ h), so its weight gradient is written in place rather than allocated per chunk. Rows are
    independent: for any upstream gradient g, d(Σ g_i l_i)/dh_i = g_i · dl_i/dh_i.

    - store=False: each chunk's dh and dW are taken in forward; the (M, H) row gradients are exact for
      any g, and dW is stored for the sum and scaled once (in place) when g is uniform, as it is for
      `reduce_token_loss`; any other g, or a second backward through a retained graph, recomputes the
      chunks (exact, slower).
    - store=True: forward keeps dpre (M, V) and backward takes dh = (dpre W)·g and dW = dpreᵀ (g·h) in one
      matmul each, exact for any g and any number of backward calls.
    """

    @staticmethod
    def forward(ctx, logits_loss: LogitsLoss, head, chunk_size: int, store: bool, hidden: torch.Tensor,
                *params: torch.Tensor):
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        ctx.logits_loss, ctx.head, ctx.chunk_size, ctx.store = logits_loss, head, chunk_size, store
        if store:
            d_pre = None
            for start in range(0, hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                losses[rows], grad = chunk_logit_grad(logits_loss, head, hidden[rows], rows)
                if d_pre is None:
                    d_pre = grad.new_empty(hidden.shape[0], grad.shape[1])
                d_pre[rows] = grad
            ctx.save_for_backward(hidden, d_pre, *params)
            return losses
        grad_hidden = torch.empty_like(hidden)
        grad_params = [torch.empty_like(p) for p in params]  # the first chunk writes, later chunks add
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            losses[rows], grad_hidden[rows] = chunk_loss_and_grads(logits_loss, head, hidden[rows], rows, params,
                                                                   grad_params, first=start == 0)
        ctx.grad_params = grad_params  # not saved tensors: backward scales them in place, once
        ctx.save_for_backward(hidden, grad_hidden, *params)
        return losses

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.store:
            return (None, None, None, None, *stored_grads(ctx, grad_out))
        hidden, grad_hidden, *params = ctx.saved_tensors
        grad_out = grad_out.to(grad_hidden.dtype)
        d_hidden = grad_hidden * grad_out[:, None] if ctx.needs_input_grad[4] else None
        if not params:
            return None, None, None, None, d_hidden
        if ctx.grad_params is not None and bool((grad_out == grad_out[0]).all()):
            d_params = [g.mul_(grad_out[0]) for g in ctx.grad_params]  # in place: no second (V, H) tensor
            ctx.grad_params = None
        else:  # a non-uniform upstream gradient, or a second backward: recompute each chunk with its weights
            d_params = [torch.zeros_like(p) for p in params]
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                rows = slice(start, start + ctx.chunk_size)
                chunk_loss_and_grads(ctx.logits_loss, ctx.head, hidden[rows], rows, params, d_params, grad_out[rows])
        return None, None, None, None, d_hidden, *d_params


def stored_grads(ctx, grad_out: torch.Tensor) -> list[torch.Tensor | None]:
    """Backward of `ChunkedRowLoss(store=True)`: (d hidden, *d params) from the stored dpre (M, V)."""
    hidden, d_pre, *params = ctx.saved_tensors
    weight, _ = ctx.head.linear_parts()
    g = grad_out.to(d_pre.dtype)[:, None]  # (M, 1)
    out: list[torch.Tensor | None] = [None]
    if ctx.needs_input_grad[4]:
        out[0] = torch.mm(d_pre, weight.detach().to(d_pre.dtype)).mul_(g).to(hidden.dtype)
    grads = [torch.empty_like(p) for p in params]
    head_param_grads(ctx.head, params, d_pre, hidden, grads, add=False, row_weights=grad_out)
    return out + grads


@torch.no_grad()
def head_param_grads(
    head,
    params: Sequence[torch.Tensor],
    d_pre: torch.Tensor,
    hidden: torch.Tensor,
    into: list[torch.Tensor],
    add: bool,
    row_weights: torch.Tensor | None = None,
) -> None:
    """Gradients of Σ_i w_i·loss_i w.r.t. a plain-linear head's parameters, from dpre (R, V) and hidden (R, H):
    dW[:V] = dpreᵀ (w·h), db[:V] = dpreᵀ w (w = 1 without `row_weights`), added to `into` (`add`) or written
    there, in place: no (V, H) temporary unless the dtypes differ (mixed precision: the product in the autocast
    dtype, accumulated in the parameter's). Writing zeroes the rows a narrowed head (num_columns) never touches.
    """
    w = None if row_weights is None else row_weights.to(d_pre.dtype)[:, None]
    h = hidden.to(d_pre.dtype) if w is None else hidden.to(d_pre.dtype) * w
    for p, acc in zip(params, into, strict=True):
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
            b = d_pre.sum(0) if w is None else torch.mv(d_pre.t(), w.squeeze(-1))
            rows_of.add_(b.to(acc.dtype)) if add else rows_of.copy_(b)
        else:  # pragma: no cover - chunkable() admits plain nn.Linear heads only
            raise TypeError("ChunkedRowLoss: a head parameter that is neither its weight nor its bias")


def chunk_logit_grad(
    logits_loss: LogitsLoss, head, hidden: torch.Tensor, rows: slice, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(R,) loss of one chunk of a plain-linear head and d(Σ weights·loss)/dpre (R, V), where
    pre = F.linear(hidden, weight, bias) are the logits before the model's post-processing."""
    weight, bias = head.linear_parts()
    with torch.no_grad():
        pre = F.linear(hidden, weight, bias)  # (R, V)
    with torch.enable_grad():
        pre.requires_grad_(True)
        loss = logits_loss(head.postprocess(pre), rows)
        total = loss.sum() if weights is None else (loss * weights).sum()
        d_pre = torch.autograd.grad(total, pre)[0] if total.requires_grad else torch.zeros_like(pre)
    return loss.detach(), d_pre


def chunk_loss_and_grads(
    logits_loss: LogitsLoss,
    head,
    hidden: torch.Tensor,
    rows: slice,
    params: Sequence[torch.Tensor],
    grads_into: list[torch.Tensor],
    weights: torch.Tensor | None = None,
    first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(R,) loss of one chunk and d(Σ weights·loss)/dhidden (R, H); the head parameters' gradients are
    added into `grads_into` (same order as `params`), or written there when `first` (no zero-fill pass
    over a (V, H) buffer)."""
    if not params:  # a frozen head: autograd through the head for the hidden rows only
        with torch.enable_grad():
            h = hidden.detach().requires_grad_(True)
            loss = logits_loss(head(h), rows)
            total = loss.sum() if weights is None else (loss * weights).sum()
            grad = torch.autograd.grad(total, h)[0] if total.requires_grad else torch.zeros_like(h)
        return loss.detach(), grad
    loss, d_pre = chunk_logit_grad(logits_loss, head, hidden, rows, weights)
    weight, _ = head.linear_parts()
    with torch.no_grad():
        grad_hidden = torch.mm(d_pre, weight.to(d_pre.dtype)).to(hidden.dtype)
        head_param_grads(head, params, d_pre, hidden, grads_into, add=not first)
    return loss, grad_hidden


def score_and_loss_all_rows(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    rollout: Rollout,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_head: Callable[[torch.Tensor], torch.Tensor],
    divergence: Divergence,
    top_k: int = 16,
    chunk_size: int = 1024,
    full_kl: bool = False,
    full_entropy: bool = True,
) -> tuple[TokenStats, torch.Tensor]:
    """TokenStats and the (R,) per-token loss at *every* valid position, from one projection per chunk.

    For ratio-1 selection (the full-token baseline, or any selector at ratio 1): the keep mask is the
    response mask before any score exists, so scoring and loss need not project the rows twice. Equal
    to `compute_token_stats` followed by `kept_token_loss(keep=response_mask)`.
    """
    valid = rollout.response_mask.bool()
    idx = valid.flatten().nonzero().squeeze(-1)  # (R,)
    tokens = rollout.response_ids.flatten()[idx]
    sampling_logp = rollout.sampling_logp.flatten()[idx]
    teacher_rows = teacher_hidden.flatten(0, 1)[idx]
    work, chunks = Workspace(min(chunk_size, idx.numel())), []

    def logits_loss(student_logits: torch.Tensor, rows: slice) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = head_logits(teacher_head, teacher_rows[rows], work, "teacher")  # (R, V) fp32
        st = chunk_stats(student_logits.detach().float(), teacher_logits, tokens[rows], top_k, full_kl, work,
                         full_entropy)
        chunks.append(st)
        inputs = LossInputs(
            student_logits=student_logits,
            teacher_logits=teacher_logits if divergence.needs_teacher_logits else None,
            tokens=tokens[rows],
            sampling_logp=sampling_logp[rows],
            teacher_token_logp=st["teacher_token_logp"],
        )
        return divergence.token_loss(inputs)

    student_rows = student_hidden.flatten(0, 1)[idx]
    if idx.numel() == 0 or not chunkable(student_head):  # the plain two-pass path
        from opdlab.scoring import compute_token_stats

        stats = compute_token_stats(student_hidden.detach(), teacher_hidden, rollout.response_ids, valid,
                                    student_head, teacher_head, top_k, chunk_size, full_kl, full_entropy)
        return stats, kept_token_loss(student_hidden, teacher_hidden, valid, rollout, stats, student_head,
                                      teacher_head, divergence, chunk_size)
    token_loss = ChunkedRowLoss.apply(logits_loss, student_head, chunk_size, False, student_rows,
                                      *student_head.parameters())
    return scatter_rows(chunks, idx, valid, top_k, full_kl, full_entropy), token_loss


def reduce_token_loss(token_loss: torch.Tensor, denominator: float | torch.Tensor) -> torch.Tensor:
    """Sum of per-token losses divided by `denominator` — the only place losses are reduced.

    The caller picks the denominator (see `OPDModule(loss_normalization=...)`):
    - "kept": the number of kept tokens, so each step's loss is a mean over supervised tokens and its
      scale does not depend on the budget;
    - "valid": the number of valid response tokens, as when the reference code masks a token-mean loss;
      a 5% budget then scales gradients by ~0.05.
    In distributed or accumulated steps the denominator is the global count, so the result does not
    depend on how the batch is split. An empty selection gives 0 with the graph kept intact.
    """
    return token_loss.sum() / max(float(denominator), 1.0)
