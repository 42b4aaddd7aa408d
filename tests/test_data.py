"""Data: prompt sources (toy task, JSONL), held-out separation, and a resumable prompt stream."""

from __future__ import annotations

import json
from itertools import islice
from types import SimpleNamespace

import pytest

from opdlab.data import PromptDataModule
from opdlab.tasks import AdditionTask, JsonlPrompts
from opdlab.tasks.addition import format_problem
from opdlab.tasks.jsonl import read_jsonl_problems


# ------------------------------------------------------------------------------ AdditionTask
def test_format_problem_is_reversed_addition():
    p = format_problem(123, 456, 3)
    assert (p.prompt, p.answer) == ("321+654=", "9750")
    p = format_problem(5, 7, 2)  # 05 + 07 = 012, each reversed
    assert (p.prompt, p.answer) == ("50+70=", "210")


@pytest.mark.parametrize("digits, num_eval, n_train", [(2, 256, 5000), (3, 256, 3000)])
def test_held_out_problems_never_in_training_stream(digits, num_eval, n_train):
    task = AdditionTask(digits=digits, num_eval=num_eval, seed=0)
    held_out = {p.prompt for p in task.eval_problems()}
    assert len(held_out) == num_eval
    train = [p.prompt for p in islice(task.train_problems(), n_train)]
    # Without the exclusion ~n_train·num_eval/10^(2·digits) (≥ 77 here) would collide.
    assert held_out.isdisjoint(train)
    assert len(set(train)) > n_train // 2  # the stream is not degenerate


def test_addition_stream_is_deterministic_and_index_addressable():
    task = AdditionTask(digits=2, seed=3)
    first = list(islice(task.train_problems(), 20))
    assert first == list(islice(AdditionTask(digits=2, seed=3).train_problems(), 20))
    assert list(islice(task.train_problems(start=7), 13)) == first[7:]
    assert first != list(islice(AdditionTask(digits=2, seed=4).train_problems(), 20))
    assert task.eval_problems() == AdditionTask(digits=2, seed=3).eval_problems()


def test_addition_verify():
    task = AdditionTask(digits=2)
    p = task.eval_problems()[0]
    assert task.verify(p.answer, p.answer) and task.verify(f" {p.answer}\n", p.answer)
    assert not task.verify("", p.answer) and not task.verify(p.answer + "0", p.answer)


@pytest.mark.parametrize("kwargs", [{"digits": 0}, {"digits": 7}, {"digits": 1, "num_eval": 26}, {"num_eval": 0}])
def test_addition_invalid_arguments(kwargs):
    with pytest.raises(ValueError, match="must be in"):
        AdditionTask(**kwargs)


# ------------------------------------------------------------------------------ JSONL
def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_reads_problems_and_skips_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        json.dumps({"prompt": "1+1=", "answer": "2"}), "", json.dumps({"prompt": "2+2=", "answer": 4}),
    ])
    problems = read_jsonl_problems(path)
    assert [(p.prompt, p.answer) for p in problems] == [("1+1=", "2"), ("2+2=", "4")]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"prompt": "x", "answer": ', "not valid JSON"),
        ('["prompt", "x"]', 'string "prompt" field'),
        ('{"question": "x"}', 'string "prompt" field'),
        ('{"prompt": 3}', 'string "prompt" field'),
    ],
)
def test_jsonl_malformed_line_reports_file_and_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps({"prompt": "a", "answer": "1"}), "", bad_line])
    with pytest.raises(ValueError, match=message) as err:
        read_jsonl_problems(path)
    assert f"{path}:3" in str(err.value)


def test_jsonl_prompts_hold_out_last_lines(tmp_path):
    lines = [json.dumps({"prompt": f"q{i}", "answer": str(i)}) for i in range(10)]
    source = JsonlPrompts(str(write_jsonl(tmp_path / "p.jsonl", lines)), num_eval=3)
    assert [p.prompt for p in source.eval_problems()] == ["q7", "q8", "q9"]
    epoch = [p.prompt for p in islice(source.train_problems(), 7)]
    assert sorted(epoch) == [f"q{i}" for i in range(7)]  # each training line once per pass
    two_epochs = [p.prompt for p in islice(source.train_problems(), 14)]
    assert sorted(two_epochs[7:]) == sorted(epoch) and two_epochs[7:] != epoch  # reshuffled
    # Index-addressable: starting mid-stream (mid-pass too) continues the same sequence.
    for start in (3, 7, 9):
        assert [p.prompt for p in islice(source.train_problems(start), 5)] == two_epochs[start : start + 5]


def test_jsonl_prompts_with_eval_file(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [json.dumps({"prompt": "a", "answer": "1"})])
    evals = write_jsonl(tmp_path / "eval.jsonl", [json.dumps({"prompt": "b", "answer": " 2 "})])
    source = JsonlPrompts(str(train), eval_path=str(evals))
    assert [p.prompt for p in source.eval_problems()] == ["b"]
    assert source.verify("2", " 2 ")


def test_jsonl_too_few_lines_to_hold_out(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps({"prompt": "a", "answer": "1"})] * 3)
    with pytest.raises(ValueError, match="too few to hold out num_eval=64"):
        JsonlPrompts(str(path))


# ------------------------------------------------------------------------------ DataModule
def fake_trainer(rank: int = 0, world_size: int = 1):
    return SimpleNamespace(training=True, global_rank=rank, world_size=world_size)


def take_batches(dm: PromptDataModule, n: int) -> list[dict]:
    """Iterate the training loader like the fit loop does (the batch hook counts consumed prompts)."""
    batches = []
    for batch in islice(dm.train_dataloader(), n):
        batches.append(dm.on_before_batch_transfer(batch, 0))
    return batches


def test_datamodule_state_dict_resumes_stream():
    make = lambda: PromptDataModule(AdditionTask(digits=2), batch_size=4)  # noqa: E731
    uninterrupted = make()
    uninterrupted.trainer = fake_trainer()
    expected = take_batches(uninterrupted, 5)
    assert uninterrupted.consumed == 20

    first = make()
    first.trainer = fake_trainer()
    assert take_batches(first, 3) == expected[:3]
    state = first.state_dict()
    assert state == {"consumed": 12}

    resumed = make()
    resumed.trainer = fake_trainer()
    resumed.load_state_dict(state)
    assert resumed.consumed == 12
    assert take_batches(resumed, 2) == expected[3:]
    assert resumed.consumed == 20


def test_datamodule_counts_only_training_batches():
    dm = PromptDataModule(AdditionTask(digits=2), batch_size=4)
    dm.trainer = SimpleNamespace(training=False, global_rank=0, world_size=1)
    dm.on_before_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert dm.consumed == 0


def test_datamodule_ranks_partition_the_stream():
    source = AdditionTask(digits=2)
    single = [p for b in take_batches(PromptDataModule(source, batch_size=4), 4) for p in b["prompts"]]
    per_rank = []
    for rank in (0, 1):
        dm = PromptDataModule(source, batch_size=4)
        dm.trainer = fake_trainer(rank, world_size=2)
        batches = take_batches(dm, 2)
        assert dm.consumed == 2 * 4 * 2  # counts prompts over all ranks
        per_rank.append([p for b in batches for p in b["prompts"]])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(single)
    assert per_rank[0] == single[0::2] and per_rank[1] == single[1::2]


def test_datamodule_validation_batches_are_the_held_out_set():
    source = AdditionTask(digits=2, num_eval=40)
    dm = PromptDataModule(source, batch_size=4, val_batch_size=16)
    batches = list(dm.val_dataloader())
    assert [len(b["prompts"]) for b in batches] == [16, 16, 8]
    assert [p for b in batches for p in b["prompts"]] == [p.prompt for p in source.eval_problems()]
    assert dm.verify(batches[0]["answers"][0], batches[0]["answers"][0])


def test_datamodule_invalid_batch_size():
    with pytest.raises(ValueError, match="batch sizes must be >= 1"):
        PromptDataModule(batch_size=0)


# ------------------------------------------------------------------------------ the test split
def test_addition_test_split_is_disjoint_and_leaves_the_eval_set_unchanged():
    task, without = AdditionTask(digits=2, num_eval=32, num_test=64), AdditionTask(digits=2, num_eval=32, num_test=0)
    assert task.eval_problems() == without.eval_problems()  # adding a test split does not move validation
    test = {p.prompt for p in task.test_problems()}
    assert len(test) == 64 and not test & {p.prompt for p in task.eval_problems()}
    train = {task.problem_at(i).prompt for i in range(5000)}
    assert not train & test
    assert without.test_problems() is None


def test_test_dataloader_serves_the_test_split_or_says_there_is_none(tmp_path):
    dm = PromptDataModule(AdditionTask(digits=2, num_eval=16, num_test=8), val_batch_size=4)
    batches = list(dm.test_dataloader())
    assert sum(len(b["prompts"]) for b in batches) == 8
    assert {p for b in batches for p in b["prompts"]} == {p.prompt for p in dm.source.test_problems()}
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps({"prompt": f"{i}", "answer": "1"}) for i in range(10)])
    with pytest.raises(ValueError, match="JsonlPrompts has no test split.*test_path"):
        PromptDataModule(JsonlPrompts(str(path), num_eval=2)).test_dataloader()
    source = JsonlPrompts(str(path), num_eval=2, test_path=str(path))
    assert len(source.test_problems()) == 10
