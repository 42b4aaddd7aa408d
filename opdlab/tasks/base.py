"""The prompt-source interface: where prompts come from and how answers are checked.

A `PromptSource` streams training problems, owns a held-out evaluation set that never appears in
training, and verifies a decoded response against a reference answer. The DataModule (`opdlab.data`)
only batches what a source yields; the LightningModule only calls `verify`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

from opdlab.console import OpdlabError


class DataError(OpdlabError, ValueError):
    """A prompt file, folder or option that cannot give problems (printed as one `opdlab: error:` line naming the
    file, option or value and what to do). A ValueError too, so callers that catch those keep working."""


@dataclass(frozen=True)
class Problem:
    """One prompt with its reference answer (the answer is used for evaluation only)."""

    prompt: str
    answer: str


class PromptSource(ABC):
    """Streams training problems and holds the evaluation problems of one task."""

    @abstractmethod
    def train_problems(self, start: int = 0) -> Iterator[Problem]:
        """Yield training problems forever, deterministically, beginning at stream index `start`.

        Index-addressable streams make resume exact: the DataModule records how many problems were
        consumed and restarts the stream there.
        """

    @abstractmethod
    def eval_problems(self) -> list[Problem]:
        """The held-out problems used by validation (disjoint from `train_problems`)."""

    def test_problems(self) -> list[Problem] | None:
        """A second held-out set for `opdlab test`, disjoint from training and evaluation; None if the
        source has none (then `opdlab test` says so)."""
        return None

    @abstractmethod
    def verify(self, response: str, answer: str) -> bool:
        """True when a decoded response is a correct answer to the problem."""

    def answer_key(self, response: str) -> str | None:
        """The answer a response gives, normalised so that equal answers are equal strings (majority voting in
        `opdlab eval`); None when it gives none. Default: the stripped response."""
        return response.strip() or None

    # Prompt formatting: plain text by default; chat sources set this to True.
    use_chat_template: bool = False
