"""The pure maths shared by scoring, selectors and divergences: clamped log-softmax, KL with 0·log 0 = 0,
entropy, the union-restricted KL of teachability, and linear-interpolated quantiles. Only torch.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-12


def log_softmax_fp32(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-softmax in fp32 (bf16 log-probs lose ~3 significant digits)."""
    if temperature <= 0:
        raise ValueError(f"loss temperature must be > 0, got {temperature}")
    # -inf (masked vocabulary) becomes the most negative float: exp() is still exactly 0, but the
    # backward of 0 · (-inf - -inf) no longer produces NaN gradients.
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    return torch.log_softmax(scaled, dim=-1).clamp_min(torch.finfo(torch.float32).min)


def token_log_prob(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] in fp32, (M, V), (M,) -> (M,).

    Clamps only the gathered (M,) values, not the whole (M, V) log-softmax: the backward of a gather
    through log-softmax is onehot - softmax, where -inf logits contribute exp(-inf) = 0, so no NaN can
    arise; skipping the (M, V) clamp and its backward saves ~4 passes over the logits.
    """
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return logp.clamp_min(torch.finfo(torch.float32).min)


def masked_kl(logp_p: torch.Tensor, logp_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim with 0·log 0 = 0 (safe for -inf logits). (M, V) -> (M,)."""
    terms = logp_p.exp() * (logp_p - logp_q)
    return torch.where(torch.isneginf(logp_p), torch.zeros_like(terms), terms).sum(-1)


def entropy_from_logp(logp: torch.Tensor) -> torch.Tensor:
    return masked_kl(logp, torch.zeros_like(logp)).neg()


def union_kl(
    s_union_logp: torch.Tensor, t_union_logp: torch.Tensor, s_ids: torch.Tensor, t_ids: torch.Tensor
) -> torch.Tensor:
    """KL(pbar_T || pbar_S) restricted to U = S ∪ T and renormalised.

    Args:
        s_union_logp, t_union_logp: (R, 2K) log-probs at the ids cat([s_ids, t_ids]).
        s_ids, t_ids: (R, K) top-K ids (a top-k teacher may give fewer: (R, k)); a teacher id already in S
            counts once.
    """
    dup = (t_ids[:, :, None] == s_ids[:, None, :]).any(-1)  # teacher ids already in S
    member = torch.cat([torch.ones_like(s_ids, dtype=torch.bool), ~dup], -1)  # (R, K_S + K_T)
    p_t = t_union_logp.exp() * member
    p_s = s_union_logp.exp() * member
    p_t = p_t / p_t.sum(-1, keepdim=True).clamp_min(EPS)
    p_s = p_s / p_s.sum(-1, keepdim=True).clamp_min(EPS)
    terms = p_t * (p_t.clamp_min(EPS).log() - p_s.clamp_min(EPS).log())
    return (terms * member).sum(-1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (expm1 near 0, log1p far from it)."""
    x = x.clamp(max=-1e-12)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def tail_bucket_forward_kl(student_logp: torch.Tensor, ids: torch.Tensor, teacher_logp: torch.Tensor,
                           known: torch.Tensor) -> torch.Tensor:
    """Forward KL(p_T || p_S) over the teacher's known ids plus one "tail" outcome for every other token.

    The standard top-k approximation (TRL's server distillation does the same): the known ids keep their
    probabilities, the rest of each distribution is lumped into a tail bucket, so the result is a true KL
    over J + 1 outcomes (>= 0, 0 when the student equals the teacher). student_logp: (M, V) log-probs, with
    grad; ids, teacher_logp, known: (M, J) (`opdlab.teachers.TopLogprobs`). Returns (M,).
    """
    s_known = student_logp.gather(-1, ids)  # (M, J)
    zero = torch.zeros_like(teacher_logp)
    p_t = torch.where(known, teacher_logp.exp(), zero)
    terms = (p_t * torch.where(known, teacher_logp - s_known, zero)).sum(-1)
    t_tail = (1 - p_t.sum(-1)).clamp_min(0.0)
    s_tail_logp = log1mexp(torch.logsumexp(s_known.masked_fill(~known, -torch.inf), -1))
    tail = t_tail * (t_tail.clamp_min(EPS).log() - s_tail_logp)  # 0 where the teacher has no tail mass
    return terms + tail


def linear_quantiles(values: torch.Tensor, qs: tuple[float, ...]) -> list[torch.Tensor]:
    """Quantiles of a 1-D tensor with linear interpolation (numpy's default, `method="linear"`).

    Sort-based rather than `torch.quantile`, which refuses inputs above 2**24 elements (a large rollout
    batch can have more valid positions than that).
    """
    ordered = values.float().sort().values
    n = ordered.numel()
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, n - 1)
        out.append(ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo]))
    return out
