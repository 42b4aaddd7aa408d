"""The loss pass: kept-rows loss == full-logits loss restricted to the same rows; the one reduction."""

from __future__ import annotations

import pytest
import torch

from opdlab.divergences import GeneralizedJSD, LossInputs, ReverseKL, SampledTokenOPD
from opdlab.loss import kept_token_loss, reduce_token_loss
from opdlab.rollout import encode_prompts
from opdlab.tasks import AdditionTask

DIVERGENCES = {"sampled_token": SampledTokenOPD, "reverse_kl": ReverseKL, "jsd(0.3)": lambda: GeneralizedJSD(beta=0.3)}


def step_inputs(module, n_prompts: int = 6):
    """Rollout, hidden states (student with grad) and stats of one step on the tiny models."""
    problems = [AdditionTask(digits=2).problem_at(i) for i in range(n_prompts)]
    prompts = encode_prompts(module.tokenizer, [p.prompt for p in problems], [p.answer for p in problems])
    module.hparams.num_samples = 2
    rollout = module.rollout(prompts)
    student_hidden, teacher_hidden = module.response_hidden_states(rollout)
    stats = module.score(student_hidden, teacher_hidden, rollout)
    return rollout, student_hidden, teacher_hidden, stats


def full_logits_token_loss(module, student_hidden, teacher_hidden, rollout, stats, divergence):
    """The plain computation: heads on all N×L rows, per-token loss everywhere. (N·L,)"""
    student_logits = module.student_head(student_hidden).flatten(0, 1)
    with torch.no_grad():
        teacher_logits = module.teacher_head(teacher_hidden).flatten(0, 1)
    inputs = LossInputs(
        student_logits=student_logits,
        teacher_logits=teacher_logits,
        tokens=rollout.response_ids.flatten(),
        sampling_logp=rollout.sampling_logp.flatten(),
        teacher_token_logp=stats.teacher_token_logp.flatten(),
    )
    return divergence.token_loss(inputs)


def random_keep(valid: torch.Tensor, fraction: float = 0.4) -> torch.Tensor:
    keep = (torch.rand(valid.shape, generator=torch.Generator().manual_seed(3)) < fraction) & valid
    assert 0 < keep.sum() < valid.sum(), "test needs a proper subset"
    return keep


@pytest.mark.parametrize("chunk_size", [1024, 3], ids=["one_chunk", "chunked"])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_kept_rows_loss_equals_full_logits_loss_and_gradients(tiny_module, name, chunk_size):
    module, divergence = tiny_module, DIVERGENCES[name]()
    rollout, student_hidden, teacher_hidden, stats = step_inputs(module)
    assert student_hidden.requires_grad and not teacher_hidden.requires_grad
    keep = random_keep(stats.valid)
    params = [p for p in module.student.parameters() if p.requires_grad]

    kept = kept_token_loss(student_hidden, teacher_hidden, keep, rollout, stats,
                           module.student_head, module.teacher_head, divergence, chunk_size=chunk_size)
    full = full_logits_token_loss(module, student_hidden, teacher_hidden, rollout, stats, divergence)
    flat_keep = keep.flatten()
    assert kept.shape == (int(keep.sum()),)
    # Row for row, in the same (sequence-major) order.
    torch.testing.assert_close(kept, full[flat_keep], atol=1e-6, rtol=1e-5)

    count = keep.sum()
    kept_scalar = reduce_token_loss(kept, count)
    full_scalar = torch.where(flat_keep, full, torch.zeros_like(full)).sum() / count
    torch.testing.assert_close(kept_scalar, full_scalar, atol=1e-6, rtol=1e-5)

    kept_grads = torch.autograd.grad(kept_scalar, params, retain_graph=True, allow_unused=True)
    full_grads = torch.autograd.grad(full_scalar, params, allow_unused=True)
    nonzero = 0
    for p, a, b in zip(params, kept_grads, full_grads, strict=True):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
        nonzero += int(a.abs().sum() > 0)
    assert nonzero > 0, "the loss did not reach the student parameters"


@pytest.mark.parametrize("chunk_size", [1024, 4], ids=["one_chunk", "chunked"])
def test_kept_rows_gradients_with_nonuniform_weights(tiny_module, chunk_size):
    """Per-row weights on the token losses (not the uniform mean) still give the plain gradients."""
    module, divergence = tiny_module, ReverseKL()
    rollout, student_hidden, teacher_hidden, stats = step_inputs(module)
    keep = random_keep(stats.valid, 0.6)
    params = [p for p in module.student.parameters() if p.requires_grad]
    kept = kept_token_loss(student_hidden, teacher_hidden, keep, rollout, stats,
                           module.student_head, module.teacher_head, divergence, chunk_size=chunk_size)
    weights = torch.linspace(0.1, 2.0, kept.numel())
    full = full_logits_token_loss(module, student_hidden, teacher_hidden, rollout, stats, divergence)[keep.flatten()]
    a = torch.autograd.grad((kept * weights).sum(), params, retain_graph=True, allow_unused=True)
    b = torch.autograd.grad((full * weights).sum(), params, allow_unused=True)
    for p, ga, gb in zip(params, a, b, strict=True):
        ga = torch.zeros_like(p) if ga is None else ga
        gb = torch.zeros_like(p) if gb is None else gb
        torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("chunk_size", [1024, 5], ids=["one_chunk", "chunked"])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_score_and_loss_all_rows_equals_two_pass_path(tiny_module, name, chunk_size):
    """The ratio-1 fused path == compute_token_stats followed by kept_token_loss(keep=response mask)."""
    from opdlab.loss import score_and_loss_all_rows
    from opdlab.scoring import compute_token_stats

    module, divergence = tiny_module, DIVERGENCES[name]()
    rollout, student_hidden, teacher_hidden, _ = step_inputs(module)
    params = [p for p in module.student.parameters() if p.requires_grad]
    valid = rollout.response_mask
    stats = compute_token_stats(student_hidden.detach(), teacher_hidden, rollout.response_ids, valid,
                                module.student_head, module.teacher_head, top_k=4, chunk_size=chunk_size)
    two_pass = kept_token_loss(student_hidden, teacher_hidden, valid, rollout, stats, module.student_head,
                               module.teacher_head, divergence, chunk_size=chunk_size)
    fused_stats, fused = score_and_loss_all_rows(student_hidden, teacher_hidden, rollout, module.student_head,
                                                 module.teacher_head, divergence, top_k=4, chunk_size=chunk_size)
    torch.testing.assert_close(fused, two_pass, atol=1e-6, rtol=1e-5)
    for field in ("student_token_logp", "teacher_token_logp", "compat", "union_kl", "topk_entropy"):
        torch.testing.assert_close(getattr(fused_stats, field), getattr(stats, field), atol=1e-5, rtol=1e-5)
    a = torch.autograd.grad(reduce_token_loss(fused, valid.sum()), params, retain_graph=True, allow_unused=True)
    b = torch.autograd.grad(reduce_token_loss(two_pass, valid.sum()), params, allow_unused=True)
    for p, ga, gb in zip(params, a, b, strict=True):
        ga = torch.zeros_like(p) if ga is None else ga
        gb = torch.zeros_like(p) if gb is None else gb
        torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-4)


def test_kept_rows_loss_skips_teacher_head_for_sampled_token(tiny_module):
    """SampledTokenOPD needs no teacher logits in the loss pass: the teacher head is not applied again."""
    module = tiny_module
    rollout, student_hidden, teacher_hidden, stats = step_inputs(module)
    calls = []

    def teacher_head(h):
        calls.append(h.shape)
        return module.teacher_head(h)

    kept_token_loss(student_hidden, teacher_hidden, stats.valid, rollout, stats,
                    module.student_head, teacher_head, SampledTokenOPD())
    assert calls == []
    kept_token_loss(student_hidden, teacher_hidden, stats.valid, rollout, stats,
                    module.student_head, teacher_head, ReverseKL())
    assert calls == [(int(stats.valid.sum()), teacher_hidden.shape[-1])]


def test_student_head_applied_to_kept_rows_only(tiny_module):
    """The memory claim: the with-grad student head sees M kept rows, never N×L."""
    module = tiny_module
    rollout, student_hidden, teacher_hidden, stats = step_inputs(module)
    keep = random_keep(stats.valid, 0.2)
    shapes = []

    def student_head(h):
        shapes.append(tuple(h.shape))
        return module.student_head(h)

    kept_token_loss(student_hidden, teacher_hidden, keep, rollout, stats, student_head, module.teacher_head,
                    ReverseKL())
    assert shapes == [(int(keep.sum()), student_hidden.shape[-1])]


def test_reduce_token_loss_denominators():
    token_loss = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    torch.testing.assert_close(reduce_token_loss(token_loss, 3), torch.tensor(2.0))  # "kept"
    torch.testing.assert_close(reduce_token_loss(token_loss, torch.tensor(10)), torch.tensor(0.6))  # "valid"
    torch.testing.assert_close(reduce_token_loss(token_loss, 0), torch.tensor(6.0))  # never divides by zero


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_all_false_keep_gives_zero_loss_and_clean_backward(tiny_module, name):
    module = tiny_module
    rollout, student_hidden, teacher_hidden, stats = step_inputs(module)
    keep = torch.zeros_like(stats.valid)
    token_loss = kept_token_loss(student_hidden, teacher_hidden, keep, rollout, stats, module.student_head,
                                 module.teacher_head, DIVERGENCES[name]())
    assert token_loss.shape == (0,)
    for denominator in (keep.sum(), stats.valid.sum()):  # "kept" and "valid" normalisation
        loss = reduce_token_loss(token_loss, denominator)
        assert loss.item() == 0.0
        assert loss.requires_grad, "an empty selection must keep the graph (DDP and Lightning call backward)"
        loss.backward(retain_graph=True)
    for p in module.student.parameters():
        assert p.grad is None or (torch.isfinite(p.grad).all() and (p.grad == 0).all())


def test_full_vocabulary_entropies_only_when_asked(tiny_module):
    """No built-in selector reads the full-vocabulary entropies, so the step skips their two passes;
    `request_full_entropy` (the token bank calls it) or a selector's `needs_full_entropy` turns them on,
    with the same values as the plain computation."""
    module = tiny_module
    rollout, student_hidden, teacher_hidden, stats = step_inputs(module)
    assert stats.student_entropy is None and stats.teacher_entropy is None
    assert not module.scores_full_entropy
    module.request_full_entropy()
    with_entropy = module.score(student_hidden, teacher_hidden, rollout)
    valid = with_entropy.valid
    with torch.no_grad():
        logp = torch.log_softmax(module.student_head(student_hidden).double(), -1)
        expected = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(with_entropy.student_entropy[valid].double(), expected[valid], atol=1e-5, rtol=1e-5)
    assert (with_entropy.teacher_entropy[valid] > 0).all()
    for name in ("union_kl", "compat", "topk_entropy", "student_token_logp"):  # the rest is unchanged
        torch.testing.assert_close(getattr(with_entropy, name), getattr(stats, name))

    from opdlab.selectors import EntropySelector

    class FullEntropySelector(EntropySelector):
        needs_full_entropy = True

    module.full_entropy_requested, module.selector = False, FullEntropySelector()
    assert module.scores_full_entropy
    assert module.score(student_hidden, teacher_hidden, rollout).student_entropy is not None
