"""A fit never loses or overwrites a user's results, says what it trained on, and stops cleanly when asked:
run names, finished runs, dry runs, damaged checkpoints, float16 students, NaN exports, Ctrl-C after training,
the plugin switch, and a selector whose normalised feature has no spread (issue 28)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import CONFIG_DIR, run_opdlab

FAST = str(CONFIG_DIR / "fast.yaml")


def fit(tmp_path: Path, tiny, *args: str, checkpoints: bool = False):
    extra = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.every_n_train_steps=1",
             "--trainer.callbacks.save_last=true", "--trainer.callbacks.save_top_k=-1"] if checkpoints else []
    return run_opdlab(["fit", "--config", FAST, "--model.student", tiny.student, "--model.teacher", tiny.teacher,
                       "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.max_steps", "2",
                       "--trainer.val_check_interval", "2", "--data.batch_size", "4", "--data.val_batch_size", "16",
                       "--data.source.init_args.num_eval", "16", "--trainer.enable_progress_bar", "false", *extra, *args])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_finished_run_without_checkpoints_is_never_overwritten(tmp_path, tiny_checkpoints):
    first = fit(tmp_path, tiny_checkpoints, "--run_name", "done", "--trainer.enable_checkpointing", "false")
    assert first.code == 0, first.err[-3000:]
    run = tmp_path / "runs" / "fast" / "done"
    assert (run / "student").is_dir() and (run / "summary.json").is_file() and not (run / "checkpoints").exists()
    before = snapshot(run)
    again = fit(tmp_path, tiny_checkpoints, "--run_name", "done", "--trainer.enable_checkpointing", "false",
                "--model.optimizer.init_args.lr", "0.1")
    message = str(again.code)
    assert message.startswith(f"opdlab: error: run {run} already holds ") and "student/" in message \
        and "summary.json" in message and "choose another --run_name" in message, message
    assert snapshot(run) == before  # every file byte for byte, no extra event file


@pytest.mark.parametrize("name", ["../escape", ".", "..", "a/b", "/abs", "", "-x", ".hidden", "..."])
def test_a_run_name_names_one_folder_under_the_save_dir(tmp_path, tiny_checkpoints, name):
    message = str(fit(tmp_path, tiny_checkpoints, f"--run_name={name}").code)
    assert message.startswith(f"opdlab: error: --run_name {name!r} ") and "names one folder" in message, message
    assert not (tmp_path / "escape").exists() and not (tmp_path / "runs" / "fast" / "student").exists()


def test_fast_dev_run_writes_nothing_and_says_it_was_a_dry_run(tmp_path, tiny_checkpoints, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_opdlab(["fit", "--config", FAST, "--model.student", tiny_checkpoints.student, "--model.teacher",
                         tiny_checkpoints.teacher, "--data.source.init_args.num_eval", "16", "--data.batch_size", "4",
                         "--trainer.fast_dev_run", "true", "--trainer.enable_progress_bar", "false"])
    assert result.code == 0, result.err[-3000:]
    assert "--trainer.fast_dev_run: a dry run of 1 step(s) ran; nothing was saved" in result.out, result.out[-2000:]
    assert list(tmp_path.iterdir()) == []  # no runs/, checkpoints/, student/ or summary.json


def test_resume_of_a_finished_run_is_refused_and_one_without_its_export_finishes_it(tmp_path, tiny_checkpoints):
    first = fit(tmp_path, tiny_checkpoints, "--run_name", "r", checkpoints=True)
    assert first.code == 0, first.err[-3000:]
    run = tmp_path / "runs" / "fast" / "r"
    message = str(fit(tmp_path, tiny_checkpoints, "--run_name", "r", "--resume", checkpoints=True).code)
    assert f"run {run} is finished: its checkpoint is at step 2 (trainer.max_steps 2)" in message, message
    import shutil

    shutil.rmtree(run / "student")  # as if stopped in the export
    again = fit(tmp_path, tiny_checkpoints, "--run_name", "r", "--resume", checkpoints=True)
    assert again.code == 0, again.err[-3000:]
    assert "steps: 2 (all trained before this resume: this process trained none)" in again.out, again.out[-2000:]
    assert "wall time: 0.0 s" not in again.out and (run / "student" / "config.json").is_file()


def test_resume_from_a_truncated_last_checkpoint_names_the_intact_one(tmp_path, tiny_checkpoints):
    first = fit(tmp_path, tiny_checkpoints, "--run_name", "t", checkpoints=True)
    assert first.code == 0, first.err[-3000:]
    folder = tmp_path / "runs" / "fast" / "t" / "checkpoints"
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    message = str(fit(tmp_path, tiny_checkpoints, "--run_name", "t", "--resume", "--trainer.max_steps", "3",
                      checkpoints=True).code)
    intact = folder / "epoch=0-step=2.ckpt"
    assert message.startswith(f"opdlab: error: cannot resume: {last} is damaged or incomplete") \
        and f"--resume --run_name t --ckpt_path {intact}" in message and message.count("\n") <= 1, message
    # the advice works: the run continues in its own folder from the intact checkpoint (it looped before)
    again = fit(tmp_path, tiny_checkpoints, "--run_name", "t", "--resume", "--ckpt_path", str(intact),
                "--trainer.max_steps", "3", checkpoints=True)
    assert again.code == 0, again.err[-3000:]
    assert f"resuming from {intact}" in again.out + again.err
    assert json.loads((folder.parent / "summary.json").read_text())["steps"] == 3
    assert sorted(p.name for p in (tmp_path / "runs" / "fast").iterdir()) == ["t"]


def test_resume_without_last_ckpt_names_the_newest_checkpoint_and_only_the_runs_own(tmp_path, tiny_checkpoints):
    assert fit(tmp_path, tiny_checkpoints, "--run_name", "t", checkpoints=True).code == 0
    folder = tmp_path / "runs" / "fast" / "t" / "checkpoints"
    (folder / "last.ckpt").unlink()
    message = str(fit(tmp_path, tiny_checkpoints, "--run_name", "t", "--resume", "--trainer.max_steps", "3").code)
    assert "no checkpoints/last.ckpt; the newest checkpoint there is" in message \
        and f"--resume --run_name t --ckpt_path {folder}/" in message, message
    elsewhere = tmp_path / "other.ckpt"
    elsewhere.write_bytes((folder / "epoch=0-step=2.ckpt").read_bytes())
    message = str(fit(tmp_path, tiny_checkpoints, "--run_name", "t", "--resume", "--ckpt_path", str(elsewhere)).code)
    assert message.startswith(f"opdlab: error: --resume --ckpt_path {elsewhere}: not a checkpoint file in"), message


def test_too_many_non_finite_steps_stop_in_one_line_that_says_what_was_kept(tmp_path, tiny_checkpoints):
    run = fit(tmp_path, tiny_checkpoints, "--model.optimizer.init_args.lr", "1e30", "--model.training.max_bad_steps", "0")
    message = str(run.code)
    assert message.startswith("opdlab: error: non-finite ") and "max_bad_steps=0" in message \
        and ("this fit saves no checkpoints" in message or "no checkpoint was saved yet" in message) \
        and "Traceback" not in run.err, (message, run.err[-2000:])
    assert not list((tmp_path / "runs").rglob("student"))


def test_eval_settings_without_benchmarks_are_refused_not_ignored(tmp_path, tiny_checkpoints):
    message = str(fit(tmp_path, tiny_checkpoints, "--eval.k", "4").code)
    assert message.startswith("opdlab: error: --eval.k is set but --eval.benchmarks is empty"), message
    message = str(run_opdlab(["validate", "--config", FAST, "--model.student", tiny_checkpoints.student,
                              "--eval.k", "4"]).code)
    assert "`opdlab validate` does not run it" in message, message


def test_benchmarks_on_the_command_line_replace_the_config_files_list(tmp_path):
    from opdlab.evaluation import replacing_lists

    assert replacing_lists(["--config", "c.yaml", "--benchmarks", "[...]", "--benchmarks+", "{}"], "--benchmarks") \
        == ["--config", "c.yaml", "--benchmarks", "[]", "--benchmarks", "[...]", "--benchmarks+", "{}"]
    config = tmp_path / "e.yaml"
    config.write_text("benchmarks:\n  - {name: add2, path: 'toy:add2', limit: 32}\nk: 2\n")
    shown = run_opdlab(["eval", "--config", str(config), "--benchmarks", "[{name: other, path: 'toy:add2'}]",
                        "--print_config"])
    import yaml

    # the newest jsonargparse prints an entry's unset fields (limit: null); the floor (4.48) leaves them out
    assert [{k: v for k, v in b.items() if k in ("name", "limit")} for b in yaml.safe_load(shown.out)["benchmarks"]] \
        in ([{"name": "other", "limit": None}], [{"name": "other"}]), shown.out


def test_a_float16_student_is_refused_before_training(tmp_path, tiny_checkpoints):
    message = str(fit(tmp_path, tiny_checkpoints, "--model.memory.student_dtype", "float16").code)
    assert message.startswith("opdlab: error: --model.memory.student_dtype float16 trains") and "bfloat16" in message
    assert not (tmp_path / "runs" / "fast").exists() or not any((tmp_path / "runs" / "fast").iterdir())


def test_a_student_with_nan_weights_is_not_exported(tmp_path, tiny_checkpoints):
    from opdlab.console import OpdlabError
    from opdlab.module import OPDModule

    module = OPDModule(student=tiny_checkpoints.student, teacher=tiny_checkpoints.teacher)
    module.configure_model()
    with torch.no_grad():
        next(module.student.parameters())[0, 0] = float("nan")
    with pytest.raises(OpdlabError, match=r"weights hold NaN or inf in 1 tensor\(s\) .*it was not exported"):
        module.export_student(str(tmp_path / "student"))
    assert not (tmp_path / "student").exists()


def test_validate_refuses_eval_options_it_would_ignore(tmp_path, tiny_checkpoints):
    message = str(run_opdlab(["validate", "--config", FAST, "--model.student", tiny_checkpoints.student,
                              "--eval", str(CONFIG_DIR / "eval" / "toy.yaml")]).code)
    assert "`opdlab validate` does not run it" in message and "opdlab eval --model" in message, message


@pytest.mark.parametrize("value, off", [("1", True), ("on", True), ("yes", True), ("0", False), ("off", False),
                                        ("false", False), ("", False)])
def test_the_plugin_switch_reads_yes_and_no(monkeypatch, value, off):
    from opdlab import plugins

    monkeypatch.setenv(plugins.DISABLE_ENV, value)
    assert plugins.plugins_disabled() is off


def test_the_plugin_switch_refuses_other_values_and_the_listing_says_when_plugins_are_off():
    def listing(value):
        return subprocess.run([sys.executable, "-m", "opdlab.cli", "plugins"], capture_output=True, text=True,
                              env={**os.environ, "OPDLAB_DISABLE_PLUGINS": value}, check=False)

    bad = listing("maybe")
    assert bad.returncode != 0 and "OPDLAB_DISABLE_PLUGINS='maybe' is not a yes/no value" in bad.stderr, bad.stderr
    assert listing("1").stdout.startswith("third-party plugins are off (OPDLAB_DISABLE_PLUGINS=1)")
    assert "third-party plugins are off" not in listing("off").stdout


@pytest.mark.parametrize("lightning_converts", [False, True])
def test_ctrl_c_after_training_stops_says_what_was_kept_and_exits_130(lightning_converts):
    """The block after training (validation, export, evaluation) stops on SIGINT: `on_stop` reports, exit 130.
    Lightning's validate turns the KeyboardInterrupt into SystemExit(1); that is caught the same way."""
    from opdlab.fit_cli import interruptible

    stopped, reached = [], []
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when an earlier in-process Lightning run was interrupted
    with pytest.raises(SystemExit) as exit_info:
        with interruptible(SimpleNamespace(world_size=1), stopped.append):
            try:
                os.kill(os.getpid(), signal.SIGINT)
                reached.append("after the signal")
            except KeyboardInterrupt:
                if lightning_converts:
                    raise SystemExit(1) from None
                raise
    assert exit_info.value.code == 130 and stopped == [signal.SIGINT] and reached == []
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_a_block_that_handles_the_interrupt_itself_and_finishes_is_not_reported_as_stopped():
    """A SIGTERM whose KeyboardInterrupt the block catches and recovers from: the block's own choice stands (no
    report, no exit), and the handlers are restored."""
    from opdlab.fit_cli import interruptible

    stopped, reached = [], []
    before = signal.getsignal(signal.SIGTERM)
    with interruptible(SimpleNamespace(world_size=1), stopped.append):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except KeyboardInterrupt:
            reached.append("handled")
    assert stopped == [] and reached == ["handled"]
    assert signal.getsignal(signal.SIGTERM) is before


def test_fit_summary_says_which_share_of_tokens_was_trained_on(tmp_path, tiny_checkpoints):
    result = fit(tmp_path, tiny_checkpoints, "--run_name", "s")
    assert result.code == 0, result.err[-3000:]
    summary = json.loads((tmp_path / "runs" / "fast" / "s" / "summary.json").read_text())
    share = summary["kept_tokens"] / summary["response_tokens"]
    assert summary["kept_token_share"] == pytest.approx(share) and 0.2 <= share <= 1.0
    assert f"trained on {share:.1%} of {summary['response_tokens']} sampled response tokens (selector budget 20%" \
        in result.out, result.out[-2000:]
    assert "greedy decoding on the held-out prompts" in result.out


def test_a_selector_whose_score_has_no_spread_warns_once_and_logs_the_zero_share():
    from opdlab.callbacks.selection import SelectionMetrics
    from opdlab.selectors import TeachabilitySelector

    valid = torch.ones(4, 5, dtype=torch.bool)
    compatibility = torch.full((4, 5), 0.9998)
    compatibility[0, 0] = 1.0  # C is its 5% quantile almost everywhere (mix4): C̃ = 0 at every position but one
    stats = SimpleNamespace(valid=valid, compatibility=compatibility, disagreement=torch.rand(4, 5),
                            topk_entropy=torch.rand(4, 5))
    record = SimpleNamespace(stats=stats, keep=valid.clone())
    logged = {}
    module = SimpleNamespace(selector=TeachabilitySelector(ratio=0.05), log_dict=lambda m, **_: logged.update(m))
    callback = SelectionMetrics()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            callback.log_score_spread(SimpleNamespace(global_step=3), module, record)
    degenerate = [w for w in caught if "the score is exactly 0 at" in str(w.message)]
    assert len(degenerate) == 1 and "C's q05/q95 over the batch are" in str(degenerate[0].message)
    assert float(logged["select/score_zero_share"]) >= 0.9 and float(logged["select/compatibility_q05"]) == pytest.approx(0.9998)
    spread = SimpleNamespace(valid=valid, compatibility=torch.linspace(0, 1, 20).view(4, 5),
                             disagreement=torch.linspace(1, 0, 20).view(4, 5), topk_entropy=torch.rand(4, 5))
    callback.log_score_spread(SimpleNamespace(global_step=4), module, SimpleNamespace(stats=spread, keep=valid))
    assert float(logged["select/score_zero_share"]) < 0.5


@pytest.mark.parametrize("text, expected", [
    ("model:\n  rollout: 5\n", "model.rollout is a group of options and must be a mapping"),
    ("trainer: 3\n", "trainer is a group of options and must be a mapping"),  # jsonargparse dropped every trainer option
    ("- a\n- b\n", "the top level must be a mapping of option groups"),
    ("model:\n  memory: [1, 2]\n", "model.memory is a group of options and must be a mapping"),
    ("model: null\n", "model is a group of options and must be a mapping"),  # a traceback before
    ("model:\n  rollout: null\n", "model.rollout is a group of options and must be a mapping"),  # a traceback
    ("trainer: null\n", "trainer is a group of options and must be a mapping"),  # silently dropped the trainer
])
def test_a_config_file_giving_a_group_one_value_is_refused_in_one_line(tmp_path, text, expected):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    message = str(run_opdlab(["fit", "--config", FAST, "--config", str(config)]).code)
    assert message.startswith(f"opdlab: error: config {config}: {expected}") and message.count("\n") <= 1, message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_a_gpu_config_on_a_cpu_names_every_option_to_change():
    message = str(run_opdlab(["fit", "--config", str(CONFIG_DIR / "qwen3_8b_to_1.7b_ta_opd.yaml")]).code)
    assert message.startswith("opdlab: error: this config asks for --trainer.accelerator gpu, and this machine has no GPU")
    assert "--trainer.accelerator cpu --trainer.devices 1 --trainer.strategy auto --trainer.precision 32-true" in message
    assert "configs/own_models_cpu.yaml" in message


def test_a_fit_writes_one_event_file_with_every_point_at_its_step(tmp_path, tiny_checkpoints):
    """The validation before training, the training and the validation after its last step (3 is not a multiple of
    val_check_interval 2) share one TensorBoard event file, and each point sits at the step the console names."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = fit(tmp_path, tiny_checkpoints, "--run_name", "e", "--trainer.max_steps", "3", "--trainer.log_every_n_steps", "1")
    assert result.code == 0, result.err[-3000:]
    run = tmp_path / "runs" / "fast" / "e"
    assert len(list(run.glob("events.out.tfevents.*"))) == 1, sorted(p.name for p in run.iterdir())
    events = EventAccumulator(str(run))
    events.Reload()
    assert [e.step for e in events.Scalars("val/accuracy")] == [0, 2, 3]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("train/skipped_steps")] == [1, 2, 3]


@pytest.mark.parametrize("engine, dtype, expected", [("static", "float32", []), ("reference", "float32", ["--engine", "reference"]),
                                                     ("static", "bfloat16", ["--dtype", "bfloat16"])])
def test_the_command_that_continues_an_interrupted_evaluation_names_the_fits_engine_and_dtype(engine, dtype, expected):
    """eval.json records the engine and the dtype: the printed `opdlab eval` command must reproduce them, or the
    evaluation it continues would be refused as made under other settings."""
    from opdlab import plugins
    from opdlab.fit_cli import OPDLabCLI

    engine_class = plugins.discover("opdlab.rollout_engines")[engine].cls
    fake = SimpleNamespace(model=SimpleNamespace(rollout_engine=object.__new__(engine_class),
                                                 memory_options=SimpleNamespace(student_dtype=dtype)))
    assert OPDLabCLI.eval_engine_options(fake) == expected


def test_a_compatibility_with_no_spread_is_named_as_a_threshold_once():
    """mix4: C ≈ 1 nearly everywhere (q05 0.9998): C̃ is 0 for every position with C slightly lower, though the
    score is 0 at only a small share of positions. Teachability under quantile normalisation is warned about; under
    min-max, or for a selector that does not read C̃, it is not."""
    from opdlab.callbacks.selection import SelectionMetrics
    from opdlab.selectors import EntropySelector, TeachabilitySelector

    valid = torch.ones(10, 10, dtype=torch.bool)
    compatibility = torch.ones(10, 10)
    compatibility.view(-1)[:10] = torch.linspace(0.9990, 0.9998, 10)  # 10% slightly below 1
    stats = SimpleNamespace(valid=valid, compatibility=compatibility, disagreement=torch.rand(10, 10),
                            topk_entropy=torch.rand(10, 10))
    record = SimpleNamespace(stats=stats, keep=valid.clone())

    def warnings_for(selector) -> tuple[list[str], dict]:
        logged = {}
        module = SimpleNamespace(selector=selector, log_dict=lambda m, **_: logged.update(m))
        callback = SelectionMetrics()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                callback.log_score_spread(SimpleNamespace(global_step=1), module, record)
        return [str(w.message) for w in caught if "turns C into a threshold" in str(w.message)], logged

    found, logged = warnings_for(TeachabilitySelector(ratio=0.05))
    assert len(found) == 1 and re.search(r"C's q05/q95 over the batch are 0\.999\d/1\.0000", found[0]), found
    assert float(logged["select/compatibility_q95"]) - float(logged["select/compatibility_q05"]) < 0.01
    assert float(logged["select/score_zero_share"]) < 0.5  # the score-share rule alone would not have caught it
    assert warnings_for(TeachabilitySelector(ratio=0.05, normalization="minmax"))[0] == []
    assert warnings_for(EntropySelector(ratio=0.05))[0] == []


def test_ctrl_c_where_no_command_says_what_it_kept_is_one_line_and_exit_130(monkeypatch):
    from opdlab import cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", interrupted)
    result = run_opdlab(["eval", "--help"])
    assert result.code == 130 and result.err.strip() == "opdlab: error: stopped by Ctrl-C", result


@pytest.mark.parametrize("option, text, expected", [
    ("--config", "", "--config {f} is empty (no settings in it)"),
    ("--config", "# only a comment\n", "--config {f} is empty (no settings in it)"),
    ("--eval", "", "--eval {f} is empty (no settings in it)"),
    ("--eval", "- a\n- b\n", "--eval {f}: the top level must be a mapping of evaluation settings"),
    ("--eval", "3\n", "--eval {f}: the top level must be a mapping of evaluation settings"),
])
def test_an_empty_or_non_mapping_settings_file_is_refused_in_one_line(tmp_path, option, text, expected):
    """jsonargparse said "Unexpected config:" or "Unable to load config" twice, without the reason."""
    settings = tmp_path / "s.yaml"
    settings.write_text(text)
    message = str(run_opdlab(["fit", "--config", FAST, option, str(settings)]).code)
    assert message.startswith("opdlab: error: " + expected.format(f=settings)) and message.count("\n") <= 1, message
