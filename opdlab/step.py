"""The step plan and the step's paths: how one training step runs, decided once, and the functions that run it.

`plan_step` answers every "which path?" question of `OPDModule.training_step` in one place: how the
rollout rows split into micro-batches, whether the scoring forward's graph is reused by the loss,
whether scoring and loss share one projection per chunk (ratio 1), the chunk sizes of both passes,
up to how many kept rows the loss stores logit gradients, and which optional statistics are computed.
`loss_scale` owns the normalisation: the denominator rule, the global count and the world-size factor.

The paths take tensors and components, not the module: `score` (statistics without grad), `select` (the
selector's global keep mask, checked) and `backward_kept` (the loss of the kept rows, micro-batch by
micro-batch), or `score_with_loss` (the shared projection: statistics and loss of every valid row at once).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from opdlab.chunks import Scoring
from opdlab.distributed import all_reduce_sum, gather_stats, world_size
from opdlab.divergences.base import Divergence
from opdlab.heads import LogitHead
from opdlab.loss import HeadLoss, head_loss, kept_rows
from opdlab.options import LossNormalization
from opdlab.rollout import Rollout
from opdlab.scoring import TokenStats, compute_token_stats, scatter_rows
from opdlab.selectors.base import TokenSelector
from opdlab.teachers.rows import TeacherRows

Hidden = list[tuple[torch.Tensor, TeacherRows]]  # per micro-batch: the student's (n, L, H) hidden states, the teacher's rows



@dataclass(frozen=True)
class StepPlan:
    micro_batches: tuple[slice, ...]  # row slices of the rollout batch, one forward/backward each
    shared_projection: bool  # scoring and loss from one projection per chunk (every valid row is kept)
    score_chunk_rows: int  # rows whose logits the no-grad scoring pass holds at once (~3 x rows x V fp32)
    loss_chunk_rows: int  # rows per loss chunk (~10 (rows, V) tensors each, so a quarter of the above)
    store_rows: int  # up to this many kept rows, logit gradients are stored (one head matmul, not per chunk)
    full_kl: bool  # full-vocabulary KLs in the statistics (a selector asks)
    full_entropy: bool  # full-vocabulary entropies (a selector or a callback asks)
    loss_denominator: LossNormalization  # the loss's denominator: kept or valid tokens of the whole batch
    topk_lists: bool = False  # both models' (N, L, K) top-K ids and log-probs (a selector asks)

    def scoring(self, top_k: int) -> Scoring:
        """The statistics this step computes, with the selector's K."""
        return Scoring(top_k, self.full_kl, self.full_entropy, self.topk_lists)

    @property
    def reuse_student_graph(self) -> bool:
        """One micro-batch: the scoring forward runs with grad and the loss backpropagates through it;
        several: the scoring forward runs without grad and each micro-batch runs again with grad."""
        return len(self.micro_batches) == 1

    def describe(self) -> str:
        rows = self.micro_batches[-1].stop
        batches = len(self.micro_batches)
        parts = [
            f"{rows} rollout rows in {batches} micro-batch{'es' if batches > 1 else ''}"
            + (" (student forward with grad reused by the loss)" if self.reuse_student_graph
               else " (scoring forward without grad; each micro-batch forward again with grad)"),
            "scoring and loss share one projection per chunk (every valid token is kept)" if self.shared_projection
            else "score all rows, select, then the loss on the kept rows",
            (f"chunks: scoring {self.score_chunk_rows} rows, loss {self.loss_chunk_rows} rows; logit gradients "
             f"stored up to {self.store_rows} kept rows"),
            f"loss = sum over kept tokens / {self.loss_denominator} tokens of the whole batch on every rank",
        ]
        extras = [name for name, on in (("full-vocabulary KLs", self.full_kl),
                                        ("full-vocabulary entropies", self.full_entropy),
                                        ("top-K lists", self.topk_lists)) if on]
        if extras:
            parts.append("statistics also include " + " and ".join(extras))
        return "step plan: " + "; ".join(parts)


def micro_batches(n: int, size: int | None) -> tuple[slice, ...]:
    """Row slices of at most `size` rows covering n rows (one slice when size is None)."""
    if size is None or size >= n:
        return (slice(0, n),)
    return tuple(slice(i, min(i + size, n)) for i in range(0, n, size))


def plan_step(
    rows: int,
    *,
    micro_batch_size: int | None,
    chunk_size: int,
    keeps_every_valid_position: bool,
    full_kl: bool,
    full_entropy: bool,
    loss_denominator: LossNormalization,
    shared_projection: bool = True,
    topk_lists: bool = False,
) -> StepPlan:
    """The plan of a step over `rows` rollout rows (prompts x samples).

    Args:
        keeps_every_valid_position: the selector keeps every valid position (ratio 1 with the shared
            budget rule; `TokenSelector.keeps_every_valid_position`), so the keep mask is known before any
            score and, in one micro-batch, scoring and loss can share the projection.
        shared_projection: False forces the score-select-loss path even then (to compare the two, or when the
            student's LM head is sharded: `head_loss` then projects all rows at once, and the chunked scoring
            pass keeps the statistics' memory at one chunk).
    """
    parts = micro_batches(rows, micro_batch_size)
    return StepPlan(
        micro_batches=parts,
        shared_projection=shared_projection and keeps_every_valid_position and len(parts) == 1,
        score_chunk_rows=chunk_size,
        loss_chunk_rows=max(1, chunk_size // 4),  # measured: 8,192 tokens at 5%, 1.54 GB -> 0.46 GB, same time
        store_rows=2 * chunk_size,  # up to two scoring chunks: the head weight read 2 + chunks times, not 3·chunks
        full_kl=full_kl,
        full_entropy=full_entropy,
        loss_denominator=loss_denominator,
        topk_lists=topk_lists,
    )


def plan_for(rows: int, memory, training, selector: TokenSelector, full_entropy: bool,
             student_head: LogitHead | None) -> StepPlan:
    """`plan_step` from a run's options and selector; a sharded (FSDP2) student head (not plain linear) takes
    head_loss's autograd path, so scoring does not share its projection."""
    return plan_step(
        rows, micro_batch_size=memory.micro_batch_size, chunk_size=memory.chunk_size,
        keeps_every_valid_position=selector.keeps_every_valid_position, full_kl=selector.needs_full_kl,
        full_entropy=full_entropy, loss_denominator=training.loss_normalization,
        shared_projection=student_head is None or student_head.is_plain_linear,
        topk_lists=getattr(selector, "needs_topk_lists", False),
    )


def loss_scale(denominator: LossNormalization, keep: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The factor on this rank's sum of kept-token losses: world size / global count.

    The count is kept tokens (`kept`: each step's loss is a mean over supervised tokens and its scale
    does not depend on the budget) or valid response tokens (`valid`: as when a reference implementation
    masks a token-mean loss; a 5% budget then scales gradients by ~0.05), summed over all ranks and
    micro-batches. Data-parallel gradient reduction averages over ranks, hence the world size: the update
    equals the single-process update on the whole batch. An empty count counts as 1.
    """
    count = (keep if denominator == "kept" else valid).sum().float()
    return world_size() / all_reduce_sum(count).clamp_min(1.0)


def global_loss(local: torch.Tensor) -> torch.Tensor:
    """The step's loss value for logging: the ranks' scaled sums added, the world-size factor removed."""
    return all_reduce_sum(local.detach()) / world_size()


@dataclass
class StepRecord:
    """What one training step selected, handed to callbacks as `outputs["record"]` (no hidden states or
    logits are kept)."""

    rollout: Rollout
    stats: TokenStats
    keep: torch.Tensor  # (N, L) bool
    seconds: dict[str, float]
    plan: StepPlan
    spans: list[tuple[str, float, float]] = field(default_factory=list)  # (stage, perf_counter start, seconds)
    taken: object | None = None  # an asynchronous run's `opdlab.pipeline.Taken`: the producer's span, staleness, wait


# ----------------------------------------------------------------------------------------- the step's paths
def score(hidden: Hidden, rollout: Rollout, plan: StepPlan, student_head: LogitHead, scoring: Scoring) -> TokenStats:
    """The statistics of every valid position, without grad, micro-batch by micro-batch."""
    return TokenStats.cat([
        compute_token_stats(s.detach(), t, part.response_ids, part.response_mask, student_head, None, scoring.top_k,
                            plan.score_chunk_rows, scoring.full_kl, scoring.full_entropy, scoring.topk_lists)
        for (s, t), part in zip(hidden, (rollout.rows(r) for r in plan.micro_batches), strict=True)
    ])


def score_with_loss(hidden: Hidden, rollout: Rollout, plan: StepPlan, student_head: LogitHead, divergence: Divergence,
                    scoring: Scoring) -> tuple[TokenStats, HeadLoss]:
    """The statistics and the loss of every valid position from one projection of each chunk (the plan's shared
    path: every valid position is kept, one micro-batch, a local head)."""
    (student_hidden, teacher), valid = hidden[0], rollout.response_mask.bool()
    rows = kept_rows(valid, student_hidden, teacher, rollout)
    loss = head_loss(rows, student_head, None, divergence, loss_scale(plan.loss_denominator, valid, valid),
                     plan.score_chunk_rows, scoring=scoring)
    stats = scatter_rows(loss.stats, rows.index, valid, scoring.top_k, scoring.full_kl, scoring.full_entropy,
                         scoring.topk_lists)
    return stats, loss


def select(selector: TokenSelector, stats: TokenStats, generator: torch.Generator) -> torch.Tensor:
    """Keep mask for this rank's rows; the budget and normalisation are global across ranks (`generator`: the same
    on every rank, so a random selector draws one global choice). A mask of the wrong type or shape, or one that
    keeps positions outside the responses, is refused naming the selector."""
    everything, (offset, count, length) = gather_stats(stats)
    keep = selector.select(everything, generator=generator)
    expected = tuple(everything.valid.shape)
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != expected:
        got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise ValueError(f"selector {type(selector).__name__} returned a keep mask of {got}; expected "
                         f"torch.bool {expected} (one entry per response position of the whole batch)")
    keep = keep[offset : offset + count, :length]
    if (keep & ~stats.valid).any():
        raise RuntimeError(f"selector {type(selector).__name__} kept positions outside the response mask")
    return keep


def backward_shared(loss: HeadLoss, backward: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """Backpropagate the shared projection's loss (its gradients were computed with it); returns its global value."""
    backward(loss.loss)
    return global_loss(loss.loss)


def backward_kept(hidden: Hidden, keep: torch.Tensor, rollout: Rollout, stats: TokenStats, plan: StepPlan,
                  student_head: LogitHead, divergence: Divergence, forward: Callable[[Rollout], torch.Tensor],
                  backward: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """Backpropagate the loss of the kept rows, micro-batch by micro-batch; returns its global value.

    Every micro-batch's head loss carries the same `loss_scale` (the global count and the world-size factor), so
    the update equals the single-process update on the whole batch. `forward(part)`: the student's hidden states
    with grad, for micro-batches whose scoring forward ran without; `backward(loss)`: the module's backward.
    """
    scale = loss_scale(plan.loss_denominator, keep, stats.valid)
    total = torch.zeros((), device=keep.device)
    for (student_hidden, teacher), rows in zip(hidden, plan.micro_batches, strict=True):
        part = rollout.rows(rows)
        if not plan.reuse_student_graph:
            student_hidden = forward(part)
        kept = kept_rows(keep[rows], student_hidden, teacher, part, stats.teacher_token_logp[rows])
        loss = head_loss(kept, student_head, None, divergence, scale, plan.loss_chunk_rows, plan.store_rows).loss
        backward(loss)
        total += loss.detach()
    return global_loss(total)


def optimizer_step(optimizer, scheduler, parameters, max_norm: float | None,
                   skip: Callable[[bool, str], bool]) -> torch.Tensor | None:
    """Clip the gradients to `max_norm` (None or 0: no clipping), and step unless `skip(finite, "gradient norm")`
    says to skip a non-finite norm; the gradients are zeroed either way. Returns the norm, or None if skipped."""
    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf")) if params else torch.zeros(())
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    if skip(bool(torch.isfinite(norm)), "gradient norm"):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return norm


def default_optimizer(params) -> torch.optim.Optimizer:
    """`--model.optimizer`'s default: AdamW at lr 1e-4, no weight decay."""
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)


def configure_optimizers(optimizer_factory, scheduler_factory, parameters):
    """The optimizer over the trainable parameters only (with an adapter the frozen base gets no optimizer state),
    and its scheduler stepped every optimizer step; torch's own refusals name the option to fix."""
    try:
        optimizer = optimizer_factory([p for p in parameters if p.requires_grad])
    except (ValueError, TypeError) as err:  # torch's own checks (e.g. "Invalid learning rate: -0.1")
        raise ValueError(f"--model.optimizer: {err}; fix its init_args (e.g. --model.optimizer.init_args.lr)") from err
    if scheduler_factory is None:
        return optimizer
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler_factory(optimizer), "interval": "step"}}
