"""What the teacher says at a set of response positions, whatever its placement.

Scoring and the loss never call the teacher themselves: they take `TeacherRows`, one entry per response
position (flat, sequence-major), and ask each chunk for

- `logits(work)`: the teacher's next-token logits (R, V) in fp32, exact, or None when the placement only
  gives its top log-probs;
- `top_logprobs`: the teacher's top-k log-probs and the sampled token's (`TopLogprobs`), when that is all
  there is (docs/method.md §2.6 says what is then exact, bounded or approximated).

Three kinds: `HeadRows` (a local teacher's final hidden states and LM head: logits made chunk by chunk),
`DenseRows` (full-vocabulary log-probs from a server) and `SparseRows` (top-k log-probs from a server).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from opdlab.heads import Workspace, head_logits

Index = slice | torch.Tensor


@dataclass(frozen=True)
class TopLogprobs:
    """The teacher's log-probs at a few token ids per position: its top-k and the sampled token.

    ids, logp, known: (R, J) with J = top_k + 1. Columns 0 .. top_k-1 hold the teacher's top-k, most likely
    first; the last column holds the sampled token when it is not among them (`known` is False there
    otherwise, and wherever a server gave fewer entries). `vocab` is V, the size of the distribution.
    """

    ids: torch.Tensor  # (R, J) long
    logp: torch.Tensor  # (R, J) fp32
    known: torch.Tensor  # (R, J) bool
    top_k: int
    vocab: int

    def __getitem__(self, index: Index) -> TopLogprobs:
        return replace(self, ids=self.ids[index], logp=self.logp[index], known=self.known[index])

    def __len__(self) -> int:
        return self.ids.shape[0]

    def tail_mass(self) -> torch.Tensor:
        """(R,) the teacher's probability outside the known ids: 1 - Σ known p, clamped to [0, 1]."""
        return (1 - (self.logp.exp() * self.known).sum(-1)).clamp(0.0, 1.0)

    def unseen_logp(self) -> torch.Tensor:
        """(R,) log-prob given to each token whose probability the teacher did not send: the tail mass shared
        equally by the V - (known ids) unseen tokens. This is the maximum-entropy completion of what is known,
        and never exceeds the k-th largest probability (each unseen token has at most that, so their mean
        does too)."""
        unseen = (self.vocab - self.known.sum(-1)).clamp_min(1)
        return self.tail_mass().log() - unseen.float().log()

    def lookup(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logp (R, Q), known (R, Q)) at the ids `query` (R, Q): the sent log-prob where the id is known,
        else `unseen_logp`."""
        match = (query[:, :, None] == self.ids[:, None, :]) & self.known[:, None, :]  # (R, Q, J)
        found = match.any(-1)
        sent = torch.where(match, self.logp[:, None, :], torch.full_like(self.logp[:, None, :], -torch.inf)).amax(-1)
        return torch.where(found, sent, self.unseen_logp()[:, None].expand_as(sent)), found

    def kth_probability(self) -> torch.Tensor:
        """(R,) the smallest of the top-k probabilities: no unseen token has more."""
        return self.logp[:, self.top_k - 1].exp() * self.known[:, self.top_k - 1]


class TeacherRows(ABC):
    """The teacher's view of R response positions; indexing selects positions (a slice or flat indices)."""

    @abstractmethod
    def __getitem__(self, index: Index) -> TeacherRows: ...

    @abstractmethod
    def __len__(self) -> int: ...

    def logits(self, work: Workspace | None = None) -> torch.Tensor | None:
        """(R, V) fp32 logits (exact), or None where only top log-probs exist."""
        return None

    @property
    def top_logprobs(self) -> TopLogprobs | None:
        """The top log-probs, where `logits` is None."""
        return None


class HeadRows(TeacherRows):
    """A local teacher: final hidden states (R, H) and its LM head, applied when a chunk asks."""

    def __init__(self, hidden: torch.Tensor, head: Callable[..., torch.Tensor]) -> None:
        self.hidden, self.head = hidden, head

    def __getitem__(self, index: Index) -> HeadRows:
        return HeadRows(self.hidden[index], self.head)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def logits(self, work: Workspace | None = None) -> torch.Tensor:
        if work is None:
            return self.head(self.hidden).float()
        return head_logits(self.head, self.hidden, work, "teacher")


class DenseRows(TeacherRows):
    """A served teacher's full-vocabulary log-probs (R, V); log-probs are valid logits."""

    def __init__(self, logp: torch.Tensor) -> None:
        self.logp = logp

    def __getitem__(self, index: Index) -> DenseRows:
        return DenseRows(self.logp[index])

    def __len__(self) -> int:
        return self.logp.shape[0]

    def logits(self, work: Workspace | None = None) -> torch.Tensor:
        return self.logp


class SparseRows(TeacherRows):
    """A served teacher's top-k log-probs and the sampled token's."""

    def __init__(self, top: TopLogprobs) -> None:
        self.top = top

    def __getitem__(self, index: Index) -> SparseRows:
        return SparseRows(self.top[index])

    def __len__(self) -> int:
        return len(self.top)

    @property
    def top_logprobs(self) -> TopLogprobs:
        return self.top


def as_teacher_rows(teacher: torch.Tensor | TeacherRows, head: Callable[..., torch.Tensor] | None) -> TeacherRows:
    """`teacher` itself, or a local teacher's hidden states (..., H) flattened to rows with its head."""
    if isinstance(teacher, TeacherRows):
        return teacher
    if head is None:
        raise TypeError("teacher hidden states need the teacher's head (teacher_head)")
    return HeadRows(teacher.reshape(-1, teacher.shape[-1]), head)
