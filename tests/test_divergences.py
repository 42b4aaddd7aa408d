"""Divergence contract tests (every registered divergence, plugins included) and reference numerics."""

from __future__ import annotations

import math

import pytest
import torch

from opdlab.divergences import (
    Divergence, ForwardKL, GeneralizedJSD, LossInputs, ReverseKL, SampledTokenOPD, SkewKL, TotalVariation,
)
from opdlab.plugins import discover

M, V = 6, 11

# Every registered divergence with its default arguments, plus a few non-default settings of built-ins.
REGISTERED = {name: plugin.cls for name, plugin in discover("opdlab.divergences").items()}
VARIANTS = {
    **REGISTERED,
    "jsd(beta=0.1)": lambda: GeneralizedJSD(beta=0.1),
    "jsd(beta=0.9)": lambda: GeneralizedJSD(beta=0.9),
    "skew_kl(alpha=0.3,reverse)": lambda: SkewKL(alpha=0.3, reverse=True),
    "forward_kl(T=2)": lambda: ForwardKL(temperature=2.0),
    "sampled_token(coef=0.5)": lambda: SampledTokenOPD(coef=0.5),
}


def build(name: str) -> Divergence:
    return VARIANTS[name]()


def make_inputs(student_logits, teacher_logits, tokens=None, sampling_logp=None, teacher_token_logp=None):
    """LossInputs with the sampled-token fields derived from the logits unless given."""
    if tokens is None:
        probs = torch.softmax(student_logits.detach().float(), -1)
        tokens = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(0)).squeeze(-1)
    s_logp = torch.log_softmax(student_logits.detach().float(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    t_logp = torch.log_softmax(teacher_logits.detach().float(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    return LossInputs(
        student_logits=student_logits,
        teacher_logits=teacher_logits,
        tokens=tokens,
        sampling_logp=s_logp if sampling_logp is None else sampling_logp,
        teacher_token_logp=t_logp if teacher_token_logp is None else teacher_token_logp,
    )


def test_builtins_are_registered():
    assert {"sampled_token", "forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"} <= set(REGISTERED)


# --------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_zero_when_student_equals_teacher(name):
    div = build(name)
    logits = torch.randn(M, V) * 3
    # Student == teacher: same logits, teacher's sampled-token log-prob == student's == sampling log-prob.
    loss = div.token_loss(make_inputs(logits.clone().requires_grad_(), logits.clone()))
    assert loss.shape == (M,)
    torch.testing.assert_close(loss.detach(), torch.zeros(M), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_nonnegative_when_declared(name):
    div = build(name)
    if not div.nonnegative:
        pytest.skip(f"{name} declares nonnegative=False (a policy-gradient surrogate)")
    for scale in (0.1, 1.0, 10.0):
        loss = div.token_loss(make_inputs(torch.randn(64, V) * scale, torch.randn(64, V) * scale))
        assert (loss >= -1e-6).all(), f"{name}: min {loss.min()}"
        assert (loss > 1e-6).any(), f"{name}: zero on different distributions"


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_finite_loss_and_gradient_with_neginf_columns(name):
    div = build(name)
    student = torch.randn(M, V) * 2
    teacher = torch.randn(M, V) * 2
    masked_cols = [2, 7]  # e.g. vocabulary padding or banned tokens, masked in both models
    student[:, masked_cols] = float("-inf")
    teacher[:, masked_cols] = float("-inf")
    student.requires_grad_()
    tokens = torch.tensor([0, 1, 3, 4, 5, 10])
    loss = div.token_loss(make_inputs(student, teacher, tokens=tokens))
    assert torch.isfinite(loss).all(), loss
    # A non-trivial upstream gradient so that a NaN anywhere in the backward shows up.
    loss.backward(torch.linspace(0.5, 1.5, M))
    assert torch.isfinite(student.grad).all(), student.grad
    assert (student.grad[:, masked_cols] == 0).all()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_gradient_reaches_student_logits(name):
    div = build(name)
    student = (torch.randn(M, V) * 2).requires_grad_()
    teacher = torch.randn(M, V) * 2
    loss = div.token_loss(make_inputs(student, teacher))
    assert loss.requires_grad
    loss.sum().backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_no_gradient_to_teacher_inputs(name):
    """Teacher-side inputs are constants of the loss: even if they carry grad, none flows back into them."""
    div = build(name)
    teacher_weight = torch.randn(V, V, requires_grad=True)  # a teacher someone forgot to freeze
    student = (torch.randn(M, V) * 2).requires_grad_()
    features = torch.randn(M, V)
    teacher = features @ teacher_weight
    tokens = torch.randint(0, V, (M,), generator=torch.Generator().manual_seed(1))
    inputs = make_inputs(student, teacher, tokens=tokens)
    inputs.teacher_token_logp = torch.log_softmax(teacher, -1).gather(-1, tokens[:, None]).squeeze(-1)
    old_policy = torch.log_softmax(features @ teacher_weight * 0.5, -1)  # grad-carrying "old" log-probs
    inputs.sampling_logp = old_policy.gather(-1, tokens[:, None]).squeeze(-1)
    loss = div.token_loss(inputs)
    loss.sum().backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher_weight.grad is None or (teacher_weight.grad == 0).all()


# --------------------------------------------------------------------------------------- references
def kl64(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim from probabilities, float64, 0·log 0 = 0."""
    p, q = p.double(), q.double()
    return torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p)).sum(-1)


def trl_generalized_jsd(student_logits, teacher_logits, beta: float, temperature: float = 1.0) -> torch.Tensor:
    """Independent reference of TRL's `generalized_jsd_loss` per token (reduction="none", summed over vocab).

    beta·KL(T || M) + (1 - beta)·KL(S || M), M = beta·T + (1 - beta)·S; beta = 0 -> KL(T || S),
    beta = 1 -> KL(S || T).
    """
    s = torch.softmax(student_logits.double() / temperature, -1)
    t = torch.softmax(teacher_logits.double() / temperature, -1)
    if beta == 0:
        return kl64(t, s)
    if beta == 1:
        return kl64(s, t)
    m = beta * t + (1 - beta) * s
    return beta * kl64(t, m) + (1 - beta) * kl64(s, m)


@pytest.fixture
def logits_pair():
    return torch.randn(32, 4096) * 2, torch.randn(32, 4096) * 2  # a wide vocabulary: cancellation shows


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_generalized_jsd_matches_trl_formula(beta, temperature, logits_pair):
    """fp32 against the float64 formula at fp32 precision (rtol 1e-6): the hand-written JSD once summed
    q·t and q·log m separately and lost 1.3e-5 relative by cancellation at beta 0.1/0.9, temperature 2."""
    s, t = logits_pair
    got = GeneralizedJSD(beta=beta, temperature=temperature).token_loss(make_inputs(s, t))
    torch.testing.assert_close(got.double(), trl_generalized_jsd(s, t, beta, temperature), atol=1e-7, rtol=1e-6)


def test_generalized_jsd_limits_are_forward_and_reverse_kl(logits_pair):
    s, t = logits_pair
    inputs = make_inputs(s, t)
    torch.testing.assert_close(GeneralizedJSD(beta=0.0).token_loss(inputs), ForwardKL().token_loss(inputs))
    torch.testing.assert_close(GeneralizedJSD(beta=1.0).token_loss(inputs), ReverseKL().token_loss(inputs))


def test_kl_directions_match_reference(logits_pair):
    s, t = logits_pair
    inputs = make_inputs(s, t)
    ps, pt = torch.softmax(s.double(), -1), torch.softmax(t.double(), -1)
    torch.testing.assert_close(ForwardKL().token_loss(inputs).double(), kl64(pt, ps), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ReverseKL().token_loss(inputs).double(), kl64(ps, pt), atol=1e-5, rtol=1e-5)
    pt2, ps2 = torch.softmax(t.double() / 3, -1), torch.softmax(s.double() / 3, -1)
    torch.testing.assert_close(
        ReverseKL(temperature=3.0).token_loss(inputs).double(), kl64(ps2, pt2), atol=1e-5, rtol=1e-5
    )


def test_skew_kl_and_tvd_match_reference(logits_pair):
    s, t = logits_pair
    inputs = make_inputs(s, t)
    ps, pt = torch.softmax(s.double(), -1), torch.softmax(t.double(), -1)
    torch.testing.assert_close(
        SkewKL(alpha=0.1).token_loss(inputs).double(), kl64(pt, 0.1 * pt + 0.9 * ps), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        SkewKL(alpha=0.3, reverse=True).token_loss(inputs).double(), kl64(ps, 0.3 * ps + 0.7 * pt), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(SkewKL(alpha=0.0).token_loss(inputs), ForwardKL().token_loss(inputs))
    torch.testing.assert_close(
        TotalVariation().token_loss(inputs).double(), 0.5 * (pt - ps).abs().sum(-1), atol=1e-6, rtol=1e-6
    )


# --------------------------------------------------------------------------------------- sampled-token OPD
def test_sampled_token_opd_clipping_by_hand():
    """Ratio and advantage on both sides of [1 - 0.2, 1 + 0.28], against a hand computation."""
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0, 1.0]]).repeat(6, 1)
    tokens = torch.tensor([0, 1, 4, 0, 1, 4])
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1, 0.9])  # pi_theta / pi_old
    adv = torch.tensor([0.7, -0.7, 0.7, -0.7, 0.4, -0.4])  # -(log pi_theta - log pi_T)
    # Hand-computed loss -min(r·A, clip(r, 0.8, 1.28)·A) and whether the clipped branch is active.
    expected = torch.tensor([-1.28 * 0.7, -1.5 * -0.7, -0.5 * 0.7, -0.8 * -0.7, -1.1 * 0.4, -0.9 * -0.4])
    clipped = torch.tensor([True, False, False, True, False, False])

    student = logits.clone().requires_grad_()
    inputs = LossInputs(
        student_logits=student, teacher_logits=None, tokens=tokens,
        sampling_logp=logp - ratio.log(), teacher_token_logp=logp + adv,
    )
    loss = SampledTokenOPD().token_loss(inputs)
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)

    loss.sum().backward()
    # d(-r·A)/d logits = -A · r · (onehot(y) - softmax); zero where the clipped branch is taken.
    onehot = torch.nn.functional.one_hot(tokens, logits.shape[-1]).float()
    expected_grad = -(adv * ratio)[:, None] * (onehot - torch.softmax(logits, -1))
    expected_grad[clipped] = 0.0
    torch.testing.assert_close(student.grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_sampled_token_opd_custom_clip_and_coef():
    logits = torch.zeros(2, 4)
    tokens = torch.tensor([0, 1])
    logp = torch.full((2,), -math.log(4))
    inputs = LossInputs(logits.requires_grad_(), None, tokens, logp - math.log(1.2), logp + 1.0)
    # ratio 1.2, teacher likes the token: A = coef · 1 > 0, clip_high 0.1 -> clipped at 1.1.
    loss = SampledTokenOPD(coef=2.0, clip_low=0.2, clip_high=0.1).token_loss(inputs)
    torch.testing.assert_close(loss.detach(), torch.full((2,), -1.1 * 2.0))


def test_sampled_token_opd_gradient_is_reverse_kl_policy_gradient():
    """On-policy (ratio 1), the surrogate's gradient is -A · ∇log π(y): it raises tokens the teacher prefers."""
    student = torch.zeros(1, 3, requires_grad=True)
    tokens = torch.tensor([2])
    logp = torch.full((1,), -math.log(3))
    loss = SampledTokenOPD().token_loss(LossInputs(student, None, tokens, logp, logp + 0.5))
    loss.sum().backward()
    assert student.grad[0, 2] < 0  # gradient descent raises the logit of the token the teacher likes more
    assert SampledTokenOPD.needs_teacher_logits is False


def test_sampled_token_opd_tolerates_neginf_teacher_logp():
    """A token the teacher gives zero probability must not turn the loss into inf/NaN."""
    student = torch.randn(3, V, requires_grad=True)
    tokens = torch.tensor([0, 1, 2])
    inputs = make_inputs(student, torch.randn(3, V), tokens=tokens,
                         teacher_token_logp=torch.tensor([float("-inf"), -1.0, -2.0]))
    loss = SampledTokenOPD().token_loss(inputs)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("make", [lambda: GeneralizedJSD(beta=1.5), lambda: GeneralizedJSD(beta=-0.1),
                                  lambda: SkewKL(alpha=1.0), lambda: SampledTokenOPD(clip_low=-0.1)])
def test_invalid_divergence_arguments_raise(make):
    with pytest.raises(ValueError, match="must be"):
        make()


def test_loss_temperature_must_be_positive():
    """Refused where the divergence is built (it used to pass construction and fail inside the first step)."""
    for value in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"temperature \(the loss's softmax temperature, not the rollout's\) must"):
            ForwardKL(temperature=value)


def autograd_reference(kind: str, student, teacher, beta: float = 0.5, temperature: float = 1.0):
    """The plain autograd formulas (what the divergences computed before their hand-written gradients)."""
    from opdlab.maths import log_softmax_fp32, masked_kl

    s, t = log_softmax_fp32(student, temperature), log_softmax_fp32(teacher.detach(), temperature)
    if kind == "reverse_kl":
        return masked_kl(s, t)
    if kind == "forward_kl":
        return masked_kl(t, s)
    m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
    return beta * masked_kl(t, m) + (1 - beta) * masked_kl(s, m)


HAND_GRAD = {
    "reverse_kl": (lambda: ReverseKL(), "reverse_kl", 0.5, 1.0),
    "reverse_kl(T=2)": (lambda: ReverseKL(temperature=2.0), "reverse_kl", 0.5, 2.0),
    "forward_kl": (lambda: ForwardKL(), "forward_kl", 0.5, 1.0),
    "forward_kl(T=0.5)": (lambda: ForwardKL(temperature=0.5), "forward_kl", 0.5, 0.5),
    "jsd(0.5)": (lambda: GeneralizedJSD(0.5), "jsd", 0.5, 1.0),
    "jsd(0.1,T=2)": (lambda: GeneralizedJSD(0.1, temperature=2.0), "jsd", 0.1, 2.0),
    "jsd(0.9)": (lambda: GeneralizedJSD(0.9), "jsd", 0.9, 1.0),
}


@pytest.mark.parametrize("masked", [False, True], ids=["finite", "neginf_columns"])
@pytest.mark.parametrize("name", sorted(HAND_GRAD))
def test_hand_written_gradients_equal_autograd(name, masked):
    """KL / JSD compute d loss / d logits by hand: value and gradient == autograd through the plain
    formula, for a non-uniform upstream gradient, temperatures, peaked logits and masked columns."""
    make, kind, beta, temperature = HAND_GRAD[name]
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(M, 40, generator=gen) * 4
    teacher = torch.randn(M, 40, generator=gen) * 4
    teacher[0] = student[0]  # identical rows: zero loss, zero gradient
    student[1, 3] += 40.0  # a near one-hot row
    if masked:
        student[:, [5, 9]] = teacher[:, [5, 9]] = float("-inf")
    upstream = torch.linspace(0.5, 1.5, M)
    a, b = student.clone().requires_grad_(), student.clone().requires_grad_()
    got = make().token_loss(make_inputs(a, teacher))
    ref = autograd_reference(kind, b, teacher, beta, temperature)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    (got * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4)
    assert got[0].abs() < 1e-5 and a.grad[0].abs().max() < 1e-5


def test_hand_written_gradient_in_the_logits_dtype():
    student = (torch.randn(M, V) * 2).bfloat16().requires_grad_()
    loss = ReverseKL().token_loss(make_inputs(student, torch.randn(M, V).bfloat16()))
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert student.grad.dtype == torch.bfloat16 and torch.isfinite(student.grad).all()


def test_hand_written_loss_without_grad_matches():
    """Under no_grad (evaluation) the loss is the same and no gradient buffer is kept."""
    s, t = torch.randn(M, V), torch.randn(M, V)
    with torch.no_grad():
        got = GeneralizedJSD(0.3).token_loss(make_inputs(s, t))
    torch.testing.assert_close(got, autograd_reference("jsd", s, t, 0.3), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_importable_contract_check_passes_for_every_divergence(name):
    """opdlab.testing.check_divergence, what a plugin package's own tests call."""
    from opdlab.testing import check_divergence

    check_divergence(REGISTERED[name])
