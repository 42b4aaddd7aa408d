"""The `opdlab` command end to end on tiny models: fit, TensorBoard tags, export, help, plugins, resume."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import CONFIG_DIR, REPO_ROOT, run_opdlab

FAST = str(CONFIG_DIR / "fast.yaml")
MAX_STEPS, BATCH = 4, 8


def write_overrides(root: Path, tiny, version: str) -> Path:
    """A second --config on top of configs/fast.yaml: tiny models, 4 steps, checkpoints every step."""
    overrides = {
        "trainer": {
            "max_steps": MAX_STEPS,
            "val_check_interval": 2,
            "log_every_n_steps": 1,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(root / "runs"), "name": "fast", "version": version},
            },
            "callbacks": [{
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(root / f"ckpt_{version}"), "every_n_train_steps": 1,
                              "save_top_k": -1, "filename": "{step}"},
            }],
        },
        "model": {"student": tiny.student, "teacher": tiny.teacher},
        "data": {
            "source": {"class_path": "opdlab.tasks.AdditionTask", "init_args": {"digits": 2, "num_eval": 32}},
            "batch_size": BATCH,
            "val_batch_size": 32,
        },
    }
    path = root / f"overrides_{version}.yaml"
    path.write_text(yaml.safe_dump(overrides))
    return path


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def uninterrupted(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_fit")
    result = run_opdlab(["fit", "--config", FAST, "--config", str(write_overrides(root, tiny_checkpoints, "full"))])
    return root, result


# ------------------------------------------------------------------------------ fit end to end
def test_fit_end_to_end_summary(uninterrupted):
    root, result = uninterrupted
    assert result.code == 0, result.err[-3000:]
    out = result.out
    assert "opdlab fit summary" in out
    assert f"steps: {MAX_STEPS}" in out
    summary = out[out.index("opdlab fit summary"):]
    assert "student accuracy: before" in summary and "-> after" in summary
    assert "training wall time:" in summary and "response tokens/s:" in summary
    assert re.search(r"^train \d+/\d+ ", result.out, re.M), "plain progress lines (stdout is not a terminal)"


def test_fit_logs_namespaced_tensorboard_tags(uninterrupted):
    root, result = uninterrupted
    assert result.code == 0, result.err[-3000:]
    tags = scalars(root / "runs" / "fast" / "full")
    for tag in ("train/loss", "train/retained_ratio", "rollout/len_mean", "val/accuracy", "val/teacher_accuracy"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    # every point sits at the number of steps done: step N's loss and the validation after it at N
    assert [step for step, _ in tags["train/loss"]] == list(range(1, MAX_STEPS + 1))
    assert [step for step, _ in tags["val/accuracy"]] == [0, 2, 4]  # before training, then every 2 steps
    assert all(math.isfinite(v) for _, v in tags["train/loss"])
    # fast.yaml keeps 20% of response tokens (at least one per response, so a bit more on short rollouts).
    assert all(0.2 <= v <= 1.0 for _, v in tags["train/retained_ratio"])
    assert all(1.0 <= v <= 6.0 for _, v in tags["rollout/len_mean"])  # max_new_tokens 6 in fast.yaml
    assert all(0.0 <= v <= 1.0 for _, v in tags["val/accuracy"])
    assert len(tags["val/teacher_accuracy"]) == 1, "the teacher's accuracy is logged once"


def test_fit_exports_student_and_config(uninterrupted, tiny_checkpoints):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, result = uninterrupted
    assert result.code == 0, result.err[-3000:]
    export = root / "runs" / "fast" / "full" / "student"
    assert f"student exported to {export}" in result.out
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tiny_checkpoints.student).get_vocab()
    # It is the trained student (same architecture, changed weights), not the teacher.
    original = AutoModelForCausalLM.from_pretrained(tiny_checkpoints.student)
    assert model.config.hidden_size == original.config.hidden_size
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), original.parameters(), strict=True))
    final = load_ckpt(root / "ckpt_full" / f"step={MAX_STEPS}.ckpt")["state_dict"]
    for name, p in model.state_dict().items():
        assert torch.equal(p, final[f"student.{name}"]), name
    assert (root / "runs" / "fast" / "full" / "config.yaml").exists()


def test_checkpoints_every_step_without_teacher(uninterrupted):
    root, result = uninterrupted
    assert result.code == 0, result.err[-3000:]
    for step in range(1, MAX_STEPS + 1):
        ckpt = load_ckpt(root / "ckpt_full" / f"step={step}.ckpt")
        assert ckpt["global_step"] == step
        assert ckpt["PromptDataModule"] == {"consumed": step * BATCH}
        assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])


# ------------------------------------------------------------------------------ resume
def test_resume_continues_the_same_run(uninterrupted, tiny_checkpoints):
    """Resuming at step 2 replays steps 3-4 exactly: same losses, data position, and final weights."""
    root, first = uninterrupted
    assert first.code == 0, first.err[-3000:]
    k = 2
    overrides = write_overrides(root, tiny_checkpoints, "resumed")
    result = run_opdlab(["fit", "--config", FAST, "--config", str(overrides),
                         "--ckpt_path", str(root / "ckpt_full" / f"step={k}.ckpt")])
    assert result.code == 0, result.err[-3000:]
    assert f"steps: {MAX_STEPS}" in result.out

    # global_step and the prompt stream continue from the checkpoint (not from 0).
    saved = sorted(p.name for p in (root / "ckpt_resumed").glob("*.ckpt"))
    assert saved == [f"step={s}.ckpt" for s in range(k + 1, MAX_STEPS + 1)]
    for step in range(k + 1, MAX_STEPS + 1):
        ckpt = load_ckpt(root / "ckpt_resumed" / f"step={step}.ckpt")
        assert ckpt["global_step"] == step
        assert ckpt["PromptDataModule"] == {"consumed": step * BATCH}

    full = dict(scalars(root / "runs" / "fast" / "full")["train/loss"])
    resumed = dict(scalars(root / "runs" / "fast" / "resumed")["train/loss"])
    assert sorted(resumed) == list(range(k + 1, MAX_STEPS + 1))
    assert resumed == {step: full[step] for step in range(k + 1, MAX_STEPS + 1)}

    a = load_ckpt(root / "ckpt_full" / f"step={MAX_STEPS}.ckpt")
    b = load_ckpt(root / "ckpt_resumed" / f"step={MAX_STEPS}.ckpt")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name in a["state_dict"]:
        assert torch.equal(a["state_dict"][name], b["state_dict"][name]), name


def test_resume_takes_options_from_the_command_line_and_warns(uninterrupted, tiny_checkpoints):
    """LightningCLI used to restore the checkpoint's hyperparameters over these (config.yaml recorded 5 / null)."""
    root, first = uninterrupted
    assert first.code == 0, first.err[-3000:]
    overrides = write_overrides(root, tiny_checkpoints, "changed")
    with pytest.warns(UserWarning) as caught:
        result = run_opdlab(["fit", "--config", FAST, "--config", str(overrides), "--model.training.max_bad_steps", "50",
                             "--model.training.gradient_clip_val", "0.5", "--ckpt_path", str(root / "ckpt_full" / "step=2.ckpt")])
    assert result.code == 0, result.err[-3000:]
    said = [str(w.message) for w in caught if "resuming from" in str(w.message)]
    assert any("model.training.max_bad_steps=50 (the checkpoint was trained with 5)" in m for m in said), said
    assert any("model.training.gradient_clip_val=0.5 (the checkpoint was trained with None)" in m for m in said), said
    assert len(said) == 2, said  # only what differs
    config = yaml.safe_load((root / "runs" / "fast" / "changed" / "config.yaml").read_text())
    assert config["model"]["training"]["max_bad_steps"] == 50 and config["model"]["training"]["gradient_clip_val"] == 0.5


def test_resume_with_another_student_is_refused(uninterrupted, tiny_checkpoints):
    root, first = uninterrupted
    assert first.code == 0, first.err[-3000:]
    overrides = write_overrides(root, tiny_checkpoints, "other_student")
    result = run_opdlab(["fit", "--config", FAST, "--config", str(overrides), "--model.student",
                         tiny_checkpoints.teacher, "--ckpt_path", str(root / "ckpt_full" / "step=2.ckpt")])
    assert result.code != 0
    assert f"was trained with model.student={tiny_checkpoints.student!r}" in str(result.code)
    assert not (root / "ckpt_other_student").exists()  # refused before anything ran


# ------------------------------------------------------------------------------ help and plugins
def test_top_level_help():
    for args in ([], ["--help"], ["-h"]):
        result = run_opdlab(args)
        assert result.code == 0
        for command in ("fit", "validate", "test", "toy", "plugins"):
            assert command in result.out


def test_fit_help_documents_options():
    result = run_opdlab(["fit", "--help"])
    assert result.code == 0, result.err[-2000:]
    out = " ".join(result.out.split())  # help text is wrapped
    for option in ("--model.selector", "--model.divergence", "--model.training.loss_normalization", "--data.source",
                   "--trainer.max_steps", "--ckpt_path", "--config", "--print_config"):
        assert option in out, option
    # Docstrings of OPDModule's arguments become the option help.
    assert "which response positions get the loss" in out
    assert "responses sampled per prompt" in out


def test_toy_help():
    result = run_opdlab(["toy", "--help"])
    assert result.code == 0
    assert "--name" in result.out and "add2" in result.out


def test_plugins_lists_builtins():
    result = run_opdlab(["plugins"])
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].split() == ["group", "name", "package", "class"]
    rows = {tuple(line.split()[:2]): line.split() for line in lines[1:]}
    assert rows[("selectors", "teachability")][2:] == ["opdlab", "opdlab.selectors.teachability.TeachabilitySelector"]
    assert ("selectors", "full") in rows and ("divergences", "sampled_token") in rows
    assert ("divergences", "reverse_kl") in rows


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "opdlab"
    assert script.exists(), "pip install -e . should install the `opdlab` console script"
    out = subprocess.run([str(script), "plugins"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "teachability" in out.stdout


def test_validate_command(tiny_checkpoints, tmp_path):
    overrides = write_overrides(tmp_path, tiny_checkpoints, "validate")
    result = run_opdlab(["validate", "--config", FAST, "--config", str(overrides)])
    assert result.code == 0, result.err[-3000:]
    assert "val/accuracy" in result.out


# ------------------------------------------------------------------------------ errors a person can read
def test_option_errors_are_one_line_with_a_traceback_switch(monkeypatch):
    result = run_opdlab(["fit", "--config", FAST, "--model.training.gradient_clip_val", "-1"])
    message = str(result.code)
    assert message.startswith("opdlab: error: training.gradient_clip_val must be > 0"), message
    assert "Traceback" not in result.err and message.count("\n") == 1  # the message and the switch's hint
    monkeypatch.setenv("OPDLAB_TRACEBACK", "1")
    with pytest.raises(ValueError, match="gradient_clip_val must be > 0"):
        run_opdlab(["fit", "--config", FAST, "--model.training.gradient_clip_val", "-1"])


def test_unknown_option_prints_the_hint_without_the_usage():
    result = run_opdlab(["fit", "--config", FAST, "--model.rollout.max_new_tokns", "4"])
    assert result.code == 2
    assert "usage:" not in result.err and len(result.err.splitlines()) <= 4, result.err
    assert "did you mean 'model.rollout.max_new_tokens'" in result.err and "opdlab fit --help" in result.err


def test_a_mistyped_class_path_says_why_in_one_line():
    """jsonargparse's first line only names the key (`Parser key "model.selector":`); the reason is lines later."""
    result = run_opdlab(["fit", "--config", FAST, "--model.selector.class_path", "opdlab.selectors.TeachabilitySelectr"])
    assert result.code == 2
    first = result.err.splitlines()[0]
    assert first == ("opdlab fit: error: --model.selector: class_path 'opdlab.selectors.TeachabilitySelectr' does not "
                     "import (module 'opdlab.selectors' has no attribute 'TeachabilitySelectr'); check its spelling"), first
    assert "Subtypes" not in result.err, result.err


# A value jsonargparse refuses, in every command built on it: one line naming the whole option (a class's init_args
# included, where jsonargparse names only the last key and, from the nested parser, exited as `opdlab` with the
# wrong --help), what it takes and the value given; never the usage of every option.
PARSER_REFUSALS = [
    (["fit", "--config", FAST, "--model.optimizer.init_args.lr", "nan"],
     "opdlab fit: error: --model.optimizer.init_args.lr: expected float or Tensor, got 'nan'"),
    (["fit", "--config", FAST, "--model.selector.init_args.ratio", "abc"],
     "opdlab fit: error: --model.selector.init_args.ratio: expected float, got 'abc'"),
    (["fit", "--config", FAST, "--model.selector.init_args.rati", "0.1"],
     ("opdlab fit: error: --model.selector.init_args.rati: TeachabilitySelector takes no option 'rati' "
      "(did you mean 'ratio'?)")),
    (["fit", "--config", FAST, "--model.optimizer.init_args.lrr", "0.1"],
     "opdlab fit: error: --model.optimizer.init_args.lrr: AdamW takes no option 'lrr' (did you mean 'lr'?)"),
    (["fit", "--config", FAST, "--model.divergence.class_path", "nosuchmodule.KL"],
     ("opdlab fit: error: --model.divergence: class_path 'nosuchmodule.KL' does not import (No module named "
      "'nosuchmodule'); check its spelling")),
    (["fit", "--config", FAST, "--model.rollout", "null"],
     ("opdlab fit: error: --model.rollout: 'null' is not a value this group of options takes; set its options one "
      "by one (--model.rollout.<option> VALUE) or leave it out for the defaults")),
    (["fit", "--config", FAST, "--trainer.max_steps", "1.5"], "opdlab fit: error: --trainer.max_steps: expected int, got '1.5'"),
    (["eval", "--model", "toy:add3/student", "--pass_at", "5"],
     ("opdlab eval: error: --pass_at: expected list[int] or null, got '5' (a list is written in brackets: "
      "--pass_at '[5]')")),
    (["eval", "--config", str(REPO_ROOT / "configs" / "eval" / "toy.yaml"), "--model", "toy:add3/student",
      "--benchmarks.limit", "x"], "opdlab eval: error: --benchmarks.limit: expected int or null, got 'x'"),
    (["compare", "--seeds", "3"],
     "opdlab compare: error: --seeds: expected list, got '3' (a list is written in brackets: --seeds '[3]')"),
    (["diagnose", "--train.steps", "x"], "opdlab diagnose: error: --train.steps: expected int, got 'x'"),
    (["toy", "--seed", "x"], "opdlab toy: error: --seed: expected int, got 'x'"),
    (["fit", "--config", FAST, "--model.optimizer.init_args.weight_decay", "abc"],  # jsonargparse repeats the value
     "opdlab fit: error: --model.optimizer.init_args.weight_decay: expected float, got 'abc'"),
    (["eval", "--model", "toy:add3/student", "--benchmarks", '[{"name": "a", "path": "toy:add3", "limt": 3}]'],
     "opdlab eval: error: --benchmarks.limt: Benchmark takes no option 'limt' (did you mean 'limit' or 'split'?)"),
    (["eval", "--model", "toy:add3/student", "--dtype", "float64"],
     "opdlab eval: error: --dtype: expected one of 'float32', 'bfloat16', 'float16', got 'float64'"),
    (["compare", "--ratio", "abc"], "opdlab compare: error: --ratio: expected float or list[float], got 'abc'"),
]


def test_a_refusal_jsonargparse_made_in_several_branches_is_never_given_a_wrong_reason(tmp_path):
    """A list of callbacks (each entry tried as several classes) or a class inside a class: which branch failed for
    which reason cannot be told apart, so the line keeps jsonargparse's words rather than blame the wrong option or
    class (`EarlyStopping takes no option 'patience'`, `DDPStrategy does not import`)."""
    callbacks = run_opdlab(["fit", "--config", FAST, "--trainer.callbacks+", "lightning.pytorch.callbacks.EarlyStopping",
                            "--trainer.callbacks.monitor", "x", "--trainer.callbacks.patience", "abc"])
    first = callbacks.err.splitlines()[0]
    assert callbacks.code == 2 and "EarlyStopping" in first and "patience" in first and "takes no option" not in first
    nested = tmp_path / "strategy.yaml"
    nested.write_text("trainer:\n  strategy:\n    class_path: lightning.pytorch.strategies.DDPStrategy\n    init_args:\n"
                      "      cluster_environment:\n        class_path: nosuchmod.Env\n")
    result = run_opdlab(["fit", "--config", FAST, "--config", str(nested)])
    first = result.err.splitlines()[0]
    assert result.code == 2 and first.startswith("opdlab fit: error: ") and "does not import" not in first, first


@pytest.mark.parametrize(("argv", "line"), PARSER_REFUSALS, ids=[" ".join(a[-2:]) for a, _ in PARSER_REFUSALS])
def test_a_value_the_parser_refuses_is_one_line_naming_the_whole_option(argv, line):
    result = run_opdlab(argv)
    command = argv[0]
    assert result.code == 2 and result.err.splitlines() == [line, f"run 'opdlab {command} --help' for every option"], \
        result.err


def test_a_mistyped_option_of_any_command_gets_the_closest_names():
    result = run_opdlab(["compare", "--seedz", "3"])
    assert result.code == 2 and result.err.splitlines() == [
        "opdlab compare: error: unrecognized arguments: --seedz 3", "'seedz': did you mean 'seeds'?",
        "run 'opdlab compare --help' for every option"], result.err


def test_errors_from_outside_opdlab_keep_their_traceback(monkeypatch):
    from opdlab import cli

    def broken(argv):
        return int("not a number")  # a ValueError raised by Python itself, not by opdlab's checks

    monkeypatch.setitem(cli.COMMANDS, "toy", broken)
    with pytest.raises(ValueError, match="invalid literal"):
        cli.main(["toy"])


# ------------------------------------------------------------------------------ help that is quick and findable
@pytest.mark.parametrize("command", [["--help"], ["plugins"], ["toy", "--help"]])
def test_light_commands_do_not_import_lightning_or_transformers(command):
    """`opdlab --help` and `opdlab plugins` answer in about a second: they never import Lightning or
    transformers (10 s of CPU together on a busy 2-core machine); checked by module, not by clock."""
    code = ("import sys; from opdlab.cli import main\n"
            f"try:\n    main({command!r})\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('lightning', 'transformers', 'matplotlib') if m in sys.modules)\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "HEAVY []" in out, out[-500:]


def test_fit_help_puts_opdlab_options_first_and_describes_each():
    out = run_opdlab(["fit", "--help"]).out
    lines = out.splitlines()
    assert lines[0].startswith("usage: opdlab fit [--config CONFIG]") and len(lines[0]) < 160  # not 400 options
    first = {group: next(i for i, line in enumerate(lines) if line.startswith(f"  --{group}."))
             for group in ("model", "data", "trainer")}
    assert first["model"] < first["data"] < first["trainer"]
    undocumented = [line.split()[0] for i, line in enumerate(lines[:-1])
                    if re.match(r"  --(model|data)\.\w[\w.]*( [A-Z_]+)?$", line) and not line.split()[0].endswith(".help")
                    and lines[i + 1].strip().startswith("(type:")]
    assert undocumented == []


# ------------------------------------------------------------------------------ run folders and resuming the latest
def run_fit(tmp_path, tiny, *args):
    return run_opdlab([
        "fit", "--config", FAST, "--model.student", tiny.student, "--model.teacher", tiny.teacher,
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.val_check_interval", "2",
        "--data.batch_size", "4", "--data.val_batch_size", "16", "--data.source.init_args.num_eval", "16",
        "--trainer.log_every_n_steps", "1", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_last=true", *args,
    ])


def test_resume_continues_the_latest_run_in_its_own_folder(tmp_path, tiny_checkpoints):
    first = run_fit(tmp_path, tiny_checkpoints, "--trainer.max_steps", "2")
    assert first.code == 0, first.err[-3000:]
    run = tmp_path / "runs" / "fast" / "version_0"
    assert f"run folder {run}" in first.out
    before = re.search(r"before (\S+) ->", first.out).group(1)
    for steps in (3, 4):  # resumed twice: each time the same folder, each time its fresh last.ckpt
        again = run_fit(tmp_path, tiny_checkpoints, "--trainer.max_steps", str(steps), "--resume")
        assert again.code == 0, again.err[-3000:]
        assert f"resuming from {run / 'checkpoints' / 'last.ckpt'}" in again.out
        assert f"steps: {steps}" in again.out and f"before {before} ->" in again.out  # not re-validated
    assert sorted(p.name for p in (tmp_path / "runs" / "fast").iterdir()) == ["version_0"]
    losses = dict(scalars(run)["train/loss"])
    assert sorted(losses) == [1, 2, 3, 4]  # one curve across the three processes
    assert "hp_metric" not in scalars(run)


def test_run_name_and_resume_errors(tmp_path, tiny_checkpoints):
    nothing = run_fit(tmp_path, tiny_checkpoints, "--trainer.max_steps", "1", "--resume")
    assert "nothing to resume under" in str(nothing.code)
    named = run_fit(tmp_path, tiny_checkpoints, "--trainer.max_steps", "1", "--run_name", "mine")
    assert named.code == 0 and (tmp_path / "runs" / "fast" / "mine" / "checkpoints" / "last.ckpt").is_file()
    taken = run_fit(tmp_path, tiny_checkpoints, "--trainer.max_steps", "1", "--run_name", "mine")
    assert "already has checkpoints; pass --resume" in str(taken.code)


def test_validate_writes_no_run_folder(tmp_path, tiny_checkpoints, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_opdlab(["validate", "--config", FAST, "--model.student", tiny_checkpoints.student,
                         "--model.teacher", tiny_checkpoints.teacher, "--data.source.init_args.num_eval", "16"])
    assert result.code == 0, result.err[-3000:]
    assert "val/accuracy" in result.out
    assert list(tmp_path.iterdir()) == []  # no runs/ folder, no config.yaml


def test_rollouts_are_logged_as_text_with_the_kept_tokens(tmp_path, tiny_checkpoints):
    result = run_fit(tmp_path, tiny_checkpoints, "--trainer.max_steps", "2", "--rollout_samples.every_n_steps", "1",
                     "--rollout_samples.num_rows", "3")
    assert result.code == 0, result.err[-3000:]
    acc = EventAccumulator(str(tmp_path / "runs" / "fast" / "version_0"), size_guidance={"tensors": 0})
    acc.Reload()
    events = acc.Tensors("rollouts/samples/text_summary")
    assert [e.step for e in events] == [1, 2]
    text = events[0].tensor_proto.string_val[0].decode()
    lines = text.splitlines()
    assert lines[0] == "| prompt | response (**kept tokens**) | answer | correct |" and len(lines) == 2 + 3
    assert "**" in text and all(line.endswith(("| yes |", "| no |")) for line in lines[2:])


def test_rollouts_are_logged_at_the_last_step_too(tmp_path, tiny_checkpoints):
    """every_n_steps 3 over 4 steps logs steps 1 and 4 (the first, then 1 + 3), and a run of 5 steps logs its
    last step as well (1, 4, 5): what the trained student writes is always in the log."""
    for steps, logged in ((4, [1, 4]), (5, [1, 4, 5])):
        root = tmp_path / str(steps)
        result = run_fit(root, tiny_checkpoints, "--trainer.max_steps", str(steps), "--rollout_samples.every_n_steps", "3")
        assert result.code == 0, result.err[-3000:]
        acc = EventAccumulator(str(root / "runs" / "fast" / "version_0"), size_guidance={"tensors": 0})
        acc.Reload()
        assert [e.step for e in acc.Tensors("rollouts/samples/text_summary")] == logged


def test_an_engine_failure_mid_run_names_the_step_and_keeps_the_checkpoints(tmp_path, tiny_checkpoints, monkeypatch):
    """An engine that breaks in training step 3 (a serving engine's crash, an out-of-memory): one line naming
    the engine and the step, the checkpoint of step 2 intact, and --resume continues from it."""
    from opdlab.engines import StaticCacheEngine

    generate, calls = StaticCacheEngine.generate, []

    def breaks_at_the_third_training_rollout(self, prompts, params):
        calls.append(params.temperature)
        if params.temperature > 0 and calls.count(params.temperature) == 3:
            raise RuntimeError("engine core died")
        return generate(self, prompts, params)

    monkeypatch.setattr(StaticCacheEngine, "generate", breaks_at_the_third_training_rollout)
    failed = run_fit(tmp_path, tiny_checkpoints, "--trainer.max_steps", "4")
    message = str(failed.code)
    assert message.startswith("opdlab: error: rollout engine StaticCacheEngine failed in training step 3 (2 steps "
                              "completed"), message
    assert "RuntimeError: engine core died" in message and "--resume" in message and message.count("\n") == 1
    last = tmp_path / "runs" / "fast" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 2
    monkeypatch.setattr(StaticCacheEngine, "generate", generate)
    resumed = run_fit(tmp_path, tiny_checkpoints, "--trainer.max_steps", "4", "--resume")
    assert resumed.code == 0 and f"resuming from {last}" in resumed.out and "steps: 4" in resumed.out, resumed.err[-2000:]


@pytest.mark.parametrize("interrupt", ["sigint", "finished"])
def test_resume_with_the_csv_logger_keeps_the_earlier_rows(tmp_path, tiny_checkpoints, interrupt):
    """Lightning's CSVLogger deletes metrics.csv when the folder has one; a resumed run must keep the
    curve: rows of steps before the resume point stay, the redone steps' rows are replaced, not doubled."""
    import csv

    csv_logger = ["--trainer.callbacks.save_top_k=-1", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                  "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.logger.init_args.name", "fast"]
    first = run_fit(tmp_path, tiny_checkpoints, "--trainer.max_steps", "3", *csv_logger)
    assert first.code == 0, first.err[-3000:]
    run = tmp_path / "runs" / "fast" / "version_0"
    if interrupt == "sigint":  # as if killed after step 3 was logged but before its checkpoint: step 2's is the last
        (run / "checkpoints" / "last.ckpt").unlink()
        (run / "checkpoints" / "epoch=0-step=2.ckpt").rename(run / "checkpoints" / "last.ckpt")
    for steps in (5, 6):
        again = run_fit(tmp_path, tiny_checkpoints, "--trainer.max_steps", str(steps), "--resume", *csv_logger)
        assert again.code == 0, again.err[-3000:]
    with open(run / "metrics.csv", newline="") as file:
        losses = [int(row["step"]) for row in csv.DictReader(file) if row.get("train/loss")]
    assert losses == [1, 2, 3, 4, 5, 6], losses  # one row per step, across three processes


def test_resume_refuses_when_the_latest_run_has_no_checkpoint(tmp_path, tiny_checkpoints):
    """--resume without a name continues the most recent run; when that one has nothing to resume from it
    says so, naming it and the older run it could mean, instead of silently continuing the older run."""
    import os
    import time

    older = run_fit(tmp_path, tiny_checkpoints, "--trainer.max_steps", "1")
    assert older.code == 0, older.err[-2000:]
    newer = tmp_path / "runs" / "fast" / "version_1"
    newer.mkdir()
    (newer / "events.out.tfevents.1").write_bytes(b"x")  # a run that logged but never checkpointed
    later = time.time() + 5
    os.utime(newer / "events.out.tfevents.1", (later, later))
    message = str(run_fit(tmp_path, tiny_checkpoints, "--trainer.max_steps", "2", "--resume").code)
    assert message.startswith(f"opdlab: error: the most recent run, {newer}, has no checkpoints/last.ckpt"), message
    assert "--run_name version_0 --resume" in message, message


def test_a_fit_that_fails_before_its_first_step_leaves_no_run_folder(tmp_path, tiny_checkpoints, monkeypatch):
    from opdlab.engines import StaticCacheEngine

    def broken(self, prompts, params):
        raise RuntimeError("no engine today")

    monkeypatch.setattr(StaticCacheEngine, "generate", broken)
    result = run_fit(tmp_path, tiny_checkpoints, "--trainer.max_steps", "2")
    assert "rollout engine StaticCacheEngine failed in validation at step 0" in str(result.code), result.code
    assert "removed" in result.err and "before its first step" in result.err, result.err[-1000:]
    assert not list((tmp_path / "runs" / "fast").glob("*")), list((tmp_path / "runs" / "fast").glob("*"))


def test_the_exported_student_is_readable_like_any_new_file(tmp_path, tiny_checkpoints):
    import os
    import stat

    result = run_fit(tmp_path, tiny_checkpoints, "--trainer.max_steps", "1")
    assert result.code == 0, result.err[-2000:]
    umask = os.umask(0)
    os.umask(umask)
    for file in (tmp_path / "runs" / "fast" / "version_0" / "student").iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file


# ------------------------------------------------------------------------------ silent wrong runs, now refused or warned
def test_max_new_tokens_beyond_the_students_positions_is_refused(tmp_path, tiny_checkpoints):
    message = str(run_fit(tmp_path, tiny_checkpoints, "--model.rollout.max_new_tokens", "100000").code)
    assert message.startswith("opdlab: error: rollout.max_new_tokens=100000 does not fit the student's"), message
    assert message.count("\n") == 1


def test_nonfinite_rollout_temperature_is_refused():
    from opdlab.options import RolloutOptions

    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="rollout.temperature must be > 0"):
            RolloutOptions(temperature=value)


def test_an_empty_jsonl_prompt_is_refused_with_its_line(tmp_path):
    from opdlab.tasks import JsonlPrompts

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "  ", "answer": "3"}\n')
    with pytest.raises(ValueError, match=r'p.jsonl:2: the "prompt" is empty'):
        JsonlPrompts(str(path), num_eval=1)


def test_a_step_that_keeps_nothing_and_a_teacher_at_zero_percent_are_said(tmp_path, tiny_checkpoints, monkeypatch):
    """A selector that keeps nothing trains on nothing; a teacher that scores 0% (the tiny random teacher here)
    means data, verifier or teacher are wrong: both are said once, not left to the final summary."""
    from opdlab.selectors import TeachabilitySelector

    monkeypatch.setattr(TeachabilitySelector, "select", lambda self, stats, generator=None: torch.zeros_like(stats.valid))
    with pytest.warns(UserWarning) as caught:
        result = run_fit(tmp_path, tiny_checkpoints, "--trainer.max_steps", "2")
    assert result.code == 0, result.err[-2000:]
    messages = [str(w.message) for w in caught]
    assert sum("kept no response token in step 1" in m for m in messages) == 1, messages
    assert sum("answers 0% of the validation set" in m for m in messages) == 1, messages


def test_a_bad_optimizer_value_and_an_unreachable_hub_id_are_one_line(tmp_path, tiny_checkpoints):
    message = str(run_fit(tmp_path, tiny_checkpoints, "--model.optimizer.init_args.lr", "-0.1").code)
    assert message.startswith("opdlab: error: --model.optimizer: Invalid learning rate: -0.1"), message
    message = str(run_fit(tmp_path, tiny_checkpoints, "--model.student", "nobody/no-such-model").code)
    assert message.startswith("opdlab: error: model 'nobody/no-such-model' is"), message  # unreachable or unknown
    assert message.count("\n") == 1


@pytest.mark.parametrize("bad", ["float", "shape"])
def test_a_plugin_selectors_malformed_keep_mask_names_the_selector(tmp_path, tiny_checkpoints, monkeypatch, bad):
    from opdlab.selectors import TeachabilitySelector

    def malformed(self, stats, generator=None):
        return stats.valid.float() if bad == "float" else stats.valid[:, :-1]

    monkeypatch.setattr(TeachabilitySelector, "select", malformed)
    message = str(run_fit(tmp_path, tiny_checkpoints, "--trainer.max_steps", "1").code)
    assert "selector TeachabilitySelector returned a keep mask of" in message and "expected torch.bool" in message, message


@pytest.mark.parametrize("command", ["fit", "compare", "diagnose", "cache"])
def test_an_output_folder_that_cannot_be_written_is_one_line(tmp_path, command, monkeypatch):
    """A folder under a regular file (the same refusal covers read-only disks and missing permissions)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    where = str(blocker / "out")
    args = {
        "fit": ["fit", "--config", FAST, "--trainer.logger.init_args.save_dir", where],
        "compare": ["compare", "--seeds", "[0]", "--selectors", "[full]", "--out_dir", where,
                    "--overlays_dir", str(REPO_ROOT / "configs" / "selectors")],
        "diagnose": ["diagnose", "--config", str(REPO_ROOT / "configs" / "diagnose" / "add3.yaml"), "--out_dir", where],
        "cache": ["fit", "--config", FAST, "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")],
    }[command]
    if command == "cache":  # the toy add2 of fast.yaml is built into the cache on first use
        monkeypatch.setenv("OPDLAB_CACHE", where)
    message = str(run_opdlab(args).code)
    name = {"fit": "--trainer.logger.init_args.save_dir", "cache": "OPDLAB_CACHE"}.get(command, "--out_dir")
    assert message.startswith(f"opdlab: error: {name} {where}"), message
    assert "cannot be written (NotADirectoryError" in message and message.count("\n") == 1, message


def test_resume_with_a_changed_selector_warns_and_keeps_the_original_config(tmp_path, tiny_checkpoints):
    first = run_fit(tmp_path, tiny_checkpoints, "--trainer.max_steps", "1")
    assert first.code == 0, first.err[-2000:]
    with pytest.warns(UserWarning) as caught:
        again = run_fit(tmp_path, tiny_checkpoints, "--trainer.max_steps", "2", "--resume",
                        "--model.selector.init_args.ratio", "0.5")
    assert again.code == 0, again.err[-2000:]
    said = [str(w.message) for w in caught if "resuming from" in str(w.message)]
    assert len(said) == 1 and "model.selector.init_args.ratio=0.5 (the run was started with 0.2" in said[0], "\n".join(m.split(" with ", 1)[1][:150] for m in said)
    run = tmp_path / "runs" / "fast" / "version_0"
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["selector"]["init_args"]["ratio"] == 0.2
    assert yaml.safe_load((run / "config.resume-1.yaml").read_text())["model"]["selector"]["init_args"]["ratio"] == 0.5


def test_two_fits_with_the_same_run_name_cannot_share_its_folder(tmp_path, tiny_checkpoints):
    import subprocess

    run = tmp_path / "runs" / "fast" / "mine"
    run.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "opdlab"])  # a live fit's lock
    unrelated = subprocess.Popen(["sleep", "30"])  # a process that reused the id of a killed fit
    try:
        (run / ".opdlab.lock").write_text(str(holder.pid))
        message = str(run_fit(tmp_path, tiny_checkpoints, "--trainer.max_steps", "1", "--run_name", "mine").code)
        assert f"run {run} is in use by another opdlab fit (process {holder.pid})" in message, message
        (run / ".opdlab.lock").write_text(str(unrelated.pid))
        message = str(run_fit(tmp_path, tiny_checkpoints, "--trainer.max_steps", "1", "--run_name", "mine").code)
        assert f"naming process {unrelated.pid}, which is now 'sleep 30', not an opdlab fit: the lock is probably " \
               f"stale" in message and f"delete {run / '.opdlab.lock'}" in message, message
    finally:
        for process in (holder, unrelated):
            process.kill()
            process.wait()
    (run / ".opdlab.lock").unlink()
    result = run_fit(tmp_path, tiny_checkpoints, "--trainer.max_steps", "1", "--run_name", "mine")  # a stale lock
    assert result.code == 0, result.err[-2000:]


def test_jsonl_a_directory_is_named_and_a_byte_order_mark_is_read(tmp_path):
    from opdlab.tasks import JsonlPrompts

    with pytest.raises(IsADirectoryError, match="is a directory; pass the .jsonl file inside it"):
        JsonlPrompts(str(tmp_path), num_eval=1)
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"}\n')
    assert [p.prompt for p in JsonlPrompts(str(path), num_eval=1).eval_problems()] == ["2+2="]


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd", "skew_kl", "tvd"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_loss_temperature_that_is_not_positive_is_refused_before_any_model_loads(divergence, value):
    message = str(run_opdlab(["fit", "--config", FAST, "--model.divergence", divergence,
                              "--model.divergence.init_args.temperature", value]).code)
    assert "temperature (the loss's softmax temperature, not the rollout's) must be a number > 0" in message, message
    assert message.startswith("opdlab: error: ") and message.count("\n") == 1


def test_a_value_of_the_wrong_type_is_shown_in_its_error_line():
    result = run_opdlab(["fit", "--config", FAST, "--model.training.gradient_clip_val", "nan"])
    first = result.err.splitlines()[0]
    assert first == "opdlab fit: error: --model.training.gradient_clip_val: expected float or null, got 'nan'", first


def test_resume_after_an_interruption_past_the_checkpoint_keeps_one_tensorboard_point_per_step(tmp_path, tiny_checkpoints):
    """Steps logged after the last checkpoint are trained again on resume: their first points are purged."""
    first = run_fit(tmp_path, tiny_checkpoints, "--trainer.max_steps", "3", "--trainer.callbacks.save_top_k=-1")
    assert first.code == 0, first.err[-3000:]
    run = tmp_path / "runs" / "fast" / "version_0"
    (run / "checkpoints" / "last.ckpt").unlink()  # as if killed after step 3 was logged, before its checkpoint
    (run / "checkpoints" / "epoch=0-step=2.ckpt").rename(run / "checkpoints" / "last.ckpt")
    again = run_fit(tmp_path, tiny_checkpoints, "--trainer.max_steps", "4", "--resume")
    assert again.code == 0, again.err[-3000:]
    steps = [step for step, _ in scalars(run)["train/loss"]]
    assert steps == [1, 2, 3, 4], steps


def test_evaluation_prompts_that_are_also_training_prompts_are_warned_about(tmp_path):
    from opdlab.tasks import JsonlPrompts

    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(f'{{"prompt": "{i}+1=", "answer": "{i + 1}"}}\n' for i in range(10)))
    held.write_text('{"prompt": "3+1=", "answer": "4"}\n{"prompt": "99+1=", "answer": "100"}\n')
    with pytest.warns(UserWarning, match="1 of 2 evaluation prompts also appear among the 10 training prompts"):
        JsonlPrompts(str(train), eval_path=str(held))


@pytest.mark.parametrize("option,value,says", [
    ("--trainer.max_steps", "-5", "`max_steps` must be a non-negative integer"),
    ("--trainer.devices", "0", "value is not a valid input"),
    pytest.param("--trainer.accelerator", "gpu", "this machine has no GPU", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="a GPU machine runs it")),
    ("--trainer.val_check_interval", "0", "trainer.val_check_interval must be > 0"),
])
def test_trainer_options_lightning_refuses_are_one_line(option, value, says):
    """Found by benchmarks/adversarial.py: Lightning's MisconfigurationException reached users as a traceback,
    and val_check_interval 0 as a ZeroDivisionError inside Lightning."""
    message = str(run_opdlab(["fit", "--config", FAST, option, value]).code)
    assert message.startswith("opdlab: error: ") and says in message and message.count("\n") == 1, message
