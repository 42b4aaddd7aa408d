"""`opdlab compare`: run commands, aggregation over seeds, and a tiny end-to-end comparison through the CLI."""

from __future__ import annotations

import csv
import json
import re
import shlex
import sys
import threading

import numpy as np
import pytest
import yaml
from conftest import CONFIG_DIR, run_opdlab

from opdlab.compare import (
    CompareError,
    RunResult,
    RunSpec,
    command_line,
    compare,
    fit_command,
    markdown_table,
    mean_curves,
    run_one,
    run_specs,
    summarize,
    supervised_so_far,
)

OVERLAYS = CONFIG_DIR / "selectors"


def test_fit_command_applies_overlay_ratio_and_seed(tmp_path):
    cmd = fit_command(RunSpec("random", 0.05, 3), ["base.yaml"], OVERLAYS, tmp_path, steps=7, val_check_interval=2,
                      extra_args=["--trainer.callbacks=[]"])
    joined = " ".join(cmd)
    assert cmd[1:4] == ["-m", "opdlab.cli", "fit"]
    assert f"--config base.yaml --config {OVERLAYS / 'random.yaml'}" in joined
    assert "--model.selector.init_args.ratio 0.05" in joined
    assert "--seed_everything 3 --model.training.seed 3" in joined
    assert "--trainer.max_steps 7 --trainer.val_check_interval 2 --trainer.log_every_n_steps 1" in joined
    assert "--trainer.logger.init_args.name random_r0.05 --trainer.logger.init_args.version seed3" in joined
    assert cmd[-1] == "--trainer.callbacks=[]"
    full = " ".join(fit_command(RunSpec("full", 1.0, 0), ["b.yaml"], OVERLAYS, tmp_path, 7, 2, []))
    assert "ratio" not in full and "--trainer.logger.init_args.name full " in full


def test_unknown_overlay_lists_the_known_ones(tmp_path):
    with pytest.raises(FileNotFoundError, match="teachability"):
        fit_command(RunSpec("nope", 0.05, 0), ["b.yaml"], OVERLAYS, tmp_path, 7, 2, [])


def test_run_specs_share_the_sweep_point_with_the_comparison():
    main, sweep = run_specs(["full", "teachability"], 0.05, [0, 1], "teachability", [0.05, 0.3])
    assert [(s.method, s.seed) for s in main] == [("full", 0), ("teachability@0.05", 0), ("full", 1), ("teachability@0.05", 1)]
    assert len(set(main) | set(sweep)) == 6  # teachability@0.05 runs once for both tables


def test_run_specs_take_several_budgets_and_sweep_selectors():
    main, sweep = run_specs(["full", "random", "entropy"], [0.05, 0.1], [0], ["random", "divergence"], [0.02, 0.2])
    assert [s.method for s in main] == ["full", "random@0.05", "entropy@0.05", "random@0.1", "entropy@0.1"]  # full once
    assert [s.method for s in sweep] == ["random@0.02", "random@0.2", "divergence@0.02", "divergence@0.2"]


def test_supervised_tokens_so_far_at_each_validation():
    # validations before training, after steps 2 and 4, and at the end (step 5)
    assert supervised_so_far([3, 4, 5, 6, 7], [0, 2, 4, 5]) == [0.0, 7.0, 18.0, 25.0]


def fake(selector, ratio, seed, acc, kept=10.0, valid=100.0, seconds=5.0):
    return RunResult(RunSpec(selector, ratio, seed), ok=True, val_steps=[0, 5, 10], val_accuracy=acc,
                     kept_tokens=kept, valid_tokens=valid, fit_seconds=seconds,
                     val_supervised_tokens=[0.0, kept / 2, kept])


def test_summarize_means_and_stds_over_seeds():
    results = [fake("random", 0.1, 0, [0.2, 0.6, 0.4]), fake("random", 0.1, 1, [0.2, 0.4, 0.6], kept=20.0),
               RunResult(RunSpec("random", 0.1, 2), ok=False, error="boom")]
    (row,) = summarize(results)
    assert row["method"] == "random@0.1" and row["seeds"] == 2 and row["failed"] == 1
    assert row["final_mean"] == pytest.approx(0.5) and row["final_std"] == pytest.approx(0.1414213, rel=1e-5)
    assert row["best_mean"] == pytest.approx(0.6) and row["best_std"] == 0.0  # best excludes step 0
    assert row["before_mean"] == pytest.approx(0.2)
    assert row["supervised_tokens_mean"] == 15.0 and row["retained_ratio_mean"] == pytest.approx(0.15)
    assert "| random@0.1 | 2 (1 failed) | 0.200 | 0.500 ± 0.141 | 0.600 ± 0.000 | 15 | 0.150 |" in markdown_table([row])
    steps, mean, _std = mean_curves(results)["random@0.1"]
    assert steps.tolist() == [0, 5, 10] and mean.tolist() == pytest.approx([0.2, 0.5, 0.5])
    tokens, mean_t, _std = mean_curves(results, "tokens")["random@0.1"]
    assert tokens.tolist() == [0.0, 7.5, 15.0] and mean_t.tolist() == mean.tolist()


def test_one_mean_std_for_eval_compare_and_the_paired_report():
    """One arithmetic (opdlab.metrics.mean_std): sample std over the finite values; a single value has an
    unknown spread (nan), not a zero one."""
    import math

    from opdlab import compare as compare_module
    from opdlab import metrics
    from opdlab.evaluation import tables

    m, s = metrics.mean_std([0.2, 0.4, float("nan"), 0.6])
    assert m == pytest.approx(0.4) and s == pytest.approx(0.2)
    m, s = metrics.mean_std([0.7, float("nan")])
    assert m == pytest.approx(0.7) and math.isnan(s)
    assert all(math.isnan(v) for v in metrics.mean_std([]))
    assert compare_module.mean_std is metrics.mean_std and tables.mean_std is metrics.mean_std
    assert metrics.format_mean_std([0.5, 0.7]) == "0.600 ± 0.141"
    assert metrics.format_mean_std([0.5]) == "0.500 (n=1)"
    assert metrics.format_mean_std([float("nan")]) == "–"


def test_one_seed_shows_the_mean_alone_not_a_zero_spread(tmp_path):
    results = [fake("random", 0.1, 0, [0.2, 0.6, 0.4]), fake("full", 1.0, 0, [0.2, 0.5, 0.7]),
               fake("full", 1.0, 1, [0.2, 0.5, 0.7])]
    rows = summarize(results)
    one, two = rows
    assert one["seeds"] == 1 and one["final_mean"] == pytest.approx(0.4) and np.isnan(one["final_std"])
    assert two["final_std"] == 0.0  # two seeds that agree: a measured zero
    table = markdown_table(rows)
    assert "| random@0.1 | 1 | 0.200 | 0.400 (n=1) | 0.600 (n=1) |" in table, table
    assert "| full | 2 | 0.200 | 0.700 ± 0.000 |" in table, table
    _steps, _mean, std = mean_curves(results)["random@0.1"]
    assert np.isnan(std).all()  # curves.csv and the plot band: unknown, not 0
    _steps, _mean, std = mean_curves(results)["full"]
    assert std.tolist() == [0.0, 0.0, 0.0]


@pytest.fixture(scope="module")
def compared(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    base = yaml.safe_load((CONFIG_DIR / "fast.yaml").read_text())
    base["model"].update(student=tiny_checkpoints.student, teacher=tiny_checkpoints.teacher)
    base["data"] = {"source": {"class_path": "opdlab.tasks.AdditionTask", "init_args": {"digits": 2, "num_eval": 16}},
                    "batch_size": 8, "val_batch_size": 16}
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    out = root / "out"
    result = run_opdlab([
        "compare", "--fit_config", f"[{root / 'base.yaml'}]", "--selectors", "[full,random]", "--ratio", "0.25",
        "--seeds", "[0]", "--steps", "3", "--val_check_interval", "1", "--overlays_dir", str(OVERLAYS),
        "--out_dir", str(out), "--jobs", "2", "--threads", "1",
    ])
    assert result.code == 0, result.err[-3000:] + result.out[-3000:]
    return out, result


def test_compare_writes_table_curves_and_plot(compared):
    out, _ = compared
    for name in ("table.md", "table.csv", "results.csv", "curves.csv", "accuracy_vs_step.png", "accuracy_vs_tokens.png"):
        assert (out / name).is_file(), name
    table = (out / "table.md").read_text()
    assert "command: `opdlab compare --fit_config" in table and "machine:" in table and "date:" in table
    assert "| full | 1 |" in table and "| random@0.25 | 1 |" in table
    assert "(n=1)" in table and "± 0.000" not in table  # one seed: no spread claimed
    with open(out / "table.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"full", "random@0.25"}
    assert rows["full"]["final_std"] == "nan" and float(rows["full"]["final_mean"]) >= 0
    with open(out / "curves.csv") as f:
        assert {r["std"] for r in csv.DictReader(f)} == {"nan"}
    assert float(rows["full"]["retained_ratio_mean"]) == pytest.approx(1.0)
    assert 0.25 <= float(rows["random@0.25"]["retained_ratio_mean"]) < 0.6  # ceil + one per response
    assert float(rows["full"]["supervised_tokens_mean"]) > float(rows["random@0.25"]["supervised_tokens_mean"]) > 0
    assert float(rows["full"]["fit_seconds_mean"]) > 0


def test_compare_reads_validation_curves_and_resumes(compared, monkeypatch):
    out, _ = compared
    run = json.loads((out / "runs" / "random_r0.25" / "seed0" / "result.json").read_text())
    assert run["val_steps"] == [0, 1, 2, 3]  # before training, then every step
    assert len(run["val_accuracy"]) == 4
    tokens = run["val_supervised_tokens"]
    assert tokens[0] == 0 and tokens[-1] == pytest.approx(run["kept_tokens"]) and tokens == sorted(tokens)
    with open(out / "curves.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["method"] == "random@0.25"]
    assert [float(r["supervised_tokens"]) for r in rows] == pytest.approx(tokens)
    # A finished run is reloaded, not rerun.
    from opdlab import compare

    monkeypatch.setattr(compare.subprocess, "Popen", lambda *a, **k: pytest.fail("a finished run was rerun"))
    results = compare.compare(fit_config=[str(out.parent / "base.yaml")], selectors=["random"], ratio=0.25, seeds=[0],
                              steps=3, val_check_interval=1, overlays_dir=str(OVERLAYS), out_dir=str(out))
    assert results[0]["final_mean"] == pytest.approx(run["val_accuracy"][-1])
    # The header of a call from Python records the equivalent command line (its arguments, not a global).
    table = (out / "table.md").read_text()
    assert f"command: `opdlab compare --fit_config '[{out.parent / 'base.yaml'}]' --selectors '[random]' --ratio 0.25 " \
           "--seeds '[0]' --steps 3 --val_check_interval 1" in table
    assert not hasattr(compare, "INVOCATION")


def test_compare_reads_the_fits_summary_json(compared):
    """Validation steps, accuracies and wall time come from the summary.json `opdlab fit` writes, not from
    its stdout or a schedule."""
    out, _ = compared
    log_dir = out / "runs" / "random_r0.25" / "seed0"
    summary = json.loads((log_dir / "summary.json").read_text())
    run = json.loads((log_dir / "result.json").read_text())
    assert summary["steps"] == 3
    assert run["val_steps"] == [v["step"] for v in summary["validations"]] == [0, 1, 2, 3]
    assert run["val_accuracy"] == [v["accuracy"] for v in summary["validations"]]
    assert run["fit_seconds"] == summary["train_seconds"] > 0
    assert summary["accuracy_before"] == run["val_accuracy"][0] and summary["accuracy_after"] == run["val_accuracy"][-1]


def test_compare_streams_each_runs_progress_prefixed_whole_lines(compared):
    """Two runs at once (--jobs 2): each run's start and its fit's progress lines, prefixed with its name."""
    out, result = compared
    lines = result.out.splitlines()
    for name in ("full seed 0", "random@0.25 seed 0"):
        assert any(re.fullmatch(rf"compare: starting {re.escape(name)} \(run [12] of 2\): .*", line) for line in lines)
        assert f"[{name}] train 1/3 " in result.out and f"[{name}] train 3/3 " in result.out
        assert f"[{name}] val at step 2: val/accuracy=" in result.out
    streamed = [line for line in lines if line.startswith("[")]
    assert streamed and all(re.fullmatch(r"\[(full|random@0\.25) seed 0\] (train \d/3 .*\]|val at step \d: .*)", line)
                            for line in streamed), streamed
    assert "\r" not in result.out and "\x1b[" not in result.out
    assert "train 3/3" in (out / "runs" / "full" / "seed0" / "fit.log").read_text()  # the whole output is kept


def test_parallel_runs_never_interleave_mid_line(tmp_path, capsys):
    """Runs print from their own threads; every printed line is one whole line of one run."""
    child = ("import sys\nfor i in range(300):\n    print(f'train {i}/300 ' + sys.argv[1] * 200, flush=True)\n"
             "print('noise not shown')\n")
    specs = [RunSpec("full", 1.0, 0), RunSpec("random", 0.1, 0), RunSpec("random", 0.2, 0)]
    results = {}

    def go(spec, letter):
        command = [sys.executable, "-c", child, letter]
        results[letter] = run_one(spec, command, tmp_path / spec.name, {}, rerun=True)

    threads = [threading.Thread(target=go, args=(spec, letter)) for spec, letter in zip(specs, "abc", strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = capsys.readouterr().out.splitlines()
    progress = [line for line in lines if line.startswith("[")]
    assert len(progress) == 900
    for line in progress:
        match = re.fullmatch(r"\[(full|random@0\.1|random@0\.2) seed 0\] train \d+/300 ([abc])\2{199}", line)
        assert match, line[:120]
    assert "noise not shown" not in "\n".join(lines)
    # a fit that exits 0 without a summary.json is a failed run that says why
    for letter, result in results.items():
        assert not result.ok and "summary.json not found" in result.error, (letter, result.error)
    assert sum("failed: " in line and "summary.json not found" in line for line in lines) == 3


def test_the_header_command_line_parses_back_to_the_same_arguments(tmp_path):
    from jsonargparse import ArgumentParser

    given = {"fit_config": ["configs/a b.yaml", "configs/b.yaml"], "selectors": ["full", "teachability"],
             "ratio": [0.05, 1e-05], "seeds": [0, 1], "sweep_selector": None, "extra_args": ["--trainer.callbacks=[]",
             "--model.rollout.max_new_tokens", "8"], "rerun": True, "top_k": 4, "rank_by": "best", "jobs": 1,
             "out_dir": str(tmp_path / "o u t")}
    command = command_line(given)
    assert "--jobs" not in command and "--sweep_selector" not in command  # defaults are left out
    parser = ArgumentParser()
    parser.add_function_arguments(compare)
    parsed = parser.parse_args(shlex.split(command)[2:])
    for key, value in given.items():
        assert parsed[key] == value, (key, parsed[key])


def test_compare_help_documents_every_option():
    result = run_opdlab(["compare", "--help"])
    assert result.code == 0
    for option in ("--fit_config", "--selectors", "--ratio", "--seeds", "--steps", "--val_check_interval",
                   "--sweep_selector", "--sweep_ratios", "--overlays_dir", "--out_dir", "--jobs", "--extra_args"):
        assert option in result.out, option


def test_failed_run_makes_compare_exit_nonzero_after_writing_the_rest(compared, tmp_path):
    out, _ = compared
    base = out.parent / "base.yaml"
    broken = tmp_path / "broken.yaml"  # an overlay whose run fails at once (no such selector class)
    broken.write_text("model:\n  selector:\n    class_path: opdlab.selectors.NoSuchSelector\n")
    result = run_opdlab([  # `full` is reloaded from the fixture's run (same settings)
        "compare", "--fit_config", f"[{base}]", "--selectors", f"[full,{broken}]", "--ratio", "0.25", "--seeds", "[0]",
        "--steps", "3", "--val_check_interval", "1", "--overlays_dir", str(OVERLAYS), "--out_dir", str(out),
    ])
    assert result.code != 0
    assert "1 of 2 runs failed (broken" in str(result.code), result.code
    assert "| full | 1 |" in (out / "table.md").read_text()  # what finished is still written


def test_results_made_with_other_settings_are_not_reused(compared):
    """The fixture ran 3 steps; asking for 2 into the same folder must not tabulate the 3-step results."""
    out, _ = compared
    result = run_opdlab([
        "compare", "--fit_config", f"[{out.parent / 'base.yaml'}]", "--selectors", "[full]", "--seeds", "[0]",
        "--steps", "2", "--val_check_interval", "1", "--overlays_dir", str(OVERLAYS), "--out_dir", str(out),
    ])
    message = str(result.code)
    assert "already holds a result of runs/full/seed0 made with other settings" in message, message
    assert "--trainer.max_steps" not in message or "3 vs 2" in message, message
    assert "pass --rerun" in message


def test_compare_with_nothing_to_run_exits_nonzero(tmp_path):
    result = run_opdlab(["compare", "--seeds", "[]", "--out_dir", str(tmp_path / "out")])
    assert result.code != 0 and "nothing to run" in str(result.code)


def test_top_k_applies_to_the_overlays_that_set_one(tmp_path):
    with_k = fit_command(RunSpec("teachability", 0.05, 0), ["base.yaml"], OVERLAYS, tmp_path, 10, 5, [], top_k=4)
    assert with_k[with_k.index("--model.selector.init_args.top_k") + 1] == "4"
    for selector in ("random", "full"):  # no top_k in their overlays: untouched
        assert "--model.selector.init_args.top_k" not in fit_command(RunSpec(selector, 0.05, 0), ["base.yaml"],
                                                                     OVERLAYS, tmp_path, 10, 5, [], top_k=4)


@pytest.mark.parametrize("args,says", [
    (["--selectors", "[full,teachabilty]"], "no selector 'teachabilty'"),
    (["--selectors", "[full,teachabilty]"], "did you mean 'teachability'"),
    (["--ratio", "1.5"], "ratio must be in (0, 1]"),
    (["--sweep_selector", "random", "--sweep_ratios", "[0.1,2.0]"], "got 2"),
    (["--steps", "0"], "steps must be >= 1"),
])
def test_compare_checks_names_and_values_before_any_run(tmp_path, args, says):
    out = tmp_path / "out"
    result = run_opdlab(["compare", "--overlays_dir", str(OVERLAYS), "--seeds", "[0]", "--out_dir", str(out), *args])
    assert result.code != 0 and says in str(result.code), result.code
    assert not out.exists()  # nothing ran, nothing written


@pytest.fixture
def fake_fits(monkeypatch):
    """`opdlab fit` replaced by a stand-in that writes what a fit with --eval writes (summary.json and
    eval/result.json, its Avg@k the --eval file's k / 10): compare's bookkeeping without training. Returns the
    list of runs it was asked for."""
    from opdlab import compare as compare_module

    calls = []

    def stream_fit(command, env, log, name):
        run = log.parent
        calls.append(name)
        (run / "summary.json").write_text(json.dumps({"validations": [{"step": 0, "accuracy": 0.1},
                                                                      {"step": 2, "accuracy": 0.3}], "train_seconds": 1.0}))
        if "--eval" in command:
            k = yaml.safe_load(open(command[command.index("--eval") + 1]))["k"]
            (run / "eval").mkdir()
            (run / "eval" / "result.json").write_text(json.dumps({"mean": {"avg": {"mean": k / 10, "std": 0.0}}}))
        return 0, []

    monkeypatch.setattr(compare_module, "stream_fit", stream_fit)
    monkeypatch.setattr(compare_module, "read_scalars", lambda log_dir: {"train/kept_tokens": [1.0, 1.0]})
    return calls


def test_an_edited_eval_config_is_not_reused_under_its_old_results(tmp_path, fake_fits):
    """compare --eval_config F --rank_by eval, F edited, the same compare: the saved evaluations were made with the
    old F; they are refused in one line naming the difference, not tabulated under F's name."""
    (tmp_path / "base.yaml").write_text("{}\n")
    bench = tmp_path / "bench.jsonl"
    bench.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    settings = tmp_path / "eval.yaml"
    settings.write_text(f"benchmarks:\n  - {{name: b, path: {bench}}}\nk: 2\n")
    args = dict(fit_config=[str(tmp_path / "base.yaml")], selectors=["full"], seeds=[0], steps=2, val_check_interval=1,
                overlays_dir=str(OVERLAYS), out_dir=str(tmp_path / "out"), eval_config=str(settings), rank_by="eval")
    (row,) = compare(**args)
    assert row["eval_avg_mean"] == pytest.approx(0.2) and fake_fits == ["full seed 0"]
    record = json.loads((tmp_path / "out" / "runs" / "full" / "seed0" / "result.json").read_text())
    assert record["eval_settings"]["options"]["k"] == 2 and len(record["eval_settings"]["sha256"]) == 16
    table = (tmp_path / "out" / "table.md").read_text()
    assert f"eval settings: {settings} as it was: k=2" in table and record["eval_settings"]["sha256"] in table
    # Same content (a comment added): reused, not rerun.
    settings.write_text(f"# a note\nbenchmarks:\n  - {{name: b, path: {bench}}}\nk: 2\n")
    compare(**args)
    assert fake_fits == ["full seed 0"]
    # k edited: refused, naming the difference; nothing rerun, the old table not rewritten under the new file.
    settings.write_text(f"benchmarks:\n  - {{name: b, path: {bench}}}\nk: 4\n")
    with pytest.raises(CompareError, match=r"evaluated with other eval settings than .*eval.yaml holds now "
                                           r"\(first difference, saved vs now: k: 2 vs 4\); pass --rerun"):
        compare(**args)
    assert fake_fits == ["full seed 0"]
    # the benchmark file's content edited (same name, same options): refused too
    settings.write_text(f"benchmarks:\n  - {{name: b, path: {bench}}}\nk: 2\n")
    bench.write_text('{"prompt": "1+2=", "answer": "3"}\n')
    with pytest.raises(CompareError, match="first difference, saved vs now: benchmark file b: "):
        compare(**args)
    # --rerun: evaluated again under the new settings
    settings.write_text(f"benchmarks:\n  - {{name: b, path: {bench}}}\nk: 4\n")
    (row,) = compare(**{**args, "rerun": True})
    assert row["eval_avg_mean"] == pytest.approx(0.4) and fake_fits == ["full seed 0", "full seed 0"]


def test_a_result_without_recorded_eval_settings_is_not_reused_for_an_evaluation(tmp_path, fake_fits):
    (tmp_path / "base.yaml").write_text("{}\n")
    settings = tmp_path / "eval.yaml"
    settings.write_text("benchmarks:\n  - {name: add3, path: 'toy:add3'}\nk: 2\n")
    args = dict(fit_config=[str(tmp_path / "base.yaml")], selectors=["full"], seeds=[0], steps=2, val_check_interval=1,
                overlays_dir=str(OVERLAYS), out_dir=str(tmp_path / "out"), eval_config=str(settings))
    compare(**args)
    done = tmp_path / "out" / "runs" / "full" / "seed0" / "result.json"
    record = json.loads(done.read_text())
    assert record["eval_settings"]["benchmark_files"] == {"add3": "name toy:add3"}
    del record["eval_settings"]  # as an older compare wrote it
    done.write_text(json.dumps(record))
    with pytest.raises(CompareError, match="it records no eval settings: made by an older opdlab compare"):
        compare(**args)


def test_an_eval_config_edited_while_the_comparison_runs_stops_it(tmp_path, fake_fits, monkeypatch):
    from opdlab import compare as compare_module

    (tmp_path / "base.yaml").write_text("{}\n")
    settings = tmp_path / "eval.yaml"
    settings.write_text("benchmarks:\n  - {name: add3, path: 'toy:add3'}\nk: 2\n")
    real = compare_module.stream_fit

    def then_edit(*a, **k):  # the first run's fit finishes, then someone edits the file
        out = real(*a, **k)
        settings.write_text("benchmarks:\n  - {name: add3, path: 'toy:add3'}\nk: 8\n")
        return out

    monkeypatch.setattr(compare_module, "stream_fit", then_edit)
    with pytest.raises(CompareError, match=r"changed while the comparison ran \(saved vs now: k: 2 vs 8\)"):
        compare(fit_config=[str(tmp_path / "base.yaml")], selectors=["full"], seeds=[0, 1], steps=2,
                val_check_interval=1, overlays_dir=str(OVERLAYS), out_dir=str(tmp_path / "out"),
                eval_config=str(settings))
    assert fake_fits == ["full seed 0"]


@pytest.mark.parametrize("args,says", [
    ({"seeds": [0, 1, 0]}, "seeds repeat: [0, 1, 0] (seed 0)"),
    ({"threads": 0}, "threads must be >= 1"),
    ({"top_k": 0}, "top_k must be >= 1"),
    ({"overlays_dir": "nowhere"}, "overlays_dir nowhere is not a folder"),
    ({"fit_config": ["none.yaml"]}, "fit_config none.yaml not found"),
    ({"fit_config": []}, "fit_config is empty"),
    ({"rank_by": "eval"}, "rank_by=eval needs eval_config"),
    ({"eval_config": "."}, "eval_config . is a folder, not a file"),
    ({"eval_config": "missing.yaml"}, "eval_config missing.yaml not found"),
    ({"eval_config": "bad.yaml"}, "eval_config bad.yaml is not readable YAML"),
    ({"eval_config": "list.yaml"}, "eval_config list.yaml holds a list, not a mapping"),
    ({"eval_config": "typo.yaml"}, "unexpected keyword argument 'kk'"),
    ({"eval_config": "nobench.yaml"}, "it lists no benchmarks"),
])
def test_bad_compare_inputs_are_one_line_before_any_run(tmp_path, monkeypatch, args, says):
    from opdlab import compare as compare_module

    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text("{}\n")
    (tmp_path / "bad.yaml").write_text("benchmarks: [\n  k: :\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "typo.yaml").write_text("benchmarks: [{name: add3, path: 'toy:add3'}]\nkk: 2\n")
    (tmp_path / "nobench.yaml").write_text("k: 2\n")
    monkeypatch.setattr(compare_module, "stream_fit", lambda *a, **k: pytest.fail("a run started"))
    given = dict(fit_config=["base.yaml"], selectors=["full"], seeds=[0], overlays_dir=str(OVERLAYS), out_dir="out")
    with pytest.raises(CompareError, match=re.escape(says)):
        compare(**{**given, **args})
    assert not (tmp_path / "out").exists()


def test_an_unreadable_saved_result_is_one_line(tmp_path):
    (tmp_path / "base.yaml").write_text("{}\n")
    done = tmp_path / "out" / "runs" / "full" / "seed0" / "result.json"
    done.parent.mkdir(parents=True)
    done.write_text('{"ok": tr')
    with pytest.raises(CompareError, match="result.json is not readable JSON .*delete it to run that run again"):
        compare(fit_config=[str(tmp_path / "base.yaml")], selectors=["full"], seeds=[0], overlays_dir=str(OVERLAYS),
                out_dir=str(tmp_path / "out"))
