"""`OPDModule`'s options by topic: `--model.rollout.*`, `--model.memory.*`, `--model.training.*`.

Each group checks its own values at construction, before any model loads, and says what to do.
"""

from __future__ import annotations

import dataclasses

import math
from dataclasses import dataclass
from typing import Literal

import torch

from opdlab.chunks import SCORE_CHUNK_ROWS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # dtype options
LossNormalization = Literal["kept", "valid"]  # the loss's denominator: kept or valid tokens of the whole batch


@dataclass
class RolloutOptions:
    """How the student's training responses are sampled (validation is always greedy, one per prompt).

    Args:
        num_samples: responses sampled per prompt.
        max_new_tokens: response length limit, for training rollouts and validation.
        temperature: sampling temperature (> 0: on-policy sampling).
        top_p: nucleus-sampling threshold in (0, 1] (1: no truncation).
        max_prompt_len: prompt length limit in tokens.
        on_long_prompt: `truncate` (keep the last max_prompt_len tokens, with a warning) or `error`.
    """

    num_samples: int = 1
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_len: int = 512
    on_long_prompt: Literal["truncate", "error"] = "truncate"

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_new_tokens < 1:
            raise ValueError(f"rollout.num_samples and rollout.max_new_tokens must be >= 1, got {self.num_samples} "
                             f"and {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"rollout.temperature must be > 0 (on-policy sampling), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1] (1 = no nucleus truncation), got {self.top_p}")
        if self.max_prompt_len < 1:
            raise ValueError(f"rollout.max_prompt_len must be >= 1 token, got {self.max_prompt_len}")
        if self.on_long_prompt not in ("truncate", "error"):
            raise ValueError(f"rollout.on_long_prompt must be 'truncate' or 'error', got {self.on_long_prompt!r}")


@dataclass
class MemoryOptions:
    """Memory and precision: what the step holds at once, and the weights' dtypes.

    Args:
        chunk_size: response rows whose logits the scoring pass holds at once (about 3 · chunk_size · V
            fp32); the loss uses chunks of a quarter of it (see `opdlab.step.plan_step`).
        micro_batch_size: rollout rows (prompts x samples) per forward/backward; the whole batch when null.
            Selection and normalisation always cover the whole batch (and all ranks), so the update does not
            depend on it; with several micro-batches the student forward runs twice (no-grad for scoring,
            with grad per micro-batch for the loss).
        gradient_checkpointing: recompute student activations in backward.
        student_dtype: the student's weight dtype: float32 (default; under bf16-mixed these are the fp32
            master weights), bfloat16 or float16.
        teacher_dtype: the frozen teacher's weight dtype: float32, bfloat16 (halves its memory; the GPU
            configs use it) or float16.
        shard_student: under a sharding strategy (ModelParallelStrategy), shard the student with FSDP2 as
            well as the teacher; the teacher is always sharded there.
    """

    chunk_size: int = SCORE_CHUNK_ROWS
    micro_batch_size: int | None = None
    gradient_checkpointing: bool = False
    student_dtype: str = "float32"
    teacher_dtype: str = "float32"
    shard_student: bool = True

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"memory.chunk_size must be >= 1 row, got {self.chunk_size}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"memory.micro_batch_size must be >= 1 or null (the whole batch), got {self.micro_batch_size}")
        for name in ("student_dtype", "teacher_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"memory.{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}")


@dataclass
class TrainingOptions:
    """The loss normalisation, safety limits and the seed.

    Args:
        loss_normalization: `kept` (mean over kept tokens) or `valid` (sum over kept tokens / valid response
            tokens). See `opdlab.step.loss_scale`.
        gradient_clip_val: clip the student's gradient norm to this value (null: no clipping).
        max_bad_steps: consecutive steps with non-finite log-probs or gradients that are skipped (with a
            warning, counted in `train/skipped_steps`) before training stops with an error.
        seed: seed of rollout sampling (per prompt, from its stream index) and of random selection.
    """

    loss_normalization: LossNormalization = "kept"
    gradient_clip_val: float | None = None
    max_bad_steps: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss_normalization not in ("kept", "valid"):
            raise ValueError(f"training.loss_normalization must be 'kept' or 'valid', got {self.loss_normalization!r}")
        if self.gradient_clip_val is not None and not self.gradient_clip_val > 0:
            raise ValueError("training.gradient_clip_val must be > 0 (a maximum gradient norm) or null for no "
                             f"clipping, got {self.gradient_clip_val}")
        if self.max_bad_steps < 0:
            raise ValueError(f"training.max_bad_steps must be >= 0 (0: stop at the first non-finite step), "
                             f"got {self.max_bad_steps}")


def as_options(cls, value):
    """A private copy of an options group, from the group itself, a dict (a checkpoint's saved
    hyperparameters) or None (the defaults)."""
    return cls() if value is None else cls(**value) if isinstance(value, dict) else dataclasses.replace(value)
