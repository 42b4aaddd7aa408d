"""The GPU configs for real Qwen models, run here with tiny randomly initialised local Qwen3 models:
only model paths, sizes and the hardware are overridden; everything else is the shipped config."""

from __future__ import annotations

import string

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from conftest import CONFIG_DIR, REPO_ROOT, run_opdlab
from fake_vllm import FakeVLLM
from opdlab.engines.vllm_engine import vllm_available
from opdlab.tasks import JsonlPrompts
from opdlab.toy import build_char_tokenizer

REAL_CONFIGS = sorted(CONFIG_DIR.glob("qwen*.yaml"))
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    """A chat tokenizer over printable ASCII and random-init Qwen3 student/teacher, saved locally."""
    tokenizer = build_char_tokenizer(charset="".join(c for c in string.printable if c not in "\n\r\x0b\x0c"))
    tokenizer.chat_template = CHAT_TEMPLATE
    paths = {}
    for role, (hidden, layers) in {"student": (32, 1), "teacher": (48, 2)}.items():
        torch.manual_seed(len(role))
        config = Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, intermediate_size=2 * hidden,
            # head_dim 32: the smallest vLLM's CPU attention takes (the configs generate with vLLM)
            num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
        )
        path = tmp_path_factory.mktemp(f"qwen3_{role}")
        Qwen3ForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[role] = str(path)
    return paths


NEEDS_VLLM = [pytest.mark.vllm, pytest.mark.skipif(not vllm_available(), reason="vllm is not installed (.ci/run tests "
                                                                            "it in .venv-vllm)")]
ENGINES = {  # the configs' own engine (vLLM, here on its CPU build) and the static engine they name as the alternative
    "vllm": ["--model.rollout_engine.init_args.max_model_len", "512", "--model.rollout_engine.init_args.enforce_eager",
             "true"],
    "static": ["--model.rollout_engine", "static"],
}


@pytest.mark.parametrize("engine", [pytest.param("vllm", marks=NEEDS_VLLM), "static"])
@pytest.mark.parametrize("config", REAL_CONFIGS, ids=lambda p: p.name)
def test_real_config_runs_with_tiny_qwen3(config, engine, tiny_qwen3, tmp_path):
    """Each GPU config with tiny local Qwen3 models; a config whose teacher is on a server gets a loopback server of
    the tiny teacher (tests/fake_vllm.py), named as the config names its model."""
    import yaml

    placement = yaml.safe_load(config.read_text())["model"].get("teacher_placement")
    if placement is None:
        run_config(config, engine, tiny_qwen3, tmp_path, tiny_qwen3["teacher"])
        return
    with FakeVLLM(tiny_qwen3["teacher"], served_name=placement["init_args"]["model"], max_model_len=2048) as server:
        run_config(config, engine, tiny_qwen3, tmp_path, server.url)


def run_config(config, engine, tiny_qwen3, tmp_path, teacher: str) -> None:
    result = run_opdlab([
        "fit", "--config", str(config), *ENGINES[engine],
        # models and sizes
        "--model.student", tiny_qwen3["student"], "--model.teacher", teacher,
        "--model.rollout.max_new_tokens", "8", "--model.rollout.num_samples", "2", "--model.memory.micro_batch_size", "2",
        "--data.source.init_args.train_path", str(REPO_ROOT / "data/math_sample.jsonl"),
        "--data.source.init_args.num_eval", "4", "--data.batch_size", "2", "--data.val_batch_size", "4",
        # hardware and length of the run
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", "2",
        "--trainer.val_check_interval", "2", "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
    ])
    assert result.code == 0, result.err[-3000:]
    assert "opdlab fit summary" in result.out and "steps: 2" in result.out


def test_real_configs_use_the_papers_hyperparameters():
    import yaml

    for config in REAL_CONFIGS:
        cfg = yaml.safe_load(config.read_text())
        opt = cfg["model"]["optimizer"]
        assert opt["init_args"]["lr"] == 1.0e-6 and opt["init_args"]["weight_decay"] == 0.1
        assert opt["init_args"]["betas"] == [0.9, 0.98]
        assert cfg["model"]["divergence"]["class_path"].endswith("SampledTokenOPD")
        assert cfg["model"]["rollout"]["temperature"] == 1.0 and cfg["trainer"]["precision"] == "bf16-mixed"
        assert cfg["model"]["memory"]["student_dtype"] == "float32" and cfg["model"]["memory"]["teacher_dtype"] == "bfloat16"
        if "teacher_placement" in cfg["model"]:  # a served teacher: enough log-probs for the selector's top-K
            k = cfg["model"]["teacher_placement"]["init_args"]["top_logprobs"]
            assert k >= cfg["model"]["selector"]["init_args"]["top_k"], config
        assert cfg["data"]["source"]["init_args"]["verifier"] == "math"
        assert cfg["data"]["source"]["init_args"]["chat_template"] is True
        assert "ModelParallelStrategy" in cfg["trainer"]["strategy"]["class_path"]
        engine = cfg["model"]["rollout_engine"]
        assert engine["class_path"] == "opdlab.engines.VLLMEngine", config
        limit = cfg["model"]["rollout"]["max_prompt_len"] + cfg["model"]["rollout"]["max_new_tokens"]
        assert engine["init_args"]["max_model_len"] == limit, config


def test_math_verify_checks_the_shipped_math_sample():
    source = JsonlPrompts(str(REPO_ROOT / "data/math_sample.jsonl"), num_eval=4, verifier="math")
    problems = source._train + source.eval_problems()
    assert len(problems) == 16
    for p in problems:  # the reference answer, boxed as a model would write it, is accepted
        assert source.verify(f"The answer is $\\boxed{{{p.answer}}}$.", p.answer), p
    assert source.verify("$\\boxed{\\frac{4}{6}}$", "\\frac{2}{3}")
    assert not source.verify("$\\boxed{25}$", "26")
    assert not source.verify("no answer here", "26")
