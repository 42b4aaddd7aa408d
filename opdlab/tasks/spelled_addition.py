"""Spelled reversed addition: one sum, many correct spellings (the toy where D^L and D^I separate).

The problems are those of `AdditionTask` (`21+43=` asks for 12 + 34 written least-significant digit
first, `640`), but every answer digit d may be written either as the digit or as the letter
`"abcdefghij"[d]`: `640`, `gea`, `6e0` ... are all correct and `verify` accepts each of them.

The toy built on it (`toy:spell2/...`, see `opdlab.toy.TOYS`) pre-trains teacher and student on
*different* correct spellings, so they disagree in two ways (docs/method.md §2):

- the teacher writes digits everywhere; the student writes a letter at answer position 0, either at
  position 1 (50/50) and a digit at position 2. Where the student already mixes both spellings, the
  teacher's digit is among its top-K candidates: *learnable* disagreement (high D, high C). Where it
  always writes a letter, the teacher's digit is not: *incompatible* disagreement (high D, low C).
- the student is weak on carries, so the digit it ranks first is sometimes simply wrong (learnable too).

`demonstration` produces the pre-training sequences of one spelling policy; the DataModule never calls
it, so `fit`, `diagnose` and `compare` see the same prompts and the same verifier for every policy.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from opdlab.tasks.addition import CHARSET as DIGIT_CHARSET
from opdlab.tasks.addition import AdditionTask
from opdlab.tasks.base import Problem, PromptSource

LETTERS = "abcdefghij"  # LETTERS[d] spells digit d
CHARSET = DIGIT_CHARSET + LETTERS
TO_DIGIT = str.maketrans(LETTERS, "0123456789")


def spell(answer: str, as_letter: Sequence[bool]) -> str:
    """Write the digits of `answer` as letters where `as_letter` is True."""
    return "".join(LETTERS[int(c)] if letter else c for c, letter in zip(answer, as_letter, strict=True))


def canonical(response: str) -> str:
    """The all-digit spelling of a response (letters a-j -> digits 0-9; other characters unchanged)."""
    return response.strip().translate(TO_DIGIT)


class SpelledAdditionTask(PromptSource):
    """Reversed `digits`-digit addition whose answer digits may be spelled as digits or letters.

    Args:
        digits: operand width (the answer has digits + 1 characters).
        num_eval: size of the held-out evaluation set (pairs never seen in training).
        seed: seed of the training stream and of the held-out sets.
        num_test: size of the held-out test set (`opdlab test`), disjoint from training and evaluation.
        letter_prob: for pre-training demonstrations only: per answer position, the probability of
            spelling that digit as a letter (length digits + 1; default all digits).
        context_letter_prob: for pre-training demonstrations only: the probability of spelling each
            *context* digit as a letter while the target keeps `letter_prob`'s spelling. A model trained
            with it (the toy teacher) has seen every mixed spelling in its context and still answers in
            its own spelling, so it gives sensible targets on student-written contexts.
    """

    charset = CHARSET  # the toy tokenizer's characters

    def __init__(
        self,
        digits: int = 2,
        num_eval: int = 256,
        seed: int = 0,
        letter_prob: list[float] | None = None,
        context_letter_prob: float | None = None,
        num_test: int | None = None,
    ) -> None:
        self.addition = AdditionTask(digits=digits, num_eval=num_eval, seed=seed, num_test=num_test)
        self.digits, self.seed = digits, seed
        self.letter_prob = list(letter_prob) if letter_prob is not None else [0.0] * (digits + 1)
        if len(self.letter_prob) != digits + 1 or not all(0.0 <= p <= 1.0 for p in self.letter_prob):
            raise ValueError(
                f"letter_prob must hold {digits + 1} probabilities in [0, 1] (one per answer digit), "
                f"got {letter_prob}"
            )
        if context_letter_prob is not None and not 0.0 <= context_letter_prob <= 1.0:
            raise ValueError(f"context_letter_prob must be in [0, 1] or None, got {context_letter_prob}")
        self.context_letter_prob = context_letter_prob

    def problem_at(self, index: int) -> Problem:
        """The training problem at stream position `index`; its answer is the all-digit spelling."""
        return self.addition.problem_at(index)

    def train_problems(self, start: int = 0) -> Iterator[Problem]:
        return self.addition.train_problems(start)

    def eval_problems(self) -> list[Problem]:
        return self.addition.eval_problems()

    def test_problems(self) -> list[Problem] | None:
        return self.addition.test_problems()

    def verify(self, response: str, answer: str) -> bool:
        """True for every spelling of the right sum (`640`, `gea`, `6e0`, ...)."""
        return canonical(response) == canonical(answer)

    def answer_key(self, response: str) -> str | None:
        return canonical(response) or None

    def demonstration(self, index: int) -> tuple[str, str, str]:
        """(prompt, context answer, target answer) of pre-training example `index`.

        A language model is trained to predict target character t from the prompt and the context
        characters before t; context and target spell the same digits (they are equal unless
        `context_letter_prob` is set). Deterministic in (seed, index).
        """
        problem = self.problem_at(index)
        rng = random.Random(f"spelling-{self.seed}-{index}")
        target = spell(problem.answer, [rng.random() < p for p in self.letter_prob])
        if self.context_letter_prob is None:
            return problem.prompt, target, target
        context = spell(problem.answer, [rng.random() < self.context_letter_prob for _ in problem.answer])
        return problem.prompt, context, target
