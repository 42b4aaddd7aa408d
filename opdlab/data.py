"""The DataModule: streams training prompts from a `PromptSource` and serves its held-out problems.

Batches are plain text (`{"prompts": [...], "answers": [...]}`); the LightningModule tokenises them
with the student's tokenizer, so data and models stay independent. The training stream is
index-addressable: the DataModule counts the prompts the training loop consumed and saves that count
in checkpoints, so a resumed run continues the stream where it stopped (at batch granularity).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import lightning as L
from torch.utils.data import DataLoader, IterableDataset

from opdlab.tasks.addition import AdditionTask
from opdlab.tasks.base import Problem, PromptSource


def collate_problems(items: list[Problem] | list[tuple[int, Problem]]) -> dict[str, list]:
    """Batch problems (optionally with their stream indices) into lists of prompts, answers, indices."""
    pairs = [item if isinstance(item, tuple) else (i, item) for i, item in enumerate(items)]
    return {
        "prompts": [p.prompt for _, p in pairs],
        "answers": [p.answer for _, p in pairs],
        "indices": [i for i, _ in pairs],
    }


def lost_characters(tokenizer, texts: list[str], sample: int = 64) -> tuple[str, str] | None:
    """(the characters, a text holding them) of the first `sample` texts that `tokenizer` cannot represent: gone
    after encoding and decoding (mapped to its unknown token, or dropped, e.g. words on the character-level toy);
    None when every character survives. Whitespace is ignored (tokenizers normalise it). Every command that feeds
    prompts to a model can say so once: the models cannot read such characters, and accuracy would read 0% with
    no hint why. A prompt_template's own characters count: they are in every prompt."""
    for text in texts[:sample]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        back = tokenizer.decode(ids, skip_special_tokens=True)
        lost = sorted(set(text) - set(back) - set(" \t\n\r"))
        if lost:
            return "".join(lost), text
    return None


class PromptStream(IterableDataset):
    """An endless stream of (index, problem); rank r of w reads indices start + r, start + r + w, ...

    The index (the problem's position in the stream) seeds that prompt's rollout sampling, so a prompt
    gets the same samples however the batch is split.
    """

    def __init__(self, source: PromptSource, start: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.source, self.start, self.rank, self.world_size = source, start, rank, world_size

    def __iter__(self) -> Iterator[Problem]:
        for i, problem in enumerate(self.source.train_problems(self.start)):
            if i % self.world_size == self.rank:
                yield self.start + i, problem


class PromptDataModule(L.LightningDataModule):
    """Training prompts and held-out evaluation problems.

    Args:
        source: where prompts come from: `opdlab.tasks.AdditionTask` (the toy), `opdlab.tasks.JsonlPrompts`,
            or any `PromptSource` subclass.
        batch_size: prompts per training step and rank (each is sampled `num_samples` times by the model).
        val_batch_size: prompts per validation batch.
    """

    def __init__(self, source: PromptSource | None = None, batch_size: int = 64, val_batch_size: int = 256) -> None:
        super().__init__()
        if batch_size < 1 or val_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got batch_size={batch_size}, val_batch_size={val_batch_size}")
        self.source = source if source is not None else AdditionTask()
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.consumed = 0  # training prompts consumed by the training loop, over all ranks

    def verify(self, response: str, answer: str) -> bool:
        return self.source.verify(response, answer)

    def train_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        stream = PromptStream(self.source, start=self.consumed, rank=rank, world_size=world)
        return DataLoader(stream, batch_size=self.batch_size, collate_fn=collate_problems)

    def read_ahead(self, skip_batches: int = 0) -> Iterator[dict]:
        """The training batches this rank's `train_dataloader()` yields from now on, after its next `skip_batches`
        (the rollout pipeline reads them before the training loop does, and checks they are the same)."""
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        start = self.consumed + skip_batches * self.batch_size * world
        items = iter(PromptStream(self.source, start=start, rank=rank, world_size=world))
        while chunk := list(itertools.islice(items, self.batch_size)):
            yield collate_problems(chunk)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.source.eval_problems(), batch_size=self.val_batch_size, collate_fn=collate_problems)

    def test_dataloader(self) -> DataLoader:
        problems = self.source.test_problems()
        if not problems:
            raise ValueError(f"{type(self.source).__name__} has no test split: `opdlab test` needs one (the toy "
                             "tasks: num_test > 0; JsonlPrompts: test_path); `opdlab validate` evaluates the "
                             "validation split")
        return DataLoader(problems, batch_size=self.val_batch_size, collate_fn=collate_problems)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        # Called when the loop takes a batch (not when it prefetches), so the count matches the steps run.
        if self.trainer is not None and self.trainer.training:
            self.consumed += len(batch["prompts"]) * self.trainer.world_size
        return batch

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state_dict: dict) -> None:
        self.consumed = int(state_dict["consumed"])
