"""Data-parallel correctness: 2 CPU processes (gloo, FSDP2-sharded teacher) equal 1 process, and
micro-batching (gradient accumulation) does not change the update."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from step_recorder import read_records
from conftest import REPO_ROOT

pytestmark = pytest.mark.filterwarnings("ignore")


def fit_subprocess(tiny_checkpoints, tmp_path, name, extra, steps=3, batch_size=8, env=None, **popen):
    record = tmp_path / f"{name}.jsonl"
    args = [
        sys.executable, "-m", "opdlab.cli", "fit", "--config", str(REPO_ROOT / "configs/fast.yaml"),
        "--model.student", tiny_checkpoints.student, "--model.teacher", tiny_checkpoints.teacher,
        "--model.selector", "teachability", "--model.selector.ratio", "0.3",
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "1000",
        "--trainer.logger.init_args.save_dir", str(tmp_path / name),
        "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=step_recorder.StepRecorder", f"--trainer.callbacks.path={record}",
        "--data.batch_size", str(batch_size), "--data.val_batch_size", "16",
        "--data.source.init_args.num_eval", "16", *extra,
    ]
    full_env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT / 'tests'}{os.pathsep}{REPO_ROOT}", "OMP_NUM_THREADS": "1",
                **(env or {})}
    if popen:
        return subprocess.Popen(args, cwd=tmp_path, env=full_env, **popen), record
    proc = subprocess.run(args, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, record


MODEL_PARALLEL_2 = [
    "--trainer.accelerator", "cpu", "--trainer.devices", "2",
    "--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy",
    "--trainer.strategy.data_parallel_size", "2", "--trainer.strategy.tensor_parallel_size", "1",
]


def test_two_processes_with_sharded_teacher_match_one_process(tiny_checkpoints, tmp_path):
    # Two ranks with 4 prompts each see exactly the prompts of one process with 8: rank r reads stream
    # indices r, r+2, ...; sampling is seeded per prompt, selection and normalisation are global.
    _, one = fit_subprocess(tiny_checkpoints, tmp_path, "one", [], batch_size=8)
    _, two = fit_subprocess(tiny_checkpoints, tmp_path, "two", MODEL_PARALLEL_2, batch_size=4)
    single = read_records(one)
    ranks = [read_records(two, r) for r in (0, 1)]
    assert [len(r) for r in ranks] == [3, 3]
    for step in range(3):
        both = sorted(ranks[0][step]["indices"] + ranks[1][step]["indices"])
        assert both == sorted(single[step]["indices"])
        for rank_rows in ranks:
            row = rank_rows[step]
            assert row["teacher_sharded"] and row["student_sharded"]
            assert not row["teacher_has_grad"] and not row["teacher_in_optimizer"]
        assert ranks[0][step]["loss"] == pytest.approx(ranks[1][step]["loss"], rel=1e-6)  # the global loss
        assert ranks[0][step]["loss"] == pytest.approx(single[step]["loss"], rel=1e-4, abs=1e-6)
    assert not single[0]["teacher_sharded"]


def run_in_process(tiny_checkpoints, micro_batch_size, steps=3):
    import lightning as L

    from opdlab.data import PromptDataModule
    from opdlab.divergences import ReverseKL
    from opdlab.module import OPDModule
    from opdlab.selectors import TeachabilitySelector
    from opdlab.tasks import AdditionTask

    losses = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

    module = OPDModule(
        student=tiny_checkpoints.student,
        teacher=tiny_checkpoints.teacher,
        selector=TeachabilitySelector(0.3, top_k=4),
        divergence=ReverseKL(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
        rollout=dict(max_new_tokens=5),
        memory=dict(micro_batch_size=micro_batch_size),
    )
    data = PromptDataModule(AdditionTask(digits=2, num_eval=8), batch_size=8, val_batch_size=8)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[Losses()],
        inference_mode=False,
    )
    trainer.fit(module, datamodule=data)
    return losses, {k: v.detach().clone() for k, v in module.student.state_dict().items()}


def test_micro_batches_do_not_change_the_update(tiny_checkpoints):
    """Batch 8 as 8 x 1, 4 x 2 and 2 x 4 micro-batches: same losses, same weights after 3 steps."""
    reference_losses, reference_weights = run_in_process(tiny_checkpoints, None)
    for micro in (4, 2):
        losses, weights = run_in_process(tiny_checkpoints, micro)
        assert losses == pytest.approx(reference_losses, rel=1e-5, abs=1e-7)
        for name, value in reference_weights.items():
            torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_sigkill_mid_training_resumes_without_repeating_or_skipping_prompts(tiny_checkpoints, tmp_path):
    """A run killed with SIGKILL resumes from its last checkpoint: every checkpoint file loads, and the
    prompts of each step equal those of an uninterrupted run (granularity: steps after the last
    checkpoint are redone, nothing else)."""
    import signal
    import time

    steps = 8
    _, full = fit_subprocess(tiny_checkpoints, tmp_path, "full", [], steps=steps)
    ckpt = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_last=true",
            f"--trainer.callbacks.dirpath={tmp_path / 'ckpts'}", "--trainer.callbacks.save_top_k=-1"]
    proc, killed = fit_subprocess(
        tiny_checkpoints, tmp_path, "killed", ckpt, steps=steps, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (tmp_path / "ckpts" / "epoch=0-step=3.ckpt").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its third checkpoint"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before_kill = read_records(killed)
    assert len(before_kill) < steps, "the run finished before it was killed"
    for path in (tmp_path / "ckpts").glob("*.ckpt"):  # nothing truncated: every file loads
        torch.load(path, map_location="cpu", weights_only=False)
    # A kill during a save may leave a hidden `.name.pid.tmp` file, never a truncated `.ckpt`.
    fit_subprocess(tiny_checkpoints, tmp_path, "killed", [*ckpt, "--ckpt_path", str(tmp_path / "ckpts" / "last.ckpt")],
                   steps=steps)
    reference = {row["step"]: row["indices"] for row in read_records(full)}
    rows = read_records(killed)
    resumed_from = rows[len(before_kill)]["step"] - 1  # the checkpoint's step
    # last.ckpt is written just after the step-numbered file, so a kill in between resumes one step earlier.
    assert resumed_from >= 2
    by_step = {}
    for row in rows:  # a step redone after the kill overwrites its first attempt
        by_step[row["step"]] = row["indices"]
    assert by_step == reference  # same prompts at every step, none skipped
    redone = [row["step"] for row in rows].count(resumed_from + 1)
    assert redone <= 2


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupted_fit_saves_a_checkpoint_exits_nonzero_and_resumes(tiny_checkpoints, tmp_path, sig):
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM mid-fit, with no ModelCheckpoint configured: the step under
    way ends, checkpoints/last.ckpt is written, the exit code is 128 + signal, the output says how to
    continue, and `--resume` continues from that step."""
    import signal
    import time

    proc, record = fit_subprocess(tiny_checkpoints, tmp_path, "run", [], steps=200, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (record.parent / f"{record.name}.rank0").exists() or len(read_records(record)) < 2:
        assert proc.poll() is None and time.time() < deadline, "the run ended before its second step"
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + getattr(signal, sig), err[-3000:]
    steps = len(read_records(record))
    assert 2 <= steps < 200
    assert f"opdlab fit: stopped by {sig} after step {steps}" in out and "--resume" in out.splitlines()[-1], out[-2000:]
    checkpoint = tmp_path / "run" / "fast" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"] == steps
    proc, _ = fit_subprocess(tiny_checkpoints, tmp_path, "run", ["--resume"], steps=steps + 2)
    assert f"resuming from {checkpoint}" in proc.stdout and f"steps: {steps + 2}" in proc.stdout


def test_two_processes_with_a_sharded_lora_student_match_one_process(tiny_checkpoints, tmp_path):
    """A LoRA student under FSDP2 (the adapter sharded with its decoder layer) takes the same steps on two ranks
    as in one process, and exports the same peft adapter folder."""
    pytest.importorskip("peft")
    lora = ["--model.student_adapter.rank", "4"]
    _, one = fit_subprocess(tiny_checkpoints, tmp_path, "one", lora, batch_size=8)
    _, two = fit_subprocess(tiny_checkpoints, tmp_path, "two", [*lora, *MODEL_PARALLEL_2], batch_size=4)
    single, ranks = read_records(one), [read_records(two, r) for r in (0, 1)]
    for step in range(3):
        assert ranks[0][step]["student_sharded"] and ranks[1][step]["student_sharded"]
        assert ranks[0][step]["loss"] == pytest.approx(single[step]["loss"], rel=1e-4, abs=1e-6)
    exported = sorted(tmp_path.glob("two/**/student/adapter_config.json"))
    assert exported, "the two-rank run exported no peft adapter"


@pytest.mark.slow  # two ranks, two fits (~30 s): run with -m slow
def test_two_ranks_with_a_producer_process_each_match_one_process_inline(tiny_checkpoints, tmp_path):
    """An asynchronous run on two ranks (sharded student: each rank's producer process gets the gathered weights every
    step) trains the losses of one process with the inline producer on the whole batch, N = 1."""
    pipeline = ["--model.pipeline.max_staleness", "1", "--model.optimizer.init_args.lr", "0.05"]  # samples change
    _, one = fit_subprocess(tiny_checkpoints, tmp_path, "one", [*pipeline, "--model.pipeline.producer", "inline"],
                            batch_size=8)
    _, two = fit_subprocess(tiny_checkpoints, tmp_path, "two", [*MODEL_PARALLEL_2, *pipeline], batch_size=4)
    single, ranks = read_records(one), [read_records(two, r) for r in (0, 1)]
    assert [len(r) for r in ranks] == [3, 3]
    for step in range(3):
        assert sorted(ranks[0][step]["indices"] + ranks[1][step]["indices"]) == sorted(single[step]["indices"])
        assert ranks[0][step]["student_sharded"]
        assert ranks[0][step]["loss"] == pytest.approx(single[step]["loss"], rel=1e-4, abs=1e-6)


@pytest.mark.slow  # two ranks, two fits (~30 s): run with -m slow
def test_two_ranks_resume_an_asynchronous_run_exactly(tiny_checkpoints, tmp_path):
    """Each rank's rollouts in flight are in the checkpoint (gathered: rank 0 writes it), and each rank resumes its
    own: the resumed steps' losses are the uninterrupted run's on both ranks."""
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--model.pipeline.max_staleness", "1", "--model.pipeline.producer", "inline",
           "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
           "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_top_k=-1",
           f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}", "--trainer.callbacks.filename={step}"]
    _, whole = fit_subprocess(tiny_checkpoints, tmp_path, "whole", ddp, batch_size=4)
    saved = torch.load(tmp_path / "ckpt" / "step=1.ckpt", map_location="cpu", weights_only=False)["rollout_pipeline"]
    assert len(saved["ranks"]) == 2 and saved["ranks"][0]["jobs"][0]["batch"] != saved["ranks"][1]["jobs"][0]["batch"]
    resume = [*ddp[:-1], f"--trainer.callbacks.dirpath={tmp_path / 'ckpt2'}", "--ckpt_path",
              str(tmp_path / "ckpt" / "step=1.ckpt")]
    _, resumed = fit_subprocess(tiny_checkpoints, tmp_path, "resumed", resume, batch_size=4)
    for rank in (0, 1):
        first, again = read_records(whole, rank), read_records(resumed, rank)
        assert [r["loss"] for r in again] == [r["loss"] for r in first[1:]]
        assert [r["indices"] for r in again] == [r["indices"] for r in first[1:]]
