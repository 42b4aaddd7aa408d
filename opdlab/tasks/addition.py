"""Reversed-digit addition: the embedded toy task.

`123 + 456 = 579` is written least-significant digit first with fixed widths, `321+654=9750`, so a
left-to-right model can carry like a person does. The prompt is `321+654=` and the answer `9750`
(digits + 1 characters, zero padded). Character tokens only (see `opdlab.toy.build_char_tokenizer`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from opdlab.tasks.base import Problem, PromptSource

CHARSET = "0123456789+="


def format_problem(a: int, b: int, digits: int) -> Problem:
    """Problem for a + b with operands and answer written least-significant digit first."""
    rev = lambda x, width: str(x).zfill(width)[::-1]  # noqa: E731
    return Problem(prompt=f"{rev(a, digits)}+{rev(b, digits)}=", answer=rev(a + b, digits + 1))


class AdditionTask(PromptSource):
    """Reversed `digits`-digit addition with exact-match verification.

    Args:
        digits: operand width (2 trains a near-perfect teacher in well under a minute; 3 is the default toy).
        num_eval: size of the held-out evaluation set (validation); those pairs never appear in training.
        num_test: size of the held-out test set (`opdlab test`), disjoint from training and evaluation
            (default: 256, or what the problem space leaves after num_eval for 1-digit addition).
        seed: seed of the training stream and of the held-out sets.
    """

    def __init__(self, digits: int = 3, num_eval: int = 256, seed: int = 0, num_test: int | None = None) -> None:
        if not 1 <= digits <= 6:
            raise ValueError(f"digits must be in [1, 6], got {digits}")
        space = (10**digits) ** 2
        if num_test is None:
            num_test = max(0, min(256, space // 4 - num_eval))
        if not 0 < num_eval <= space // 4 or not 0 <= num_test <= space // 4 - num_eval:
            raise ValueError(
                f"num_eval must be in [1, {space // 4}] and num_eval + num_test <= {space // 4} for {digits}-digit "
                f"addition, got num_eval={num_eval}, num_test={num_test}"
            )
        self.digits, self.num_eval, self.num_test, self.seed = digits, num_eval, num_test, seed
        rng = random.Random(f"eval-{seed}-{digits}")
        pairs: list[tuple[int, int]] = []  # the evaluation pairs first (unchanged by num_test), then the test pairs
        seen: set[tuple[int, int]] = set()
        while len(pairs) < num_eval + num_test:
            pair = (rng.randrange(10**digits), rng.randrange(10**digits))
            if pair not in seen:
                seen.add(pair)
                pairs.append(pair)
        self._eval_pairs, self._test_pairs = pairs[:num_eval], pairs[num_eval:]
        self._held_out = seen

    def problem_at(self, index: int) -> Problem:
        """The training problem at stream position `index` (never a held-out pair)."""
        rng = random.Random(f"train-{self.seed}-{self.digits}-{index}")
        while True:
            pair = (rng.randrange(10**self.digits), rng.randrange(10**self.digits))
            if pair not in self._held_out:
                return format_problem(*pair, self.digits)

    def train_problems(self, start: int = 0) -> Iterator[Problem]:
        index = start
        while True:
            yield self.problem_at(index)
            index += 1

    def eval_problems(self) -> list[Problem]:
        return [format_problem(a, b, self.digits) for a, b in self._eval_pairs]

    def test_problems(self) -> list[Problem] | None:
        return [format_problem(a, b, self.digits) for a, b in self._test_pairs] or None

    def verify(self, response: str, answer: str) -> bool:
        return response.strip() == answer
