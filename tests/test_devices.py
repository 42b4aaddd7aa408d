"""Device-correct by construction: every tensor of the teacher's rows is on the student's device when the step reads
it. The CPU has one device, so these tests use a second device type, `meta` (tensors with shapes and no data): rows
built or moved anywhere else than where they are asked for fail here."""

from __future__ import annotations

import pytest
import torch
from fake_vllm import FakeVLLM

from opdlab.teachers import DenseRows, HeadRows, PendingTeacher, SparseRows, TeacherError, VLLMServerTeacher
from opdlab.teachers.base import TeacherPlacement
from opdlab.teachers.rows import to_device
from opdlab.teachers.session import TeacherSession
from opdlab.testing import top_logprobs_of

META = torch.device("meta")


def every_kind_of_rows() -> dict:
    logits = torch.randn(6, 16)
    return {"head": HeadRows(torch.randn(6, 8), torch.nn.Linear(8, 16)), "dense": DenseRows(logits.log_softmax(-1)),
            "sparse": SparseRows(top_logprobs_of(logits, torch.arange(6), 4))}


@pytest.mark.parametrize("kind", ["head", "dense", "sparse"])
def test_every_kind_of_rows_moves_every_tensor(kind):
    rows = every_kind_of_rows()[kind]
    assert to_device(rows, torch.device("cpu")) is rows  # already there: no copy
    moved = to_device(rows, META)
    assert len(moved) == len(rows) and all(t.device == META for t in moved.tensors())
    assert all(t.device == META for t in moved[1:3].tensors())  # indexing keeps the device


class Pending(PendingTeacher):
    """A plugin's pending teacher that answers on the CPU, whatever the student's device."""

    def __init__(self, rows) -> None:
        self.answer = rows

    def rows(self, rows: slice):
        return self.answer


def test_the_session_hands_the_step_rows_on_the_students_device():
    session = TeacherSession(placement=None, where=lambda: "in training step 1")
    for rows in every_kind_of_rows().values():
        got = session.rows(Pending(rows), slice(0, 1), META)
        assert all(t.device == META for t in got.tensors()), type(rows).__name__


def test_the_module_asks_for_rows_on_its_students_device(tiny_module, monkeypatch):
    """`hidden_states` passes the student's device to the session (a wrong device would be moved to, not read)."""
    asked = []
    original = TeacherSession.rows
    monkeypatch.setattr(TeacherSession, "rows", lambda self, p, r, device: asked.append(device) or original(self, p, r, device))
    prompts = tiny_module.encode({"prompts": ["12+34=", "5+6="], "answers": ["64", "11"]})
    rollout = tiny_module.rollout(prompts)
    tiny_module.hidden_states(rollout, tiny_module.plan(rollout.response_mask.shape[0]))
    assert asked and all(d == next(tiny_module.student.parameters()).device for d in asked)


@pytest.mark.parametrize("top_logprobs", ["full", 4])
def test_a_served_teachers_rows_are_laid_out_on_the_rollouts_device(tiny_module, tiny_checkpoints, top_logprobs):
    prompts = tiny_module.encode({"prompts": ["12+34=", "5+6="], "answers": ["64", "11"]})
    rollout = tiny_module.rollout(prompts)
    with FakeVLLM(tiny_checkpoints.teacher, max_logprobs=-1) as server:
        placement = VLLMServerTeacher(top_logprobs=top_logprobs)
        placement.connect(server.url, tiny_module.tokenizer, 64)
        placement.load(tiny_module.student, tiny_module.tokenizer, None)
        pending = placement.request(rollout)
        assert pending.device == rollout.input_ids.device
        pending.device = META  # as if the rollout (and the student) lived on another device
        rows = pending.rows(slice(0, rollout.response_mask.shape[0]))
        placement.close()
    assert rows.tensors() and all(t.device == META for t in rows.tensors())


def test_a_plugin_placements_failure_is_one_line_naming_it_and_the_step():
    class Broken(TeacherPlacement):
        name = "broken"
        signal = connect = load = generate = None

        def request(self, rollout):
            raise ConnectionError("socket closed\n  at line 3")

    session = TeacherSession(Broken(), where=lambda: "in training step 3 (2 steps completed)")
    with pytest.raises(TeacherError) as err:
        session.request(None)
    assert str(err.value) == ("teacher placement broken failed in training step 3 (2 steps completed): "
                              "ConnectionError: socket closed at line 3")
