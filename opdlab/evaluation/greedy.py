"""Greedy held-out accuracy: the one place responses are decoded and checked by a task's verifier."""

from __future__ import annotations

from collections.abc import Callable

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
