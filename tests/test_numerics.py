"""Numerics of the memory-saving paths against plain full-logits computations.

- chunked `compute_token_stats` == every field computed from full (N, L, V) log-softmaxes;
- `head_loss` (one chunk, several chunks, stored logit gradients, the autograd path of other heads, and
  with the shared scoring projection): loss and gradients (hidden states and LM-head weight) == the
  full-logits loss masked to the same rows;
- `LogitHead` == the model's own logits for a soft-capped Gemma 2, a tied-embedding Qwen2, Cohere's
  logit_scale and Granite's logits_scaling (random init, no hub);
- memory: no tensor with more than chunk_size rows of V logits exists during scoring + loss + backward,
  measured by recording every op's output shape (not by timing).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, GraniteConfig
from transformers import GraniteForCausalLM, Qwen2Config, Qwen2ForCausalLM

from opdlab.divergences import GeneralizedJSD, LossInputs, ReverseKL, SampledTokenOPD
from conftest import kept_head_loss, shared_head_loss

from opdlab.heads import LogitHead
from opdlab.models import final_hidden_states
from opdlab.rollout import Rollout
from opdlab.scoring import TokenStats, compute_token_stats
from opdlab.selectors import TeachabilitySelector

VOCAB, HIDDEN, N, LENGTH, K = 97, 24, 3, 11, 5
DIVERGENCES = {"reverse_kl": ReverseKL, "sampled_token": SampledTokenOPD, "jsd(0.3)": lambda: GeneralizedJSD(0.3)}


def tiny_qwen2(seed: int, vocab: int = VOCAB, hidden: int = HIDDEN, **config) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=1, intermediate_size=2 * hidden,
                      num_attention_heads=2, num_key_value_heads=1, **config)
    return Qwen2ForCausalLM(cfg)


@pytest.fixture
def step():
    """Hidden states (student with grad), tokens, a padded response mask and a rollout; LM heads of V=97."""
    student, teacher = tiny_qwen2(1), tiny_qwen2(2)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (N, LENGTH), generator=gen)
    valid = torch.arange(LENGTH)[None, :] < torch.tensor([LENGTH, 7, 4])[:, None]  # 22 valid rows, padding after
    rollout = Rollout(
        input_ids=torch.cat([torch.zeros(N, 1, dtype=torch.long), tokens], 1),
        attention_mask=torch.cat([torch.ones(N, 1, dtype=torch.long), valid.long()], 1),
        response_mask=valid, sampling_logp=-torch.rand(N, LENGTH, generator=gen) * 2, prompt_len=1,
    )
    return {
        "student": student, "teacher": teacher,
        "student_hidden": (torch.randn(N, LENGTH, HIDDEN, generator=gen) * 3).requires_grad_(True),
        "teacher_hidden": torch.randn(N, LENGTH, HIDDEN, generator=gen) * 3,
        "tokens": tokens, "valid": valid, "rollout": rollout,
        "student_head": LogitHead(student), "teacher_head": LogitHead(teacher),
    }


# ------------------------------------------------------------------------------------ plain references
def reference_stats(s_logits: torch.Tensor, t_logits: torch.Tensor, tokens: torch.Tensor, k: int) -> dict:
    """Every TokenStats field from full (..., V) logits, written out from docs/method.md §2 with log_softmax."""
    s, t = torch.log_softmax(s_logits.double(), -1), torch.log_softmax(t_logits.double(), -1)

    def kl(p, q):  # KL(p || q), 0·log 0 = 0
        return torch.where(p > -math.inf, p.exp() * (p - q), torch.zeros_like(p)).sum(-1)

    s_top, s_ids = s.topk(k, -1)
    t_top, t_ids = t.topk(k, -1)
    union_kl = torch.zeros(s.shape[:-1], dtype=torch.float64)
    for pos in itertools.product(*map(range, s.shape[:-1])):  # U = S ∪ T as a python set, renormalised by hand
        u = sorted(set(s_ids[pos].tolist()) | set(t_ids[pos].tolist()))
        p_t, p_s = t[pos][u].exp(), s[pos][u].exp()
        p_t, p_s = p_t / p_t.sum(), p_s / p_s.sum()
        union_kl[pos] = (p_t * (p_t.clamp_min(1e-12).log() - p_s.clamp_min(1e-12).log())).sum()
    s_top_norm = torch.log_softmax(s_top, -1)
    return {
        "student_token_logp": s.gather(-1, tokens[..., None]).squeeze(-1),
        "teacher_token_logp": t.gather(-1, tokens[..., None]).squeeze(-1),
        "student_entropy": -kl(s, torch.zeros_like(s)),
        "teacher_entropy": -kl(t, torch.zeros_like(t)),
        "compatibility": t.gather(-1, s_ids).exp().sum(-1).clamp(0, 1),
        "disagreement": union_kl,
        "topk_entropy": -kl(s_top_norm, torch.zeros_like(s_top_norm)) / math.log(k),
        "student_topk_ids": s_ids, "student_topk_logp": s_top,
        "teacher_topk_ids": t_ids, "teacher_topk_logp": t_top,
        "forward_kl": kl(t, s), "reverse_kl": kl(s, t),
    }


def assert_stats_equal(stats: TokenStats, ref: dict, valid: torch.Tensor) -> None:
    for name, expected in ref.items():
        got = getattr(stats, name)
        assert got.shape == expected.shape, name
        if name.endswith("_ids"):
            assert torch.equal(got[valid], expected[valid]), name
        else:
            torch.testing.assert_close(got[valid].double(), expected[valid], atol=2e-5, rtol=1e-4, msg=name)
        assert not got[~valid].any(), f"{name} must be zero at invalid positions"


def full_logits_loss(s, divergence, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The TRL-style way: both heads on all N·L rows, the per-token loss everywhere, masked afterwards."""
    student_logits = s["student_head"](s["student_hidden"]).flatten(0, 1)
    with torch.no_grad():
        teacher_logits = s["teacher_head"](s["teacher_hidden"]).flatten(0, 1)
    t_logp = torch.log_softmax(teacher_logits, -1)
    inputs = LossInputs(student_logits, teacher_logits, s["tokens"].flatten(), s["rollout"].sampling_logp.flatten(),
                        t_logp.gather(-1, s["tokens"].flatten()[:, None]).squeeze(-1))
    token_loss = divergence.token_loss(inputs)
    flat = keep.flatten()
    return token_loss[flat], torch.where(flat, token_loss, torch.zeros_like(token_loss)).sum() / flat.sum()


def grads_of(loss: torch.Tensor, s) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [s["student_hidden"], s["student"].lm_head.weight]))


# ------------------------------------------------------------------------------------ scoring
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1024])
@pytest.mark.parametrize("head_kind", ["logit_head", "plain_callable"])
def test_chunked_stats_equal_full_logits(step, chunk_size, head_kind):
    """22 valid rows: chunk sizes 3 and 7 leave a ragged last chunk; 1024 is one chunk."""
    s = step
    heads = (s["student_head"], s["teacher_head"])
    if head_kind == "plain_callable":
        heads = (lambda h: s["student"].lm_head(h), lambda h: s["teacher"].lm_head(h))
    stats = compute_token_stats(s["student_hidden"].detach(), s["teacher_hidden"], s["tokens"], s["valid"], *heads,
                                top_k=K, chunk_size=chunk_size, full_kl=True, topk_lists=True, full_entropy=True)
    with torch.no_grad():
        ref = reference_stats(s["student_head"](s["student_hidden"]), s["teacher_head"](s["teacher_hidden"]),
                              s["tokens"], K)
    assert_stats_equal(stats, ref, s["valid"])


def test_chunked_stats_with_minus_inf_logits(step):
    """Impossible tokens (-inf logits, e.g. masked padding columns) give finite statistics, as the reference."""
    s = step

    def masked(head):
        return lambda h: head(h).index_fill(-1, torch.arange(VOCAB - 6, VOCAB), -math.inf)

    s_head, t_head = masked(s["student_head"]), masked(s["teacher_head"])
    tokens = s["tokens"] % (VOCAB - 6)
    stats = compute_token_stats(s["student_hidden"].detach(), s["teacher_hidden"], tokens, s["valid"], s_head, t_head,
                                top_k=K, chunk_size=4, full_kl=True, topk_lists=True, full_entropy=True)
    with torch.no_grad():
        ref = reference_stats(s_head(s["student_hidden"]), t_head(s["teacher_hidden"]), tokens, K)
    assert_stats_equal(stats, ref, s["valid"])
    for name in ("student_entropy", "teacher_entropy", "disagreement", "forward_kl", "reverse_kl"):
        assert torch.isfinite(getattr(stats, name)).all(), name


def test_bf16_head_stats_are_fp32_of_bf16_logits(step):
    s = step
    student = s["student"].to(torch.bfloat16)
    hidden = s["student_hidden"].detach().bfloat16()
    stats = compute_token_stats(hidden, hidden, s["tokens"], s["valid"], LogitHead(student), LogitHead(student),
                                top_k=K, chunk_size=5, topk_lists=True, full_entropy=True)
    with torch.no_grad():
        logits = student.lm_head(hidden).float()
    ref = reference_stats(logits, logits, s["tokens"], K)
    ref.pop("forward_kl"), ref.pop("reverse_kl")
    assert stats.student_entropy.dtype == torch.float32
    assert_stats_equal(stats, ref, s["valid"])


def test_top_k_lists_only_when_asked(step):
    """The four (N, L, K) top-K lists are computed (and so scattered and gathered across ranks) only on request;
    the features made from them are the same either way."""
    s = step
    args = (s["student_hidden"].detach(), s["teacher_hidden"], s["tokens"], s["valid"], s["student_head"],
            s["teacher_head"])
    without, with_lists = (compute_token_stats(*args, top_k=K, topk_lists=lists) for lists in (False, True))
    assert without.student_topk_ids is None and without.teacher_topk_logp is None and without.top_k is None
    assert with_lists.student_topk_ids.shape == (*s["valid"].shape, K) and with_lists.top_k == K
    for name in ("compatibility", "disagreement", "topk_entropy", "student_token_logp", "teacher_token_logp"):
        assert torch.equal(getattr(without, name), getattr(with_lists, name)), name


# ------------------------------------------------------------------------------------ loss
@pytest.mark.parametrize("store", [False, True], ids=["grads_per_chunk", "stored_logit_grads"])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("chunk_size", [3, 7, 1024])
def test_kept_rows_loss_and_gradients_equal_full_logits(step, name, chunk_size, store):
    """Kept rows (11 of 22): chunk 1024 is one chunk, 3 and 7 several, whose head gradients are taken per
    chunk in forward or from the stored logit gradients after the last chunk."""
    s, divergence = step, DIVERGENCES[name]()
    keep = s["valid"] & (torch.rand(N, LENGTH, generator=torch.Generator().manual_seed(1)) < 0.5)
    assert int(keep.sum()) > 7
    stats = compute_token_stats(s["student_hidden"].detach(), s["teacher_hidden"], s["tokens"], s["valid"],
                                s["student_head"], s["teacher_head"], top_k=K)
    loss = kept_head_loss(s["student_hidden"], s["teacher_hidden"], keep, s["rollout"], stats, s["student_head"],
                          s["teacher_head"], divergence, chunk_size=chunk_size, store_rows=10**6 if store else 0)
    ref_tokens, ref_loss = full_logits_loss(s, divergence, keep)
    torch.testing.assert_close(loss.token_losses, ref_tokens.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss.loss, ref_loss, atol=1e-6, rtol=1e-5)
    for got, expected in zip(grads_of(loss.loss, s), grads_of(ref_loss, s), strict=True):
        assert expected.abs().sum() > 0
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_autograd_path_of_other_heads_equals_full_logits(step, name):
    """A head that is not a local plain-linear LogitHead (here any callable; in training a sharded one)
    goes through autograd over all kept rows, with the same loss and gradients."""
    s, divergence = step, DIVERGENCES[name]()
    keep = s["valid"] & (torch.rand(N, LENGTH, generator=torch.Generator().manual_seed(1)) < 0.5)
    stats = compute_token_stats(s["student_hidden"].detach(), s["teacher_hidden"], s["tokens"], s["valid"],
                                s["student_head"], s["teacher_head"], top_k=K)
    loss = kept_head_loss(s["student_hidden"], s["teacher_hidden"], keep, s["rollout"], stats,
                          lambda h: s["student_head"](h), s["teacher_head"], divergence, chunk_size=3)
    assert loss.loss.grad_fn is not None and "PrecomputedGradients" not in type(loss.loss.grad_fn).__name__
    ref_tokens, ref_loss = full_logits_loss(s, divergence, keep)
    torch.testing.assert_close(loss.loss, ref_loss, atol=1e-6, rtol=1e-5)
    for got, expected in zip(grads_of(loss.loss, s), grads_of(ref_loss, s), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("store", [False, True], ids=["grads_per_chunk", "stored_logit_grads"])
def test_upstream_gradient_rescales_the_gradients_of_forward(step, store):
    """backward only rescales the gradients computed in forward: d(3·loss) = 3·d(loss), exactly as autograd."""
    s = step
    stats = compute_token_stats(s["student_hidden"].detach(), s["teacher_hidden"], s["tokens"], s["valid"],
                                s["student_head"], s["teacher_head"], top_k=K)
    loss = kept_head_loss(s["student_hidden"], s["teacher_hidden"], s["valid"], s["rollout"], stats, s["student_head"],
                          s["teacher_head"], ReverseKL(), chunk_size=3, store_rows=10**6 if store else 0)
    _, ref_loss = full_logits_loss(s, ReverseKL(), s["valid"])
    for got, expected in zip(grads_of(3.0 * loss.loss, s), grads_of(3.0 * ref_loss, s), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("chunk_size", [3, 7, 1024])
def test_shared_projection_equals_score_then_loss(step, name, chunk_size):
    """Ratio 1: the statistics and the loss of every valid row from one projection per chunk."""
    s, divergence = step, DIVERGENCES[name]()
    stats, loss = shared_head_loss(s["student_hidden"], s["teacher_hidden"], s["rollout"], s["student_head"],
                                   s["teacher_head"], divergence, top_k=K, chunk_size=chunk_size, full_kl=True)
    with torch.no_grad():
        ref = reference_stats(s["student_head"](s["student_hidden"]), s["teacher_head"](s["teacher_hidden"]),
                              s["tokens"], K)
    assert_stats_equal(stats, ref, s["valid"])
    ref_tokens, ref_loss = full_logits_loss(s, divergence, s["valid"])
    torch.testing.assert_close(loss.token_losses, ref_tokens.detach(), atol=1e-6, rtol=1e-5)
    for got, expected in zip(grads_of(loss.loss, s), grads_of(ref_loss, s), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)


def test_tied_head_gradient_reaches_the_shared_embedding():
    """With tied embeddings the chunked loss's head gradient lands on the one shared weight."""
    model = tiny_qwen2(3, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    rollout = Rollout(ids, mask, torch.ones(2, 8, dtype=torch.bool), torch.zeros(2, 8), prompt_len=1)
    head = LogitHead(model)

    def run(chunk_size):
        model.zero_grad()
        hidden = final_hidden_states(model, ids, mask)[:, :-1]
        with torch.no_grad():
            teacher_hidden = hidden.detach() + 0.5
        stats = compute_token_stats(hidden.detach(), teacher_hidden, rollout.response_ids, rollout.response_mask,
                                    head, head, top_k=K)
        kept_head_loss(hidden, teacher_hidden, rollout.response_mask, rollout, stats, head, head, ReverseKL(),
                       chunk_size=chunk_size).loss.backward()
        return model.model.embed_tokens.weight.grad.clone()

    torch.testing.assert_close(run(chunk_size=3), run(chunk_size=1024), atol=1e-6, rtol=1e-4)
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ LogitHead
def gemma2_softcapped():
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0)
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # logits well beyond the cap, so a missing tanh would show
    return model


def cohere_scaled():
    torch.manual_seed(0)
    cfg = CohereConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, logit_scale=0.25)
    return CohereForCausalLM(cfg)


def granite_scaled():
    torch.manual_seed(0)
    cfg = GraniteConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, logits_scaling=8.0)
    return GraniteForCausalLM(cfg)


MODELS = {
    "gemma2_softcap": gemma2_softcapped,
    "qwen2_tied": lambda: tiny_qwen2(0, tie_word_embeddings=True),
    "qwen2_untied": lambda: tiny_qwen2(0),
    "cohere_logit_scale": cohere_scaled,
    "granite_logits_scaling": granite_scaled,
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logit_head_matches_model_forward(name):
    model = MODELS[name]().eval()
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        hidden = final_hidden_states(model, ids, mask)
        head = LogitHead(model)
        torch.testing.assert_close(head(hidden), expected, atol=1e-5, rtol=1e-5)
        out = torch.empty(14, VOCAB)
        torch.testing.assert_close(head(hidden.flatten(0, 1), out=out), expected.flatten(0, 1), atol=1e-5, rtol=1e-5)
        narrow = LogitHead(model, num_columns=VOCAB - 10)
        torch.testing.assert_close(narrow(hidden.flatten(0, 1), out=torch.empty(14, VOCAB - 10)),
                                   expected.flatten(0, 1)[:, : VOCAB - 10], atol=1e-5, rtol=1e-5)
    if name == "gemma2_softcap":
        cap = model.config.final_logit_softcapping
        assert expected.abs().max() <= cap and expected.abs().max() > 0.9 * cap, "the cap must be active"


def with_biased_head(model):
    """The same model with an untied lm_head that has a bias (some families ship one)."""
    old = model.lm_head
    model.lm_head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        model.lm_head.weight.copy_(old.weight)
        model.lm_head.bias.normal_(0, 0.5)
    model.config.tie_word_embeddings = False
    return model


HEAD_KINDS = {**MODELS, "qwen2_head_bias": lambda: with_biased_head(tiny_qwen2(0)), "qwen2_narrowed": lambda: tiny_qwen2(0)}


@pytest.mark.parametrize("store", [False, True], ids=["grads_per_chunk", "stored_logit_grads"])
@pytest.mark.parametrize("name", sorted(HEAD_KINDS))
def test_chunked_loss_gradients_for_every_head_kind(name, store):
    """Chunked kept-rows loss (the matmul differentiated by hand, weight gradient accumulated in place) ==
    autograd through the model's own full logits, for soft-capped, scaled, tied, biased and narrowed heads,
    on every trainable parameter of the model."""
    model = HEAD_KINDS[name]()
    head = LogitHead(model, num_columns=VOCAB - 10) if name == "qwen2_narrowed" else LogitHead(model)
    vocab = head.num_logits
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    rollout = Rollout(ids, mask, torch.ones(3, 9, dtype=torch.bool), -torch.rand(3, 9, generator=gen), prompt_len=1)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(chunk_size):
        hidden = final_hidden_states(model, ids, mask)[:, :-1]
        with torch.no_grad():
            teacher_hidden = hidden.detach().flip(0)
        stats = compute_token_stats(hidden.detach(), teacher_hidden, rollout.response_ids, rollout.response_mask,
                                    head, head, top_k=K)
        if chunk_size is None:  # the reference: full logits through the model's own head, masked
            token_loss, loss = full_logits_loss({"student_head": head, "teacher_head": head, "student_hidden": hidden,
                                                 "teacher_hidden": teacher_hidden, "tokens": rollout.response_ids,
                                                 "rollout": rollout}, ReverseKL(), rollout.response_mask)
            return token_loss.detach(), torch.autograd.grad(loss, params)
        loss = kept_head_loss(hidden, teacher_hidden, rollout.response_mask, rollout, stats, head, head, ReverseKL(),
                              chunk_size=chunk_size, store_rows=10**6 if store else 0)
        return loss.token_losses, torch.autograd.grad(loss.loss, params)

    ref_loss, ref = grads(None)
    got_loss, got = grads(4)  # 27 rows in chunks of 4: the last chunk is partial
    torch.testing.assert_close(got_loss, ref_loss, atol=1e-5, rtol=1e-5)
    for p, a, b in zip(params, got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert head.proj.weight.requires_grad and any(a.abs().sum() > 0 for a in got)


@pytest.mark.parametrize("store", [False, True], ids=["grads_per_chunk", "stored_logit_grads"])
def test_second_backward_through_retained_graph_is_refused(step, store):
    """The gradients are computed once, in forward, and handed over by the first backward; a second one
    (retain_graph) is an error that says so, never silently wrong gradients."""
    s = step
    stats = compute_token_stats(s["student_hidden"].detach(), s["teacher_hidden"], s["tokens"], s["valid"],
                                s["student_head"], s["teacher_head"], top_k=K)
    loss = kept_head_loss(s["student_hidden"], s["teacher_hidden"], s["valid"], s["rollout"], stats, s["student_head"],
                          s["teacher_head"], ReverseKL(), chunk_size=3, store_rows=10**6 if store else 0).loss
    first = torch.autograd.grad(loss, [s["student_hidden"], s["student"].lm_head.weight], retain_graph=True)
    _, ref_loss = full_logits_loss(s, ReverseKL(), s["valid"])
    for a, c in zip(first, grads_of(ref_loss, s), strict=True):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-4)
    with pytest.raises(RuntimeError, match="second backward"):
        torch.autograd.grad(loss, [s["student_hidden"], s["student"].lm_head.weight])


@pytest.mark.parametrize("store", [False, True], ids=["grads_per_chunk", "stored_logit_grads"])
def test_chunked_loss_under_bf16_autocast_matches_autograd(step, store):
    """Mixed precision: under bf16 autocast the hand-differentiated head gives autograd's gradients
    (fp32 parameter, bf16 matmuls) to bf16 accuracy."""
    s = step
    stats = compute_token_stats(s["student_hidden"].detach(), s["teacher_hidden"], s["tokens"], s["valid"],
                                s["student_head"], s["teacher_head"], top_k=K)

    def run(head):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = kept_head_loss(s["student_hidden"], s["teacher_hidden"], s["valid"], s["rollout"], stats, head,
                                  s["teacher_head"], ReverseKL(), chunk_size=3, store_rows=10**6 if store else 0)
        return grads_of(loss.loss, s)

    weight = s["student"].lm_head.weight
    chunked, plain = run(s["student_head"]), run(lambda h: s["student_head"](h))  # a plain callable: autograd
    assert weight.dtype == torch.float32 and chunked[1].dtype == torch.float32
    for a, b in zip(chunked, plain, strict=True):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-2)


# ------------------------------------------------------------------------------------ memory
class LargestLogits(TorchDispatchMode):
    """Records the most rows of any (rows, V) or (N, L, V) tensor an op allocates (views allocate nothing)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.max_rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):  # views and in-place ops
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab:
                self.max_rows = max(self.max_rows, t.numel() // self.vocab)
        return out


def memory_step(vocab: int = 512, chunk_size: int = 16, ratio: float = 0.1, fused: bool = False, store_rows: int = 0):
    """A small model step's scoring + selection + loss + backward under `LargestLogits`; returns rows seen."""
    student, teacher = tiny_qwen2(1, vocab=vocab), tiny_qwen2(2, vocab=vocab)
    n, p, length = 8, 4, 24
    ids = torch.randint(0, vocab, (n, p + length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    rollout = Rollout(ids, mask, torch.ones(n, length, dtype=torch.bool), -torch.rand(n, length), prompt_len=p)
    s_hidden = final_hidden_states(student, ids, mask)[:, p - 1 : -1]
    with torch.no_grad():
        t_hidden = final_hidden_states(teacher, ids, mask)[:, p - 1 : -1]
    s_head, t_head = LogitHead(student), LogitHead(teacher)
    selector = TeachabilitySelector(ratio=ratio, top_k=8)
    with LargestLogits(vocab) as probe:
        if fused:
            stats, loss = shared_head_loss(s_hidden, t_hidden, rollout, s_head, t_head, ReverseKL(), top_k=8,
                                           chunk_size=chunk_size)
            keep = stats.valid
        else:
            stats = compute_token_stats(s_hidden.detach(), t_hidden, rollout.response_ids, rollout.response_mask,
                                        s_head, t_head, top_k=8, chunk_size=chunk_size)
            keep = selector.select(stats)
            loss = kept_head_loss(s_hidden, t_hidden, keep, rollout, stats, s_head, t_head, ReverseKL(),
                                  chunk_size=chunk_size, store_rows=store_rows)
        loss.loss.backward()
    assert student.lm_head.weight.grad.abs().sum() > 0
    return probe.max_rows, n * length, int(keep.sum())


@pytest.mark.parametrize(("ratio", "fused"), [(0.1, False), (0.5, False), (1.0, False), (1.0, True)])
def test_step_holds_at_most_one_chunk_of_logits(ratio, fused):
    """192 response rows, chunk 16, 20 to 192 kept rows: no (rows, V) tensor ever has more than 16 rows."""
    max_rows, rows, kept = memory_step(chunk_size=16, ratio=ratio, fused=fused)
    assert kept > 16, "the kept rows must exceed one chunk for this test to mean anything"
    assert 0 < max_rows <= 16, f"a tensor held {max_rows} rows of logits (chunk 16, {rows} response rows)"


def test_stored_logit_gradients_hold_kept_rows_not_all_rows():
    """With the kept rows' logit gradients stored (store_rows), the one tensor larger than a chunk is the
    kept rows' (M, V) gradient: 20 of 192 rows, never all of them."""
    max_rows, rows, kept = memory_step(chunk_size=16, ratio=0.1, store_rows=64)
    assert 16 < kept <= 64
    assert max_rows == kept, f"largest logits-shaped tensor {max_rows} rows; kept {kept}, all {rows}"


def test_largest_logits_probe_sees_full_logits():
    """The probe itself: the TRL-style full-logits computation shows all N·L rows."""
    model = tiny_qwen2(1, vocab=512)
    hidden = torch.randn(8, 24, HIDDEN)
    with LargestLogits(512) as probe:
        LogitHead(model)(hidden).log_softmax(-1)
    assert probe.max_rows == 8 * 24
