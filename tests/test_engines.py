"""Rollout engines: the contract every registered engine passes, and the static engine's own guarantees.

The contract (see opdlab/engines/base.py and CONTRIBUTING.md), for every engine in the registry:
greedy tokens equal the reference loop's; the sampling log-probs equal a recomputation by a plain
full-sequence forward under the distribution actually sampled from; after `load_weights` with new
weights the outputs change; the Rollout invariants of test_rollout hold.
"""

from __future__ import annotations

import functools
import warnings

import lightning as L
import pytest
import torch
from conftest import CONFIG_DIR, run_opdlab
from test_rollout import check_rollout_invariants
from transformers import Qwen3Config, Qwen3ForCausalLM

from opdlab.data import PromptDataModule
from opdlab.engines import ReferenceEngine, SamplingParams, StaticCacheEngine
from opdlab.engines.vllm_engine import vllm_available
from opdlab.models import final_hidden_states
from opdlab.module import OPDModule
from opdlab.plugins import discover
from opdlab.rollout import encode_prompts, sampling_logprobs
from opdlab.tasks import AdditionTask
from opdlab.testing import check_rollout_engine
from opdlab.toy import ModelSpec, make_qwen2


def registered_engines() -> list:
    """Every registered engine; `vllm` runs where the vllm package is installed (.ci/run's .venv-vllm)."""
    needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vllm is not installed (.ci/run tests it in .venv-vllm)")
    return [pytest.param(name, marks=[pytest.mark.vllm, needs_vllm] if name == "vllm" else [])
            for name in sorted(discover("opdlab.rollout_engines"))]


ENGINES = registered_engines()
# Options the tests give an engine: vLLM skips its torch.compile warm-up (minutes on two cores).
ENGINE_OPTIONS = {"vllm": {"enforce_eager": True}}


def make_engine(name: str):
    return discover("rollout_engine")[name].cls(**ENGINE_OPTIONS.get(name, {}))


def bound(engine, model, tokenizer):
    engine.bind(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
    engine.load_weights(model)
    return engine


def ragged_prompts(tokenizer, n: int = 16):
    """Prompts of three lengths (left padding, distinct position ids) from the 2-digit task."""
    problems = [AdditionTask(digits=2).problem_at(i) for i in range(n)]
    return encode_prompts(tokenizer, [p.prompt[i % 3 :] for i, p in enumerate(problems)], [p.answer for p in problems])


def recomputed_logp(model, rollout, temperature: float, top_p: float) -> torch.Tensor:
    """(N, L) log-probs of the rollout's tokens under a plain forward's sampling distribution."""
    with torch.no_grad():
        hidden = final_hidden_states(model, rollout.input_ids, rollout.attention_mask)
        logits = model.lm_head(hidden)
    p, length = rollout.prompt_len, rollout.response_mask.shape[1]
    logp = sampling_logprobs(logits[:, p - 1 : p - 1 + length].flatten(0, 1), temperature, top_p)
    return logp.view(rollout.response_mask.shape + logp.shape[-1:]).gather(-1, rollout.response_ids[..., None]).squeeze(-1)


@pytest.fixture(scope="module")
def tiny_student(char_tokenizer):
    torch.manual_seed(3)
    # head_dim 32: the smallest vLLM's CPU attention kernels take (every engine runs these tests)
    return make_qwen2(ModelSpec(hidden=64, layers=2, ffn=64, heads=2, kv_heads=1), char_tokenizer).eval()


# --------------------------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("name", ENGINES)
def test_greedy_tokens_equal_the_reference_engine(name, tiny_student, char_tokenizer):
    tok = char_tokenizer
    prompts = ragged_prompts(tok)
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    expected = bound(ReferenceEngine(), tiny_student, tok).generate(prompts, params)
    got = bound(make_engine(name), tiny_student, tok).generate(prompts, params)
    check_rollout_invariants(got, prompts, tok.eos_token_id, tok.pad_token_id)
    assert torch.equal(got.input_ids, expected.input_ids)
    assert torch.equal(got.response_mask, expected.response_mask)
    torch.testing.assert_close(got.sampling_logp, expected.sampling_logp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature,top_p,num_samples", [(1.0, 1.0, 1), (0.7, 1.0, 3), (1.3, 0.6, 2)])
@pytest.mark.parametrize("name", ENGINES)
def test_sampling_logp_equals_a_plain_forward(name, temperature, top_p, num_samples, tiny_student, char_tokenizer):
    """The PPO ratio of the sampled-token loss divides by these: they must be the sampled distribution's."""
    tok = char_tokenizer
    prompts = ragged_prompts(tok)
    engine = bound(make_engine(name), tiny_student, tok)
    params = SamplingParams(num_samples=num_samples, max_new_tokens=12, temperature=temperature, top_p=top_p,
                            seeds=list(range(100, 116)))
    rollout = engine.generate(prompts, params)
    check_rollout_invariants(rollout, prompts, tok.eos_token_id, tok.pad_token_id)
    assert rollout.response_ids.shape[0] == 16 * num_samples
    expected = recomputed_logp(tiny_student, rollout, temperature, top_p)
    mask = rollout.response_mask
    torch.testing.assert_close(rollout.sampling_logp[mask], expected[mask], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ENGINES)
def test_seeded_samples_do_not_depend_on_the_batch_split(name, tiny_student, char_tokenizer):
    tok = char_tokenizer
    prompts = ragged_prompts(tok, 8)
    seeds = [7 * i for i in range(8)]
    engine = bound(make_engine(name), tiny_student, tok)
    params = lambda s: SamplingParams(num_samples=2, max_new_tokens=8, seeds=s)  # noqa: E731
    whole = engine.generate(prompts, params(seeds))
    halves = [engine.generate(encode_prompts(tok, *texts), params(seeds[i : i + 4]))
              for i, texts in ((0, (tok.batch_decode(prompts.input_ids[:4], skip_special_tokens=True), prompts.answers[:4])),
                               (4, (tok.batch_decode(prompts.input_ids[4:], skip_special_tokens=True), prompts.answers[4:])))]
    for part, rows in zip(halves, (slice(0, 8), slice(8, 16)), strict=True):
        length = part.response_mask.shape[1]
        assert torch.equal(part.response_ids, whole.response_ids[rows, :length])
        assert not whole.response_mask[rows, length:].any()


@pytest.mark.parametrize("name", ENGINES)
def test_load_weights_changes_the_outputs(name, char_tokenizer):
    """After new weights are loaded the engine uses them (and nothing computed with the old ones)."""
    tok = char_tokenizer
    torch.manual_seed(5)
    model = make_qwen2(ModelSpec(hidden=64, layers=1, ffn=64, heads=2, kv_heads=1), tok).eval()
    prompts = ragged_prompts(tok, 8)
    engine = bound(make_engine(name), model, tok)
    params = SamplingParams(max_new_tokens=6, seeds=list(range(8)))
    before = engine.generate(prompts, params)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    engine.load_weights(model)
    after = engine.generate(prompts, params)
    assert not torch.allclose(before.sampling_logp, after.sampling_logp)
    expected = recomputed_logp(model, after, 1.0, 1.0)
    torch.testing.assert_close(after.sampling_logp[after.response_mask], expected[after.response_mask], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ENGINES)
def test_eos_edge_cases_match_the_reference(name, char_tokenizer, make_scripted_model):
    """EOS first, EOS at different steps, and rows that never stop (max_new_tokens reached)."""
    tok = char_tokenizer
    model = make_scripted_model({"=": "1", "1": "2", "2": "<eos>", "+": "7", "7": "7", "9": "<eos>"})
    prompts = encode_prompts(tok, ["34=", "5+", "12+9", "1=", "3+4="], [""] * 5)
    for max_new in (1, 3, 6):
        params = SamplingParams(max_new_tokens=max_new, temperature=0.0)
        expected = bound(ReferenceEngine(), model, tok).generate(prompts, params)
        got = bound(make_engine(name), model, tok).generate(prompts, params)
        assert torch.equal(got.input_ids, expected.input_ids), max_new
        assert torch.equal(got.response_mask, expected.response_mask), max_new
    assert got.response_mask.sum(1).tolist() == [3, 6, 1, 3, 3]  # "9" -> EOS first


# --------------------------------------------------------------------------------------------- the static engine
def test_static_engine_compiled_step_traces_as_one_graph(tiny_student, char_tokenizer):
    """fullgraph=True fails on any graph break: the decode step (model forward with the static cache,
    sampling, bookkeeping) is one graph in this transformers version, as CUDA-graph capture needs."""
    tok = char_tokenizer
    prompts = ragged_prompts(tok)
    compiled = StaticCacheEngine(compile=True, compile_options={"backend": "eager", "fullgraph": True, "dynamic": False})
    bound(compiled, tiny_student, tok)
    reference = bound(ReferenceEngine(), tiny_student, tok)
    for params in (SamplingParams(max_new_tokens=9, temperature=0.0),
                   SamplingParams(num_samples=2, max_new_tokens=9, temperature=0.8, top_p=0.9, seeds=list(range(16)))):
        with torch._dynamo.config.patch(error_on_recompile=False):
            got = compiled.generate(prompts, params)
        expected = reference.generate(prompts, params)
        assert compiled.step_fn is not None and compiled.decode_fn(torch.device("cpu"))[1], "fell back to eager"
        assert torch.equal(got.input_ids, expected.input_ids)
        torch.testing.assert_close(got.sampling_logp, expected.sampling_logp, atol=1e-5, rtol=1e-5)
    # Compiled, prompts are padded to a power-of-two width (>= 16), so ragged batches share cache shapes.
    assert {key[1] for key in compiled.workspaces} == {16}


@pytest.mark.slow
def test_static_engine_default_compile_options_on_cpu(tiny_student, char_tokenizer):
    """The CUDA defaults (inductor, mode reduce-overhead, fullgraph) compiled for real on the CPU, where
    reduce-overhead has no CUDA graphs to capture: what GPU users run, short of the graph capture."""
    tok = char_tokenizer
    prompts = ragged_prompts(tok)
    engine = bound(StaticCacheEngine(compile=True), tiny_student, tok)
    params = SamplingParams(num_samples=2, max_new_tokens=9, temperature=0.8, seeds=list(range(16)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a compile failure falls back with a warning
        got = engine.generate(prompts, params)
    expected = bound(ReferenceEngine(), tiny_student, tok).generate(prompts, params)
    assert torch.equal(got.input_ids, expected.input_ids)
    torch.testing.assert_close(got.sampling_logp, expected.sampling_logp, atol=1e-5, rtol=1e-5)


def test_static_engine_tied_and_qwen3_models(char_tokenizer):
    tok = char_tokenizer
    torch.manual_seed(0)
    tied = make_qwen2(ModelSpec(hidden=32, layers=1, ffn=64, heads=2, kv_heads=1), tok)
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    qwen3 = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    ))
    prompts = ragged_prompts(tok, 8)
    for model in (tied.eval(), qwen3.eval()):
        params = SamplingParams(max_new_tokens=8, temperature=0.0)
        expected = bound(ReferenceEngine(), model, tok).generate(prompts, params)
        engine = bound(StaticCacheEngine(), model, tok)
        assert torch.equal(engine.generate(prompts, params).input_ids, expected.input_ids)
        if model is tied:  # the copy's head stays one tensor with its embedding
            assert engine.copy.lm_head.weight is engine.copy.model.embed_tokens.weight
    copy = engine.copy
    assert copy is not qwen3 and copy.config is not qwen3.config
    assert qwen3.config._attn_implementation != copy.config._attn_implementation  # the student is untouched


def test_static_engine_generation_dtype(tiny_student, char_tokenizer):
    engine = bound(StaticCacheEngine(dtype="bfloat16"), tiny_student, char_tokenizer)
    assert {p.dtype for p in engine.copy.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in tiny_student.parameters()} == {torch.float32}
    rollout = engine.generate(ragged_prompts(char_tokenizer, 4), SamplingParams(max_new_tokens=4, seeds=[0, 1, 2, 3]))
    assert torch.isfinite(rollout.sampling_logp).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # auto: the compute dtype where the copy is built
        auto = bound(StaticCacheEngine(), tiny_student, char_tokenizer)
    assert {p.dtype for p in auto.copy.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bound(StaticCacheEngine(), tiny_student, char_tokenizer).copy.parameters()} == {torch.float32}


def test_static_engine_refuses_sliding_window_models(char_tokenizer):
    model = make_qwen2(ModelSpec(hidden=32, layers=2, ffn=64, heads=2, kv_heads=1), char_tokenizer)
    model.config.use_sliding_window, model.config.sliding_window = True, 4
    model.config.layer_types = ["sliding_attention", "full_attention"]
    engine = StaticCacheEngine()
    engine.bind(model, char_tokenizer.eos_token_id, char_tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="rollout_engine reference"):
        engine.load_weights(model)


@pytest.mark.parametrize("kwargs", [{"dtype": "fp8"}, {"stop_check_interval": 0}, {"min_prompt_bucket": 0}])
def test_static_engine_rejects_bad_options(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        StaticCacheEngine(**kwargs)


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"max_new_tokens": 0}])
def test_sampling_params_are_validated(kwargs):
    with pytest.raises(ValueError, match="need"):
        SamplingParams(**kwargs)


# --------------------------------------------------------------------------------------------- in training
def test_engine_generates_with_the_weights_of_the_last_optimizer_step(tiny_checkpoints):
    """Fails if the module does not hand the engine the new weights after an optimizer step: the static
    engine keeps a copy, which would still hold the weights of the first rollout."""
    module = OPDModule(
        student=tiny_checkpoints.student,
        teacher=tiny_checkpoints.teacher,
        rollout_engine=StaticCacheEngine(),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
        rollout=dict(max_new_tokens=4),
    )
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    trainer.fit(module, datamodule=PromptDataModule(AdditionTask(digits=2), batch_size=8))
    assert module.rollout_engine.copy is not None
    prompts = ragged_prompts(module.tokenizer, 8)
    rollout = module.generate(prompts, SamplingParams(max_new_tokens=4, seeds=list(range(8))))
    expected = recomputed_logp(module.student, rollout, 1.0, 1.0)
    mask = rollout.response_mask
    torch.testing.assert_close(rollout.sampling_logp[mask], expected[mask], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,class_path", [("reference", "opdlab.engines.reference.ReferenceEngine"),
                                             ("static", "opdlab.engines.static.StaticCacheEngine"),
                                             ("vllm", "opdlab.engines.vllm_engine.VLLMEngine")])
def test_rollout_engine_option_takes_registered_names(name, class_path):
    result = run_opdlab(["fit", "--config", str(CONFIG_DIR / "fast.yaml"), "--model.rollout_engine", name,
                         "--print_config"])
    assert result.code == 0, result.err
    assert class_path in result.out


@pytest.mark.parametrize("option,name,says", [("--model.rollout_engine.help", "vllm", "gpu_memory_utilization"),
                                              ("--model.selector.help", "teachability", "top_k")])
def test_a_plugins_options_are_explained_by_its_short_name(option, name, says):
    result = run_opdlab(["fit", option, name])
    assert result.code == 0 and says in result.out, result.err


def test_rollout_engine_is_described_in_fit_help():
    assert "what generates the student's responses: `static`" in " ".join(run_opdlab(["fit", "--help"]).out.split())


@pytest.mark.parametrize("name", ENGINES)
def test_importable_contract_check_passes_for_every_engine(name):
    """opdlab.testing.check_rollout_engine, what a plugin package's own tests call."""
    check_rollout_engine(functools.partial(discover("rollout_engine")[name].cls, **ENGINE_OPTIONS.get(name, {})))


def test_importable_contract_check_catches_a_stale_engine():
    class Stale(StaticCacheEngine):  # forgets to copy new weights after the first load
        def load_weights(self, model):
            if self.copy is None:
                super().load_weights(model)

    with pytest.raises(AssertionError, match="old weights"):
        check_rollout_engine(Stale)
