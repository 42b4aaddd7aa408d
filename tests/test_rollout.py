"""Rollout: response masks end at EOS (inclusive), sampling log-probs, and the EOS-first edge case."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import kept_head_loss, response_hidden_states, score

from opdlab.divergences import LossInputs
from opdlab.models import final_hidden_states
from opdlab.module import OPDModule
from opdlab.plugins import discover
from opdlab.rollout import decode_responses, encode_prompts, sample_rollouts, sampling_logprobs
from opdlab.tasks import AdditionTask


def check_rollout_invariants(rollout, prompts, eos_id: int, pad_id: int) -> None:
    mask, ids = rollout.response_mask, rollout.response_ids
    assert mask.dtype == torch.bool and mask.shape == ids.shape == rollout.sampling_logp.shape
    assert torch.equal(rollout.input_ids[:, : rollout.prompt_len],
                       prompts.input_ids.repeat_interleave(ids.shape[0] // prompts.input_ids.shape[0], 0))
    assert torch.equal(rollout.attention_mask[:, rollout.prompt_len :], mask.long())
    for row_mask, row_ids in zip(mask, ids, strict=True):
        n = int(row_mask.sum())
        assert n >= 1, "the first response token is always valid (it may be EOS)"
        assert row_mask[:n].all() and not row_mask[n:].any(), "the mask is a prefix"
        eos_at = (row_ids[:n] == eos_id).nonzero().flatten().tolist()
        assert eos_at in ([], [n - 1]), f"EOS only as the last valid token, got {eos_at} in {n}"
        if n < len(row_ids):
            assert eos_at == [n - 1], "a response that stops early stops at EOS"
            assert (row_ids[n:] == pad_id).all()
    assert (rollout.sampling_logp[~mask] == 0).all()
    valid_logp = rollout.sampling_logp[mask]
    assert torch.isfinite(valid_logp).all() and (valid_logp <= 0).all()


def test_scripted_response_mask_ends_at_eos_inclusive(char_tokenizer, make_scripted_model):
    tok = char_tokenizer
    # "=" -> "1" -> "2" -> EOS; "+" -> "7" -> "7" -> ... (never stops)
    model = make_scripted_model({"=": "1", "1": "2", "2": "<eos>", "+": "7", "7": "7"})
    prompts = encode_prompts(tok, ["34=", "5+"], ["", ""])
    rollout = sample_rollouts(model, prompts, tok.eos_token_id, tok.pad_token_id, max_new_tokens=6,
                              temperature=1.0, generator=torch.Generator().manual_seed(0))
    vocab = tok.get_vocab()
    assert rollout.response_ids.tolist() == [
        [vocab["1"], vocab["2"], tok.eos_token_id, tok.pad_token_id, tok.pad_token_id, tok.pad_token_id],
        [vocab["7"]] * 6,
    ]
    assert rollout.response_mask.tolist() == [[True, True, True, False, False, False], [True] * 6]
    assert (rollout.sampling_logp[0, 3:] == 0).all()
    check_rollout_invariants(rollout, prompts, tok.eos_token_id, tok.pad_token_id)
    assert decode_responses(tok, rollout) == ["12", "777777"]


def test_rollout_stops_when_every_row_hit_eos(char_tokenizer, make_scripted_model):
    tok = char_tokenizer
    model = make_scripted_model({"=": "1", "1": "<eos>"})
    prompts = encode_prompts(tok, ["34=", "12="], ["", ""])
    rollout = sample_rollouts(model, prompts, tok.eos_token_id, tok.pad_token_id, max_new_tokens=10)
    assert rollout.response_ids.shape == (2, 2)
    assert rollout.response_mask.all()


def test_random_model_rollout_invariants_and_logp_match_plain_forward(tiny_module):
    """Sampled with temperature and many rows (some stop early): masks, padding, and the sampling
    log-probs equal a plain full-sequence forward's tempered log-softmax at the sampled tokens."""
    module = tiny_module
    tok = module.tokenizer
    problems = [AdditionTask(digits=2).problem_at(i) for i in range(16)]
    # Different prompt lengths exercise left padding and position ids.
    texts = [p.prompt[i % 3 :] for i, p in enumerate(problems)]
    prompts = encode_prompts(tok, texts, [p.answer for p in problems])
    temperature = 0.7
    rollout = sample_rollouts(module.student, prompts, tok.eos_token_id, tok.pad_token_id, num_samples=4,
                              max_new_tokens=12, temperature=temperature,
                              generator=torch.Generator().manual_seed(0))
    assert rollout.response_ids.shape[0] == 64 and len(rollout.answers) == 64
    check_rollout_invariants(rollout, prompts, tok.eos_token_id, tok.pad_token_id)
    assert (~rollout.response_mask).any(), "with 64 random rows some should stop at EOS early"

    with torch.no_grad():
        hidden = final_hidden_states(module.student, rollout.input_ids, rollout.attention_mask)
        logits = module.student.lm_head(hidden)
    p, length = rollout.prompt_len, rollout.response_mask.shape[1]
    logp = torch.log_softmax(logits[:, p - 1 : p - 1 + length].float() / temperature, -1)
    expected = logp.gather(-1, rollout.response_ids[..., None]).squeeze(-1)
    mask = rollout.response_mask
    torch.testing.assert_close(rollout.sampling_logp[mask], expected[mask], atol=1e-4, rtol=1e-4)


def test_rollout_is_deterministic_given_generator(tiny_module):
    tok = tiny_module.tokenizer
    prompts = encode_prompts(tok, ["12+34=", "56+78="], ["", ""])
    run = lambda seed: sample_rollouts(tiny_module.student, prompts, tok.eos_token_id, tok.pad_token_id,  # noqa: E731
                                       num_samples=3, max_new_tokens=8,
                                       generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.sampling_logp, b.sampling_logp)
    assert not torch.equal(a.input_ids, c.input_ids)
    greedy = [sample_rollouts(tiny_module.student, prompts, tok.eos_token_id, tok.pad_token_id,
                              max_new_tokens=8, temperature=0.0) for _ in range(2)]
    assert torch.equal(greedy[0].input_ids, greedy[1].input_ids)


def test_rollout_leaves_model_mode_unchanged(tiny_module):
    tok, model = tiny_module.tokenizer, tiny_module.student
    model.train()
    sample_rollouts(model, encode_prompts(tok, ["1+2="]), tok.eos_token_id, tok.pad_token_id, max_new_tokens=2)
    assert model.training


def test_sampling_logprobs_top_p():
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]])
    # mass before the third token is 0.8 >= 0.7: it is dropped; the rest is renormalised.
    logp = sampling_logprobs(logits, temperature=1.0, top_p=0.7)
    torch.testing.assert_close(logp.exp(), torch.tensor([[0.625, 0.375, 0.0]]))
    assert torch.isneginf(logp[0, 2])
    # top_p so small that only the argmax survives.
    torch.testing.assert_close(sampling_logprobs(logits, 1.0, 1e-6).exp(), torch.tensor([[1.0, 0.0, 0.0]]))
    # temperature: the plain tempered softmax when top_p = 1.
    torch.testing.assert_close(sampling_logprobs(logits, 2.0, 1.0), torch.log_softmax(logits / 2.0, -1))


def test_top_p_rollout_invariants(char_tokenizer, tiny_module):
    tok = char_tokenizer
    prompts = encode_prompts(tok, ["12+34="] * 8, [""] * 8)
    rollout = sample_rollouts(tiny_module.student, prompts, tok.eos_token_id, tok.pad_token_id,
                              max_new_tokens=6, temperature=1.0, top_p=0.3,
                              generator=torch.Generator().manual_seed(0))
    check_rollout_invariants(rollout, prompts, tok.eos_token_id, tok.pad_token_id)


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_invalid_sampling_arguments(tiny_module, kwargs):
    tok = tiny_module.tokenizer
    with pytest.raises(ValueError, match="temperature >= 0 and top_p in"):
        sample_rollouts(tiny_module.student, encode_prompts(tok, ["1+2="]), tok.eos_token_id, tok.pad_token_id,
                        **kwargs)


# ------------------------------------------------------------------------------ EOS first
@pytest.fixture(scope="module")
def eos_first_module(tiny_checkpoints, tmp_path_factory, char_tokenizer, make_scripted_model):
    """A student that answers EOS straight after '=' but keeps talking after '+'."""
    path = tmp_path_factory.mktemp("eos_first_student")
    model = make_scripted_model({"=": "<eos>", "+": "3", "3": "4", "4": "<eos>"}, default="5")
    model.save_pretrained(path)
    char_tokenizer.save_pretrained(path)
    module = OPDModule(
        student=str(path),
        teacher=tiny_checkpoints.teacher,
        rollout=dict(max_new_tokens=5),
    )
    module.configure_model()
    return module


def run_step_stages(module, texts):
    """rollout -> hidden states -> score -> select -> kept-rows loss (mean over kept), as a training step."""
    prompts = encode_prompts(module.tokenizer, texts, [""] * len(texts))
    module.request_full_entropy()  # the full-vocabulary entropies are checked too
    rollout = module.rollout(prompts)
    student_hidden, teacher_hidden = response_hidden_states(module, rollout)
    stats = score(module, student_hidden, teacher_hidden, rollout)
    keep = module.select(stats)
    loss = kept_head_loss(student_hidden, teacher_hidden, keep, rollout, stats, module.student_head,
                          module.placement.head, module.divergence)
    return rollout, stats, keep, loss.loss


def assert_step_finite(module, rollout, stats, keep, loss):
    for name in ("student_token_logp", "teacher_token_logp", "compatibility", "disagreement", "topk_entropy",
                 "student_entropy", "teacher_entropy"):
        assert torch.isfinite(getattr(stats, name)).all(), name
    assert not (keep & ~rollout.response_mask).any()
    assert keep[rollout.response_mask.any(1)].any(1).all(), "each non-empty response keeps a position"
    assert torch.isfinite(loss), loss
    module.student.zero_grad(set_to_none=True)
    loss.backward()
    for name, p in module.student.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


SELECTORS = sorted(discover("opdlab.selectors"))
DIVERGENCES = sorted(discover("opdlab.divergences"))


def test_eos_first_rollout_shape(eos_first_module):
    rollout, stats, keep, loss = run_step_stages(eos_first_module, ["12+34=", "99+99="])
    tok = eos_first_module.tokenizer
    assert rollout.response_ids.tolist() == [[tok.eos_token_id]] * 2
    assert rollout.response_mask.tolist() == [[True]] * 2
    assert decode_responses(tok, rollout) == ["", ""]
    assert keep.tolist() == [[True]] * 2  # the EOS token itself is the one supervised position


@pytest.mark.parametrize("texts", [["12+34=", "99+99="], ["12+34=", "5+", "1+2=", "7+"]],
                         ids=["all_eos_first", "mixed"])
@pytest.mark.parametrize("selector", SELECTORS)
def test_eos_first_no_nan_for_every_selector(eos_first_module, selector, texts):
    module = eos_first_module
    module.selector = discover("opdlab.selectors")[selector].cls()
    assert_step_finite(module, *run_step_stages(module, texts))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_eos_first_no_nan_for_every_divergence(eos_first_module, divergence):
    from opdlab.selectors import FullSelector

    module = eos_first_module
    module.selector = FullSelector()
    module.divergence = discover("opdlab.divergences")[divergence].cls()
    rollout, stats, keep, loss = run_step_stages(module, ["12+34=", "5+", "1+2="])
    assert rollout.response_mask.sum(1).tolist() == [1, 3, 1]
    assert_step_finite(module, rollout, stats, keep, loss)


def test_loss_inputs_from_eos_first_rollout_are_consistent(eos_first_module):
    """The sampled-token fields handed to the divergence line up with the rollout's kept rows."""
    module = eos_first_module
    rollout, stats, keep, _ = run_step_stages(module, ["12+34=", "5+"])
    captured = []

    class Spy(type(module.divergence)):
        def token_loss(self, inputs: LossInputs):
            captured.append(inputs)
            return super().token_loss(inputs)

    student_hidden, teacher_hidden = response_hidden_states(module, rollout)
    kept_head_loss(student_hidden, teacher_hidden, keep, rollout, stats, module.student_head,
                   module.placement.head, Spy())
    tokens = torch.cat([c.tokens for c in captured])
    assert torch.equal(tokens, rollout.response_ids[keep])
    torch.testing.assert_close(torch.cat([c.sampling_logp for c in captured]), rollout.sampling_logp[keep])
