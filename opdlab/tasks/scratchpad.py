"""Scratchpad addition: long responses of structured work ending in an answer (the long-response toy).

The problems are `AdditionTask`'s (reversed operands: `4321+8765=` asks for 1234 + 5678), but the response
works column by column before answering, one step per digit, least significant first:

    4+8+0=2c1|3+7+1=1c1|2+6+1=9c0|1+5+0=6c0|:21960

Step i copies the two operand digits and the incoming carry, then writes the sum digit and the outgoing
carry: `a+b+c=sCc'|`. The answer after `:` repeats the sum digits and the final carry. For 4-digit
operands that is 4 x 10 + 6 = 46 characters plus EOS; for 6 digits, 68.

Most tokens are easy (copying operand digits from the prompt, the carry from the previous step, the
separators, the answer from the steps); the hard ones are each step's sum digit and carry (2 in 10).
`verify` checks only the answer after the last `:`, so any way of writing the steps is correct.

A *spelling* may write some steps with the operands swapped (`b+a+c=...`): equally valid, and a model
taught that spelling disagrees with one that was not where the steps begin, with the teacher's token
outside its top candidates (incompatible disagreement, see docs/method.md §2), while its computational
errors are disagreements the teacher can fix (teachable).
"""

from __future__ import annotations

import random

from opdlab.tasks.addition import CHARSET as DIGIT_CHARSET
from opdlab.tasks.addition import AdditionTask

CHARSET = DIGIT_CHARSET + "c|:"


def work(prompt: str, swapped: set[int] | frozenset[int] = frozenset(), carry_mark: str = "c") -> str:
    """The scratchpad response to a reversed-addition prompt (`4321+8765=`); steps in `swapped` write the
    second operand's digit first; `carry_mark` is written between each step's sum digit and its carry ('c', or
    '=' in the other style)."""
    a, b = prompt.rstrip("=").split("+")
    carry, steps, digits = 0, [], []
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        total = int(x) + int(y) + carry
        first, second = (y, x) if i in swapped else (x, y)
        steps.append(f"{first}+{second}+{carry}={total % 10}{carry_mark}{total // 10}|")
        digits.append(str(total % 10))
        carry = total // 10
    return "".join(steps) + ":" + "".join(digits) + str(carry)


def final_answer(response: str) -> str:
    """The text after the last `:` (stripped), or '' when there is none."""
    head, sep, tail = response.strip().rpartition(":")
    return tail.strip() if sep else ""


class ScratchpadAdditionTask(AdditionTask):
    """Reversed `digits`-digit addition answered through a column-by-column scratchpad: `AdditionTask`'s
    problems and held-out sets, its own verifier and demonstrations.

    Args:
        digits: operand width (responses are 10 · digits + digits + 2 characters).
        num_eval: size of the held-out evaluation set (pairs never seen in training).
        seed: seed of the training stream and of the held-out sets.
        num_test: size of the held-out test set (`opdlab test`).
        swap_prob: for pre-training demonstrations only: the probability of writing a step with its
            operands swapped, one for all steps or one per step (0: never, the teacher's spelling; the
            long toy's student always swaps step 0 and swaps step 1 half the time).
        carry_mark_prob: for pre-training demonstrations only: the probability that a demonstration writes '='
            instead of 'c' before every step's carry (`4+8+0=2=1|`): a style chosen once per response, which a
            reader can follow once the first step has shown it.
    """

    charset = CHARSET  # the toy tokenizer's characters
    max_response_tokens: int

    def __init__(self, digits: int = 4, num_eval: int = 256, seed: int = 0, num_test: int | None = None,
                 swap_prob: float | list[float] = 0.0, carry_mark_prob: float = 0.0) -> None:
        super().__init__(digits=digits, num_eval=num_eval, seed=seed, num_test=num_test)
        probs = [swap_prob] * digits if isinstance(swap_prob, (int, float)) else list(swap_prob)
        if len(probs) != digits or not all(0.0 <= p <= 1.0 for p in probs):
            raise ValueError(f"swap_prob must be one probability in [0, 1] or {digits} of them (one per step), "
                             f"got {swap_prob}")
        if not 0.0 <= carry_mark_prob <= 1.0:
            raise ValueError(f"carry_mark_prob must be a probability in [0, 1], got {carry_mark_prob}")
        self.swap_prob, self.carry_mark_prob = probs, carry_mark_prob
        self.max_response_tokens = 11 * digits + 3  # the response, EOS and a little slack

    def verify(self, response: str, answer: str) -> bool:
        """True when the answer after the last `:` is the sum (the steps may be written any way)."""
        return final_answer(response) == answer.strip()

    def answer_key(self, response: str) -> str | None:
        return final_answer(response) or None

    def demonstration(self, index: int) -> tuple[str, str, str]:
        """(prompt, context, target) of pre-training example `index`: the scratchpad, some steps swapped."""
        problem = self.problem_at(index)
        rng = random.Random(f"swap-{self.seed}-{index}")
        swapped = {i for i, p in enumerate(self.swap_prob) if rng.random() < p}
        mark = "=" if self.carry_mark_prob and random.Random(f"mark-{self.seed}-{index}").random() < self.carry_mark_prob else "c"
        target = work(problem.prompt, swapped, mark)
        return problem.prompt, target, target
