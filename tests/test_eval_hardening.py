"""`opdlab eval` against careless and hostile input (issue 28): --overwrite never loses a finished evaluation to a
run that fails early; the default output folder is the model's own; stored responses are reused only for the same
model (by content) with the same settings; bad paths, files and options are one line; the table says what Avg@k
is; one progress helper."""

from __future__ import annotations

import io
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from opdlab import evaluation
from opdlab.console import OpdlabError
from opdlab.evaluation import sampling, sources

from conftest import CONFIG_DIR, run_opdlab

TOY = str(CONFIG_DIR / "eval" / "toy.yaml")
SMALL = ["--k", "2", "--benchmarks.limit", "4", "--batch_size", "2"]


def toy_student_copy(where: Path) -> Path:
    """A copy of the toy add3 student: a model directory of our own to re-export, replace and move."""
    from opdlab.toy import resolve_toy_path

    shutil.copytree(resolve_toy_path("toy:add3/student"), where)
    return where


def run_eval(model: str, out: Path | None, *more: str):
    args = ["eval", "--config", TOY, "--model", model, *SMALL, *more]
    return run_opdlab([*args, "--out_dir", str(out)] if out is not None else args)


def message(result) -> str:
    """What the user sees of a refusal: the exit message (a string exit code) or stderr (an exit status)."""
    return (result.code if isinstance(result.code, str) else "") + result.err


def one_line_refusal(result, *says: str) -> str:
    text = message(result)
    assert result.code != 0, text
    assert "Traceback" not in text, text
    first = text.splitlines()[0]
    assert first.startswith(("opdlab: error: ", "opdlab eval: error: ")), text
    for part in says:
        assert part in first, (part, text)
    return first


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished evaluation of the toy student (4 problems x 2 samples)."""
    out = tmp_path_factory.mktemp("finished") / "eval"
    result = run_eval("toy:add3/student", out)
    assert result.code == 0, message(result)[-2000:]
    return out


@pytest.fixture
def copy_of_finished(finished, tmp_path):
    out = tmp_path / "eval"
    shutil.copytree(finished, out)
    return out


@pytest.fixture
def no_weights(monkeypatch):
    """Loading weights fails the test: every refusal must come before."""
    monkeypatch.setattr(sources, "load_source", lambda *a, **k: pytest.fail("model weights were loaded"))


def failing_engine(monkeypatch, after_calls: int):
    """The engine raises on its (after_calls + 1)-th generate call, as a crash mid-evaluation."""
    from opdlab.engines.static import StaticCacheEngine

    real, calls = StaticCacheEngine.generate, []

    def generate(self, prompts, params):
        calls.append(1)
        if len(calls) > after_calls:
            raise OpdlabError("the engine died (a test's crash)")
        return real(self, prompts, params)

    monkeypatch.setattr(StaticCacheEngine, "generate", generate)
    return calls


# ------------------------------------------------------------------------------ 1. --overwrite loses nothing early
def test_overwrite_refused_before_anything_runs_leaves_the_evaluation_intact(copy_of_finished, no_weights):
    before = snapshot(copy_of_finished)
    result = run_eval("toy:add3/student", copy_of_finished, "--overwrite", "true", "--chat_template", "true")
    one_line_refusal(result, "--chat_template true", "has no chat template")
    assert snapshot(copy_of_finished) == before


def test_overwrite_that_crashes_on_its_first_batch_keeps_the_old_files(copy_of_finished, monkeypatch):
    before = snapshot(copy_of_finished)
    calls = failing_engine(monkeypatch, after_calls=0)
    result = run_eval("toy:add3/student", copy_of_finished, "--overwrite", "true", "--temperature", "0.5")
    assert result.code != 0 and "the engine died" in message(result) and calls
    assert snapshot(copy_of_finished) == before  # no responses.jsonl emptied, no partial file left behind
    monkeypatch.undo()
    again = run_eval("toy:add3/student", copy_of_finished)  # the old evaluation is still whole: nothing to sample
    assert again.code == 0, message(again)[-2000:]
    assert json.loads((copy_of_finished / "result.json").read_text())["generated_now"] == 0


def test_overwrite_replaces_once_it_has_responses_and_then_resumes_as_its_own(copy_of_finished, monkeypatch):
    failing_engine(monkeypatch, after_calls=1)  # the first batch (2 problems) is written, the second fails
    result = run_eval("toy:add3/student", copy_of_finished, "--overwrite", "true", "--temperature", "0.5")
    assert result.code != 0 and "the engine died" in message(result)
    assert json.loads((copy_of_finished / "eval.json").read_text())["temperature"] == 0.5
    assert len((copy_of_finished / "responses.jsonl").read_text().splitlines()) == 2 * 2
    assert not (copy_of_finished / "result.json").exists()  # the old result is not left beside new responses
    assert not list(copy_of_finished.glob("*.partial"))
    monkeypatch.undo()
    again = run_eval("toy:add3/student", copy_of_finished, "--temperature", "0.5")  # continues the new one
    assert again.code == 0, message(again)[-2000:]
    assert json.loads((copy_of_finished / "result.json").read_text())["generated_now"] == 2 * 2


# ------------------------------------------------------------------------------ 2. the default output folder
def make_run(root: Path, name: str) -> Path:
    run = root / name / "version_0"
    run.mkdir(parents=True)
    (run / "hparams.yaml").write_text("student: toy:add3/student\n")
    toy_student_copy(run / "student")
    return run


def test_default_out_dir_is_the_model_s_own(tmp_path):
    a, b = make_run(tmp_path / "runs", "ta_opd"), make_run(tmp_path / "runs", "fast")
    for run in (a, b):
        for model in (run, run / "student"):
            assert sources.default_out_dir(str(model), evaluation.resolve_model(str(model))) == run.resolve() / "eval"
    one, two = toy_student_copy(tmp_path / "x" / "student"), toy_student_copy(tmp_path / "y" / "student")
    dirs = {sources.default_out_dir(str(m), evaluation.resolve_model(str(m))) for m in (one, two)}
    assert len(dirs) == 2 and all(d.parent == Path("evals") and d.name.startswith("student-") for d in dirs)
    ckpt = a / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    source = evaluation.ModelSource("ckpt", str(ckpt), "toy:add3/student", "x", base="toy:add3/student")
    assert sources.default_out_dir(str(ckpt), source) == a.resolve() / "eval-last"
    toy = evaluation.resolve_model("toy:add3/student")
    assert sources.default_out_dir("toy:add3/student", toy) == Path("evals/toy_add3_student")


def test_two_runs_evaluated_without_out_dir_do_not_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = make_run(tmp_path / "runs", "ta_opd"), make_run(tmp_path / "runs", "fast")
    for run in (a, b / "student"):
        result = run_eval(str(run), None)
        assert result.code == 0, message(result)[-2000:]
        assert "(the default for this model; --out_dir to choose)" in result.err
    assert (a / "eval" / "result.json").is_file() and (b / "eval" / "result.json").is_file()
    assert f"-> {a.resolve() / 'eval'}" in run_eval(str(a), None).err
    assert not (tmp_path / "evals").exists()


# ------------------------------------------------------------------------------ 3. reuse by content, never by path
def perturb_weights(model_dir: Path) -> None:
    """Re-export the model at the same path with one weight changed (what a second training run does)."""
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    weights = load_file(path)
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.01
    save_file(weights, path, metadata={"format": "pt"})


def test_a_model_replaced_at_the_same_path_is_not_given_the_old_responses(tmp_path, no_weights):
    model, out = toy_student_copy(tmp_path / "student"), tmp_path / "eval"
    shutil.copytree(run_eval_once(tmp_path, model), out)
    perturb_weights(model)
    one_line_refusal(run_eval(str(model), out), "holds the responses of another model", "--overwrite true")


def run_eval_once(tmp_path: Path, model: Path) -> Path:
    """An evaluation of `model` in its own folder (with real weights loading)."""
    out = tmp_path / "first"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sources, "load_source", LOAD_SOURCE)
        result = run_eval(str(model), out)
    assert result.code == 0, message(result)[-2000:]
    return out


LOAD_SOURCE = sources.load_source


def test_the_same_model_under_another_path_reuses_its_responses(tmp_path):
    model = toy_student_copy(tmp_path / "a" / "student")
    out = run_eval_once(tmp_path, model)
    moved = tmp_path / "b" / "renamed"
    moved.parent.mkdir()
    shutil.copytree(model, moved)
    result = run_eval(str(moved), out)
    assert result.code == 0, message(result)[-2000:]
    assert json.loads((out / "result.json").read_text())["generated_now"] == 0


def test_a_tokenizer_or_config_change_is_another_model(tmp_path, no_weights):
    model = toy_student_copy(tmp_path / "student")
    out = run_eval_once(tmp_path, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rope_theta": 1234.0}))
    one_line_refusal(run_eval(str(model), out), "another model")


def test_a_checkpoint_s_fingerprint_follows_its_weights_not_its_path(tmp_path):
    base = toy_student_copy(tmp_path / "base")
    from safetensors.torch import load_file

    state = {f"student.{k}": v for k, v in load_file(base / "model.safetensors").items()}
    ckpt = tmp_path / "a.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"student": str(base)}}, ckpt)
    first = evaluation.model_fingerprint(evaluation.resolve_model(str(ckpt)))
    shutil.copy(ckpt, tmp_path / "b.ckpt")
    assert evaluation.model_fingerprint(evaluation.resolve_model(str(tmp_path / "b.ckpt"))) == first
    name = sorted(state)[0]
    torch.save({"state_dict": {**state, name: state[name] + 1}, "hyper_parameters": {"student": str(base)}}, ckpt)
    assert evaluation.model_fingerprint(evaluation.resolve_model(str(ckpt))) != first


def test_responses_without_their_settings_record_are_not_reused(copy_of_finished, no_weights):
    (copy_of_finished / "eval.json").unlink()
    one_line_refusal(run_eval("toy:add3/student", copy_of_finished), "responses.jsonl but no eval.json", "--overwrite")


def test_an_evaluation_from_before_fingerprints_is_not_reused(copy_of_finished, no_weights):
    settings = json.loads((copy_of_finished / "eval.json").read_text())
    for key in ("model_fingerprint", "format", "benchmark_fingerprints", "dtype"):
        settings.pop(key)
    (copy_of_finished / "eval.json").write_text(json.dumps(settings))
    one_line_refusal(run_eval("toy:add3/student", copy_of_finished), "did not record which model", "--overwrite")


@pytest.mark.parametrize("edit, says", [
    ({"k": 3}, "(k: 2 there, 3 now)"),
    ({"temperature": 0.7}, "(temperature: 1.0 there, 0.7 now)"),
    ({"benchmarks": [{"name": "add3", "path": "toy:add3", "limit": 3}]}, "(benchmarks[0].limit: 4 there, 3 now)"),
])
def test_an_edited_eval_config_never_reuses_stale_results(tmp_path, edit, says):
    config = {"benchmarks": [{"name": "add3", "path": "toy:add3", "limit": 4}], "k": 2, "temperature": 1.0}
    path, out = tmp_path / "eval.yaml", tmp_path / "out"
    path.write_text(json.dumps(config))
    first = run_opdlab(["eval", "--config", str(path), "--model", "toy:add3/student", "--out_dir", str(out)])
    assert first.code == 0, message(first)[-2000:]
    path.write_text(json.dumps({**config, **edit}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sources, "load_source", lambda *a, **k: pytest.fail("model weights were loaded"))
        again = run_opdlab(["eval", "--config", str(path), "--model", "toy:add3/student", "--out_dir", str(out)])
    one_line_refusal(again, "other settings " + says, "--overwrite true")


def test_an_edited_benchmark_file_is_another_benchmark(tmp_path, no_weights):
    rows = [{"problem": "123+456=", "answer": "579"}, {"problem": "111+222=", "answer": "333"}]
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["eval", "--model", "toy:add3/student", "--benchmarks", json.dumps([{"name": "s", "path": str(data),
            "verifier": "exact"}]), "--k", "1", "--temperature", "0", "--max_new_tokens", "5", "--out_dir",
            str(tmp_path / "out")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sources, "load_source", LOAD_SOURCE)
        assert run_opdlab(args).code == 0
    rows[1]["answer"] = "334"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    one_line_refusal(run_opdlab(args), "responses to another version of benchmark 's'", "--overwrite")


# ------------------------------------------------------------------------------ 4. one line, naming what to do
@pytest.mark.parametrize("damage, says", [
    (lambda lines: [lines[0], "[1, 2]", *lines[1:]], "line 2 holds a JSON array, not a response record"),
    (lambda lines: [json.dumps({k: v for k, v in json.loads(lines[0]).items() if k != "correct"}), *lines[1:]],
     "line 1 has no 'correct' field"),
    (lambda lines: [lines[0], lines[1].replace('"sample": 1', '"sample": "1"'), *lines[2:]],
     "line 2: 'sample' is '1', not an integer"),
    (lambda lines: [lines[0], re.sub(r'"correct": (true|false)', '"correct": 1', lines[1]), *lines[2:]],
     "line 2: 'correct' is 1, not true or false"),
    (lambda lines: [lines[0], "{not json", *lines[1:]], "line 2 is not JSON"),
    (lambda lines: [*lines, lines[0]], "repeats sample 0"),
    (lambda lines: [lines[0].replace('"index": 0', '"index": 99'), *lines[1:]], "index 99 is outside"),
    (lambda lines: [lines[0].replace('"benchmark": "add3"', '"benchmark": "gsm8k"'), *lines[1:]],
     "benchmark 'gsm8k', which this evaluation does not have"),
])
def test_a_damaged_responses_file_is_named_with_its_line(copy_of_finished, damage, says, no_weights):
    path = copy_of_finished / "responses.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(damage(lines)) + "\n")
    first = one_line_refusal(run_eval("toy:add3/student", copy_of_finished), str(path), says, "--overwrite")
    assert first.count("line ") >= 1


def test_a_torn_last_line_is_still_a_crash_to_resume_not_damage(copy_of_finished):
    path = copy_of_finished / "responses.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:5]) + lines[5][:25])  # 2 whole problems, half of the third, a cut line
    result = run_eval("toy:add3/student", copy_of_finished)
    assert result.code == 0, message(result)[-2000:]
    assert json.loads((copy_of_finished / "result.json").read_text())["generated_now"] == 2 * 2


@pytest.mark.parametrize("content, says", [
    ("{not json", "eval.json is damaged"),
    ("[1, 2]", "holds a JSON array, not the settings"),
])
def test_a_damaged_settings_record_is_one_line(copy_of_finished, content, says, no_weights):
    (copy_of_finished / "eval.json").write_text(content)
    one_line_refusal(run_eval("toy:add3/student", copy_of_finished), says, "--overwrite")


def test_model_paths_that_are_not_models_are_one_line_with_what_to_pass(tmp_path, no_weights):
    run = tmp_path / "runs" / "ta_opd" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "hparams.yaml").write_text("student: x\n")
    one_line_refusal(run_eval(str(run), tmp_path / "o"), "run folder without an exported student", "no checkpoints")
    good = tmp_path / "good.ckpt"
    checkpoint = {"state_dict": {"student.w": torch.zeros(4096)}, "hyper_parameters": {"student": "toy:add3/student"}}
    torch.save(checkpoint, good)
    blob = good.read_bytes()
    (run / "checkpoints" / "last.ckpt").write_bytes(blob[: len(blob) // 2])
    one_line_refusal(run_eval(str(run), tmp_path / "o"), "without an exported student",
                     f"--model {run / 'checkpoints' / 'last.ckpt'}")
    one_line_refusal(run_eval(str(run / "checkpoints"), tmp_path / "o"), "is a folder of checkpoints",
                     f"--model {run / 'checkpoints' / 'last.ckpt'}")
    shutil.copy(good, run / "checkpoints" / "step=2.ckpt")
    time.sleep(0.01)
    toy_student_copy(run / "student")
    one_line_refusal(run_eval(str(run / "checkpoints" / "last.ckpt"), tmp_path / "o"), "cannot be read as a checkpoint",
                     "cut short", f"--model {run / 'student'}", "step=2.ckpt")
    one_line_refusal(run_eval(str(run / "checkpoints"), tmp_path / "o"), f"--model {run / 'student'}")
    one_line_refusal(run_eval(str(run / "student" / "model.safetensors"), tmp_path / "o"),
                     f"pass the folder that holds it (--model {run / 'student'})")
    (run / "student" / "model.safetensors").unlink()
    one_line_refusal(run_eval(str(run / "student"), tmp_path / "o"), "has a config.json but no weight files")
    (tmp_path / "empty").mkdir()
    one_line_refusal(run_eval(str(tmp_path / "empty"), tmp_path / "o"), "is a folder but not a model")
    (tmp_path / "pickle.ckpt").write_bytes(b"")
    torch.save([1, 2], tmp_path / "pickle.ckpt")
    one_line_refusal(run_eval(str(tmp_path / "pickle.ckpt"), tmp_path / "o"), "not a checkpoint of an opdlab run")


def test_chat_template_is_checked_before_any_weights(tmp_path, no_weights):
    one_line_refusal(run_eval("toy:add3/student", tmp_path / "o", "--chat_template", "true"),
                     "tokenizer of toy:add3/student has no chat template")
    assert not (tmp_path / "o" / "responses.jsonl").exists()
    broken = toy_student_copy(tmp_path / "chat")
    config = json.loads((broken / "tokenizer_config.json").read_text())
    (broken / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ messages[0].nope() }}"}))
    one_line_refusal(run_eval(str(broken), tmp_path / "o", "--chat_template", "true"), "fails on the first prompt")


@pytest.mark.parametrize("content, says", [
    ("- k: 2\n- temperature: 1\n",
     "the top level must be a mapping of evaluation settings (k: 8, benchmarks: [...], ...), but it is a list"),
    ("7\n", "the top level must be a mapping of evaluation settings (k: 8, benchmarks: [...], ...), but it is a single value (7)"),
    ("k: [1\n", "is not valid YAML (line"),
])
def test_an_eval_config_that_is_not_a_mapping_is_one_line(tmp_path, content, says, no_weights):
    path = tmp_path / "eval.yaml"
    path.write_text(content)
    first = one_line_refusal(run_opdlab(["eval", "--config", str(path), "--model", "toy:add3/student"]), says)
    assert str(path) in first
    one_line_refusal(run_opdlab(["eval", f"--config={tmp_path / 'missing.yaml'}", "--model", "toy:add3/student"]),
                     "missing.yaml not found")


def test_settings_that_are_not_a_mapping_are_refused_by_every_reader():
    for data, says in [(["k"], "got a list"), (3, "got a single value"),
                       ({"benchmarks": {"name": "a"}}, "must be a list"),
                       ({"benchmarks": ["toy:add3"]}, "must be a mapping")]:
        with pytest.raises(evaluation.EvalError, match=says):
            evaluation.EvalOptions.from_mapping(data)


@pytest.mark.parametrize("bench, says", [
    ('[{name: "", path: "toy:add3"}]', "a benchmark has an empty name"),
    ('[{name: a, path: ""}]', "benchmark 'a': path is empty"),
    ('[{name: a, path: "toy:add3", split: test}]', "a toy set takes its split in the path"),
])
def test_benchmark_entries_that_cannot_be_meant_are_one_line(tmp_path, bench, says, no_weights):
    one_line_refusal(run_eval("toy:add3/student", tmp_path / "o", "--benchmarks", bench), says)


def test_option_errors_are_one_line_not_the_usage(tmp_path, no_weights):
    first = one_line_refusal(run_eval("toy:add3/student", tmp_path / "o", "--k", "many"), "--k: expected int, got 'many'")
    assert "usage:" not in message(run_eval("toy:add3/student", tmp_path / "o", "--k", "many"))
    assert first.startswith("opdlab eval: error: ")


# ------------------------------------------------------------------------------ 5. Avg@k beside greedy accuracy
def test_the_table_says_what_avg_at_k_samples_and_why_it_is_below_greedy(finished, tmp_path):
    table = (finished / "results.md").read_text()
    assert table.startswith("toy:add3/student: k=2 responses per problem sampled at temperature 1, top_p 1")
    result = run_eval("toy:add3/student", finished)
    assert "Avg@2 is the mean accuracy of 2 responses per problem sampled at temperature 1" in result.out
    assert "below the greedy accuracy" in result.out and "'student accuracy'" in result.out
    greedy = run_opdlab(["eval", "--config", TOY, "--model", "toy:add3/student", "--k", "1", "--temperature", "0",
                         "--benchmarks.limit", "2", "--out_dir", str(tmp_path / "greedy")])
    assert greedy.code == 0 and "below the greedy accuracy" not in greedy.out


def test_a_run_folder_s_greedy_accuracy_is_shown_beside_avg_at_k(tmp_path):
    run = make_run(tmp_path, "r")
    (run / "summary.json").write_text(json.dumps({"accuracy_after": 0.883}))
    result = run_eval(str(run), tmp_path / "out")
    assert result.code == 0, message(result)[-2000:]
    assert re.search(r"Side by side: greedy 88\.3% \(the fit's held-out prompts, summary\.json\) vs sampled Avg@2 "
                     r"\d+\.\d% \(these benchmarks\)", result.out), result.out


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_in_an_evaluation_keeps_the_responses_and_says_how_to_continue(tmp_path, monkeypatch, sig):
    """Ctrl-C, or a scheduler's SIGTERM (which would otherwise end the process with no word), during the second
    batch: one line, exit 128 + signal, the first batch's responses kept, and the same command continues."""
    import os
    import signal

    from opdlab.engines.static import StaticCacheEngine

    real, calls = StaticCacheEngine.generate, []

    def generate(self, prompts, params):  # the signal arrives during the second batch
        calls.append(1)
        if len(calls) > 1:
            os.kill(os.getpid(), getattr(signal, sig))
            time.sleep(5)  # the handler interrupts this
            raise AssertionError("the signal did not stop the evaluation")
        return real(self, prompts, params)

    monkeypatch.setattr(StaticCacheEngine, "generate", generate)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out = tmp_path / "ev"
    result = run_eval("toy:add3/student", out)
    assert {s: signal.getsignal(s) for s in before} == before  # the handlers are restored
    assert result.code == 128 + getattr(signal, sig) and "Traceback" not in result.err, result.err[-2000:]
    first, hint = result.err.strip().splitlines()[-2:]
    name = "Ctrl-C" if sig == "SIGINT" else sig
    assert first == f"opdlab eval: error: stopped by {name}; the responses generated so far are kept in {out}/responses.jsonl"
    assert hint.startswith("continue the evaluation with: opdlab eval"), hint
    kept = (out / "responses.jsonl").read_text().splitlines()
    assert len(kept) == 2 * 2  # the first batch: 2 problems x k=2
    monkeypatch.setattr(StaticCacheEngine, "generate", real)
    assert run_eval("toy:add3/student", out).code == 0  # the same command continues
    assert len((out / "responses.jsonl").read_text().splitlines()) == 4 * 2


# ------------------------------------------------------------------------------ 6. one progress helper
def test_one_progress_helper_for_eval_and_the_fit_bar():
    from opdlab import progress
    from opdlab.callbacks import progress as bar_module

    assert sampling.Progress is progress.Progress and bar_module.line_due is progress.line_due
    stream = io.StringIO()  # not a terminal: plain lines
    shown = progress.Progress(total=10, initial=2, desc="opdlab eval", stream=stream, interval=3600)
    for _ in range(4):
        shown.update(2, "add3 seed 0")
    shown.close()
    assert stream.getvalue().splitlines() == ["opdlab eval: 4/10 problems (40%) add3 seed 0",
                                              "opdlab eval: 10/10 problems (100%) add3 seed 0"]
    bar = bar_module.StepProgressBar(plain_interval=3600, plain_fraction=0.25)
    bar.plain_first_step, bar.plain_last_step, bar.plain_last_time = 0, 0, time.monotonic()
    assert [s for s in range(1, 9) if bar.plain_line_due(s, 8)] == [1, 2, 4, 6, 8]


def test_a_prompt_template_the_tokenizer_cannot_read_is_warned_about(tmp_path):
    """The character-level toy has no letters: 'Question: ' in every prompt is lost on encoding. fit and validate
    warn about such training prompts; the evaluation says the same of its benchmark's."""
    import warnings

    with pytest.warns(UserWarning, match="benchmark 'add3': the tokenizer of toy:add3/student cannot represent the "
                                         "characters ':Qeinostu'"):
        result = run_eval("toy:add3/student", tmp_path / "o", "--benchmarks",
                          '[{name: add3, path: "toy:add3", limit: 2, prompt_template: "Question: {prompt}"}]', "--k", "1")
    assert result.code == 0, message(result)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = run_eval("toy:add3/student", tmp_path / "p", "--benchmarks", '[{name: add3, path: "toy:add3", limit: 2}]',
                         "--k", "1")
    assert plain.code == 0 and not [w for w in caught if "cannot represent" in str(w.message)], message(plain)


def test_one_seed_has_no_spread_in_result_json(tmp_path):
    result = run_eval("toy:add3/student", tmp_path / "o", "--k", "1", "--benchmarks.limit", "2")
    assert result.code == 0, message(result)
    saved = json.loads((tmp_path / "o" / "result.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    stds = [value["std"] for row in saved["benchmarks"].values() for value in row.values() if isinstance(value, dict)]
    assert stds and all(s is None for s in stds), saved["metrics"]


def test_an_empty_eval_config_is_refused_in_one_line(tmp_path, no_weights):
    empty = tmp_path / "e.yaml"
    empty.write_text("")
    one_line_refusal(run_opdlab(["eval", "--config", str(empty), "--model", "toy:add3/student"]),
                     f"--config {empty} is empty")
