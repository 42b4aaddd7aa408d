"""`LogitHead`: hidden states -> logits as the model's own forward computes them, for any subset of rows;
`head_logits` applies a head to a chunk of rows into a reused `Workspace` buffer.

Kept apart from `opdlab.models` (loading) so the scoring and loss modules that apply heads import only
torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class LogitHead:
    """hidden states -> logits exactly as the model's own `forward` computes them.

    Applies the output embedding (tied or not) and the post-processing some families add:
    Gemma's final logit soft-capping, Cohere's `logit_scale`, Granite's `logits_scaling`.
    Calling it on a subset of rows is how opdlab avoids (N, L, V) logits. It is a plain callable, not
    a module, so the output embedding is not registered (or checkpointed) a second time; calling the
    embedding module still fires any sharding hooks on it.

    `head(hidden, out=buffer)` writes the logits into a preallocated buffer instead (the no-grad scoring
    pass reuses one buffer per chunk: on CPU a fresh (R, V) allocation costs as much page-faulting as
    several elementwise passes over it). Only the first `num_columns` rows of the weight are multiplied.
    """

    def __init__(self, model: nn.Module, num_columns: int | None = None) -> None:
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.proj = model.get_output_embeddings()
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.scale = getattr(config, "logit_scale", None)
        self.divide = getattr(config, "logits_scaling", None)
        self.num_columns = num_columns

    def __call__(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:  # (..., H) -> (..., V)
        if out is not None:
            return self._into(hidden, out)
        logits = self.proj(hidden)
        if self.num_columns is not None:
            logits = logits[..., : self.num_columns]
        return self._postprocess(logits, inplace=False)

    @property
    def num_logits(self) -> int:
        """V, the number of logit columns the head returns."""
        rows = self.proj.weight.shape[0]  # a sharded DTensor reports its global shape
        return rows if self.num_columns is None else min(rows, self.num_columns)

    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters the head reads (the output embedding; tied or not)."""
        return [p for p in self.proj.parameters() if p.requires_grad]

    @property
    def is_plain_linear(self) -> bool:
        """True when the weight can be used directly (a local nn.Linear, not a sharded DTensor)."""
        if type(self.proj) is not nn.Linear:
            return False
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover - builds without torch.distributed
            return True
        return not isinstance(self.proj.weight, DTensor)

    @torch.no_grad()
    def _into(self, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """No-grad logits of (R, H) rows written into `out` (R, V) (any float dtype); returns `out`."""
        weight = self.proj.weight if self.is_plain_linear else None
        if weight is not None and weight.dtype == out.dtype == hidden.dtype and self.proj.bias is None:
            if self.num_columns is not None:
                weight = weight[: self.num_columns]  # contiguous rows: no wasted columns
            torch.matmul(hidden, weight.t(), out=out)
        else:
            logits = self.proj(hidden)
            out.copy_(logits if self.num_columns is None else logits[..., : self.num_columns])
        return self._postprocess(out, inplace=True)

    def linear_parts(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight (V, H), bias (V,) or None): the rows of a plain-linear head that produce the V logits.

        `head(h) == head.postprocess(F.linear(h, *head.linear_parts()))`; the chunked loss uses this to
        differentiate through the matmul by hand and accumulate the weight gradient in place.
        """
        if not self.is_plain_linear:
            raise TypeError(f"linear_parts needs a local nn.Linear head, got {type(self.proj).__name__}")
        weight, bias = self.proj.weight, self.proj.bias
        if self.num_columns is not None:
            weight = weight[: self.num_columns]
            bias = None if bias is None else bias[: self.num_columns]
        return weight, bias

    def postprocess(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's elementwise logit post-processing (scale, soft-cap), out of place, differentiable."""
        return self._postprocess(logits, inplace=False)

    def _postprocess(self, logits: torch.Tensor, inplace: bool) -> torch.Tensor:
        # Same order and formulas as the HF forwards (Cohere, Granite, Gemma 2/3).
        if self.scale is not None:
            logits = logits.mul_(self.scale) if inplace else logits * self.scale
        if self.divide is not None:
            logits = logits.div_(self.divide) if inplace else logits / self.divide
        if self.softcap is not None:
            if inplace:
                logits = logits.div_(self.softcap).tanh_().mul_(self.softcap)
            else:
                logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class Workspace:
    """Reusable fp32 (rows, V) buffers for the no-grad scoring pass, allocated on first use.

    Reusing them chunk after chunk keeps the memory at a few chunks and avoids paying first-touch page
    faults for every fresh (R, V) tensor (on CPU that costs as much as several elementwise passes).
    """

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, columns: int, device: torch.device) -> torch.Tensor:
        """An uninitialised fp32 (rows, columns) view of the buffer `name`."""
        buf = self.buffers.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != columns or buf.device != device:
            buf = self.buffers[name] = torch.empty(max(self.rows, rows), columns, device=device, dtype=torch.float32)
        return buf[:rows]

    def like(self, name: str, z: torch.Tensor) -> torch.Tensor:
        return self.get(name, z.shape[0], z.shape[1], z.device)


def head_logits(head: Callable[..., torch.Tensor], hidden: torch.Tensor, work: Workspace, name: str) -> torch.Tensor:
    """No-grad fp32 logits (R, V) of (R, H) rows; a `LogitHead` writes them into a reused buffer."""
    if isinstance(head, LogitHead):
        return head(hidden, out=work.get(name, hidden.shape[0], head.num_logits, hidden.device))
    return head(hidden).float()
