"""Bad input gets a clear error (or a documented warning) and never a NaN or a crash deep inside."""

from __future__ import annotations

import json
import sys
import warnings

import lightning as L
import pytest
import torch

from opdlab.cli import main
from opdlab.data import PromptDataModule
from opdlab.models import check_tokenizers_compatible, check_vocab_sizes, resolve_model_path
from opdlab.module import OPDModule
from opdlab.rollout import encode_prompts
from opdlab.selectors import RandomSelector, TeachabilitySelector
from opdlab.tasks import AdditionTask, JsonlPrompts
from opdlab.toy import build_char_tokenizer, make_qwen2

from conftest import CONFIG_DIR, TINY_TEACHER, kept_head_loss, response_hidden_states, run_opdlab, score

FAST = str(CONFIG_DIR / "fast.yaml")


def cli_exit_message(args: list[str]) -> str:
    result = run_opdlab(args)
    assert result.code != 0
    return str(result.code)


# ------------------------------------------------------------------------------ unknown names
@pytest.mark.parametrize(
    "args, wanted",
    [
        (["--model.selector", "teachabilty"], "teachability"),
        (["--model.selector=entropi"], "entropy"),
        (["--model.divergence", "reverse_k1"], "reverse_kl"),
        (["--model.divergence=fwd_kl"], "forward_kl"),
    ],
)
def test_unknown_plugin_name_through_cli_suggests_and_lists(args, wanted):
    message = cli_exit_message(["fit", "--config", FAST, *args, "--print_config"])
    assert "did you mean" in message.lower()
    assert repr(wanted) in message
    kind = "selector" if "selector" in args[0] else "divergence"
    assert f"unknown {kind}" in message
    everything = ["full", "random", "teachability"] if kind == "selector" else ["jsd", "sampled_token", "tvd"]
    assert all(name in message for name in everything), "the error lists what exists"


def test_known_short_name_through_cli_resolves():
    result = run_opdlab(["fit", "--config", FAST, "--model.selector", "random", "--model.divergence=jsd",
                         "--print_config"])
    assert result.code == 0, result.err
    out = result.out
    assert "opdlab.selectors.random_tokens.RandomSelector" in out
    assert "opdlab.divergences.full_vocab.GeneralizedJSD" in out


# ------------------------------------------------------------------------------ ratio
@pytest.mark.parametrize("ratio", [1.5, 0.0, -0.1])
@pytest.mark.parametrize("cls", [TeachabilitySelector, RandomSelector])
def test_ratio_outside_unit_interval(cls, ratio):
    with pytest.raises(ValueError, match=rf"ratio must be in \(0, 1\], got {ratio}"):
        cls(ratio=ratio)


def test_ratio_one_is_allowed():
    assert TeachabilitySelector(ratio=1.0).ratio == 1.0


def test_ratio_outside_unit_interval_through_cli(tmp_path, monkeypatch, tiny_checkpoints):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["opdlab"])
    with pytest.raises((ValueError, SystemExit)) as err:
        main(["fit", "--config", FAST, "--model.selector.init_args.ratio", "1.5", "--trainer.logger", "false",
              "--model.student", tiny_checkpoints.student, "--model.teacher", tiny_checkpoints.teacher])
    text = str(err.value.code if isinstance(err.value, SystemExit) else err.value)
    assert "ratio must be in (0, 1], got 1.5" in text


# ------------------------------------------------------------------------------ model paths
@pytest.mark.parametrize("path", ["./nope", "/definitely/not/here", "nope"])
def test_missing_model_path(path):
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        resolve_model_path(path)
    assert repr(path) in str(err.value)
    assert "hub id" in str(err.value)


def test_hub_ids_and_existing_dirs_pass_through(tmp_path, monkeypatch):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    # No hub here: an id that is not cached is refused at once, in one line (not after a minute of retries) ...
    with pytest.raises(OSError, match="'Qwen/Qwen3-1.7B' is not a local directory, not in the hub cache"):
        resolve_model_path("Qwen/Qwen3-1.7B")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # ... and offline mode leaves ids to the cache, as transformers does
    assert resolve_model_path("Qwen/Qwen3-1.7B") == "Qwen/Qwen3-1.7B"


def test_bad_toy_spec():
    with pytest.raises(ValueError, match="toy:<name>/teacher"):
        resolve_model_path("toy:add2/teachr")
    with pytest.raises(ValueError, match="unknown toy 'add9'"):
        resolve_model_path("toy:add9/teacher")


def test_missing_model_path_through_module(tiny_checkpoints):
    module = OPDModule(student=tiny_checkpoints.student, teacher="./no_teacher_here")
    with pytest.raises(FileNotFoundError, match="no_teacher_here"):
        module.configure_model()


# ------------------------------------------------------------------------------ tokenizers
def test_tokenizer_vocab_mismatch_is_refused():
    student, teacher = build_char_tokenizer(), build_char_tokenizer("0123456789+-")
    with pytest.raises(ValueError, match="incompatible") as err:
        check_tokenizers_compatible(student, teacher)
    message = str(err.value)
    assert "vocabularies differ" in message and "'='" in message and "'-'" in message
    assert "same family" in message  # says what to do


def test_tokenizer_special_token_mismatch_is_refused():
    student, teacher = build_char_tokenizer(), build_char_tokenizer()
    teacher.pad_token = "<unk>"
    with pytest.raises(ValueError, match="pad_token_id differs"):
        check_tokenizers_compatible(student, teacher)


def test_tokenizer_mismatch_refused_before_loading_weights(tiny_checkpoints, tmp_path, monkeypatch):
    other = build_char_tokenizer("abcdefghijkl")
    path = tmp_path / "foreign_teacher"
    make_qwen2(TINY_TEACHER, other).save_pretrained(path)
    other.save_pretrained(path)
    import opdlab.building

    loaded = []
    monkeypatch.setattr(opdlab.building, "load_causal_lm", lambda *a, **k: loaded.append(a))
    module = OPDModule(student=tiny_checkpoints.student, teacher=str(path))
    with pytest.raises(ValueError, match="tokenizers are incompatible"):
        module.configure_model()
    assert loaded == [], "weights were loaded before the tokenizer check"


def test_padded_teacher_vocab_is_accepted(tiny_checkpoints, char_tokenizer, tmp_path):
    """Same tokenizer, embedding padded to a bigger size (like 151936 vs 152064): allowed."""
    torch.manual_seed(0)
    padded = make_qwen2(TINY_TEACHER, char_tokenizer)
    padded.resize_token_embeddings(len(char_tokenizer) + 16, mean_resizing=False)
    padded.save_pretrained(tmp_path / "padded")
    char_tokenizer.save_pretrained(tmp_path / "padded")
    module = OPDModule(
        student=tiny_checkpoints.student,
        teacher=str(tmp_path / "padded"),
        rollout=dict(max_new_tokens=3),
    )
    module.configure_model()
    assert check_vocab_sizes(module.student, module.teacher, module.tokenizer) == len(char_tokenizer)
    rollout = module.rollout(encode_prompts(module.tokenizer, ["12+34="], [""]))
    s, t = response_hidden_states(module, rollout)
    stats = score(module, s, t, rollout)
    keep = module.select(stats)
    loss = kept_head_loss(s, t, keep, rollout, stats, module.student_head, module.placement.head, module.divergence)
    assert loss.token_losses.shape == (int(keep.sum()),) and torch.isfinite(loss.token_losses).all()


def test_model_smaller_than_tokenizer_is_refused(tiny_checkpoints, char_tokenizer):
    small = make_qwen2(TINY_TEACHER, char_tokenizer)
    small.resize_token_embeddings(len(char_tokenizer) - 2, mean_resizing=False)
    module = OPDModule(student=tiny_checkpoints.student, teacher=tiny_checkpoints.teacher)
    module.configure_model()
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        check_vocab_sizes(module.student, small, module.tokenizer)


# ------------------------------------------------------------------------------ JSONL
def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "a", "answer": "1"}) + "\n{oops}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}:2: not valid JSON"):
        JsonlPrompts(str(path))


def test_missing_jsonl_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="JSONL prompt file not found"):
        JsonlPrompts(str(tmp_path / "nope.jsonl"))


def test_empty_jsonl_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no problems found"):
        JsonlPrompts(str(path))


# ------------------------------------------------------------------------------ long prompts
def test_long_prompt_is_truncated_from_the_left_with_warning(char_tokenizer):
    tok = char_tokenizer
    with pytest.warns(UserWarning, match=r"1 of 2 prompts exceed max_prompt_len=4 tokens \(longest 6\)"):
        batch = encode_prompts(tok, ["12+34=", "1+2="], ["", ""], max_prompt_len=4)
    assert batch.input_ids.shape == (2, 4)
    assert tok.decode(batch.input_ids[0]) == "+34="  # keeps the end, where the question is
    assert tok.decode(batch.input_ids[1]) == "1+2="


def test_prompt_within_limit_is_silent(char_tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_prompts(char_tokenizer, ["12+34="], [""], max_prompt_len=6)


def test_long_prompt_error_mode(char_tokenizer):
    with pytest.raises(ValueError, match="exceed max_prompt_len=4.*raise max_prompt_len or set on_long_prompt="):
        encode_prompts(char_tokenizer, ["12+34="], [""], max_prompt_len=4, on_long_prompt="error")


def test_long_prompt_through_module(tiny_checkpoints):
    batch = {"prompts": ["12+34=", "1="], "answers": ["", ""]}
    module = OPDModule(
        student=tiny_checkpoints.student,
        teacher=tiny_checkpoints.teacher,
        rollout=dict(max_prompt_len=3, on_long_prompt="error"),
    )
    module.configure_model()
    with pytest.raises(ValueError, match="max_prompt_len=3"):
        module.encode(batch)
    module.rollout_options.on_long_prompt = "truncate"
    with pytest.warns(UserWarning, match="max_prompt_len=3"):
        assert module.encode(batch).input_ids.shape == (2, 3)


# ------------------------------------------------------------------------------ empty responses
@pytest.fixture
def eos_first_student(tmp_path, char_tokenizer, make_scripted_model):
    model = make_scripted_model({"=": "<eos>"}, default="<eos>")
    model.save_pretrained(tmp_path / "eos_first")
    char_tokenizer.save_pretrained(tmp_path / "eos_first")
    return str(tmp_path / "eos_first")


@pytest.mark.parametrize("divergence", ["sampled_token", "reverse_kl"])
def test_empty_responses_train_and_validate_without_nan(eos_first_student, tiny_checkpoints, tmp_path, divergence):
    """A student that answers EOS at once: a real fit step and validation, no NaN, no crash, accuracy 0."""
    from opdlab.plugins import discover

    losses, records = [], []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))
            records.append(outputs["record"])
            assert all(p.grad is None or torch.isfinite(p.grad).all() for p in module.student.parameters())

    module = OPDModule(
        student=eos_first_student,
        teacher=tiny_checkpoints.teacher,
        selector=TeachabilitySelector(ratio=0.05),
        divergence=discover("opdlab.divergences")[divergence].cls(),
        rollout=dict(max_new_tokens=4),
    )
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        val_check_interval=1, limit_val_batches=1, default_root_dir=tmp_path,
                        callbacks=[Record()])
    trainer.fit(module, datamodule=PromptDataModule(AdditionTask(digits=2, num_eval=8), batch_size=4, val_batch_size=8))
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert records[-1].rollout.response_mask.sum(1).tolist() == [1] * 4
    assert float(trainer.callback_metrics["val/accuracy"]) == 0.0


# ------------------------------------------------------------------------------ option ranges, before any model loads
@pytest.mark.parametrize("kwargs,message", [
    ({"training": {"gradient_clip_val": -1.0}}, "gradient_clip_val must be > 0"),
    ({"training": {"gradient_clip_val": 0.0}}, "gradient_clip_val must be > 0"),
    ({"rollout": {"max_prompt_len": 0}}, "max_prompt_len must be >= 1"),
    ({"rollout": {"max_prompt_len": -4}}, "max_prompt_len must be >= 1"),
    ({"training": {"max_bad_steps": -1}}, "max_bad_steps must be >= 0"),
    ({"rollout": {"top_p": 0.0}}, r"top_p must be in \(0, 1\]"),
    ({"rollout": {"top_p": 1.5}}, r"top_p must be in \(0, 1\].*got 1.5"),
    ({"memory": {"chunk_size": 0}}, "chunk_size must be >= 1"),
])
def test_module_option_ranges_are_checked_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OPDModule(student="/no/such/student", teacher="/no/such/teacher", **kwargs)  # nothing is loaded


def test_encode_prompts_refuses_nonpositive_max_prompt_len(char_tokenizer):
    with pytest.raises(ValueError, match="max_prompt_len must be >= 1"):
        encode_prompts(char_tokenizer, ["12+34="], max_prompt_len=0)


def test_top_k_larger_than_the_vocabulary_fails_before_weights_load(tiny_checkpoints, monkeypatch):
    from opdlab import building as module_file

    loaded = []
    monkeypatch.setattr(module_file, "load_causal_lm", lambda *a, **k: loaded.append(a))
    module = OPDModule(student=tiny_checkpoints.student, teacher=tiny_checkpoints.teacher,
                       selector=TeachabilitySelector(top_k=64))
    with pytest.raises(ValueError, match=r"top_k=64 exceeds the vocabulary \(16 tokens"):
        module.configure_model()
    assert loaded == []


# ------------------------------------------------------------------------------ JSONL answers and encodings
@pytest.mark.parametrize("line,message", [
    ('{"prompt": "1+1="}', "record has no answer"),
    ('{"prompt": [{"role": "user", "content": "1+1="}], "reward_model": {}}', "record has no answer"),
    ('{"prompt": "1+1=", "answer": ["2"]}', r"answer must be a string or a number, got list \['2'\]"),
    ('{"prompt": "1+1=", "answer": {"value": 2}}', "got dict"),
    ('{"prompt": "1+1=", "answer": true}', "got bool"),
])
def test_jsonl_answers_that_could_never_match_are_refused_with_file_and_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "2+2=", "answer": "4"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as err:
        JsonlPrompts(str(path), eval_path=str(path))
    assert f"{path}:2" in str(err.value)


def test_jsonl_numeric_answers_become_their_text(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "answer": 125}\n{"prompt": "b", "answer": 125.0}\n'
                    '{"prompt": "c", "reward_model": {"ground_truth": 0.5}}\n')
    source = JsonlPrompts(str(path), eval_path=str(path))
    assert [p.answer for p in source.eval_problems()] == ["125", "125", "0.5"]
    assert source.verify("125", source.eval_problems()[1].answer)


def test_non_utf8_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: not UTF-8 \(byte 0xe9 at column 16\)"):
        JsonlPrompts(str(path), eval_path=str(path))


def test_prompts_with_unknown_characters_warn_once(tiny_module):
    batch = {"prompts": ["12+34=", "what is 12 plus 34?"], "answers": ["64", "64"]}
    with pytest.warns(UserWarning, match=r"cannot represent characters '\?ahilpstuw' of prompts such as 'what is 12"):
        tiny_module.encode(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_module.encode(batch)  # once per run
        tiny_module.encode({"prompts": ["1+2="], "answers": ["3"]})
