"""Placements own their teacher strings and their lifetime: which placement a `--model.teacher` string implies is
each placement's own `accepts`, and `close()` ends a served teacher's threads and requests at fit end and on
failure (a retry waiting out its back-off included)."""

from __future__ import annotations

import threading
import time

import lightning as L
import pytest
from fake_vllm import FakeVLLM

from opdlab import plugins
from opdlab.data import PromptDataModule
from opdlab.module import OPDModule
from opdlab.tasks import AdditionTask
from opdlab.teachers import LocalTeacher, TeacherServerError, VLLMServerTeacher
from opdlab.teachers.base import TeacherPlacement


class SGLangTeacher(VLLMServerTeacher):
    """A plugin placement that claims its own scheme."""

    name = "sglang"

    @classmethod
    def accepts(cls, teacher: str) -> bool:
        return teacher.startswith("sglang://")


@pytest.fixture
def with_sglang_plugin(monkeypatch):
    found = dict(plugins.discover("opdlab.teacher_placements"))
    found["sglang"] = plugins.Plugin("sglang", "opdlab.teacher_placements", SGLangTeacher, "sglang-plugin", "x:y")
    real = plugins.discover
    monkeypatch.setattr(plugins, "discover", lambda group: found if group == "opdlab.teacher_placements" else real(group))


@pytest.mark.parametrize("teacher, placement", [
    ("toy:add2/teacher", LocalTeacher), ("./checkpoints/teacher", LocalTeacher), ("Qwen/Qwen3-1.7B", LocalTeacher),
    ("http://127.0.0.1:8000/v1", VLLMServerTeacher), ("https://a/v1, https://b/v1", VLLMServerTeacher),
])
def test_the_placement_a_teacher_string_implies_is_the_one_that_accepts_it(teacher, placement):
    assert type(plugins.default_placement(teacher)) is placement


def test_a_plugin_claims_its_own_scheme_and_an_unclaimed_scheme_is_one_line(with_sglang_plugin):
    assert type(plugins.default_placement("sglang://127.0.0.1:30000")) is SGLangTeacher
    assert plugins.placement_name_for("sglang://host:1") == "sglang"
    with pytest.raises(ValueError, match=r"no teacher placement accepts teacher 'grpc://x' \(installed: local, sglang, "
                                         r"vllm_server\)") as err:
        plugins.default_placement("grpc://x")
    assert "\n" not in str(err.value)


def test_what_the_run_needs_sets_up_the_placement():
    assert VLLMServerTeacher.accepts("http://h/v1") and not LocalTeacher.accepts("http://h/v1")
    assert plugins.default_placement("http://h/v1", need="full").top_logprobs == "full"
    assert plugins.default_placement("http://h/v1").top_logprobs == 20
    assert TeacherPlacement.for_needs.__func__(LocalTeacher, "full").signal.top_logprobs is None


def teacher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("opdlab-teacher") and t.is_alive()]


def test_a_fit_closes_its_served_teacher(tiny_checkpoints):
    with FakeVLLM(tiny_checkpoints.teacher, max_logprobs=-1) as server:
        module = OPDModule(student=tiny_checkpoints.student, teacher=server.url, rollout={"max_new_tokens": 4},
                           teacher_placement=VLLMServerTeacher(top_logprobs="full"))
        trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0)
        trainer.fit(module, datamodule=PromptDataModule(AdditionTask(digits=2), batch_size=4))
        assert module.placement.pool is None and module.placement.stop.is_set()
        deadline = time.monotonic() + 5
        while teacher_threads() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not teacher_threads(), "the teacher's request threads outlived the fit"


def test_a_failed_fit_closes_its_served_teacher_too(tiny_checkpoints):
    with FakeVLLM(tiny_checkpoints.teacher, max_logprobs=-1, fail_after=1) as server:
        module = OPDModule(student=tiny_checkpoints.student, teacher=server.url, rollout={"max_new_tokens": 4},
                           teacher_placement=VLLMServerTeacher(top_logprobs="full", max_retries=0))
        trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0)
        with pytest.raises(TeacherServerError, match="in training step 1"):
            trainer.fit(module, datamodule=PromptDataModule(AdditionTask(digits=2), batch_size=4))
        assert module.placement.pool is None and module.placement.stop.is_set()


def test_close_ends_a_request_that_waits_out_its_retries(tiny_module, tiny_checkpoints):
    """A server gone after the checks: the request would retry 3 times over 1 + 2 + 4 s of back-off; close() ends it
    at once, and the placement opens again on its next request."""
    with FakeVLLM(tiny_checkpoints.teacher, max_logprobs=-1) as server:
        placement = VLLMServerTeacher(top_logprobs="full", max_retries=3, retry_backoff_s=1.0, timeout_s=2.0)
        placement.connect(server.url, tiny_module.tokenizer, 64)
        placement.load(tiny_module.student, tiny_module.tokenizer, None)
    rollout = tiny_module.rollout(tiny_module.encode({"prompts": ["1+2="], "answers": ["3"]}))
    pending = placement.request(rollout)
    time.sleep(0.3)  # the first try has failed: the request waits to retry
    started = time.monotonic()
    placement.close()
    with pytest.raises(TeacherServerError):
        pending.rows(slice(0, 1))
    assert time.monotonic() - started < 1.0, "close() left the request waiting out its back-off"
    assert placement.request(rollout).futures, "a closed placement opens again on its next request"
    placement.close()


def test_placement_options_without_a_name_go_to_the_placement_that_accepts_the_teacher(with_sglang_plugin, tmp_path):
    from opdlab.fit_cli import implied_placement

    option = ["--model.teacher_placement.timeout_s", "5"]
    assert implied_placement(["--model.teacher", "http://h/v1", *option]) == [
        "--model.teacher", "http://h/v1", "--model.teacher_placement", "vllm_server", *option]
    assert implied_placement(["--model.teacher=sglang://h:1", *option])[1:3] == ["--model.teacher_placement", "sglang"]
    config = tmp_path / "served.yaml"
    config.write_text("model:\n  teacher: sglang://h:1\n")
    assert implied_placement(["--config", str(config), *option])[2:4] == ["--model.teacher_placement", "sglang"]
    named = ["--model.teacher", "http://h/v1", "--model.teacher_placement", "vllm_server", *option]
    assert implied_placement(named) == named  # a named placement is left alone


def test_an_empty_teacher_and_options_for_an_unclaimed_scheme_are_one_line_each():
    from opdlab.fit_cli import implied_placement

    for teacher in ("", "  "):
        with pytest.raises(ValueError, match="--model.teacher is empty"):
            plugins.default_placement(teacher)
        with pytest.raises(ValueError, match="--model.teacher is empty"):
            LocalTeacher().check_spec(teacher)
    with pytest.raises(ValueError, match="no teacher placement accepts teacher 'grpc://x'"):
        implied_placement(["--model.teacher", "grpc://x", "--model.teacher_placement.timeout_s", "5"])
