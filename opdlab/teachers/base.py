"""The teacher-placement interface: where the teacher runs, and what a training step gets from it.

A placement is chosen with `--model.teacher_placement <name>` (entry-point group `opdlab.teacher_placements`);
by default `--model.teacher` decides: each placement says which teacher strings it `accepts` (`vllm_server` an
http(s) URL, a plugin e.g. `sglang://...`), and `local` takes the rest (a directory, a hub id, `toy:...`);
`opdlab.plugins.default_placement` asks them. The module calls, in order:

1. `check_spec(teacher)` when it is built: a teacher string this placement cannot use is refused;
2. `connect(teacher, tokenizer, max_sequence_len)` before any weights load: identity checks (a local
   teacher's tokenizer; a server's model, tokenizer, limits and log-probs). What the placement then gives
   (`signal`) decides whether the selector and divergence can be served (`check_teacher_needs`);
3. `load(student, tokenizer, options)` after the student loads: returns the frozen local model for the module
   to hold (None for a server) and fixes `columns`, the vocabulary both models' distributions cover;
4. every step, `request(rollout)` right after the rollout (a server's requests then run while the student's
   forward does), and `PendingTeacher.rows(...)` per micro-batch: rows on the rollout's device (the student's;
   the module refuses rows elsewhere);
5. `generate(prompts, max_new_tokens)` for the teacher's greedy accuracy at the first validation;
6. `close()` when the fit, validation or test ends, fails or is interrupted: threads stopped, requests in
   flight cancelled. A closed placement opens again on its next request.

Failures a placement reports to the user are `TeacherError`s (one line; the module adds the step).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from opdlab.console import OpdlabError
from opdlab.rollout import PromptBatch, Rollout
from opdlab.teachers.rows import TeacherRows
from opdlab.teachers.signal import TeacherSignal

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase


def is_url(teacher: str) -> bool:
    return teacher.strip().lower().startswith(("http://", "https://"))


def has_scheme(teacher: str) -> bool:
    """`teacher` starts with a URL scheme (`http://`, `sglang://`, ...): a placement's address, not a checkpoint."""
    head, sep, _ = teacher.strip().partition("://")
    return bool(sep) and head.replace("+", "").replace("-", "").replace(".", "").isalnum()


class TeacherError(OpdlabError, RuntimeError):
    """A teacher placement cannot serve this run (refused before training) or failed during it; one line for the
    user. The module adds where the run was (`in training step 12 ...`)."""


@dataclass(frozen=True)
class TeacherLoadOptions:
    """How the module wants a local teacher: weight dtype (`memory.teacher_dtype`) and the device mesh of a
    sharding strategy (None: no sharding)."""

    dtype: str = "float32"
    mesh: Any = None


class PendingTeacher(ABC):
    """The teacher's view of one rollout, possibly still being computed (a server's requests in flight)."""

    @abstractmethod
    def rows(self, rows: slice) -> TeacherRows:
        """`TeacherRows` over the response positions of rollout rows `rows` (n · L of them, flat), on the
        rollout's device."""


class TeacherPlacement(ABC):
    """Where the teacher runs. Subclasses are registered in the `opdlab.teacher_placements` entry-point group."""

    name: ClassVar[str] = "plugin"  # its entry-point name, for messages
    columns: int | None = None  # set by `load`: the vocabulary size both distributions cover

    @classmethod
    def accepts(cls, teacher: str) -> bool:
        """Whether this placement is the one a `--model.teacher` string implies when no placement is named (a
        server placement claims its URL scheme). Default: none."""
        return False

    @classmethod
    def for_needs(cls, need: str) -> TeacherPlacement:
        """The placement with default options, set up to give `need` ("none", "token", "topk" or "full") where an
        option decides it (a server: its log-probs per position). Default: `cls()`."""
        return cls()

    def check_spec(self, teacher: str) -> None:
        """Refuse (ValueError, one line) a `--model.teacher` value this placement cannot use."""

    @property
    @abstractmethod
    def signal(self) -> TeacherSignal:
        """What this placement gives per position (known from its options, before it connects)."""

    @abstractmethod
    def connect(self, teacher: str, tokenizer: PreTrainedTokenizerBase, max_sequence_len: int) -> None:
        """Before any weights load: check that `teacher` is usable with the student's tokenizer and with
        sequences of up to `max_sequence_len` tokens (prompt + response)."""

    @abstractmethod
    def load(self, student: nn.Module, tokenizer: PreTrainedTokenizerBase, options: TeacherLoadOptions) -> nn.Module | None:
        """After the student loads: make the teacher ready; return a local frozen model (None otherwise)."""

    def vocab_columns(self, student: nn.Module, tokenizer: PreTrainedTokenizerBase) -> int:
        """The logit columns a (new) student shares with the teacher."""
        return self.columns

    @abstractmethod
    def request(self, rollout: Rollout) -> PendingTeacher:
        """Start scoring every response position of `rollout`."""

    @abstractmethod
    def generate(self, prompts: PromptBatch, max_new_tokens: int, sync_ranks: bool = False) -> Rollout:
        """The teacher's greedy responses (its accuracy is reported once per run)."""

    def step_metrics(self) -> dict[str, float]:
        """Metrics of the requests since the last call (logged per step as `teacher/...`)."""
        return {}

    def close(self) -> None:
        """Release what the placement holds between steps (threads, connections); requests in flight are
        cancelled. Called at the end of every fit, validation and test, on failure and on Ctrl-C; idempotent."""

    def describe(self) -> str:
        return f"teacher: {type(self).__name__}, {self.signal.describe()}"


# Moved after 0.2.0 (discovery sits above the placements it discovers); the old path warns and works for one release.
from opdlab._deprecation import moved_names  # noqa: E402

__getattr__ = moved_names(__name__, {"default_placement": "opdlab.plugins:default_placement"})
