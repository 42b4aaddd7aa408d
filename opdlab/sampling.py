"""The student's side of a step before any scoring: prompts encoded with the run's options (and the warnings they
may call for), the student's responses from the rollout engine (which takes the weights of the last optimizer step
first), and its hidden states over the responses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from opdlab.building import position_limit
from opdlab.console import error_summary
from opdlab.distributed import world_size
from opdlab.engines import RolloutEngine, SamplingParams
from opdlab.models import final_hidden_states
from opdlab.options import RolloutOptions
from opdlab.rollout import PromptBatch, Rollout, derive_seed, encode_prompts, response_positions
from opdlab.run_warnings import RunWarnings


class StudentSampler:
    """Encodes prompts and samples the student's responses with one run's options (`where()`: where the run is,
    for an engine's failure)."""

    def __init__(self, engine: RolloutEngine, options: RolloutOptions, seed: int, warnings: RunWarnings,
                 where: Callable[[], str]) -> None:
        self.engine, self.options, self.seed, self.warnings, self.where = engine, options, seed, warnings, where
        self.student = self.tokenizer = None
        self.stale = True  # the engine takes the student's weights before its next rollout

    def bind(self, student, tokenizer, path: str) -> None:
        """Attach the engine to the current student object (again after it is replaced)."""
        self.student, self.tokenizer, self.path = student, tokenizer, path
        self.engine.bind(student, tokenizer.eos_token_id, tokenizer.pad_token_id)
        self.stale = True

    def encode(self, batch: dict, chat_template: bool) -> PromptBatch:
        opts = self.options
        prompts = encode_prompts(self.tokenizer, batch["prompts"], batch["answers"], opts.max_prompt_len,
                                 opts.on_long_prompt, chat_template=chat_template)
        if not chat_template:
            self.warnings.unknown_tokens(self.tokenizer, prompts, batch["prompts"], opts.max_prompt_len, self.path)
        self.warnings.past_positions(prompts, position_limit(self.student), opts.max_new_tokens, self.path)
        return prompts

    def prompt_seeds(self, batch: dict) -> list[int] | None:
        """One sampling seed per prompt, from its stream index: samples do not depend on batch splits."""
        return [derive_seed(self.seed, int(i)) for i in batch["indices"]] if "indices" in batch else None

    def rollout(self, prompts: PromptBatch, generator: torch.Generator, greedy: bool = False,
                seeds: list[int] | None = None) -> Rollout:
        """The student's responses with the run's sampling settings (greedy: one each, temperature 0)."""
        opts = self.options
        return self.generate(prompts, SamplingParams(
            num_samples=1 if greedy else opts.num_samples, max_new_tokens=opts.max_new_tokens,
            temperature=0.0 if greedy else opts.temperature, top_p=opts.top_p, seeds=None if greedy else seeds,
            generator=generator, sync_ranks=world_size() > 1,
        ))

    def generate(self, prompts: PromptBatch, params: SamplingParams) -> Rollout:
        """Student rollouts from the engine, which first takes the weights of the last optimizer step."""
        try:
            if self.stale:
                self.engine.load_weights(self.student)
                self.stale = False
            return self.engine.generate(prompts, params)
        except Exception as err:  # noqa: BLE001 - any engine failure (an external engine raises its own types)
            raise RuntimeError(f"rollout engine {type(self.engine).__name__} failed {self.where()}: "
                               f"{error_summary(err)}") from err


def student_hidden_states(student, rollout: Rollout, grad: bool = True) -> torch.Tensor:
    """(N, L, H) student hidden states that predict each response token."""
    with torch.set_grad_enabled(grad):
        hidden = final_hidden_states(student, rollout.input_ids, rollout.attention_mask)
    return hidden[:, response_positions(rollout)]
