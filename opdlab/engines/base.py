"""The rollout-engine interface: prompts + sampling settings -> `Rollout`, with the current policy weights.

An engine is the only thing a training step asks for generation. It owns whatever makes generation fast
(a copy of the weights in the compute dtype, a static KV cache, captured CUDA graphs, a serving system)
and must follow three rules, which `opdlab.testing`-style contract tests in tests/test_engines.py check
for every registered engine:

1. `generate` returns a `Rollout` whose `sampling_logp` is the log-probability of each sampled token under
   the distribution actually sampled from (after temperature and top-p), 0 at padding;
2. after `load_weights(model)` it generates with exactly those weights, and nothing computed with older
   weights (a prefix cache, a captured graph over stale copies) survives the call;
3. greedy decoding (temperature 0) gives the tokens the plain full-sequence argmax gives.

The module calls `bind` once per student object, `load_weights` before the first generation after every
optimizer step (and after a checkpoint is restored), and `generate` for training rollouts, greedy
validation and the diagnostic's bank.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from opdlab.rollout import PromptBatch, Rollout


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. `temperature == 0` is greedy (then top_p, seeds and generator are unused).

    seeds: one per prompt; each response then draws its randomness from (prompt seed, sample index), so
        a prompt gets the same samples however the batch is split across ranks or micro-batches.
    generator: the randomness of the whole batch when `seeds` is None.
    sync_ranks: every data-parallel rank runs the same number of decoding steps (a sharded model needs
        matching collectives on every rank).
    """

    num_samples: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seeds: list[int] | None = None
    generator: torch.Generator | None = None
    sync_ranks: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and top_p in (0, 1], got {self.temperature} and {self.top_p}")
        if self.num_samples < 1 or self.max_new_tokens < 1:
            raise ValueError(f"need num_samples >= 1 and max_new_tokens >= 1, got {self.num_samples} and "
                             f"{self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class RolloutEngine(ABC):
    """Generates rollouts of one policy model. Subclasses are registered in the `opdlab.rollout_engines`
    entry-point group and chosen with `--model.rollout_engine <name>`.

    `loads_adapters`: the engine generates with a student that carries a LoRA adapter
    (`--model.student_adapter.*`, `opdlab.adapters`): such a student's adapted layers hold their frozen weight
    as `<layer>.base_layer.weight` plus the adapter's `lora_A`/`lora_B`, so an engine that copies parameters
    by name must read them through `opdlab.adapters.plain_parameters` (the merged weights under the
    architecture's own names). False by default: training an adapter with an engine that does not declare
    it is refused before any model loads."""

    loads_adapters: bool = False

    def bind(self, model: nn.Module, eos_token_id: int, pad_token_id: int) -> None:
        """Attach the policy (the student). Called once per model object, before any `load_weights`."""
        self.model, self.eos_token_id, self.pad_token_id = model, eos_token_id, pad_token_id

    @abstractmethod
    def load_weights(self, model: nn.Module) -> None:
        """Take the model's current weights (after an optimizer step or a restore); drop every cache
        computed with older ones. Called on every rank (a sharded model gathers its full weights here)."""

    @abstractmethod
    def generate(self, prompts: PromptBatch, params: SamplingParams) -> Rollout:
        """Sample `params.num_samples` responses per prompt (rows prompt-major: i * num_samples + j)."""


def generation_dtype(setting: str, model: nn.Module, device: torch.device) -> torch.dtype:
    """The dtype an engine generates in: `setting` itself (float32, bfloat16, float16) or, for `auto`, the
    dtype the student computes in here: autocast's (bf16-mixed training) or its own weights'."""
    from opdlab.options import DTYPES

    if setting != "auto":
        return DTYPES[setting]
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype
