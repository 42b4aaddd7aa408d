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
    with pytest.raises(ValueError, match=re.escape(says)):  # the options (before any model loads) or the student
        OPDModule(student=tiny_checkpoints.student, teacher=tiny_checkpoints.teacher,
                  student_adapter=AdapterOptions(path=str(folder))).configure_model()


# --------------------------------------------------------------------------------------------- adapters made elsewhere
def peft_adapter(base: str, folder: Path, written: dict | None = None, **fields) -> Path:
    """A LoRA adapter made with peft itself on `base`, with random tensors (its lora_B too, so that it changes the
    logits); `written` is then set in its adapter_config.json as is (a value peft rewrites when it saves)."""
    from transformers import AutoModelForCausalLM

    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **fields})
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(folder)
    if written:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **written}))
    return folder


def peft_logits(base: str, folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(folder))
        return model.eval()(ids).logits


IDS = torch.tensor([[3, 4, 5, 6, 7, 8]])


@pytest.mark.parametrize("fields,written", [
    ({}, None), ({"lora_dropout": 0.1}, None), ({"init_lora_weights": "gaussian"}, None),
    ({"init_lora_weights": False}, None), ({"init_lora_weights": "orthogonal"}, None),
    ({"task_type": "CAUSAL_LM"}, None), ({"target_modules": None}, None),  # peft's default layers of the model type
    ({"target_modules": ["q_proj", "down_proj", "lm_head"]}, None),
    ({"target_modules": "all-linear"}, {"target_modules": "all-linear"}),  # as written by hand (peft saves the list)
    ({"r": 3, "lora_alpha": 5}, {"inference_mode": False, "revision": "main"}),
], ids=lambda value: json.dumps(value) if isinstance(value, dict) else "")
def test_a_peft_adapter_opdlab_accepts_is_merged_exactly(fields, written, tiny_checkpoints, tmp_path):
    """An adapter made with peft (not by opdlab) with the config fields opdlab supports: the adapted student, its
    merge (what the static engine copies and export_merged writes), the exported adapter and `opdlab eval` of the
    folder all give the logits of peft's own PeftModel."""
    from opdlab.adapters import merged_copy
    from opdlab.evaluation import load_model

    folder = peft_adapter(tiny_checkpoints.student, tmp_path / "made_by_peft", written, **fields)
    expected = peft_logits(tiny_checkpoints.student, folder, IDS)
    module = OPDModule(student=tiny_checkpoints.student, teacher=tiny_checkpoints.teacher,
                       student_adapter=AdapterOptions(path=str(folder), export_merged=True))
    module.configure_model()
    with torch.no_grad():
        torch.testing.assert_close(module.student.eval()(IDS).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged_copy(module.student)(IDS).logits, expected, atol=1e-5, rtol=1e-5)
        module.export_student(str(tmp_path / "student"))
        for model in (folder, tmp_path / "student", tmp_path / "student" / "merged"):
            net, _, _ = load_model(str(model), "float32")
            torch.testing.assert_close(net(IDS).logits, expected, atol=1e-5, rtol=1e-5)


REFUSED = [  # (fields peft makes the adapter with, what adapter_config.json then holds in the refusal's words)
    ({"use_dora": True}, "use_dora=true (DoRA's magnitude vectors"),
    ({"modules_to_save": ["lm_head"]}, 'modules_to_save=["lm_head"] (whole trained modules'),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices="),
    ({"bias": "all"}, 'bias="all" (trained biases'), ({"bias": "lora_only"}, 'bias="lora_only"'),
    ({"lora_bias": True}, "lora_bias=true"),
    ({"rank_pattern": {"v_proj": 2}}, 'rank_pattern={"v_proj": 2} (opdlab records one rank'),
    ({"alpha_pattern": {"v_proj": 2}}, 'alpha_pattern={"v_proj": 2} (opdlab records one alpha'),
    ({"use_rslora": True}, "use_rslora=true (opdlab records the scale as alpha / r"),
    ({"layers_to_transform": [0]}, "layers_to_transform=[0]"),
    ({"exclude_modules": ["v_proj"], "target_modules": ["q_proj", "v_proj", "o_proj"]}, 'exclude_modules=["v_proj"]'),
    ({"target_modules": r".*\.q_proj"}, r'target_modules=".*\\.q_proj" (opdlab records the adapted layers as a list'),
    ({"init_lora_weights": "pissa"}, 'init_lora_weights="pissa" (this initialisation rewrites the base weights'),
    ({"init_lora_weights": "olora"}, 'init_lora_weights="olora"'),
    ({"layer_replication": [[0, 1], [0, 1]]}, "layer_replication=[[0, 1], [0, 1]]"),
    ({"task_type": "SEQ_CLS"}, 'task_type="SEQ_CLS"'),
]


def fit_and_eval_refusals(student: str, folder: Path) -> tuple[str, str, str]:
    """The one line of each way an adapter folder enters opdlab: a fit's student_adapter.path, checked with the
    options (before any model loads) and again where the student is built (the folder may have changed since; a
    --resume builds it the same way), and `opdlab eval --model`."""
    from transformers import AutoModelForCausalLM

    from opdlab.adapters import apply_adapter
    from opdlab.evaluation import EvalError, resolve_model

    with pytest.raises(ValueError) as options:
        AdapterOptions(path=str(folder))
    later = AdapterOptions()
    later.path = str(folder)
    with pytest.raises(ValueError) as built:
        apply_adapter(AutoModelForCausalLM.from_pretrained(student), later, student)
    with pytest.raises(EvalError) as evaluation:
        resolve_model(str(folder))
    return str(options.value), str(built.value), str(evaluation.value)


@pytest.mark.parametrize("fields,says", REFUSED, ids=[json.dumps(f) for f, _ in REFUSED])
def test_a_peft_adapter_opdlab_cannot_merge_exactly_is_refused_in_one_line(fields, says, tiny_checkpoints, tmp_path):
    """Adapters made with peft whose config makes them more than W + alpha / r * B @ A on listed linear layers (or
    what opdlab records of them: rank, alpha, target_modules): refused wherever they enter, in one line naming the
    folder, the field with its value, and what to do instead."""
    folder = peft_adapter(tiny_checkpoints.student, tmp_path / "made_by_peft", **fields)
    for line, option in zip(fit_and_eval_refusals(tiny_checkpoints.student, folder),
                            ("student_adapter.path", "student_adapter.path", "--model"), strict=True):
        assert "\n" not in line and line.startswith(f"{option} {folder}: its adapter_config.json sets "), line
        assert says in line and "merge it into its base with peft" in line, line


def changed(default):
    """A value other than a LoraConfig field's default, of the kind the field holds."""
    if isinstance(default, bool):
        return not default
    if isinstance(default, (int, float)):
        return default + 1
    if isinstance(default, str):
        return default + ".other"
    if isinstance(default, dict):
        return {"q_proj": 2}
    return [1, 2]  # a None default: a list or an object where set


def test_every_lora_config_field_is_handled_or_refused_when_set(tiny_checkpoints, tmp_path):
    """The class, not a list of cases: every field of the installed peft's LoraConfig is one opdlab handles (rank,
    alpha, dropout, the record of where the adapter comes from), one that matters only with another field, or
    refused as soon as it differs from peft's default, so a LoRA variant a later peft adds is refused too. A
    field this peft does not know is refused when set (peft would ignore it)."""
    from opdlab.adapters import CHECKED_FIELDS, FREE_FIELDS, ONLY_WITH, lora_defaults, read_adapter_config

    folder = peft_adapter(tiny_checkpoints.student, tmp_path / "plain")
    plain = json.loads((folder / "adapter_config.json").read_text())
    read_adapter_config(folder, "plain")  # accepted as peft wrote it
    defaults = lora_defaults()
    assert set(plain) == set(defaults), "peft writes every field"
    for name, default in defaults.items():
        if name in FREE_FIELDS:
            continue
        value = changed(default)
        (folder / "adapter_config.json").write_text(json.dumps({**plain, name: value}))
        if name in ONLY_WITH:  # inert alone (peft reads it only for the other field), refused with it
            read_adapter_config(folder, "x")
            (folder / "adapter_config.json").write_text(json.dumps({**plain, name: value, ONLY_WITH[name]: [0]}))
            name, value = ONLY_WITH[name], [0]
        if name in CHECKED_FIELDS and CHECKED_FIELDS[name](value):
            continue  # a value opdlab handles (target_modules as a list): test_a_peft_adapter_opdlab_accepts...
        with pytest.raises(ValueError) as refused:
            read_adapter_config(folder, f"student_adapter.path {folder}")
        line = str(refused.value)
        assert line.startswith(f"student_adapter.path {folder}: its adapter_config.json sets ") and "\n" not in line
        assert f" {name}={json.dumps(value)} (" in line or f"sets {name}={json.dumps(value)} (" in line, line
    (folder / "adapter_config.json").write_text(json.dumps({**plain, "use_quantum_lora": True, "new_but_off": None}))
    with pytest.raises(ValueError, match=r"sets use_quantum_lora=true, which peft \S+ does not know .* upgrade peft"):
        read_adapter_config(folder, "x")


def test_a_config_that_hides_what_the_weights_hold_is_refused(tiny_checkpoints, tmp_path):
    """A DoRA adapter whose adapter_config.json says use_dora false (edited by hand): peft would drop the magnitude
    vectors without a word; the tensors of the file are checked too."""
    folder = peft_adapter(tiny_checkpoints.student, tmp_path / "dora", {"use_dora": False}, use_dora=True)
    for line in fit_and_eval_refusals(tiny_checkpoints.student, folder):
        assert "adapter_model.safetensors holds model.layers.0.self_attn.q_proj.lora_magnitude_vector (and 1 more), " \
               "not a lora_A or lora_B weight" in line, line


def test_an_adapter_on_the_embeddings_is_refused(tiny_checkpoints, tmp_path):
    folder = peft_adapter(tiny_checkpoints.student, tmp_path / "emb", target_modules=["embed_tokens", "q_proj"])
    for line in fit_and_eval_refusals(tiny_checkpoints.student, folder):
        assert "holds model.embed_tokens." in line and "LoRA on an embedding" in line, line


def test_an_adapter_folder_given_as_the_student_says_what_to_pass(tiny_checkpoints, tmp_path):
    """`--model.student <adapter folder>`: transformers would put the adapter on its base unmerged and frozen.
    (`opdlab.adapters.check_not_adapter_folder` is the check; the student's loading is where it belongs.)"""
    from opdlab.adapters import check_not_adapter_folder

    folder = peft_adapter(tiny_checkpoints.student, tmp_path / "plain")
    with pytest.raises(ValueError, match=rf"^--model.student {re.escape(str(folder))} is a peft adapter folder, not a "
                                         rf"model; .* --model.student {re.escape(tiny_checkpoints.student)} and the "
                                         rf"folder as --model.student_adapter.path {re.escape(str(folder))}$"):
        check_not_adapter_folder(str(folder), "--model.student")
    dora = peft_adapter(tiny_checkpoints.student, tmp_path / "dora", use_dora=True)
    with pytest.raises(ValueError, match="use_dora=true"):
        check_not_adapter_folder(str(dora), "--model.student")
    check_not_adapter_folder(tiny_checkpoints.student, "--model.student")  # a model: nothing to say


def test_the_module_refuses_an_adapter_folder_as_its_student_before_loading_it(tiny_checkpoints, tmp_path):
    from opdlab.module import OPDModule

    folder = peft_adapter(tiny_checkpoints.student, tmp_path / "plain")
    module = OPDModule(student=str(folder), teacher=tiny_checkpoints.teacher)
    with pytest.raises(ValueError, match="is a peft adapter folder, not a model"):
        module.configure_model()
    assert module.student is None and module.tokenizer is None
