"""Bounded-staleness asynchronous rollouts (`--model.pipeline.*`): the schedule, its exactness, resume, failures.

Every run is `opdlab fit` on the tiny checkpoints (configs/fast.yaml with 4 or 5 steps). What each test pins:
- N = 0 is the synchronous loop, and the pipeline's own machinery at N = 0 (forced) trains exactly its losses;
- the `process` producer (a worker process, weights through shared memory) trains exactly the `inline` producer's
  losses: same rollouts, same policy versions, only the overlap differs;
- the rollouts trained at step t were sampled with the policy of step max(t - N, 1), logged as rollout/staleness;
- a resumed asynchronous run trains the rollouts its checkpoint saved in flight: the same losses as one run;
- a producer that dies ends the fit in one line naming the step, with the checkpoints already written intact.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import CONFIG_DIR, run_opdlab
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from opdlab.pipeline import PipelineError, PipelineOptions
from opdlab.rollout import Rollout

FAST = str(CONFIG_DIR / "fast.yaml")
BATCH = 8


def overrides(root: Path, tiny, name: str, steps: int = 4, pipeline: dict | None = None, **extra) -> Path:
    config = {
        "trainer": {
            "max_steps": steps, "limit_val_batches": 0, "log_every_n_steps": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(root / "runs"), "name": "p", "version": name}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(root / f"ckpt_{name}"), "every_n_train_steps": 1,
                                         "save_top_k": -1, "filename": "{step}"}}],
        },
        # lr 0.05: every update changes what the student samples, so rollouts of the wrong weights would show
        "model": {"student": tiny.student, "teacher": tiny.teacher, "pipeline": pipeline or {},
                  "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.05}}},
        "data": {"source": {"class_path": "opdlab.tasks.AdditionTask", "init_args": {"digits": 2, "num_eval": 16}},
                 "batch_size": BATCH, "val_batch_size": 16},
    }
    for key, value in extra.items():
        config[key].update(value)
    path = root / f"overrides_{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(root: Path, tiny, name: str, *args: str, **kwargs):
    result = run_opdlab(["fit", "--config", FAST, "--config", str(overrides(root, tiny, name, **kwargs)), *args])
    return result


def scalars(root: Path, name: str) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(root / "runs" / "p" / name))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def runs(tiny_checkpoints, tmp_path_factory):
    """One synchronous run and the asynchronous runs the tests compare with it (4 steps each)."""
    root = tmp_path_factory.mktemp("pipeline")
    results = {"sync": fit(root, tiny_checkpoints, "sync")}
    for n in (1, 2):
        for producer in ("inline", "process"):
            name = f"{producer}{n}"
            results[name] = fit(root, tiny_checkpoints, name, pipeline={"max_staleness": n, "producer": producer})
    for name, result in results.items():
        assert result.code == 0, f"{name}: {result.err[-3000:]}"
    return root, results


def test_staleness_0_is_the_synchronous_loop_and_the_default():
    assert PipelineOptions().max_staleness == 0 and PipelineOptions().synchronous
    from opdlab.module import OPDModule

    assert OPDModule().pipeline is None


@pytest.mark.parametrize("producer", ["inline", "process"])
def test_the_pipeline_at_staleness_0_trains_exactly_the_synchronous_losses(runs, tiny_checkpoints, tmp_path,
                                                                          monkeypatch, producer):
    """The pipeline's jobs (prompt seeds, generator seeds, weights published after each step) reproduce the
    synchronous loop bit for bit when nothing is stale."""
    root, _ = runs
    monkeypatch.setattr(PipelineOptions, "synchronous", property(lambda self: False))
    result = fit(tmp_path, tiny_checkpoints, "forced", pipeline={"max_staleness": 0, "producer": producer})
    assert result.code == 0, result.err[-3000:]
    forced, sync = scalars(tmp_path, "forced"), scalars(root, "sync")
    assert forced["train/loss"] == sync["train/loss"] and len(sync["train/loss"]) == 4
    assert set(forced["rollout/staleness"].values()) == {0.0}


@pytest.mark.parametrize("n", [1, 2])
def test_the_process_producer_trains_exactly_the_inline_producers_losses(runs, n):
    root, _ = runs
    inline, process = scalars(root, f"inline{n}"), scalars(root, f"process{n}")
    assert process["train/loss"] == inline["train/loss"]
    assert process["rollout/policy_version"] == inline["rollout/policy_version"]


@pytest.mark.parametrize("n", [1, 2])
def test_rollouts_are_sampled_n_steps_off_and_never_older(runs, n):
    """Step t (from 1) trains rollouts of the policy after max(t - 1 - N, 0) updates: staleness min(t - 1, N)."""
    root, _ = runs
    logged = scalars(root, f"process{n}")
    assert logged["rollout/staleness"] == {t: float(min(t - 1, n)) for t in range(1, 5)}
    assert logged["rollout/policy_version"] == {t: float(max(t - 1 - n, 0)) for t in range(1, 5)}
    assert all(v >= 0 for v in logged["rollout/wait_seconds"].values())
    sync = scalars(root, "sync")
    assert logged["train/loss"][1] == sync["train/loss"][1]  # step 1: nothing stale yet
    assert all(logged["train/loss"][t] != sync["train/loss"][t] for t in (2, 3, 4))  # then older samples


def test_the_fit_summary_gives_the_share_of_time_the_trainer_waited(runs):
    _, results = runs
    assert "trainer waited for rollouts" in results["process1"].out
    line = next(x for x in results["process1"].out.splitlines() if "trainer waited for rollouts" in x)
    assert "max staleness 1" in line and "process" in line


def test_trace_shows_the_producers_generation_beside_the_trainer(runs):
    import json

    root, _ = runs
    events = json.loads((root / "runs" / "p" / "process1" / "trace.json").read_text())
    generate = [e for e in events if e.get("name") == "generate"]
    assert [e["args"]["step"] for e in generate] == [1, 2, 3, 4]
    assert {e["tid"] for e in generate} == {"producer"}
    assert {e["name"] for e in events if e.get("tid") == "trainer"} >= {"rollout_wait", "forward", "publish"}


def test_resume_trains_the_rollouts_in_flight_exactly(runs, tiny_checkpoints, tmp_path):
    """The checkpoint after step 2 holds the rollouts sampled for steps 3 and 4 (N = 2); the resumed run trains them:
    its losses and final weights are the uninterrupted run's."""
    root, _ = runs
    ckpt = root / "ckpt_process2" / "step=2.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["rollout_pipeline"]
    assert [job["step"] for job in saved["jobs"]] == [2, 3] and [job["version"] for job in saved["jobs"]] == [0, 1]
    result = fit(tmp_path, tiny_checkpoints, "resumed", "--ckpt_path", str(ckpt),
                 pipeline={"max_staleness": 2, "producer": "process"})
    assert result.code == 0, result.err[-3000:]
    resumed, whole = scalars(tmp_path, "resumed"), scalars(root, "process2")
    assert resumed["train/loss"] == {t: whole["train/loss"][t] for t in (3, 4)}
    assert resumed["rollout/staleness"] == {3: 2.0, 4: 2.0}
    a = torch.load(root / "ckpt_process2" / "step=4.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "ckpt_resumed" / "step=4.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_staleness_larger_than_the_run_generates_only_the_runs_steps(tiny_checkpoints, tmp_path):
    jobs = []

    class Count(L.Callback):
        def on_train_end(self, trainer, pl_module):
            jobs.append(pl_module.pipeline.next_index)

    from unittest import mock

    with mock.patch("opdlab.module.OPDModule.configure_callbacks", lambda self: [Count()]):
        result = fit(tmp_path, tiny_checkpoints, "long", steps=2, pipeline={"max_staleness": 8, "producer": "inline"})
    assert result.code == 0, result.err[-3000:]
    assert jobs == [2], "two steps: two jobs, none generated for steps the run never trains"
    assert scalars(tmp_path, "long")["rollout/staleness"] == {1: 0.0, 2: 1.0}


class KillProducer(L.Callback):
    """Kills the producer's worker process after step 2 (and its checkpoint)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:
            os.kill(pl_module.pipeline.producer.process.pid, signal.SIGKILL)


def test_a_producer_that_dies_ends_the_fit_in_one_line_with_checkpoints_intact(tiny_checkpoints, tmp_path):
    from unittest import mock

    with mock.patch("opdlab.module.OPDModule.configure_callbacks",
                    lambda self: [__import__("opdlab.callbacks.teacher", fromlist=["x"]).PipelineLifetime(),
                                  KillProducer()]):
        result = fit(tmp_path, tiny_checkpoints, "killed", steps=5, pipeline={"max_staleness": 1})
    assert result.code != 0
    line = str(result.code)  # the one-line error (SystemExit's text in-process)
    assert line.startswith("opdlab: error:") and len(line.splitlines()) <= 2, line
    assert "process producer" in line and "died" in line and re.search(r"training step [34] ", line), line
    for step in (1, 2):
        ckpt = torch.load(tmp_path / f"ckpt_killed/step={step}.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == step


def test_a_data_module_that_cannot_read_ahead_is_refused_by_name():
    """The CLI's data module reads ahead; a Python user's own must too (refused before any job, naming its type)."""
    from types import SimpleNamespace

    from opdlab.pipeline import InlineProducer, RolloutPipeline

    module = SimpleNamespace(trainer=SimpleNamespace(datamodule=object()))
    pipeline = RolloutPipeline(PipelineOptions(max_staleness=1, producer="inline"), InlineProducer())
    with pytest.raises(PipelineError, match="read its training batches ahead.*got object"):
        pipeline.begin(module, lambda produced: produced)


def test_a_produced_rollout_is_moved_to_the_students_device(tiny_module):
    """Device-correct by construction: rollouts from another process land on the module's device (`meta` plays a
    second device on the CPU)."""
    from opdlab.pipeline.producers import Job, Produced

    rollout = Rollout(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long),
                      torch.ones(2, 2, dtype=torch.bool), torch.zeros(2, 2), 3)
    asked = []
    tiny_module.teacher_session.request = lambda r: asked.append(r) or "pending"
    with mock_device(tiny_module, torch.device("meta")):
        produced = tiny_module.finish_rollout(Produced(Job(0, 0, 0, {}, None, None, 0), rollout, 0, 0.0, 0.0))
    tensors = (produced.rollout.input_ids, produced.rollout.attention_mask, produced.rollout.response_mask,
               produced.rollout.sampling_logp)
    assert all(t.device.type == "meta" for t in tensors)
    assert produced.pending == "pending" and asked[0] is produced.rollout  # the teacher is asked at once


def mock_device(module, device):
    from unittest import mock

    return mock.patch.object(type(module), "device", property(lambda self: device))


@pytest.mark.parametrize("options, message", [
    ({"max_staleness": -1}, "max_staleness must be an integer >= 0"),
    ({"max_staleness": 1.5}, "max_staleness must be an integer >= 0"),
    ({"max_staleness": True}, "max_staleness must be an integer >= 0"),
    ({"producer": "threads"}, "producer must be one of"),
    ({"producer_threads": 0}, "producer_threads must be an integer >= 1"),
    ({"timeout": 0}, "timeout must be a finite number of seconds > 0"),
    ({"timeout": float("inf")}, "timeout must be a finite number"),
    ({"producer": "vllm_fleet"}, "needs pipeline.urls"),
    ({"urls": ["http://h:1/v1"]}, "is for pipeline.producer vllm_fleet"),
    ({"producer": "vllm_fleet", "urls": ["h:1/v1"]}, "must be http(s) URLs"),
    ({"producer": "vllm_fleet", "urls": ["http://h:1/v1", "http://h:1/v1"]}, "lists a server twice"),
])
def test_pipeline_options_refuse_bad_values_naming_the_option(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PipelineOptions(**options)


def test_pipeline_error_is_a_runtime_error():
    assert issubclass(PipelineError, RuntimeError)


def test_resuming_an_asynchronous_checkpoint_synchronously_says_what_it_does(runs, tiny_checkpoints, tmp_path):
    root, _ = runs
    with pytest.warns(UserWarning, match="holds rollouts sampled ahead by an asynchronous run"):
        result = fit(tmp_path, tiny_checkpoints, "sync_resume", "--ckpt_path", str(root / "ckpt_process2" / "step=2.ckpt"))
    assert result.code == 0, result.err[-3000:]


def test_resuming_with_a_smaller_staleness_than_the_checkpoints_rollouts_is_refused(runs, tiny_checkpoints, tmp_path):
    root, _ = runs
    result = fit(tmp_path, tiny_checkpoints, "smaller", "--ckpt_path", str(root / "ckpt_process2" / "step=2.ckpt"),
                 pipeline={"max_staleness": 1, "producer": "inline"})
    assert "resume with max_staleness >= 2" in str(result.code), result.code


def test_a_skipped_step_takes_one_batch_more_and_the_run_still_ends(tiny_checkpoints, tmp_path):
    """A non-finite step does not count towards max_steps: the run trains one batch more, and the pipeline has a job
    for it (it submits by optimizer steps, not by batches)."""
    from unittest import mock

    from opdlab.scoring import TokenStats

    calls, original = {"n": 0}, TokenStats.non_finite_models

    def second_step_non_finite(self):
        calls["n"] += 1
        return ["student"] if calls["n"] == 2 else original(self)

    with mock.patch.object(TokenStats, "non_finite_models", second_step_non_finite):
        result = fit(tmp_path, tiny_checkpoints, "skip", steps=3, pipeline={"max_staleness": 1, "producer": "inline"})
    assert result.code == 0, str(result.code)[-2000:]
    assert calls["n"] == 4 and "steps: 3" in result.out  # four batches for three updates


@pytest.mark.slow  # two bf16-mixed fits (~30 s): run with -m slow
@pytest.mark.parametrize("producer", ["inline", "process"])
def test_mixed_precision_producers_sample_under_the_training_steps_autocast(tiny_checkpoints, tmp_path, producer):
    """bf16-mixed without a validation before training (the engine's first copy is made by the producer): both
    producers sample in the training step's autocast, so they train the same losses."""
    result = fit(tmp_path, tiny_checkpoints, producer, "--trainer.precision", "bf16-mixed", steps=3,
                 pipeline={"max_staleness": 1, "producer": producer})
    assert result.code == 0, str(result.code)[-2000:]
    mixed[producer] = scalars(tmp_path, producer)["train/loss"]
    if len(mixed) == 2:
        assert mixed["inline"] == mixed["process"]


mixed: dict[str, dict] = {}


def started_fit(tiny, tmp_path: Path, name: str, **popen):
    """An endless asynchronous `opdlab fit` in a subprocess, returned once it printed its first step: (process, log
    path, the open log file)."""
    import subprocess
    import sys
    import time

    from conftest import REPO_ROOT

    args = [sys.executable, "-m", "opdlab.cli", "fit", "--config", FAST, "--config",
            str(overrides(tmp_path, tiny, name, steps=100000, pipeline={"max_staleness": 1})), "--trainer.callbacks", "[]"]
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT / 'tests'}{os.pathsep}{REPO_ROOT}", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "log.txt"
    out = open(log, "w")  # noqa: SIM115 - the caller closes it
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, **popen)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not re.search(r"^train \d+/", log.read_text(), re.M):
        time.sleep(0.5)
    return proc, log, out


def test_ctrl_c_saves_the_rollouts_in_flight_and_the_worker_ignores_it(tiny_checkpoints, tmp_path):
    """Ctrl-C reaches the whole process group (the worker too): the worker leaves it to the trainer, which saves
    last.ckpt with the rollouts in flight, then stops the worker."""
    import time

    proc, log, out = started_fit(tiny_checkpoints, tmp_path, "ctrl_c", start_new_session=True)
    with out:
        time.sleep(2)  # a few steps more
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    text = log.read_text()
    (last,) = list(tmp_path.rglob("last.ckpt")) or [None]
    assert last is not None, text[-3000:]
    saved = torch.load(last, map_location="cpu", weights_only=False)
    step = saved["global_step"]  # N + 1 jobs in flight after a step: those of the next two steps
    assert [job["step"] for job in saved["rollout_pipeline"]["jobs"]] == [step, step + 1], text[-2000:]
    assert "KeyboardInterrupt" not in text, text[-2000:]


def test_a_worker_whose_trainer_was_killed_exits(tiny_checkpoints, tmp_path):
    import time

    proc, log, out = started_fit(tiny_checkpoints, tmp_path, "orphan")
    with out:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        workers = [int(c) for c in children if b"spawn" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert workers, (children, log.read_text()[-2000:])
        proc.kill()
        proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(Path(f"/proc/{w}").exists() and
                                         "Z" not in Path(f"/proc/{w}/stat").read_text().split()[2] for w in workers):
        time.sleep(0.2)
    alive = [w for w in workers if Path(f"/proc/{w}").exists() and "Z" not in Path(f"/proc/{w}/stat").read_text().split()[2]]
    for w in alive:
        os.kill(w, signal.SIGKILL)
    assert not alive, "the producer process outlived its trainer"
