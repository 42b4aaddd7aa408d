"""The step plan: how one training step runs, decided once by a pure function of the options.

`plan_step` answers every "which path?" question of `OPDModule.training_step` in one place: how the
rollout rows split into micro-batches, whether the scoring forward's graph is reused by the loss,
whether scoring and loss share one projection per chunk (ratio 1), the chunk sizes of both passes,
up to how many kept rows the loss stores logit gradients, and which optional statistics are computed.
`loss_scale` owns the normalisation: the denominator rule, the global count and the world-size factor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from opdlab.distributed import all_reduce_sum, world_size

LossNormalization = Literal["kept", "valid"]


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
