"""`opdlab eval` (Avg@k, pass@k, maj@k over benchmark sets), its resume, its bad-input refusals, `fit`'s
evaluation after training, `compare`'s ranking by it, and prompts read with `datasets`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from opdlab import evaluation
from opdlab.metrics import benchmark_metrics, majority_correct, pass_at_k
from opdlab.rollout import derive_seed
from opdlab.tasks.addition import AdditionTask

from conftest import CONFIG_DIR, REPO_ROOT, run_opdlab

TOY = str(CONFIG_DIR / "eval" / "toy.yaml")
FAST = str(CONFIG_DIR / "fast.yaml")


# ------------------------------------------------------------------------------ the estimators
def test_pass_at_k_equals_its_closed_form_on_small_cases():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                closed = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12), (n, c, k)


def test_pass_at_n_is_any_correct_and_pass_at_1_is_the_mean():
    for n in range(1, 9):
        for c in range(n + 1):
            assert pass_at_k(n, c, n) == (1.0 if c > 0 else 0.0)
            assert pass_at_k(n, c, 1) == pytest.approx(c / n)


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, 1, 5), (4, 1, 0), (4, -1, 1)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(n, c, k)


def test_majority_vote_ignores_unreadable_answers_and_breaks_ties_by_first_seen():
    assert majority_correct(["7", "5", "5", None], [True, False, False, False]) is False
    assert majority_correct(["7", None, None, "5"], [True, False, False, False]) is True  # 7 seen first
    assert majority_correct([None, None], [False, False]) is False
    assert majority_correct(["7", "7", "5"], [True, True, False]) is True


def test_benchmark_metrics_of_a_hand_made_set():
    problems = [
        {"correct": [True, False, False, False], "keys": ["1", "2", "2", None], "lengths": [3, 4, 5, 8],
         "truncated": [False, False, False, True], "parsed": [True, True, True, False]},
        {"correct": [True, True, False, False], "keys": ["9", "9", "8", "7"], "lengths": [2, 2, 2, 2],
         "truncated": [False] * 4, "parsed": [True] * 4},
    ]
    m = benchmark_metrics(problems, [1, 2, 4])
    assert m["avg"] == pytest.approx((1 / 4 + 2 / 4) / 2) == pytest.approx(m["pass@1"])
    assert m["pass@2"] == pytest.approx(((1 - 3 / 6) + (1 - 1 / 6)) / 2)
    assert m["pass@4"] == 1.0 and m["maj@4"] == 0.5
    assert m["length"] == pytest.approx(28 / 8) and m["truncated"] == 1 / 8 and m["unparsed"] == 1 / 8


def test_derive_seed_with_strings_is_the_same_in_every_process():
    here = derive_seed(0, "add3", 17)
    code = "from opdlab.rollout import derive_seed; print(derive_seed(0, 'add3', 17))"
    for _ in range(2):  # a new interpreter has a new string-hash salt
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert int(out) == here
    assert derive_seed(3, 5) == hash((3, 5)) % 2**63  # integer seeds unchanged (training runs reproduce)


def test_math_verifier_scores_and_keys_and_counts_unreadable_as_wrong():
    pytest.importorskip("math_verify")
    verifier = evaluation.Verifier("math")
    assert verifier.check("so the answer is \\boxed{\\frac{2}{3}}", "\\frac{2}{3}")[0] is True
    assert verifier.check("so the answer is \\boxed{5}", "4") == (False, "5")
    assert verifier.check("I do not know", "4") == (False, None)


# ------------------------------------------------------------------------------ opdlab eval on a toy student
def eval_args(out: Path, *more: str) -> list[str]:
    return ["eval", "--config", TOY, "--model", "toy:add3/student", "--k", "4", "--benchmarks.limit", "12",
            "--out_dir", str(out), *more]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "add3"
    result = run_opdlab(eval_args(out))
    assert result.code == 0, str(result.code) + result.err[-2000:]
    return out, result


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]


def test_eval_writes_every_response_with_a_verdict_the_task_agrees_with(evaluated):
    out, result = evaluated
    recs = records(out)
    assert len(recs) == 12 * 4 and {(r["index"], r["sample"]) for r in recs} == {(i, j) for i in range(12) for j in range(4)}
    task = AdditionTask(digits=3)
    problems = task.test_problems()
    for r in recs:
        assert r["prompt"] == problems[r["index"]].prompt and r["answer"] == problems[r["index"]].answer
        assert r["correct"] == task.verify(r["response"], r["answer"])
        # tokens: one per character (special tokens decode to nothing) and the EOS unless the response was cut
        assert len(r["response"]) + (0 if r["truncated"] else 1) <= r["length"] <= 6
        assert r["truncated"] == (r["length"] == 6 and not r["response"].endswith("<eos>")) or not r["truncated"]
    assert "| add3 | 12 |" in result.out and "Avg@4" in result.out


def test_eval_table_is_recomputed_from_the_responses(evaluated):
    out, _ = evaluated
    recs, result = records(out), json.loads((out / "result.json").read_text())
    by_problem: dict[int, list[bool]] = {}
    for r in recs:
        by_problem.setdefault(r["index"], []).append(r["correct"])
    avg = sum(sum(v) / 4 for v in by_problem.values()) / 12
    any_correct = sum(any(v) for v in by_problem.values()) / 12
    add3 = result["benchmarks"]["add3"]
    assert add3["avg"]["mean"] == pytest.approx(avg) and add3["pass@4"]["mean"] == pytest.approx(any_correct)
    assert 0 < avg < 1  # the toy student at temperature 1 is right sometimes, not always
    assert result["mean"]["avg"]["mean"] == add3["avg"]["mean"]  # one benchmark: its mean is the overall mean
    assert (out / "results.md").read_text().startswith("toy:add3/student: k=4")


def test_eval_is_reproducible_and_resumes_after_a_crash_without_redoing_scored_problems(evaluated, tmp_path):
    out, _ = evaluated
    lines = (out / "responses.jsonl").read_text().splitlines(keepends=True)
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "eval.json").write_text((out / "eval.json").read_text())
    (crashed / "responses.jsonl").write_text("".join(lines[:4 * 5 + 2]) + lines[22][:30])  # 5 problems + a torn line
    result = run_opdlab(eval_args(crashed))
    assert result.code == 0, result.err[-2000:]
    again = json.loads((crashed / "result.json").read_text())
    assert again["generated_now"] == (12 - 5) * 4  # only the unscored problems were sampled
    assert (crashed / "results.md").read_text() == (out / "results.md").read_text()
    key = lambda r: (r["index"], r["sample"])  # noqa: E731
    assert sorted(records(crashed), key=key) == sorted(records(out), key=key)  # same samples: seeded per problem


def test_greedy_avg_at_1_equals_the_toy_build_s_own_greedy_accuracy(tmp_path):
    """Two independent paths to one number: the toy build's held-out accuracy (its own greedy loop, recorded in
    build.json when it was trained) and `opdlab eval` at temperature 0, k=1 on the same validation split."""
    from opdlab.toy import shipped_toy

    built = json.loads((shipped_toy("add3", 0) / "build.json").read_text())["student"]["accuracy"]
    out = tmp_path / "greedy"
    result = run_opdlab(["eval", "--model", "toy:add3/student", "--benchmarks", '[{name: v, path: "toy:add3:validation"}]',
                         "--temperature", "0", "--k", "1", "--out_dir", str(out)])
    assert result.code == 0, str(result.code) + result.err[-2000:]
    assert json.loads((out / "result.json").read_text())["benchmarks"]["v"]["avg"]["mean"] == pytest.approx(built)


def test_eval_with_several_seeds_reports_mean_and_std(tmp_path):
    out = tmp_path / "seeds"
    result = run_opdlab(eval_args(out, "--seeds", "[0,1]", "--benchmarks.limit", "6"))
    assert result.code == 0, result.err[-2000:]
    data = json.loads((out / "result.json").read_text())
    per = [data["per_seed"]["add3"][s]["avg"] for s in ("0", "1")]
    mean = sum(per) / 2
    std = math.sqrt(sum((p - mean) ** 2 for p in per))  # sample std of two values
    assert data["benchmarks"]["add3"]["avg"]["mean"] == pytest.approx(mean)
    assert data["benchmarks"]["add3"]["avg"]["std"] == pytest.approx(std)
    assert "± " in result.out


def test_eval_refuses_to_mix_settings_in_one_folder(evaluated):
    out, _ = evaluated
    result = run_opdlab(eval_args(out, "--temperature", "0.6"))
    assert result.code != 0 and "other settings (temperature: 1.0 there, 0.6 now)" in str(result.code)


def test_eval_of_a_run_checkpoint_equals_eval_of_its_export(tmp_path, tiny_checkpoints):
    """A Lightning checkpoint of a run and the run's exported student are the same model to `opdlab eval`."""
    root = tmp_path / "fit"
    fit = run_opdlab(["fit", "--config", FAST, "--model.student", tiny_checkpoints.student, "--model.teacher",
                      tiny_checkpoints.teacher, "--trainer.max_steps", "2", "--trainer.logger.init_args.save_dir",
                      str(root), "--data.source.init_args.num_eval", "16", "--trainer.callbacks+",
                      "lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.dirpath", str(tmp_path / "ck"),
                      "--trainer.callbacks.every_n_train_steps", "1"])
    assert fit.code == 0, str(fit.code) + fit.err[-2000:]
    run = next(root.glob("*/version_0"))
    ckpt = next((tmp_path / "ck").glob("*.ckpt"))
    bench = ["--benchmarks", '[{name: add2, path: "toy:add2:validation"}]', "--k", "2", "--benchmarks.limit", "6"]
    results = []
    for model in (str(ckpt), str(run)):
        out = tmp_path / f"eval_{len(results)}"
        result = run_opdlab(["eval", "--model", model, *bench, "--out_dir", str(out)])
        assert result.code == 0, str(result.code) + result.err[-2000:]
        results.append([(r["index"], r["sample"], r["response"]) for r in records(out)])
    assert results[0] == results[1]
    import torch

    from_ckpt, from_run = (evaluation.load_model(m, "float32")[0].state_dict() for m in (str(ckpt), str(run)))
    base = evaluation.load_model(tiny_checkpoints.student, "float32")[0].state_dict()
    assert from_ckpt.keys() == from_run.keys() and all(torch.equal(from_ckpt[n], from_run[n]) for n in from_ckpt)
    assert any(not torch.equal(from_ckpt[n], base[n]) for n in base)  # the checkpoint's weights, not the base's


# ------------------------------------------------------------------------------ bad input: one line, no model loaded
def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: every refusal must come before it."""
    monkeypatch.setattr(evaluation, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))


@pytest.mark.parametrize("args, says", [
    (["--k", "0"], "k (responses per problem) must be >= 1, got 0"),
    (["--k", "4", "--pass_at", "[1,8]"], "pass_at [8] outside [1, k=4]"),
    (["--temperature", "0", "--k", "4"], "temperature 0 is greedy"),
    (["--top_p", "0"], "top_p must be in (0, 1]"),
    (["--seeds", "[]"], "seeds is empty"),
    (["--benchmarks", '[{name: a, path: "toy:add9"}]'], "unknown toy 'add9'"),
    (["--benchmarks", '[{name: a, path: "toy:add3", verifier: fuzzy}]'], "verifier"),
    (["--benchmarks", "[]"], "no benchmarks given"),
    (["--benchmarks", '[{name: a, path: "toy:add3"}, {name: a, path: "toy:add3"}]'], "benchmark names repeat"),
    (["--benchmarks", '[{name: a, path: "toy:add3", prompt_template: "Q:"}]'], "must contain {prompt}"),
])
def test_bad_eval_options_are_one_line_before_any_model(args, says, tmp_path, no_model):
    result = run_opdlab(["eval", "--config", TOY, "--model", "toy:add3/student", "--out_dir", str(tmp_path / "o"), *args])
    message = str(result.code) + result.err
    assert result.code != 0 and says in message, message
    assert "Traceback" not in message


def test_missing_model_option_is_one_line(tmp_path, no_model):
    result = run_opdlab(["eval", "--config", TOY, "--out_dir", str(tmp_path / "o")])
    assert result.code != 0 and "--model is required" in str(result.code)


def test_bad_benchmark_files_are_named_before_any_model(tmp_path, no_model):
    good = write_jsonl(tmp_path / "good.jsonl", [{"problem": "1+1", "answer": "2"}])
    cases = {
        str(tmp_path / "missing.jsonl"): "not found",
        write_jsonl(tmp_path / "fields.jsonl", [{"question_text": "1+1", "answer": "2"}]):
            "none of the usual prompt fields",
        write_jsonl(tmp_path / "noanswer.jsonl", [{"problem": "1+1", "solution": "2"}]): "none of the usual answer fields",
        write_jsonl(tmp_path / "empty.jsonl", []): "no rows (the file is empty)",
    }
    for path, says in cases.items():
        bench = json.dumps([{"name": "s", "path": path}])
        result = run_opdlab(["eval", "--model", "toy:add3/student", "--benchmarks", bench, "--max_new_tokens", "4",
                             "--out_dir", str(tmp_path / "o")])
        assert result.code != 0 and says in str(result.code), (path, result.code, result.err[-500:])
        assert "benchmark 's'" in str(result.code)
    bench = json.dumps([{"name": "s", "path": good, "answer_field": "solution"}])
    result = run_opdlab(["eval", "--model", "toy:add3/student", "--benchmarks", bench, "--out_dir", str(tmp_path / "o")])
    assert "no field 'solution' for the answer; the records have: problem, answer" in str(result.code)
    bench = json.dumps([{"name": "s", "path": good, "verifier": "exact"}])
    result = run_opdlab(["eval", "--model", "toy:add3/student", "--benchmarks", bench, "--out_dir", str(tmp_path / "o")])
    assert "max_new_tokens is needed for s" in str(result.code)


def test_a_response_the_verifier_cannot_read_is_counted_not_fatal(tmp_path):
    """Natural-language math prompts through the toy student: nothing parses; every response is scored wrong."""
    pytest.importorskip("math_verify")
    path = write_jsonl(tmp_path / "math.jsonl", [{"problem": "12+34=", "answer": "\\frac{1}{2}"},
                                                  {"problem": "55+55=", "answer": "x^2"}])
    bench = json.dumps([{"name": "m", "path": path, "verifier": "math"}])
    out = tmp_path / "o"
    result = run_opdlab(["eval", "--model", "toy:add3/student", "--benchmarks", bench, "--k", "2", "--max_new_tokens",
                         "5", "--out_dir", str(out)])
    assert result.code == 0, str(result.code) + result.err[-1000:]
    data = json.loads((out / "result.json").read_text())["benchmarks"]["m"]
    assert data["avg"]["mean"] == 0.0 and 0.0 <= data["unparsed"]["mean"] <= 1.0


# ------------------------------------------------------------------------------ prompts from `datasets`
import datasets  # noqa: E402 (a dev dependency: the datasets source is tested wherever the suite runs)

ROWS = [{"problem": f"{a}+{a}=", "answer": str(2 * a), "level": a % 3} for a in range(10)]
DAPO = [{"data_source": "x", "prompt": [{"role": "user", "content": f"What is {a}+1?"}],
         "reward_model": {"ground_truth": str(a + 1), "style": "rule"}} for a in range(10)]


def write_format(tmp_path: Path, rows: list[dict], fmt: str) -> str:
    ds = datasets.Dataset.from_list(rows)
    if fmt == "parquet":
        path = tmp_path / "set.parquet"
        ds.to_parquet(str(path))
    elif fmt == "jsonl":
        path = tmp_path / "set.jsonl"
        ds.to_json(str(path))
    elif fmt == "json":
        path = tmp_path / "set.json"
        path.write_text(json.dumps(rows))
    elif fmt == "arrow":
        path = tmp_path / "saved"
        ds.save_to_disk(str(path))
        path = next(path.glob("*.arrow"))
    elif fmt == "saved":
        path = tmp_path / "saved"
        ds.save_to_disk(str(path))
    elif fmt == "folder":
        path = tmp_path / "folder"
        path.mkdir()
        datasets.Dataset.from_list(rows[:5]).to_parquet(str(path / "a.parquet"))
        datasets.Dataset.from_list(rows[5:]).to_parquet(str(path / "b.parquet"))
    return str(path)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "json", "arrow", "saved", "folder"])
def test_datasets_source_reads_every_local_format(tmp_path, fmt):
    from opdlab.tasks import DatasetPrompts

    source = DatasetPrompts(write_format(tmp_path, ROWS, fmt), num_eval=3)
    train = [p for p, _ in zip(source.train_problems(), range(7), strict=False)]
    assert sorted(p.prompt for p in train) == sorted(r["problem"] for r in ROWS[:7])
    assert [(p.prompt, p.answer) for p in source.eval_problems()] == [(r["problem"], r["answer"]) for r in ROWS[7:]]


def test_datasets_source_reads_the_dapo_layout_as_is(tmp_path):
    from opdlab.tasks import DatasetPrompts

    source = DatasetPrompts(write_format(tmp_path, DAPO, "parquet"), num_eval=2, verifier="math")
    assert source.eval_problems()[0].prompt == "What is 8+1?" and source.eval_problems()[0].answer == "9"


def test_datasets_source_streams_and_resumes_where_it_stopped(tmp_path):
    from opdlab.tasks import DatasetPrompts

    path = write_format(tmp_path, ROWS, "parquet")
    source = DatasetPrompts(path, eval_path=path, streaming=True)
    first = [p.prompt for p, _ in zip(source.train_problems(), range(25), strict=False)]
    assert first[:10] == [r["problem"] for r in ROWS] and first[10:20] == first[:10]  # file order, cycled
    assert [p.prompt for p, _ in zip(source.train_problems(start=13), range(12), strict=False)] == first[13:25]
    with pytest.raises(ValueError, match="streaming=true needs eval_path"):
        DatasetPrompts(path, streaming=True)


def test_datasets_source_names_a_missing_field_and_the_fields_there_are(tmp_path):
    from opdlab.tasks import DatasetPrompts

    with pytest.raises(ValueError, match=r"no field 'question' for the prompt; the records have: problem, answer, level"):
        DatasetPrompts(write_format(tmp_path, ROWS, "parquet"), prompt_field="question", num_eval=2)


def test_datasets_source_trains_through_the_command(tmp_path, tiny_checkpoints):
    rows = [{"problem": f"{a % 10}{a // 10}+{a % 7}{a % 3}=", "answer": "000"} for a in range(40)]
    path = write_format(tmp_path, rows, "parquet")
    result = run_opdlab(["fit", "--config", FAST, "--model.student", tiny_checkpoints.student, "--model.teacher",
                         tiny_checkpoints.teacher, "--trainer.max_steps", "1", "--trainer.logger.init_args.save_dir",
                         str(tmp_path / "runs"), "--data.source", "opdlab.tasks.DatasetPrompts", "--data.source.path", path,
                         "--data.source.num_eval", "8", "--data.batch_size", "4"])
    assert result.code == 0, str(result.code) + result.err[-2000:]
    bad = run_opdlab(["fit", "--config", FAST, "--model.student", tiny_checkpoints.student, "--model.teacher",
                      tiny_checkpoints.teacher, "--data.source", "opdlab.tasks.DatasetPrompts", "--data.source.path",
                      path, "--data.source.answer_field", "solution"])
    assert bad.code != 0 and "no field 'solution' for the answer" in str(bad.code) and "Traceback" not in bad.err


# ------------------------------------------------------------------------------ after training: fit and compare
def test_fit_evaluates_the_exported_student_when_asked(tmp_path, tiny_checkpoints):
    root = tmp_path / "runs"
    result = run_opdlab(["fit", "--config", FAST, "--model.student", tiny_checkpoints.student, "--model.teacher",
                         tiny_checkpoints.teacher, "--trainer.max_steps", "1", "--trainer.logger.init_args.save_dir",
                         str(root), "--data.source.init_args.num_eval", "16", "--eval.benchmarks",
                         '[{name: add2, path: "toy:add2:validation", limit: 5}]', "--eval.k", "2"])
    assert result.code == 0, str(result.code) + result.err[-2000:]
    run = next(root.glob("*/version_0"))
    data = json.loads((run / "eval" / "result.json").read_text())
    assert data["k"] == 2 and data["benchmarks"]["add2"]["problems"] == 5
    assert len((run / "eval" / "responses.jsonl").read_text().splitlines()) == 10
    assert "| add2 | 5 |" in result.out


def test_fit_refuses_bad_evaluation_settings_before_training(tmp_path, tiny_checkpoints, monkeypatch):
    from opdlab.module import OPDModule

    monkeypatch.setattr(OPDModule, "configure_model", lambda self: pytest.fail("models were loaded"))
    result = run_opdlab(["fit", "--config", FAST, "--model.student", tiny_checkpoints.student,
                         "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--eval.benchmarks", '[{name: a, path: "toy:add2"}]', "--eval.k", "2",
                         "--eval.pass_at", "[4]"])
    assert result.code != 0 and "pass_at [4] outside [1, k=2]" in str(result.code)


def test_eval_configs_parse_and_their_shipped_samples_load():
    for path in sorted((CONFIG_DIR / "eval").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        options = evaluation.EvalOptions.from_mapping(data)
        options.check()
        for bench in options.benchmarks:
            sample = REPO_ROOT / "data" / "eval_sample" / Path(bench.path).name
            if bench.path.startswith("toy:"):
                pass
            elif (REPO_ROOT / bench.path).is_file():  # a file the repository ships: read in place
                bench.path = str(REPO_ROOT / bench.path)
            else:  # the user's files: the shipped sample of the same layout
                assert sample.is_file(), f"{path.name}: no sample for {bench.path}"
                bench.path = str(sample)
            loaded = evaluation.load_benchmark(bench)
            assert loaded.problems and all(p.answer for p in loaded.problems), bench.name


def test_compare_ranks_methods_by_the_evaluation(tmp_path, tiny_checkpoints):
    base = yaml.safe_load((CONFIG_DIR / "fast.yaml").read_text())
    base["model"].update(student=tiny_checkpoints.student, teacher=tiny_checkpoints.teacher)
    base["data"] = {"source": {"class_path": "opdlab.tasks.AdditionTask", "init_args": {"digits": 2, "num_eval": 8}},
                    "batch_size": 4, "val_batch_size": 8}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({"benchmarks": [{"name": "add2", "path": "toy:add2:validation",
                                                                        "limit": 6}], "k": 2}))
    out = tmp_path / "out"
    args = ["compare", "--fit_config", f"[{tmp_path / 'base.yaml'}]", "--selectors", "[full,random]", "--ratio", "0.5",
            "--seeds", "[0]", "--steps", "2", "--val_check_interval", "1", "--overlays_dir",
            str(CONFIG_DIR / "selectors"), "--out_dir", str(out), "--rank_by", "eval"]
    refused = run_opdlab(args)
    assert refused.code != 0 and "rank_by=eval needs eval_config" in str(refused.code) and not out.exists()
    result = run_opdlab([*args, "--eval_config", str(tmp_path / "eval.yaml")])
    assert result.code == 0, str(result.code) + result.err[-2000:]
    avgs = {}
    for method in ("full", "random_r0.5"):
        data = json.loads((out / "runs" / method / "seed0" / "eval" / "result.json").read_text())
        avgs[method] = data["mean"]["avg"]["mean"]
    table = (out / "table.md").read_text()
    assert "eval Avg@k" in table
    rows = [line for line in table.splitlines() if line.startswith(("| full", "| random@0.5"))]
    order = sorted(avgs, key=lambda m: -avgs[m])
    assert [r.split("|")[1].strip() for r in rows] == [{"full": "full", "random_r0.5": "random@0.5"}[m] for m in order]
    bad = run_opdlab([*args, "--eval_config", str(tmp_path / "missing.yaml")])
    assert bad.code != 0 and "eval_config" in str(bad.code) and "not found" in str(bad.code)


def test_a_hub_dataset_with_the_hub_off_is_one_line(tmp_path, monkeypatch, no_model):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bench = json.dumps([{"name": "m", "path": "HuggingFaceH4/MATH-500", "split": "test"}])
    result = run_opdlab(["eval", "--model", "toy:add3/student", "--benchmarks", bench, "--max_new_tokens", "8",
                         "--out_dir", str(tmp_path / "o")])
    assert result.code != 0 and "is not a local file or folder and the hub is off" in str(result.code)
