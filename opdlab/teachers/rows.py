"""What the teacher says at a set of response positions, whatever its placement, with its own maths.

Scoring and the loss never call the teacher, and never ask what kind it is: they take `TeacherRows`, one entry
per response position (flat, sequence-major), and ask each chunk for

- `chunk_stats(student, scoring, work)`: the teacher's half of the selection statistics, given the student's
  half (`opdlab.chunks.StudentChunk`);
- `loss_fields(needs_logits, work)`: what the divergence's `LossInputs` gets of the teacher.

Two kinds of maths: `ExactRows` (the whole distribution: every statistic exact), with `HeadRows` (a local
teacher's final hidden states and LM head: logits made chunk by chunk) and `DenseRows` (full-vocabulary
log-probs from a server); and `SparseRows` (a server's top-k log-probs and the sampled token's: C bounded, D
completed, docs/method.md §2.6). Rows live on one device (`device`); placements build them on the student's
device (`PendingTeacher.rows` is given it), and the step refuses rows elsewhere.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from opdlab import maths
from opdlab.chunks import Scoring, StudentChunk, logsumexp_entropy
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

    def to(self, device: torch.device | str) -> TopLogprobs:
        return replace(self, ids=self.ids.to(device), logp=self.logp.to(device), known=self.known.to(device))

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

    @abstractmethod
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor the rows hold (device checks and moves read this)."""

    @abstractmethod
    def to(self, device: torch.device | str) -> TeacherRows:
        """The same rows on `device`."""

    @abstractmethod
    def chunk_stats(self, student: StudentChunk, scoring: Scoring, work: Workspace) -> dict:
        """The teacher's half of these rows' statistics (`opdlab.scoring.TokenStats` field -> (R,) or (R, K)):
        `teacher_token_logp`, `compatibility` (C), `compatibility_upper` (C's upper bound: C itself where the
        distribution is known), `disagreement` (D), and `teacher_topk_*` / `teacher_entropy` / `forward_kl`,
        `reverse_kl` when `scoring` asks. Raises ValueError for what these rows cannot give."""

    @abstractmethod
    def loss_fields(self, needs_logits: bool, work: Workspace | None = None) -> dict:
        """What `LossInputs` gets of the teacher: `teacher_logits` (R, V) and `teacher_top_logprobs`, each None
        where these rows do not have it or `needs_logits` (the divergence reads the distribution) is False."""


def to_device(rows: TeacherRows, device: torch.device) -> TeacherRows:
    """`rows` on `device` (the same object when every tensor is there already)."""
    return rows if all(t.device == device for t in rows.tensors()) else rows.to(device)


class ExactRows(TeacherRows):
    """Rows whose whole distribution is known: `logits(work)` gives (R, V) fp32 logits, and every statistic
    and loss is exact."""

    @abstractmethod
    def logits(self, work: Workspace | None = None) -> torch.Tensor:
        """(R, V) fp32 logits (log-probs are valid logits)."""

    def chunk_stats(self, student: StudentChunk, scoring: Scoring, work: Workspace) -> dict:
        """Top-K and gathers read the logits directly (log p = logit - logsumexp): each model's vocabulary is
        streamed a handful of times and no (R, V) log-prob tensor is built. The full-vocabulary entropy and
        KLs (when asked) cost extra passes."""
        t_logits, k = self.logits(work), scoring.top_k
        t_top, t_ids = t_logits.topk(k, -1)
        union = torch.cat([student.ids, t_ids], -1)  # (R, 2K)
        t_lse, t_entropy = logsumexp_entropy(t_logits, t_top[:, 0], t_ids[:, 0], work, scoring.full_entropy)
        t_union = t_logits.gather(-1, union) - t_lse[:, None]
        compatibility = t_union[:, :k].exp().sum(-1).clamp(0.0, 1.0)  # teacher mass on the student's top-K
        out = {
            "teacher_token_logp": t_logits.gather(-1, student.tokens[:, None]).squeeze(-1) - t_lse,
            "compatibility": compatibility,
            "compatibility_upper": compatibility,
            "disagreement": maths.union_kl(student.logp_at(union), t_union, student.ids, t_ids),
        }
        if scoring.topk_lists:
            out.update(teacher_topk_ids=t_ids, teacher_topk_logp=t_top - t_lse[:, None])
        if scoring.full_entropy:
            out["teacher_entropy"] = t_entropy
        if scoring.full_kl:  # two more (R, V) temporaries per chunk
            s_logp, t_logp = student.full_logp(), t_logits - t_lse[:, None]
            out["forward_kl"] = maths.masked_kl(t_logp, s_logp)
            out["reverse_kl"] = maths.masked_kl(s_logp, t_logp)
        return out

    def loss_fields(self, needs_logits: bool, work: Workspace | None = None) -> dict:
        return {"teacher_logits": self.logits(work) if needs_logits else None, "teacher_top_logprobs": None}


class HeadRows(ExactRows):
    """A local teacher: final hidden states (R, H) and its LM head, applied when a chunk asks."""

    def __init__(self, hidden: torch.Tensor, head: Callable[..., torch.Tensor]) -> None:
        self.hidden, self.head = hidden, head

    def __getitem__(self, index: Index) -> HeadRows:
        return HeadRows(self.hidden[index], self.head)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.hidden,)

    def to(self, device: torch.device | str) -> HeadRows:
        return HeadRows(self.hidden.to(device), self.head)

    def logits(self, work: Workspace | None = None) -> torch.Tensor:
        if work is None:
            return self.head(self.hidden).float()
        return head_logits(self.head, self.hidden, work, "teacher")


class DenseRows(ExactRows):
    """A served teacher's full-vocabulary log-probs (R, V); log-probs are valid logits."""

    def __init__(self, logp: torch.Tensor) -> None:
        self.logp = logp

    def __getitem__(self, index: Index) -> DenseRows:
        return DenseRows(self.logp[index])

    def __len__(self) -> int:
        return self.logp.shape[0]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.logp,)

    def to(self, device: torch.device | str) -> DenseRows:
        return DenseRows(self.logp.to(device))

    def logits(self, work: Workspace | None = None) -> torch.Tensor:
        return self.logp


class SparseRows(TeacherRows):
    """A served teacher's top-k log-probs and the sampled token's (docs/method.md §2.6).

    Exact: both token log-probs, H and the student's entropy. C (`compatibility`) is the lower bound Σ p_T over
    the student's top-K tokens whose teacher probability is known; `compatibility_upper` adds what the unknown
    ones can hold at most (each at most the k-th probability, together at most the tail mass). D uses the
    union of the student's top-K and the teacher's top-min(K, k), with the maximum-entropy completion
    (`TopLogprobs.unseen_logp`) for tokens the teacher did not send. The teacher's entropy is NaN (unknown);
    the full-vocabulary KLs are refused.
    """

    def __init__(self, top: TopLogprobs) -> None:
        self.top = top

    def __getitem__(self, index: Index) -> SparseRows:
        return SparseRows(self.top[index])

    def __len__(self) -> int:
        return len(self.top)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.top.ids, self.top.logp, self.top.known)

    def to(self, device: torch.device | str) -> SparseRows:
        return SparseRows(self.top.to(device))

    @property
    def top_logprobs(self) -> TopLogprobs:
        return self.top

    def chunk_stats(self, student: StudentChunk, scoring: Scoring, work: Workspace) -> dict:
        teacher, k = self.top, scoring.top_k
        if scoring.full_kl:
            raise ValueError("full-vocabulary KLs need the teacher's whole distribution; a teacher that sends its top-"
                             f"{teacher.top_k} log-probs cannot give them (docs/method.md §2.6)")
        if scoring.topk_lists and teacher.top_k < k:
            raise ValueError(f"the teacher's top-{k} lists need at least {k} log-probs per position, the teacher sends "
                             f"{teacher.top_k}")
        t_ids = teacher.ids[:, : min(k, teacher.top_k)]
        union = torch.cat([student.ids, t_ids], -1)  # (R, K + min(K, k))
        t_union, known = teacher.lookup(union)
        s_known = known[:, :k]
        lower = (t_union[:, :k].exp() * s_known).sum(-1).clamp(0.0, 1.0)
        unknown_room = torch.minimum(teacher.tail_mass(), (~s_known).sum(-1) * teacher.kth_probability())
        out = {
            "teacher_token_logp": teacher.lookup(student.tokens[:, None])[0][:, 0],
            "compatibility": lower,
            "compatibility_upper": (lower + unknown_room).clamp(0.0, 1.0),
            "disagreement": maths.union_kl(student.logp_at(union), t_union, student.ids, t_ids),
        }
        if scoring.topk_lists:
            out.update(teacher_topk_ids=teacher.ids[:, :k], teacher_topk_logp=teacher.logp[:, :k])
        if scoring.full_entropy:
            out["teacher_entropy"] = torch.full_like(lower, torch.nan)
        return out

    def loss_fields(self, needs_logits: bool, work: Workspace | None = None) -> dict:
        return {"teacher_logits": None, "teacher_top_logprobs": self.top if needs_logits else None}


def as_teacher_rows(teacher: torch.Tensor | TeacherRows, head: Callable[..., torch.Tensor] | None) -> TeacherRows:
    """`teacher` itself, or a local teacher's hidden states (..., H) flattened to rows with its head."""
    if isinstance(teacher, TeacherRows):
        return teacher
    if head is None:
        raise TypeError("teacher hidden states need the teacher's head (teacher_head)")
    return HeadRows(teacher.reshape(-1, teacher.shape[-1]), head)
