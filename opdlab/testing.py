"""Contract checks for selector and divergence plugins, importable from a plugin package's own tests.

An installed opdlab has no `tests/` folder, so the checks that opdlab's suite runs on every registered
plugin live here:

    # my_package/tests/test_contract.py
    from opdlab.testing import check_divergence, check_selector
    from my_package import LowConfidenceSelector, MyKL

    def test_selector_contract():
        check_selector(LowConfidenceSelector)

    def test_divergence_contract():
        check_divergence(MyKL)

The statistics a selector sees here are built exactly as a training step builds them for that selector:
K = its `top_k`, the full-vocabulary KLs only with `needs_full_kl`, the full entropies only with
`needs_full_entropy` (otherwise `stats.student_entropy` / `teacher_entropy` are None, as in `fit`), the top-K
lists only with `needs_topk_lists`.
Each check raises AssertionError with what went wrong.
"""

from __future__ import annotations

import inspect

import torch

from opdlab.divergences.base import Divergence, LossInputs
from opdlab.scoring import TokenStats, compute_token_stats
from opdlab.selectors.base import TokenSelector, budget_size
from opdlab.teachers.rows import SparseRows, TopLogprobs
from opdlab.teachers.signal import NEEDS, need_of

VOCAB = 40
LENGTHS = (7, 0, 12, 3, 20, 1)  # ragged responses, one of them empty


def top_logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> TopLogprobs:
    """What a server sending its top-`k` log-probs (and the sampled token's) would send for these logits:
    (R, V) logits and (R,) tokens -> `TopLogprobs` (the columns of a vLLM `prompt_logprobs` answer). For tests and
    benchmarks that compare a top-k teacher with the exact one."""
    logp = torch.log_softmax(logits.float(), -1)
    top_logp, top_ids = logp.topk(k, -1)
    outside = ~(top_ids == tokens[:, None]).any(-1)  # the sampled token is not among the top-k
    ids = torch.cat([top_ids, torch.where(outside, tokens, 0)[:, None]], -1)
    values = torch.cat([top_logp, logp.gather(-1, tokens[:, None])], -1)
    known = torch.cat([torch.isfinite(top_logp), outside[:, None]], -1)
    return TopLogprobs(ids, values.masked_fill(~known, -torch.inf), known, k, logits.shape[-1])


def make_selector(cls: type[TokenSelector], ratio: float) -> TokenSelector:
    """An instance with `ratio` where the constructor takes one (`full` does not)."""
    return cls(ratio=ratio) if "ratio" in inspect.signature(cls).parameters else cls()


def valid_mask(lengths=LENGTHS, length: int | None = None) -> torch.Tensor:
    """(N, L) response mask of rows with the given lengths."""
    length = length or max(lengths)
    return torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]


def synthetic_stats(selector: TokenSelector, valid: torch.Tensor, seed: int = 0, same: bool = False,
                    neg_inf: bool = False, top_logprobs: int | None = None) -> TokenStats:
    """TokenStats from random logits (identity heads: the "hidden states" are the logits), computed with
    the options a training step uses for `selector`. `same`: student == teacher; `neg_inf`: some vocabulary
    entries impossible under both models (e.g. masked padding columns); `top_logprobs`: the teacher sends
    only its top-k log-probs (a served teacher)."""
    gen = torch.Generator().manual_seed(seed)
    n, length = valid.shape
    student = torch.randn(n, length, VOCAB, generator=gen) * 3
    teacher = student.clone() if same else torch.randn(n, length, VOCAB, generator=gen) * 3
    if neg_inf:
        student[..., -5:] = teacher[..., -5:] = float("-inf")
    tokens = torch.randint(0, VOCAB - 5, (n, length), generator=gen)
    identity = lambda x: x
    if top_logprobs is not None:
        teacher = SparseRows(top_logprobs_of(teacher.flatten(0, 1), tokens.flatten(), top_logprobs))
    return compute_token_stats(student, teacher, tokens, valid, identity, identity, top_k=selector.top_k,
                               chunk_size=16, full_kl=selector.needs_full_kl,
                               full_entropy=getattr(selector, "needs_full_entropy", False),
                               topk_lists=getattr(selector, "needs_topk_lists", False))


def check_budget(selector: TokenSelector, stats: TokenStats, seed: int = 3) -> torch.Tensor:
    """Shape, keep ⊆ response mask, at least one kept position per non-empty response, and the budget:
    ⌈ratio · N_valid⌉ <= kept <= that + the forced one per response. Returns the keep mask."""
    valid = stats.valid
    keep = selector.select(stats, generator=torch.Generator().manual_seed(seed))
    assert keep.shape == valid.shape and keep.dtype == torch.bool, f"keep mask {keep.shape} {keep.dtype}"
    assert not (keep & ~valid).any(), "kept a position outside the response mask"
    non_empty = valid.any(1)
    assert keep[non_empty].any(1).all(), "a non-empty response got no kept position"
    k = budget_size(selector.ratio, int(valid.sum()))
    assert k <= keep.sum() <= k + int(non_empty.sum()), f"kept {int(keep.sum())}, budget {k}"
    return keep


def check_deterministic(selector: TokenSelector, stats: TokenStats) -> None:
    first = selector.select(stats, generator=torch.Generator().manual_seed(7))
    second = selector.select(stats, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, second), "the same generator seed kept different positions"


def check_all_masked(selector_cls: type[TokenSelector]) -> None:
    selector = make_selector(selector_cls, 0.05)
    valid = torch.zeros(3, 5, dtype=torch.bool)
    keep = selector.select(synthetic_stats(selector, valid), generator=torch.Generator().manual_seed(0))
    assert keep.shape == valid.shape and not keep.any(), "kept positions of an all-masked batch"


def check_scores_finite(selector: TokenSelector, stats: TokenStats) -> None:
    scores = selector.score(stats, generator=torch.Generator().manual_seed(0))
    assert scores.shape == stats.valid.shape, f"scores {scores.shape}, expected {stats.valid.shape}"
    assert not scores[stats.valid].isnan().any(), "NaN scores at valid positions"
    check_budget(selector, stats, seed=0)


def check_selector(selector_cls: type[TokenSelector]) -> None:
    """Every contract check of opdlab's suite, on one selector class (constructed with defaults + ratio)."""
    assert issubclass(selector_cls, TokenSelector), f"{selector_cls} is not a TokenSelector"
    valid = valid_mask()
    for ratio in (0.05, 0.3, 1.0):
        selector = make_selector(selector_cls, ratio)
        check_budget(selector, synthetic_stats(selector, valid))
    selector = make_selector(selector_cls, 0.3)
    check_deterministic(selector, synthetic_stats(selector, valid))
    check_all_masked(selector_cls)
    for case in ({}, {"same": True}, {"neg_inf": True}):
        selector = make_selector(selector_cls, 0.05)
        check_scores_finite(selector, synthetic_stats(selector, valid, **case))
    selector = make_selector(selector_cls, 0.05)
    if NEEDS.index(need_of(selector)) <= NEEDS.index("topk"):  # it declares that a top-k teacher serves it
        for case in ({}, {"same": True}, {"neg_inf": True}):
            check_scores_finite(selector, synthetic_stats(selector, valid, top_logprobs=selector.top_k, **case))


# --------------------------------------------------------------------------------------------- divergences
def loss_inputs(student_logits: torch.Tensor, teacher_logits: torch.Tensor, seed: int = 0) -> LossInputs:
    """LossInputs for M rows: sampled tokens, their sampling and teacher log-probs, as the loss pass builds them."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, student_logits.shape[-1] - 5, (student_logits.shape[0],), generator=gen)
    s_logp = torch.log_softmax(student_logits.detach().float(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    t_logp = torch.log_softmax(teacher_logits.float(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    return LossInputs(student_logits=student_logits, teacher_logits=teacher_logits, tokens=tokens,
                      sampling_logp=s_logp, teacher_token_logp=t_logp)


def check_divergence(divergence_cls: type[Divergence], rows: int = 6) -> None:
    """(M,) finite per-token losses; zero where student == teacher; finite with -inf logits; gradient
    to the student logits only (the teacher's are not touched)."""
    assert issubclass(divergence_cls, Divergence), f"{divergence_cls} is not a Divergence"
    divergence = divergence_cls()
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(rows, VOCAB, generator=gen) * 3
    for student_init in (torch.randn(rows, VOCAB, generator=gen) * 3, teacher.clone()):
        student = student_init.clone().requires_grad_(True)
        teacher_leaf = teacher.clone().requires_grad_(True)
        loss = divergence.token_loss(loss_inputs(student, teacher_leaf))
        assert loss.shape == (rows,), f"token_loss returned {tuple(loss.shape)}, expected ({rows},)"
        assert torch.isfinite(loss).all(), "non-finite token losses"
        if torch.equal(student_init, teacher):
            torch.testing.assert_close(loss.detach(), torch.zeros(rows), atol=1e-5, rtol=0,
                                       msg="the loss is not zero where student == teacher")
        loss.sum().backward()
        assert student.grad is not None and torch.isfinite(student.grad).all(), "no finite gradient to the student"
        assert teacher_leaf.grad is None or (teacher_leaf.grad == 0).all(), "gradient reached the teacher"
    student, masked_teacher = torch.randn(rows, VOCAB, generator=gen) * 3, teacher.clone()
    student[:, -5:] = masked_teacher[:, -5:] = float("-inf")
    student.requires_grad_(True)
    loss = divergence.token_loss(loss_inputs(student, masked_teacher))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(student.grad).all(), "not finite with -inf logits"
    if need_of(divergence) in ("token", "topk"):  # it declares that a top-k teacher serves it: check that path
        check_top_logprob_loss(divergence, teacher, gen)


def check_top_logprob_loss(divergence: Divergence, teacher: torch.Tensor, gen: torch.Generator, k: int = 8) -> None:
    """With the teacher's top-k log-probs only (teacher_logits None): finite, zero where student == teacher,
    gradient finite and to the student only."""
    rows = teacher.shape[0]
    for student_init in (torch.randn(rows, VOCAB, generator=gen) * 3, teacher.clone()):
        student = student_init.clone().requires_grad_(True)
        inputs = loss_inputs(student, teacher)
        inputs.teacher_top_logprobs = top_logprobs_of(teacher, inputs.tokens, k)
        inputs.teacher_logits = None
        loss = divergence.token_loss(inputs)
        assert loss.shape == (rows,) and torch.isfinite(loss).all(), "non-finite token losses with a top-k teacher"
        if torch.equal(student_init, teacher) and divergence.nonnegative:
            torch.testing.assert_close(loss.detach(), torch.zeros(rows), atol=1e-5, rtol=0,
                                       msg="with a top-k teacher the loss is not zero where student == teacher")
        loss.sum().backward()
        assert torch.isfinite(student.grad).all(), "no finite gradient to the student with a top-k teacher"


# --------------------------------------------------------------------------------------------- rollout engines
def check_rollout_engine(engine_cls, atol: float = 1e-5) -> None:
    """On a tiny random Qwen2 (float32, ragged prompts): greedy tokens equal the reference loop's; the
    sampling log-probs equal a plain forward's under the sampled distribution (temperature 0.7, top-p 0.9,
    two samples per prompt); seeded samples do not depend on the batch split; after `load_weights` with
    changed weights the outputs follow the new weights. `atol` may be loosened for an engine that samples
    in lower precision (say so in its docs)."""
    from opdlab.engines import ReferenceEngine, SamplingParams
    from opdlab.models import final_hidden_states
    from opdlab.rollout import encode_prompts, sampling_logprobs
    from opdlab.tasks import AdditionTask
    from opdlab.toy import ModelSpec, build_char_tokenizer, make_qwen2

    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    # head_dim 32, grouped-query heads: the smallest head vLLM's CPU kernels take, so wrapped engines run it too
    model = make_qwen2(ModelSpec(hidden=64, layers=2, ffn=64, heads=2, kv_heads=1), tokenizer).eval()
    problems = [AdditionTask(digits=2).problem_at(i) for i in range(8)]
    texts = [p.prompt[i % 3 :] for i, p in enumerate(problems)]
    prompts = encode_prompts(tokenizer, texts, [p.answer for p in problems])

    def bound(engine):
        engine.bind(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
        engine.load_weights(model)
        return engine

    def recomputed(rollout, temperature, top_p):
        with torch.no_grad():
            logits = model.lm_head(final_hidden_states(model, rollout.input_ids, rollout.attention_mask))
        p, length = rollout.prompt_len, rollout.response_mask.shape[1]
        logp = sampling_logprobs(logits[:, p - 1 : p - 1 + length].flatten(0, 1), temperature, top_p)
        logp = logp.view(*rollout.response_mask.shape, -1)
        return logp.gather(-1, rollout.response_ids[..., None]).squeeze(-1)

    engine, reference = bound(engine_cls()), bound(ReferenceEngine())
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    got, expected = engine.generate(prompts, greedy), reference.generate(prompts, greedy)
    assert torch.equal(got.input_ids, expected.input_ids), "greedy tokens differ from the reference engine's"
    assert torch.equal(got.response_mask, expected.response_mask), "response masks differ from the reference's"
    sampled = SamplingParams(num_samples=2, max_new_tokens=8, temperature=0.7, top_p=0.9, seeds=list(range(8)))
    rollout = engine.generate(prompts, sampled)
    mask = rollout.response_mask
    torch.testing.assert_close(rollout.sampling_logp[mask], recomputed(rollout, 0.7, 0.9)[mask], atol=atol, rtol=atol,
                               msg="sampling log-probs are not those of the sampled distribution")
    first = engine.generate(encode_prompts(tokenizer, texts[:4], prompts.answers[:4]),
                            SamplingParams(num_samples=2, max_new_tokens=8, temperature=0.7, top_p=0.9, seeds=list(range(4))))
    length = first.response_mask.shape[1]
    assert torch.equal(first.response_ids, rollout.response_ids[:8, :length]), "samples depend on the batch split"
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    engine.load_weights(model)
    after = engine.generate(prompts, sampled)
    mask = after.response_mask
    torch.testing.assert_close(after.sampling_logp[mask], recomputed(after, 0.7, 0.9)[mask], atol=atol, rtol=atol,
                               msg="after load_weights the engine still generates with the old weights")
