"""LoRA students (`--model.student_adapter.*`, opdlab/adapters.py): only the adapter trains and has optimizer
state; every engine generates with the updated adapter; checkpoints hold the adapter and resume exactly; the
export is a peft adapter that `PeftModel.from_pretrained` and `opdlab eval --model` load; bad input is refused
in one line. The vllm engine's adapter path is tested in test_vllm_lora.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import CONFIG_DIR, run_opdlab
from test_engines import ragged_prompts, recomputed_logp
from test_real_configs import tiny_qwen3  # noqa: F401 - the fixture

from opdlab.adapters import DEFAULT_TARGETS, AdapterOptions, is_adapted, plain_parameters
from opdlab.data import PromptDataModule
from opdlab.engines import ReferenceEngine, RolloutEngine, SamplingParams, StaticCacheEngine
from opdlab.module import OPDModule
from opdlab.tasks import AdditionTask

peft = pytest.importorskip("peft")


def lora_module(ckpts, engine=None, lr: float = 0.05, **adapter) -> OPDModule:
    return OPDModule(student=ckpts.student, teacher=ckpts.teacher, rollout_engine=engine or StaticCacheEngine(),
                     optimizer=lambda params: torch.optim.AdamW(params, lr=lr), rollout=dict(max_new_tokens=4),
                     student_adapter=AdapterOptions(**{"rank": 4, **adapter}))


def trainer(steps: int, **kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    return L.Trainer(max_steps=steps, **{**defaults, **kwargs})


def data() -> PromptDataModule:
    return PromptDataModule(AdditionTask(digits=2), batch_size=8)


def fitted(ckpts, steps: int = 2, **kwargs) -> OPDModule:
    module = lora_module(ckpts, **kwargs)
    trainer(steps).fit(module, datamodule=data())
    return module


def adapter_tensors(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.student.named_parameters() if ".lora_" in n}


# --------------------------------------------------------------------------------------------- training
def test_only_the_adapter_trains_and_has_optimizer_state(tiny_checkpoints):
    module = lora_module(tiny_checkpoints)
    module.configure_model()
    base_before = {n: p.detach().clone() for n, p in module.student.named_parameters() if ".lora_" not in n}
    lora_before = adapter_tensors(module)
    assert lora_before and all(not p.requires_grad for n, p in module.student.named_parameters() if ".lora_" not in n)
    assert {n.rsplit(".", 4)[-4] for n in lora_before} == set(DEFAULT_TARGETS)  # attention and MLP projections
    trainer(2).fit(module, datamodule=data())
    for name, before in base_before.items():
        assert torch.equal(before, dict(module.student.named_parameters())[name]), name
    after = adapter_tensors(module)
    assert any(not torch.equal(lora_before[n], after[n]) for n in after)
    optimizer = module.optimizers().optimizer
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for n, p in module.student.named_parameters() if ".lora_" in n}
    assert len(optimizer.state) == len(after)


@pytest.mark.parametrize("engine", [ReferenceEngine, StaticCacheEngine])
def test_engine_generates_with_the_adapter_of_the_last_optimizer_step(engine, tiny_checkpoints):
    """The contract test of test_engines.py with an adapter: after 2 steps the engine's log-probs are the
    adapted student's (the static engine's copy holds the merged weights)."""
    check_generates_with_the_current_student(fitted(tiny_checkpoints, engine=engine()))


def check_generates_with_the_current_student(module) -> None:
    """Sampled log-probs equal a plain forward of the live (adapted) student; greedy decoding is repeatable."""
    rollout = module.generate(ragged_prompts(module.tokenizer, 8), SamplingParams(max_new_tokens=4, seeds=list(range(8))))
    valid = rollout.response_mask
    torch.testing.assert_close(rollout.sampling_logp[valid], recomputed_logp(module.student, rollout, 1.0, 1.0)[valid],
                               atol=1e-5, rtol=1e-5)
    greedy = [module.generate(ragged_prompts(module.tokenizer, 8), SamplingParams(max_new_tokens=4, temperature=0.0))
              for _ in range(2)]
    assert torch.equal(greedy[0].input_ids, greedy[1].input_ids)


def test_merged_parameters_give_the_adapted_models_logits(tiny_checkpoints):
    from opdlab.adapters import merged_copy

    module = fitted(tiny_checkpoints, steps=1)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    plain = merged_copy(module.student)
    assert not is_adapted(plain) and {n for n, _ in plain_parameters(module.student)} == {
        n for n, _ in plain.named_parameters(remove_duplicate=False)}
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, module.student.eval()(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("memory", [{"gradient_checkpointing": True}, {"student_dtype": "bfloat16"},
                                    {"micro_batch_size": 4}])
def test_adapter_trains_with_checkpointing_bf16_and_micro_batches(memory, tiny_checkpoints):
    module = lora_module(tiny_checkpoints)
    module.memory_options = type(module.memory_options)(**{**vars(module.memory_options), **memory})
    module.configure_model()
    before = adapter_tensors(module)
    trainer(1).fit(module, datamodule=data())
    after = adapter_tensors(module)
    changed = [n for n in after if not torch.equal(before[n], after[n])]
    assert len(changed) >= len(after) // 2, changed  # every lora_B (zero at start) gets a gradient


def test_an_adapted_lm_head_trains_through_the_heads_module(tiny_checkpoints):
    """lm_head among the targets: the head is then a LoRA layer, not a plain linear one, so the loss runs it as
    a module (autograd over the kept rows) and its adapter trains too."""
    module = lora_module(tiny_checkpoints, target_modules=["q_proj", "lm_head"])
    module.configure_model()
    assert not module.student_head.is_plain_linear
    trainer(1).fit(module, datamodule=data())
    assert any("lm_head.lora_B" in n and p.abs().sum() > 0 for n, p in module.student.named_parameters())


# --------------------------------------------------------------------------------------------- outputs
def test_checkpoint_holds_the_adapter_and_resume_is_exact(tiny_checkpoints, tmp_path):
    straight = fitted(tiny_checkpoints, steps=4)
    first = lora_module(tiny_checkpoints)
    run = trainer(2)
    run.fit(first, datamodule=data())
    path = tmp_path / "two.ckpt"
    run.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    assert saved["state_dict"] and all(".lora_" in k for k in saved["state_dict"] if k.startswith("student."))
    assert saved["opdlab"]["adapter"]["r"] == 4
    resumed = lora_module(tiny_checkpoints)
    trainer(4).fit(resumed, datamodule=data(), ckpt_path=path)
    a, b = adapter_tensors(straight), adapter_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    full = OPDModule(student=tiny_checkpoints.student, teacher=tiny_checkpoints.teacher, rollout=dict(max_new_tokens=4))
    with pytest.raises(ValueError, match="trained with the LoRA adapter .* this run has full fine-tuning"):
        trainer(4).fit(full, datamodule=data(), ckpt_path=path)


def test_export_is_a_peft_adapter_and_eval_loads_it(tiny_checkpoints, tmp_path):
    from opdlab.evaluation import load_model
    from transformers import AutoModelForCausalLM

    module = lora_module(tiny_checkpoints, export_merged=True)
    trainer(2).fit(module, datamodule=data())
    out = tmp_path / "student"
    module.export_student(str(out))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_checkpoints.student and config["r"] == 4
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        expected = module.student.eval()(ids).logits
        loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_checkpoints.student), str(out))
        torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-5, rtol=1e-5)
        for model in (str(out), str(out / "merged")):
            net, tokenizer, label = load_model(model, "float32")
            assert not is_adapted(net) and len(tokenizer) == len(module.tokenizer)
            torch.testing.assert_close(net(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_a_lora_checkpoint_evaluates_as_its_merged_student(tiny_checkpoints, tmp_path):
    from opdlab.evaluation import load_model

    module = lora_module(tiny_checkpoints)
    run = trainer(1)
    run.fit(module, datamodule=data())
    run.save_checkpoint(tmp_path / "last.ckpt")
    net, _, _ = load_model(str(tmp_path / "last.ckpt"), "float32")
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(net(ids).logits, module.student.eval()(ids).logits, atol=1e-5, rtol=1e-5)


def test_a_starting_adapter_is_continued(tiny_checkpoints, tmp_path):
    trained = fitted(tiny_checkpoints, steps=1)
    trained.export_student(str(tmp_path / "sft"))
    module = OPDModule(student=tiny_checkpoints.student, teacher=tiny_checkpoints.teacher,
                       student_adapter=AdapterOptions(path=str(tmp_path / "sft")))
    module.configure_model()
    assert adapter_tensors(module).keys() == adapter_tensors(trained).keys()
    assert all(torch.equal(a, b) for a, b in zip(adapter_tensors(module).values(), adapter_tensors(trained).values()))
    assert all(p.requires_grad for n, p in module.student.named_parameters() if ".lora_" in n)


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("options,says", [
    ({"rank": 0}, "rank must be an integer >= 1"), ({"rank": -2}, "rank must be an integer >= 1"),
    ({"rank": 8, "alpha": 0}, "alpha must be > 0"), ({"rank": 8, "dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"rank": 8, "target_modules": []}, "non-empty list"), ({"rank": 8, "target_modules": "q_proj"}, "non-empty list"),
])
def test_bad_options_are_refused(options, says):
    with pytest.raises(ValueError, match=says):
        AdapterOptions(**options)


def test_missing_peft_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(ImportError, match=r'pip install -e "\.\[peft\]"'):
        AdapterOptions(rank=8)
    AdapterOptions()  # no adapter: peft is not needed


def test_targets_that_match_nothing_list_the_layers(tiny_checkpoints):
    module = lora_module(tiny_checkpoints, target_modules=["q_proj", "query_key_value"])
    with pytest.raises(ValueError, match=r"\['query_key_value'\] match no linear layer .*'down_proj', 'gate_proj'"):
        module.configure_model()


def test_an_adapter_of_another_base_is_refused(tiny_checkpoints, tmp_path):
    other = OPDModule(student=tiny_checkpoints.teacher, teacher=tiny_checkpoints.teacher,
                      student_adapter=AdapterOptions(rank=4))
    other.configure_model()
    other.export_student(str(tmp_path / "other"))
    module = OPDModule(student=tiny_checkpoints.student, teacher=tiny_checkpoints.teacher,
                       student_adapter=AdapterOptions(path=str(tmp_path / "other")))
    with pytest.raises(ValueError, match="was made for another base model"):
        module.configure_model()


def test_an_engine_that_cannot_load_adapters_is_refused(tiny_checkpoints):
    class PluginEngine(RolloutEngine):
        def load_weights(self, model):
            pass

        def generate(self, prompts, params):
            raise NotImplementedError

    with pytest.raises(ValueError, match="PluginEngine does not declare loads_adapters"):
        lora_module(tiny_checkpoints, engine=PluginEngine())


# --------------------------------------------------------------------------------------------- the command
def test_fit_help_explains_the_adapter_options():
    out = " ".join(run_opdlab(["fit", "--help"]).out.split())
    for option in ("student_adapter.rank", "student_adapter.alpha", "student_adapter.dropout",
                   "student_adapter.target_modules", "student_adapter.path", "student_adapter.export_merged"):
        assert option in out, option
    assert "null (default): no adapter, full fine-tuning" in out


def test_fit_with_the_lora_overlay_exports_an_adapter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_opdlab(["fit", "--config", str(CONFIG_DIR / "fast.yaml"), "--config",
                         str(CONFIG_DIR / "adapters" / "lora.yaml"), "--trainer.max_steps", "3",
                         "--trainer.val_check_interval", "3", "--trainer.enable_progress_bar", "false"])
    assert result.code == 0, result.err[-3000:]
    student = next(Path("runs").rglob("student"))
    assert (student / "adapter_config.json").is_file() and not (student / "config.json").exists()


def test_the_one_gpu_lora_config_runs_with_tiny_qwen3(tiny_qwen3, tmp_path):
    """configs/lora_qwen3_8b_to_1.7b_1gpu.yaml with tiny local Qwen3 models on the CPU (paths, sizes and the
    hardware overridden, as test_real_configs does for the other GPU configs)."""
    from test_real_configs import run_config

    run_config(CONFIG_DIR / "lora_qwen3_8b_to_1.7b_1gpu.yaml", "static", tiny_qwen3, tmp_path, tiny_qwen3["teacher"])


@pytest.mark.parametrize("config,weights,says", [
    (b"{not json", None, "cannot be read as JSON"),
    (b"\xff\xfe{}", None, "cannot be read as JSON"),
    (b"[1, 2]", None, "holds a list, not the JSON object"),
    (b'{"peft_type": "PREFIX_TUNING"}', None, "holds a PREFIX_TUNING adapter"),
    (b'{"peft_type": "LORA", "r": "eight", "target_modules": ["q_proj"]}', None, "gives rank r='eight'"),
    (b'{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}', b"not safetensors", "cannot be read ("),
])
def test_a_damaged_adapter_folder_is_one_line(config, weights, says, tiny_checkpoints, tmp_path):
    """Every way an adapter folder can be unreadable is a ValueError naming the file, not a parser's traceback."""
    other = OPDModule(student=tiny_checkpoints.student, teacher=tiny_checkpoints.teacher,
                      student_adapter=AdapterOptions(rank=4))
    other.configure_model()
    folder = tmp_path / "adapter"
    other.export_student(str(folder))
    (folder / "adapter_config.json").write_bytes(config)
    if weights is not None:
        (folder / "adapter_model.safetensors").write_bytes(weights)
    module = OPDModule(student=tiny_checkpoints.student, teacher=tiny_checkpoints.teacher,
                       student_adapter=AdapterOptions(path=str(folder)))
    with pytest.raises(ValueError, match=re.escape(says)):
        module.configure_model()
