"""The loss pass on the tiny models: kept-rows head loss == full-logits loss restricted to the same rows;
the normalisation rule (`opdlab.step.loss_scale`)."""

from __future__ import annotations

import pytest
import torch

from opdlab.divergences import GeneralizedJSD, LossInputs, ReverseKL, SampledTokenOPD
from conftest import kept_head_loss, response_hidden_states, score, shared_head_loss

from opdlab.scoring import compute_token_stats
from opdlab.step import loss_scale
from opdlab.rollout import encode_prompts
from opdlab.tasks import AdditionTask

DIVERGENCES = {"sampled_token": SampledTokenOPD, "reverse_kl": ReverseKL, "jsd(0.3)": lambda: GeneralizedJSD(beta=0.3)}


def step_inputs(module, n_prompts: int = 6):
    """Rollout, hidden states (student with grad) and stats of one step on the tiny models."""
    problems = [AdditionTask(digits=2).problem_at(i) for i in range(n_prompts)]
    prompts = encode_prompts(module.tokenizer, [p.prompt for p in problems], [p.answer for p in problems])
    module.rollout_options.num_samples = 2
    rollout = module.rollout(prompts)
    student_hidden, teacher_hidden = response_hidden_states(module, rollout)
    stats = score(module, student_hidden, teacher_hidden, rollout)
    return rollout, student_hidden, teacher_hidden, stats


def full_logits_token_loss(module, student_hidden, teacher_hidden, rollout, stats, divergence):
    """The plain computation: heads on all N×L rows, per-token loss everywhere. (N·L,)"""
    student_logits = module.student_head(student_hidden).flatten(0, 1)
    with torch.no_grad():
        teacher_logits = module.placement.head(teacher_hidden).flatten(0, 1)
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

    result = kept_head_loss(student_hidden, teacher_hidden, keep, rollout, stats, module.student_head,
                            module.placement.head, divergence, chunk_size=chunk_size)
    full = full_logits_token_loss(module, student_hidden, teacher_hidden, rollout, stats, divergence)
    flat_keep = keep.flatten()
    assert result.token_losses.shape == (int(keep.sum()),)
    # Row for row, in the same (sequence-major) order.
    torch.testing.assert_close(result.token_losses, full[flat_keep].detach(), atol=1e-6, rtol=1e-5)

    count = keep.sum()
    kept_scalar = result.loss
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


@pytest.mark.parametrize("chunk_size", [1024, 5], ids=["one_chunk", "chunked"])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_shared_projection_equals_two_pass_path(tiny_module, name, chunk_size):
    """The ratio-1 path (statistics and loss from one projection) == compute_token_stats followed by the
    head loss over every valid row."""
    module, divergence = tiny_module, DIVERGENCES[name]()
    rollout, student_hidden, teacher_hidden, _ = step_inputs(module)
    params = [p for p in module.student.parameters() if p.requires_grad]
    valid = rollout.response_mask
    stats = compute_token_stats(student_hidden.detach(), teacher_hidden, rollout.response_ids, valid,
                                module.student_head, module.placement.head, top_k=4, chunk_size=chunk_size)
    two_pass = kept_head_loss(student_hidden, teacher_hidden, valid, rollout, stats, module.student_head,
                              module.placement.head, divergence, chunk_size=chunk_size)
    shared_stats, shared = shared_head_loss(student_hidden, teacher_hidden, rollout, module.student_head,
                                            module.placement.head, divergence, top_k=4, chunk_size=chunk_size)
    torch.testing.assert_close(shared.token_losses, two_pass.token_losses, atol=1e-6, rtol=1e-5)
    for field in ("student_token_logp", "teacher_token_logp", "compatibility", "disagreement", "topk_entropy"):
        torch.testing.assert_close(getattr(shared_stats, field), getattr(stats, field), atol=1e-5, rtol=1e-5)
    a = torch.autograd.grad(shared.loss, params, retain_graph=True, allow_unused=True)
    b = torch.autograd.grad(two_pass.loss, params, allow_unused=True)
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
        return module.placement.head(h)

    kept_head_loss(student_hidden, teacher_hidden, stats.valid, rollout, stats,
                   module.student_head, teacher_head, SampledTokenOPD())
    assert calls == []
    kept_head_loss(student_hidden, teacher_hidden, stats.valid, rollout, stats,
                   module.student_head, teacher_head, ReverseKL())
    assert calls == [(int(stats.valid.sum()), teacher_hidden.shape[-1])]


def test_student_head_applied_to_kept_rows_only(tiny_module, monkeypatch):
    """The memory claim: the with-grad student head sees M kept rows, never N×L."""
    module = tiny_module
    rollout, student_hidden, teacher_hidden, stats = step_inputs(module)
    keep = random_keep(stats.valid, 0.2)
    shapes = []

    def student_head(h):
        shapes.append(tuple(h.shape))
        return module.student_head(h)

    kept_head_loss(student_hidden, teacher_hidden, keep, rollout, stats, student_head, module.placement.head,
                   ReverseKL())
    assert shapes == [(int(keep.sum()), student_hidden.shape[-1])]
    linear_rows = []  # the hand-written path: the student head's matmul on kept-row chunks only
    weight, linear = module.student_head.proj.weight, torch.nn.functional.linear

    def spy(x, w, b=None):
        if w.data_ptr() == weight.data_ptr():
            linear_rows.append(x.shape[0])
        return linear(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    kept_head_loss(student_hidden, teacher_hidden, keep, rollout, stats, module.student_head, module.placement.head,
                   ReverseKL(), chunk_size=4)
    assert linear_rows and sum(linear_rows) == int(keep.sum()) and max(linear_rows) <= 4


def test_loss_scale_denominators():
    """`kept`: 1 / kept tokens; `valid`: 1 / valid response tokens; never a division by zero (single process,
    so the world-size factor is 1)."""
    keep = torch.tensor([[True, False, True], [False, False, True]])
    valid = torch.ones(2, 3, dtype=torch.bool)
    torch.testing.assert_close(loss_scale("kept", keep, valid), torch.tensor(1 / 3))
    torch.testing.assert_close(loss_scale("valid", keep, valid), torch.tensor(1 / 6))
    torch.testing.assert_close(loss_scale("kept", torch.zeros_like(keep), valid), torch.tensor(1.0))


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_all_false_keep_gives_zero_loss_and_clean_backward(tiny_module, name):
    module = tiny_module
    rollout, student_hidden, teacher_hidden, stats = step_inputs(module)
    keep = torch.zeros_like(stats.valid)
    for denominator in (keep.sum(), stats.valid.sum()):  # "kept" and "valid" normalisation
        result = kept_head_loss(student_hidden, teacher_hidden, keep, rollout, stats, module.student_head,
                                module.placement.head, DIVERGENCES[name](), denominator=denominator)
        assert result.token_losses.shape == (0,)
        loss = result.loss
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
    with_entropy = score(module, student_hidden, teacher_hidden, rollout)
    valid = with_entropy.valid
    with torch.no_grad():
        logp = torch.log_softmax(module.student_head(student_hidden).double(), -1)
        expected = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(with_entropy.student_entropy[valid].double(), expected[valid], atol=1e-5, rtol=1e-5)
    assert (with_entropy.teacher_entropy[valid] > 0).all()
    for name in ("disagreement", "compatibility", "topk_entropy", "student_token_logp"):  # the rest is unchanged
        torch.testing.assert_close(getattr(with_entropy, name), getattr(stats, name))

    from opdlab.selectors import EntropySelector

    class FullEntropySelector(EntropySelector):
        needs_full_entropy = True

    module.full_entropy_requested, module.selector = False, FullEntropySelector()
    assert module.scores_full_entropy
    assert score(module, student_hidden, teacher_hidden, rollout).student_entropy is not None
