"""The second toy task: every spelling of the right sum verifies, demonstrations follow each role's
spelling policy, the toy registry wires it up, and (slow) the `spell2` toy builds and passes its gates."""

from __future__ import annotations

import json

import pytest

import opdlab.toy as toy
from opdlab.tasks import AdditionTask, SpelledAdditionTask
from opdlab.tasks.spelled_addition import LETTERS, canonical, spell
from opdlab.toy import build_char_tokenizer, demonstration, make_task, supervised_batch


def test_verify_accepts_every_spelling_and_nothing_else():
    task = SpelledAdditionTask(digits=2)
    problem = task.eval_problems()[0]
    answer = problem.answer
    spellings = {spell(answer, [(mask >> i) & 1 for i in range(len(answer))]) for mask in range(2 ** len(answer))}
    assert len(spellings) == 2 ** len(set(range(len(answer))))  # 8 spellings of a 3-character answer
    for s in spellings:
        assert task.verify(s, answer) and task.verify(f" {s}\n", answer)
    wrong = str((int(answer[0]) + 1) % 10) + answer[1:]
    for bad in (wrong, spell(wrong, [True] * 3), answer[:-1], answer + "0", "", "k" + answer[1:]):
        assert not task.verify(bad, answer), bad


def test_spelled_task_has_the_addition_problems():
    spelled, plain = SpelledAdditionTask(digits=2, seed=3), AdditionTask(digits=2, seed=3)
    assert spelled.eval_problems() == plain.eval_problems()
    assert [spelled.problem_at(i) for i in range(5)] == [plain.problem_at(i) for i in range(5)]
    assert canonical("gea") == "640" and spell("640", [True, False, True]) == "g4a" and LETTERS[6] == "g"


def test_demonstrations_follow_the_role_spellings():
    student = SpelledAdditionTask(digits=2, letter_prob=[1.0, 0.5, 0.0])
    teacher = SpelledAdditionTask(digits=2, letter_prob=[0.0, 0.0, 0.0], context_letter_prob=0.5)
    mixed = []
    for i in range(200):
        _, context, target = student.demonstration(i)
        assert context == target and student.verify(target, student.problem_at(i).answer)
        assert target[0] in LETTERS and target[2].isdigit()
        mixed.append(target[1] in LETTERS)
        _, context, target = teacher.demonstration(i)
        assert target == teacher.problem_at(i).answer  # the teacher always answers in digits ...
        assert canonical(context) == target  # ... after contexts spelled at random
    assert 0.3 < sum(mixed) / len(mixed) < 0.7
    assert student.demonstration(7) == student.demonstration(7)


def test_bad_spelling_policies_are_refused():
    with pytest.raises(ValueError, match="letter_prob must hold 3 probabilities"):
        SpelledAdditionTask(digits=2, letter_prob=[1.0, 0.0])
    with pytest.raises(ValueError, match="context_letter_prob"):
        SpelledAdditionTask(digits=2, context_letter_prob=1.5)


def test_toy_registry_builds_role_tasks_and_batches():
    spec = toy.TOYS["spell2"]
    student, teacher = make_task(spec, 0, "student"), make_task(spec, 0, "teacher")
    assert isinstance(student, SpelledAdditionTask) and student.letter_prob == [1.0, 0.5, 0.0]
    assert teacher.context_letter_prob == 0.5
    tokenizer = build_char_tokenizer(SpelledAdditionTask.charset)
    ids, labels = supervised_batch(tokenizer, teacher, 0, 4)
    prompt, context, target = demonstration(teacher, 0)
    n = len(prompt)
    assert tokenizer.decode(ids[0, n:-1]) == context and tokenizer.decode(labels[0, n:-1]) == target
    assert (labels[:, :n] == -100).all() and (labels[:, -1] == tokenizer.eos_token_id).all()
    # add2/add3 keep their task and their one spelling
    plain = make_task(toy.TOYS["add2"], 0, "student")
    assert type(plain) is AdditionTask
    _, c, t = demonstration(plain, 5)
    assert c == t == plain.problem_at(5).answer


@pytest.mark.slow
def test_spell2_builds_and_passes_gates(tmp_path):
    """The real build (seed 0): ~1-2 min on 2 idle cores. Run with `pytest -m slow`."""
    path = toy.build_toy("spell2", cache_dir=tmp_path, seed=0)
    report = json.loads((path / "build.json").read_text())
    assert report["teacher"]["accuracy"] >= 0.95
    assert 0.20 <= report["student"]["accuracy"] <= 0.60
    assert path.name == f"spell2-v{toy.TOYS['spell2'].version}-seed0"
