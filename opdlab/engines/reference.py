"""The reference engine: the plain KV-cached loop of `opdlab.rollout.sample_rollouts` on the live model."""

from __future__ import annotations

from torch import nn

from opdlab.engines.base import RolloutEngine, SamplingParams
from opdlab.rollout import PromptBatch, Rollout, sample_rollouts


class ReferenceEngine(RolloutEngine):
    """The plain generation loop: a dynamic cache that grows by one position per step, run eagerly on the
    student itself (so its weights are always the current ones and `load_weights` has nothing to do).
    Simple and exact; Python- and launch-bound on a GPU. The other engines are tested against it. A student with
    a LoRA adapter generates through its adapted layers as they are."""

    loads_adapters = True

    def load_weights(self, model: nn.Module) -> None:
        self.model = model  # generates with the live weights: nothing to copy, nothing cached

    def generate(self, prompts: PromptBatch, params: SamplingParams) -> Rollout:
        return sample_rollouts(
            self.model, prompts, self.eos_token_id, self.pad_token_id, num_samples=params.num_samples,
            max_new_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
            generator=params.generator, seeds=None if params.greedy else params.seeds, sync_ranks=params.sync_ranks,
        )
