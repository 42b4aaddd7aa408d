"""A teacher on a server (`--model.teacher http://...`): the top-k maths against the exact teacher, the
declared needs, and fits against a loopback stand-in for vLLM's server (tests/fake_vllm.py), including every
way a server can be wrong. The real vLLM server: tests/test_served_teacher_vllm.py (vllm environment).
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from conftest import CONFIG_DIR, run_opdlab
from fake_vllm import FakeVLLM

from opdlab import plugins
from opdlab.data import PromptDataModule
from opdlab.divergences import ForwardKL, ReverseKL, SampledTokenOPD
from opdlab.heads import Workspace
from opdlab.maths import masked_kl, tail_bucket_forward_kl
from opdlab.module import OPDModule
from opdlab.scoring import chunk_stats
from opdlab.selectors import DivergenceSelector, TeachabilitySelector
from opdlab.tasks import AdditionTask
from opdlab.teachers import LocalTeacher, SparseRows, TeacherNeedError, VLLMServerTeacher
from opdlab.testing import top_logprobs_of

FAST = str(CONFIG_DIR / "fast.yaml")
V = 24


def random_logits(rows: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(rows, V, generator=gen) * 2, torch.randn(rows, V, generator=gen) * 3
    return student, teacher, torch.randint(0, V, (rows,), generator=gen)


# --------------------------------------------------------------------------------------------- the maths
@pytest.mark.parametrize("k", [1, 4, 8])
def test_top_k_statistics_bound_and_approximate_the_exact_ones(k):
    """Token log-probs and H exact; lower <= C <= upper; D finite and exact once the teacher's known ids hold
    all its mass."""
    student, teacher, tokens = random_logits()
    exact = chunk_stats(student, teacher, tokens, 8, False, Workspace(40), True)
    top = chunk_stats(student, SparseRows(top_logprobs_of(teacher, tokens, k)), tokens, 8, False, Workspace(40), True)
    for name in ("student_token_logp", "teacher_token_logp", "topk_entropy", "student_entropy"):
        torch.testing.assert_close(top[name], exact[name])
    assert (top["compatibility"] <= exact["compatibility"] + 1e-6).all()
    assert (exact["compatibility"] <= top["compatibility_upper"] + 1e-6).all()
    assert torch.isfinite(top["disagreement"]).all() and (top["disagreement"] >= -1e-6).all()
    assert torch.isnan(top["teacher_entropy"]).all()  # not knowable from a top-k


def test_top_k_statistics_are_exact_when_the_top_k_covers_the_teacher():
    student, teacher, tokens = random_logits()
    teacher[:, 8:] = -torch.inf  # all teacher mass on 8 ids: a top-8 is the whole distribution
    exact = chunk_stats(student, teacher, tokens, 8, False, Workspace(40), False)
    top = chunk_stats(student, SparseRows(top_logprobs_of(teacher, tokens, 8)), tokens, 8, False, Workspace(40), False)
    for name in ("compatibility", "disagreement", "teacher_token_logp"):
        torch.testing.assert_close(top[name], exact[name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(top["compatibility_upper"], exact["compatibility"], atol=1e-5, rtol=1e-5)


def test_tail_bucket_forward_kl_is_a_divergence_and_exact_for_a_complete_teacher():
    student, teacher, tokens = random_logits()
    s = torch.log_softmax(student, -1).requires_grad_(True)
    top = top_logprobs_of(teacher, tokens, 8)
    loss = tail_bucket_forward_kl(s, top.ids, top.logp, top.known)
    assert (loss >= -1e-6).all() and torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(s.grad).all()
    same = top_logprobs_of(teacher, tokens, 8)
    t = torch.log_softmax(teacher, -1)
    torch.testing.assert_close(tail_bucket_forward_kl(t, same.ids, same.logp, same.known), torch.zeros(40), atol=1e-5, rtol=0)
    full = top_logprobs_of(teacher, tokens, V)  # every id known: no tail, the exact forward KL
    torch.testing.assert_close(tail_bucket_forward_kl(s.detach(), full.ids, full.logp, full.known),
                               masked_kl(t, s.detach()), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------- declared needs
@pytest.mark.parametrize("group", ["opdlab.selectors", "opdlab.divergences"])
def test_every_registered_component_is_accepted_or_refused_by_its_declared_needs(group, tiny_checkpoints):
    """A top-k placement takes a component iff it declares "topk" or less; the refusal is one line naming it. The
    check runs once the placement has connected (what the server serves decides), before any weights load."""
    role = "selector" if group == "opdlab.selectors" else "divergence"
    with FakeVLLM(tiny_checkpoints.teacher, max_logprobs=8) as server:
        for name, plugin in plugins.discover(group).items():
            component = plugin.cls()
            need = component.teacher_needs
            module = OPDModule(student=tiny_checkpoints.student, teacher=server.url,
                               teacher_placement=VLLMServerTeacher(top_logprobs=4), **{role: component})
            if need == "full":
                with pytest.raises(TeacherNeedError, match=f"the {role} {type(component).__name__} needs") as err:
                    module.connect_teacher()
                assert "\n" not in str(err.value) and "top-4" in str(err.value), name
            else:
                module.connect_teacher()
            assert module.student is None  # refused or accepted: no weights loaded


def test_a_server_that_sends_the_whole_vocabulary_serves_what_needs_it(tiny_checkpoints):
    """The needs check runs after connect: top-20 covers the tiny vocabulary, the placement asks for all of it, and
    reverse KL (which needs the whole distribution) is accepted; the same server asked for top-4 refuses it."""
    with FakeVLLM(tiny_checkpoints.teacher, max_logprobs=-1) as server:
        module = OPDModule(student=tiny_checkpoints.student, teacher=server.url, divergence=ReverseKL())
        module.connect_teacher()
        assert module.placement.signal.top_logprobs is None
        refused = OPDModule(student=tiny_checkpoints.student, teacher=server.url, divergence=ReverseKL(),
                            teacher_placement=VLLMServerTeacher(top_logprobs=4))
        with pytest.raises(TeacherNeedError, match="needs the teacher's whole distribution"):
            refused.connect_teacher()


def test_needs_follow_options_not_names():
    assert DivergenceSelector(full_vocab=True).teacher_needs == "full"
    assert DivergenceSelector().teacher_needs == "topk"
    assert ForwardKL().teacher_needs == "topk" and ForwardKL(temperature=2.0).teacher_needs == "full"
    assert SampledTokenOPD().teacher_needs == "token" and ReverseKL().teacher_needs == "full"


def test_placement_and_teacher_string_must_agree(tiny_checkpoints):
    with pytest.raises(ValueError, match="is an address, and the local teacher placement loads a model"):
        OPDModule(student=tiny_checkpoints.student, teacher="http://127.0.0.1:9/v1", teacher_placement=LocalTeacher())
    with pytest.raises(ValueError, match="needs --model.teacher to be the server's URL"):
        OPDModule(student=tiny_checkpoints.student, teacher=tiny_checkpoints.teacher,
                  teacher_placement=VLLMServerTeacher())
    for bad in ({"top_logprobs": 0}, {"top_logprobs": "all"}, {"max_concurrency": 0}, {"timeout_s": -1.0},
                {"max_retries": -1}, {"rows_per_request": 0}, {"timeout_s": math.nan}):
        with pytest.raises(ValueError):
            VLLMServerTeacher(**bad)


# --------------------------------------------------------------------------------------------- against a server
def first_step_loss(student: str, teacher: str, placement=None, **kwargs) -> float:
    module = OPDModule(student=student, teacher=teacher, teacher_placement=placement,
                       optimizer=lambda params: torch.optim.SGD(params, lr=0.1), rollout={"max_new_tokens": 4}, **kwargs)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[Record()])
    trainer.fit(module, datamodule=PromptDataModule(AdditionTask(digits=2), batch_size=8))
    return losses[0]


@pytest.mark.parametrize("selector", [None, TeachabilitySelector(ratio=0.3, top_k=4)], ids=["full", "ta_opd"])
def test_full_vocabulary_server_gives_the_local_teachers_first_step_loss(tiny_checkpoints, selector):
    with FakeVLLM(tiny_checkpoints.teacher, max_logprobs=-1) as server:
        served = first_step_loss(tiny_checkpoints.student, server.url, VLLMServerTeacher(top_logprobs="full"),
                                 selector=selector, divergence=ReverseKL())
    local = first_step_loss(tiny_checkpoints.student, tiny_checkpoints.teacher, selector=selector, divergence=ReverseKL())
    assert served == pytest.approx(local, rel=1e-4)


def test_top_k_server_trains_with_the_losses_it_can_serve(tiny_checkpoints):
    with FakeVLLM(tiny_checkpoints.teacher, max_logprobs=8) as server:
        sampled = first_step_loss(tiny_checkpoints.student, server.url, VLLMServerTeacher(top_logprobs=8))
        forward = first_step_loss(tiny_checkpoints.student, server.url, VLLMServerTeacher(top_logprobs=8),
                                  divergence=ForwardKL(), selector=TeachabilitySelector(ratio=0.3, top_k=4))
    # the sampled-token loss needs only the sampled token's log-prob: exact, the local teacher's
    assert sampled == pytest.approx(first_step_loss(tiny_checkpoints.student, tiny_checkpoints.teacher), rel=1e-4)
    assert math.isfinite(forward) and forward > 0


def fit_args(tmp_path, teacher: str, *extra: str) -> list[str]:
    return ["fit", "--config", FAST, "--model.student", "toy:add2/student", "--model.teacher", teacher,
            "--model.divergence", "sampled_token", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
            "--data.batch_size", "8", "--data.val_batch_size", "16", "--data.source.init_args.num_eval", "16",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), *extra]


@pytest.fixture(scope="module")
def add2_teacher():
    from opdlab.models import resolve_model_path

    return resolve_model_path("toy:add2/teacher")


def error_line(result) -> str:
    message = str(result.code)
    assert message.startswith("opdlab: error: "), (message, result.err[-1500:])
    assert "Traceback" not in result.err, result.err[-1500:]
    return message.splitlines()[0]


def test_fit_against_a_server_logs_the_wire_and_the_teacher(tmp_path, add2_teacher):
    with FakeVLLM(add2_teacher) as server:
        result = run_opdlab(fit_args(tmp_path, server.url, "--model.teacher_placement.top_logprobs", "4",
                                     "--trainer.logger", "opdlab.loggers.CSVLogger", "--trainer.log_every_n_steps", "1"))
    assert result.code == 0, result.err[-2000:]
    metrics = next((tmp_path / "runs").rglob("metrics.csv")).read_text()
    assert "teacher/wire_bytes_per_token" in metrics and "val/teacher_accuracy" in metrics


@pytest.mark.parametrize(("fake", "extra", "expected"), [
    ({"max_logprobs": 4}, ["--model.teacher_placement.top_logprobs", "8"], "restart it with --max-logprobs 8"),
    ({"prompt_logprobs": False}, [], "returned no prompt log-probs"),
    ({"max_model_len": 8}, [], "restart it with --max-model-len"),
], ids=["too_few_logprobs", "no_prompt_logprobs", "short_max_model_len"])
def test_an_unusable_server_is_refused_before_training(tmp_path, add2_teacher, fake, extra, expected):
    with FakeVLLM(add2_teacher, **fake) as server:
        result = run_opdlab(fit_args(tmp_path, server.url, *extra))
        assert server.answered <= 1  # refused at the checks, before any training request
    assert expected in error_line(result)


def test_a_server_of_another_model_is_refused(tmp_path):
    """The student served where the teacher was named: same tokenizer, so only the name can tell."""
    from opdlab.models import resolve_model_path

    with FakeVLLM(resolve_model_path("toy:add2/student"), served_name="add2-student") as server:
        result = run_opdlab(fit_args(tmp_path, server.url, "--model.teacher_placement.model", "toy:add2/teacher"))
        assert server.answered == 0
    assert "serves add2-student (loaded from" in error_line(result) and "not 'toy:add2/teacher'" in error_line(result)


def test_a_server_of_another_tokenizer_is_refused(tmp_path):
    from opdlab.models import resolve_model_path

    with FakeVLLM(resolve_model_path("toy:spell2/teacher")) as server:  # letters as well as digits: another vocabulary
        result = run_opdlab(fit_args(tmp_path, server.url))
    line = error_line(result)  # spell2's first ids are add2's: the letters past them tell
    assert "tokenizes differently from the student's tokenizer" in line or "has a larger vocabulary" in line, line


@pytest.mark.parametrize(("teacher", "expected"), [
    ("http://127.0.0.1:9/v1", "no teacher server answers at http://127.0.0.1:9/v1"),
    ("http://", "not an http(s) URL"),
    ("http://127.0.0.1:99999/v1", "bad port"),
], ids=["nothing_listening", "no_host", "bad_port"])
def test_bad_urls_are_one_line(tmp_path, teacher, expected):
    assert expected in error_line(run_opdlab(fit_args(tmp_path, teacher)))


def test_a_path_that_is_not_the_api_is_one_line(tmp_path, add2_teacher):
    with FakeVLLM(add2_teacher) as server:
        result = run_opdlab(fit_args(tmp_path, server.url.replace("/v1", "/nope")))
    assert "is not an OpenAI-compatible server" in error_line(result)


def test_a_server_that_dies_mid_run_ends_the_fit_with_one_line_and_keeps_the_checkpoints(tmp_path, add2_teacher):
    """Dead after 4 completions (the check, the teacher's validation answers, 2 training steps): step 3 fails after
    its retries, naming the step; the checkpoint of step 2 is still there."""
    with FakeVLLM(add2_teacher, fail_after=4) as server:
        result = run_opdlab(fit_args(tmp_path, server.url, "--trainer.max_steps", "5", "--trainer.val_check_interval",
                                     "5", "--model.teacher_placement.max_retries", "2",
                                     "--model.teacher_placement.retry_backoff_s", "0.01",
                                     "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                                     "--trainer.callbacks.every_n_train_steps=2"))
    line = error_line(result)
    assert "stopped answering" in line and "HTTP 503" in line and "in training step 3 (2 steps completed" in line and "--resume" in line
    assert list((tmp_path / "runs").rglob("*step=2.ckpt")), "the checkpoint of step 2 is gone"


@pytest.mark.slow  # DDP's rendezvous port raced an HTTP connection's ephemeral port once in a fresh clone: not in CI
def test_two_processes_against_two_servers_match_one_local_process(tiny_checkpoints, tmp_path):
    """DDP over 2 CPU processes, each scoring its own rows on two servers round-robin, gives the losses of one
    process with the local teacher (selection and normalisation stay global)."""
    from step_recorder import read_records
    from test_distributed import fit_subprocess

    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    with FakeVLLM(tiny_checkpoints.teacher) as a, FakeVLLM(tiny_checkpoints.teacher) as b:
        served = ["--model.teacher", f"{a.url},{b.url}", "--model.teacher_placement.top_logprobs", "full",
                  "--model.teacher_placement.rows_per_request", "2"]
        _, two = fit_subprocess(tiny_checkpoints, tmp_path, "two", [*ddp, *served], batch_size=4)
        assert a.answered > 1 and b.answered > 1  # both servers took requests
    _, one = fit_subprocess(tiny_checkpoints, tmp_path, "one", [], batch_size=8)
    single, rank0 = read_records(one), read_records(two, 0)
    assert [r["loss"] for r in rank0] == pytest.approx([r["loss"] for r in single], rel=1e-4, abs=1e-6)


def test_micro_batches_with_a_served_teacher_do_not_change_the_loss(tiny_checkpoints):
    with FakeVLLM(tiny_checkpoints.teacher) as server:
        kwargs = {"selector": TeachabilitySelector(ratio=0.3, top_k=4), "divergence": ForwardKL()}
        whole = first_step_loss(tiny_checkpoints.student, server.url, VLLMServerTeacher(top_logprobs=8), **kwargs)
        parts = first_step_loss(tiny_checkpoints.student, server.url, VLLMServerTeacher(top_logprobs=8),
                                memory={"micro_batch_size": 3}, **kwargs)
    assert parts == pytest.approx(whole, rel=1e-5)


def test_a_server_slower_than_the_timeout_is_one_line(tmp_path, add2_teacher):
    with FakeVLLM(add2_teacher, delay_s=1.0) as server:
        result = run_opdlab(fit_args(tmp_path, server.url, "--model.teacher_placement.timeout_s", "0.2"))
    line = error_line(result)
    assert "timed out" in line and server.url in line
