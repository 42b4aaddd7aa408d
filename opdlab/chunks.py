"""One chunk of response rows, as scoring and the loss see it: which statistics are asked for (`Scoring`) and
the student's half of them (`StudentChunk`), which every kind of teacher rows completes with its own
(`opdlab.teachers.rows.TeacherRows.chunk_stats`).

The defaults of the statistics live here, once: `TOP_K` (K of the top-K sets, the paper's 16), `SCORE_CHUNK_ROWS`
(rows whose logits a scoring pass holds at once) and `FULL_ENTROPY` (the full-vocabulary entropies are computed
only when a selector or callback asks). Only torch and the heads' buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from opdlab import maths
from opdlab.heads import Workspace

TOP_K = 16  # K of the student's and teacher's top-K sets (TA-OPD's default; 8 and 32 are also used)
SCORE_CHUNK_ROWS = 256  # rows per scoring chunk (~3 x rows x V fp32 at once): `--model.memory.chunk_size`
FULL_ENTROPY = False  # full-vocabulary entropies cost two passes per chunk: off unless asked for


@dataclass(frozen=True)
class Scoring:
    """Which selection statistics a pass computes: K, and the optional full-vocabulary KLs, entropies and
    both models' top-K lists."""

    top_k: int = TOP_K
    full_kl: bool = False
    full_entropy: bool = FULL_ENTROPY
    topk_lists: bool = False


@dataclass
class StudentChunk:
    """The student's side of R rows: its fp32 logits (R, V), the sampled tokens (R,), its top-K log-probs and
    ids (R, K), its log-sum-exp (R,) and, when asked, its full entropy (R,)."""

    logits: torch.Tensor
    tokens: torch.Tensor
    top_logp: torch.Tensor
    ids: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor | None

    def logp_at(self, ids: torch.Tensor) -> torch.Tensor:
        """(R, Q) the student's log-probs at the ids (R, Q)."""
        return self.logits.gather(-1, ids) - self.lse[:, None]

    def full_logp(self) -> torch.Tensor:
        """(R, V) the student's log-probs (a new tensor)."""
        return self.logits - self.lse[:, None]


def logsumexp_entropy(
    z: torch.Tensor, top_value: torch.Tensor, top_id: torch.Tensor, work: Workspace, entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log-sum-exp and (when `entropy`) entropy of softmax(z), from one fused softmax into a reused buffer.

    The arg-max's probability is exp(0) / Z, so lse = max - log p_max; the entropy is lse - Σ p·z, where
    nansum drops the 0·(-inf) terms of impossible tokens. Two full passes after the softmax kernel (none
    without the entropy), no (R, V) allocation. z: (R, V) fp32 (left unchanged); top_value, top_id: (R,)
    row max and its id.
    """
    p = torch.ops.aten._softmax.out(z, -1, False, out=work.like("probs", z))  # (R, V)
    lse = top_value - p.gather(-1, top_id[:, None]).squeeze(-1).log()
    return lse, (lse - torch.nansum(p.mul_(z), -1)) if entropy else None


def student_chunk(s_logits: torch.Tensor, tokens: torch.Tensor, scoring: Scoring,
                  work: Workspace) -> tuple[StudentChunk, dict]:
    """The student's half of a chunk's statistics: its `StudentChunk`, and the features that need no teacher
    (its token log-prob, H, and its full entropy when asked)."""
    k = scoring.top_k
    s_top, s_ids = s_logits.topk(k, -1)  # sorted: s_top[:, 0] is the row max
    s_lse, s_entropy = logsumexp_entropy(s_logits, s_top[:, 0], s_ids[:, 0], work, scoring.full_entropy)
    s_top_logp = s_top - s_lse[:, None]
    out = {
        "student_token_logp": s_logits.gather(-1, tokens[:, None]).squeeze(-1) - s_lse,
        "topk_entropy": (
            maths.entropy_from_logp(torch.log_softmax(s_top_logp, -1)) / math.log(k) if k > 1 else torch.zeros_like(s_lse)
        ),
    }
    if scoring.topk_lists:
        out.update(student_topk_ids=s_ids, student_topk_logp=s_top_logp)
    if scoring.full_entropy:
        out["student_entropy"] = s_entropy
    return StudentChunk(s_logits, tokens, s_top_logp, s_ids, s_lse, s_entropy), out
