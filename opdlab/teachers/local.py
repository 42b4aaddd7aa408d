"""`local` (the default): the teacher as a Hugging Face model inside every training process.

Frozen (eval mode, no grad, never in the optimizer), loaded in `memory.teacher_dtype`, sharded with FSDP2
under a sharding strategy, and exact: its final hidden states are computed once per micro-batch and its LM
head is applied chunk by chunk where scoring and the loss need logits (`HeadRows`).
"""

from __future__ import annotations

import torch

from opdlab.heads import LogitHead
from opdlab.models import (
    check_tokenizers_compatible,
    check_vocab_sizes,
    final_hidden_states,
    freeze,
    load_causal_lm,
    load_tokenizer,
)
from opdlab.rollout import PromptBatch, Rollout, response_positions, sample_rollouts
from opdlab.teachers.base import PendingTeacher, TeacherLoadOptions, TeacherPlacement, has_scheme
from opdlab.teachers.rows import HeadRows
from opdlab.teachers.signal import TeacherSignal


class LocalTeacher(TeacherPlacement):
    """The teacher in this process: a local directory, a hub id or `toy:<name>/teacher` (exact; the default)."""

    name = "local"

    def __init__(self) -> None:
        self.model = self.head = self.path = None

    @classmethod
    def accepts(cls, teacher: str) -> bool:
        return not has_scheme(teacher)

    def check_spec(self, teacher: str) -> None:
        if not teacher.strip():
            raise ValueError("--model.teacher is empty; give a checkpoint directory, a hub id or a toy: name")
        if has_scheme(teacher):
            raise ValueError(f"teacher {teacher!r} is an address, and the local teacher placement loads a model; leave "
                             "--model.teacher_placement unset (the placement that accepts the address is chosen) or "
                             "name a checkpoint")

    @property
    def signal(self) -> TeacherSignal:
        return TeacherSignal(top_logprobs=None)

    def connect(self, teacher: str, tokenizer, max_sequence_len: int) -> None:
        check_tokenizers_compatible(tokenizer, load_tokenizer(teacher))
        self.path, self.eos, self.pad = teacher, tokenizer.eos_token_id, tokenizer.pad_token_id

    def load(self, student, tokenizer, options: TeacherLoadOptions):
        from opdlab.sharding import shard_model

        self.model = freeze(load_causal_lm(self.path, options.dtype))
        if options.mesh is not None:
            shard_model(self.model, options.mesh)
        self.columns = check_vocab_sizes(student, self.model, tokenizer)
        self.head = LogitHead(self.model, self.columns)
        return self.model

    def vocab_columns(self, student, tokenizer) -> int:
        return check_vocab_sizes(student, self.model, tokenizer)

    def request(self, rollout: Rollout) -> LocalPending:
        return LocalPending(self, rollout)

    def generate(self, prompts: PromptBatch, max_new_tokens: int, sync_ranks: bool = False) -> Rollout:
        return sample_rollouts(self.model, prompts, self.eos, self.pad, max_new_tokens=max_new_tokens,
                               temperature=0.0, sync_ranks=sync_ranks)

    def describe(self) -> str:
        return f"teacher: local model {self.path} (exact)"


class LocalPending(PendingTeacher):
    """A local teacher's forward runs when a micro-batch asks (no grad)."""

    def __init__(self, teacher: LocalTeacher, rollout: Rollout) -> None:
        self.teacher, self.rollout = teacher, rollout

    @torch.no_grad()
    def rows(self, rows: slice) -> HeadRows:
        part = self.rollout.rows(rows)
        hidden = final_hidden_states(self.teacher.model, part.input_ids, part.attention_mask)[:, response_positions(part)]
        return HeadRows(hidden.flatten(0, 1), self.teacher.head)
