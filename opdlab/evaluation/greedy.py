"""Greedy held-out accuracy: the one place responses are decoded and checked by a task's verifier."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchmetrics import MeanMetric

from opdlab.rollout import PromptBatch, Rollout, decode_responses, encode_prompts

Verify = Callable[[str, str], bool]


def verified(tokenizer, rollout: Rollout, answers: list[str], verify: Verify) -> list[bool]:
    """Whether each response of `rollout` verifies against its answer (one response per answer)."""
    texts = decode_responses(tokenizer, rollout)
    return [bool(verify(text, answer)) for text, answer in zip(texts, answers, strict=True)]


def greedy_accuracy(generate: Callable[[PromptBatch], Rollout], tokenizer, source, batch_size: int = 256) -> float:
    """Fraction of `source.eval_problems()` whose greedy response `generate(prompts)` verifies
    (`source.verify`), in batches of `batch_size` prompts."""
    problems, correct = source.eval_problems(), 0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        prompts = encode_prompts(tokenizer, [p.prompt for p in chunk], [p.answer for p in chunk],
                                 chat_template=getattr(source, "use_chat_template", False))
        correct += sum(verified(tokenizer, generate(prompts), prompts.answers, source.verify))
    return correct / max(len(problems), 1)


class HeldOutAccuracy(torch.nn.Module):
    """A fit's greedy held-out accuracy: the student's at every validation (and test), the teacher's once per run.
    A module, so its metrics move with the LightningModule that holds it."""

    def __init__(self) -> None:
        super().__init__()
        self.student, self.teacher = MeanMetric(), MeanMetric()
        self.teacher_done = False

    def update(self, tokenizer, verify: Verify, prompts: PromptBatch, student: Rollout, teacher: Rollout | None) -> None:
        for metric, rollout in ((self.student, student), (self.teacher, teacher)):
            if rollout is not None:
                metric.update(torch.tensor(verified(tokenizer, rollout, prompts.answers, verify), dtype=torch.float32))

    def compute(self, count_teacher: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the student's accuracy since the last call, the teacher's the first time `count_teacher` holds, else
        None); the sanity check's validation does not count for the teacher."""
        student = self.student.compute()
        self.student.reset()
        if self.teacher_done or not count_teacher:
            return student, None
        self.teacher_done = True
        return student, self.teacher.compute()
