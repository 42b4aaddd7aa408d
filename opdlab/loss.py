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

from collections.abc import Callable
from typing import Literal

import torch

from opdlab.divergences.base import Divergence, LossInputs
from opdlab.rollout import Rollout
from opdlab.scoring import TokenStats, Workspace, chunk_stats, head_logits, scatter_rows

LossNormalization = Literal["kept", "valid"]
RowLoss = Callable[[torch.Tensor, slice], torch.Tensor]  # (R, H) hidden rows with grad, their slice -> (R,)


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
    """
    idx = keep.flatten().nonzero().squeeze(-1)  # (M,)
    tokens = rollout.response_ids.flatten()[idx]
    sampling_logp = rollout.sampling_logp.flatten()[idx]
    teacher_token_logp = stats.teacher_token_logp.flatten()[idx]
    teacher_rows = teacher_hidden.flatten(0, 1)[idx]

    def rows_loss(hidden: torch.Tensor, rows: slice) -> torch.Tensor:
        teacher_logits = None
        if divergence.needs_teacher_logits:
            with torch.no_grad():
                teacher_logits = teacher_head(teacher_rows[rows])
        inputs = LossInputs(
            student_logits=student_head(hidden),  # (R, V) with grad
            teacher_logits=teacher_logits,
            tokens=tokens[rows],
            sampling_logp=sampling_logp[rows],
            teacher_token_logp=teacher_token_logp[rows],
        )
        return divergence.token_loss(inputs)

    student_rows = student_hidden.flatten(0, 1)[idx]  # (M, H), with grad
    if idx.numel() <= chunk_size or not chunkable(student_head):
        return rows_loss(student_rows, slice(None))
    return ChunkedRowLoss.apply(rows_loss, chunk_size, student_rows, *student_head.parameters())


def chunkable(head: Callable) -> bool:
    """Whether `ChunkedRowLoss` can see every trainable tensor `head` reads (a local LogitHead)."""
    from opdlab.models import LogitHead

    return isinstance(head, LogitHead) and (head.is_plain_linear or not head.parameters())


class ChunkedRowLoss(torch.autograd.Function):
    """Per-row losses of (M, H) hidden rows; each chunk's gradient is taken in forward, its logits freed.

    forward(rows_loss, chunk_size, hidden, *params) -> (M,) losses, where rows_loss(h, rows) builds the
    (R,) loss of one chunk from its hidden rows h (R, H). Rows are independent, so for any upstream
    gradient g, d(Σ g_i l_i)/dh_i = g_i · dl_i/dh_i: the stored (M, H) row gradients are exact. The head
    parameters' gradient Σ_i g_i dl_i/dW is stored for the sum and scaled when g is uniform (it is for
    `reduce_token_loss`); any other g recomputes the chunks (exact, slower).
    """

    @staticmethod
    def forward(ctx, rows_loss: RowLoss, chunk_size: int, hidden: torch.Tensor, *params: torch.Tensor):
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden)
        grad_params = [torch.zeros_like(p) for p in params]
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            loss, grads = chunk_loss_and_grads(rows_loss, hidden[rows], rows, params)
            losses[rows] = loss
            grad_hidden[rows] = grads[0]
            for acc, g in zip(grad_params, grads[1:]):
                acc += g
        ctx.rows_loss, ctx.chunk_size = rows_loss, chunk_size
        ctx.save_for_backward(hidden, grad_hidden, *params, *grad_params)
        return losses

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, grad_hidden, *rest = ctx.saved_tensors
        params, grad_params = rest[: len(rest) // 2], rest[len(rest) // 2 :]
        grad_out = grad_out.to(grad_hidden.dtype)
        d_hidden = grad_hidden * grad_out[:, None] if ctx.needs_input_grad[2] else None
        if not params:
            return None, None, d_hidden
        if bool((grad_out == grad_out[0]).all()):
            d_params = [g * grad_out[0] for g in grad_params]
        else:  # a non-uniform upstream gradient: recompute each chunk with its weights
            d_params = [torch.zeros_like(p) for p in params]
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                rows = slice(start, start + ctx.chunk_size)
                _, grads = chunk_loss_and_grads(ctx.rows_loss, hidden[rows], rows, params, grad_out[rows])
                for acc, g in zip(d_params, grads[1:]):
                    acc += g
        return None, None, d_hidden, *d_params


def chunk_loss_and_grads(
    rows_loss: RowLoss, hidden: torch.Tensor, rows: slice, params, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(R,) loss of one chunk and the gradients of Σ weights·loss w.r.t. (hidden, *params)."""
    with torch.enable_grad():
        h = hidden.detach().requires_grad_(True)
        loss = rows_loss(h, rows)
        total = loss.sum() if weights is None else (loss * weights).sum()
        inputs = [h, *params]
        grads = torch.autograd.grad(total, inputs, allow_unused=True) if total.requires_grad else [None] * len(inputs)
    return loss.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


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

    def rows_loss(hidden: torch.Tensor, rows: slice) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = head_logits(teacher_head, teacher_rows[rows], work, "teacher")  # (R, V) fp32
        student_logits = student_head(hidden)  # (R, V) with grad
        st = chunk_stats(student_logits.detach().float(), teacher_logits, tokens[rows], top_k, full_kl, work)
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
                                    student_head, teacher_head, top_k, chunk_size, full_kl)
        return stats, kept_token_loss(student_hidden, teacher_hidden, valid, rollout, stats, student_head,
                                      teacher_head, divergence, chunk_size)
    token_loss = ChunkedRowLoss.apply(rows_loss, chunk_size, student_rows, *student_head.parameters())
    return scatter_rows(chunks, idx, valid, top_k, full_kl), token_loss


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
