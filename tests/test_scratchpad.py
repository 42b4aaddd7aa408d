"""The long-response task: scratchpad addition (generator, verifier, demonstrations)."""

from __future__ import annotations

import pytest

from opdlab.tasks.scratchpad import ScratchpadAdditionTask, final_answer, work


def test_work_known_example():
    # 1234 + 5678 = 6912, operands written least-significant digit first.
    assert work("4321+8765=") == "4+8+0=2c1|3+7+1=1c1|2+6+1=9c0|1+5+0=6c0|:21960"
    assert work("4321+8765=", swapped={0, 2}) == "8+4+0=2c1|3+7+1=1c1|6+2+1=9c0|1+5+0=6c0|:21960"


def test_responses_are_long_and_answers_are_the_additions():
    task = ScratchpadAdditionTask(digits=4, num_eval=32)
    for problem in task.eval_problems():
        response = work(problem.prompt)
        assert len(response) == 10 * 4 + 1 + 5
        assert task.verify(response, problem.answer)
        a, b = problem.prompt.rstrip("=").split("+")
        assert int(final_answer(response)[::-1]) == int(a[::-1]) + int(b[::-1])
    assert task.max_response_tokens >= len(response) + 1  # room for EOS


@pytest.mark.parametrize("response,ok", [
    ("4+8+0=2c1|3+7+1=1c1|2+6+1=9c0|1+5+0=6c0|:21960", True),
    ("anything at all:21960", True),       # only the answer is checked: any way of writing the steps
    (" :21960 ", True),
    ("4+8+0=2c1|:21961", False),           # wrong answer
    ("4+8+0=2c1|3+7+1=1c1|2+6+1=9c0|1+5+0=6c0|", False),  # no answer
    ("", False),
    (":2196", False),                      # truncated
])
def test_verifier(response, ok):
    assert ScratchpadAdditionTask(digits=4, num_eval=8).verify(response, "21960") is ok


def test_demonstrations_are_deterministic_and_swap_at_the_asked_rate():
    task = ScratchpadAdditionTask(digits=4, num_eval=8, swap_prob=0.5)
    first = [task.demonstration(i) for i in range(200)]
    assert first == [task.demonstration(i) for i in range(200)]
    unswapped = [work(p) for p, _, _ in first]
    swapped_steps = sum(a[j] != b[j] for (_, _, a), b in zip(first, unswapped, strict=True) for j in range(0, 40, 10))
    assert 0.35 < swapped_steps / (200 * 4) < 0.65  # ties (a == b) count as unswapped
    assert all(task.verify(target, task.problem_at(i).answer) for i, (_, _, target) in enumerate(first))
    with pytest.raises(ValueError, match="swap_prob"):
        ScratchpadAdditionTask(swap_prob=1.5)


def test_carry_mark_style_is_one_per_demonstration_and_verifies():
    """mix4's teacher: each demonstration writes every carry after 'c' or every one after '=', about half each;
    both verify (only the answer after ':' is read)."""
    from opdlab.tasks.scratchpad import work

    task = ScratchpadAdditionTask(digits=4, num_eval=8, carry_mark_prob=0.5)
    kinds = []
    for i in range(200):
        prompt, _, target = task.demonstration(i)
        assert target in (work(prompt), work(prompt, carry_mark="="))
        assert task.verify(target, task.problem_at(i).answer)
        kinds.append(target == work(prompt, carry_mark="="))
    assert 0.35 < sum(kinds) / len(kinds) < 0.65
    assert work("12+34=", carry_mark="=") == "1+3+0=4=0|2+4+0=6=0|:460"
    with pytest.raises(ValueError, match="carry_mark_prob"):
        ScratchpadAdditionTask(carry_mark_prob=2.0)


def test_tiny_fit_on_the_scratchpad_task(tiny_checkpoints, tmp_path):
    """The long-response task through `opdlab fit` end to end (tiny random models: nothing is learned)."""
    from conftest import CONFIG_DIR, run_opdlab

    result = run_opdlab([
        "fit", "--config", str(CONFIG_DIR / "ta_opd_long.yaml"), "--model.student", tiny_checkpoints.student,
        "--model.teacher", tiny_checkpoints.teacher, "--trainer.max_steps", "2", "--trainer.logger", "false",
        "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir",
        str(tmp_path), "--data.batch_size", "4", "--data.val_batch_size", "16", "--data.source.init_args.num_eval", "16",
        "--trainer.val_check_interval", "1000", "--model.rollout.max_new_tokens", "50",
    ])
    assert result.code == 0, result.err[-3000:]
    assert "steps: 2" in result.out
