"""Non-finite log-probs or gradients: the step is skipped with a warning and counted; repeated
failures stop training with a clear error."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from opdlab.data import PromptDataModule
from opdlab.divergences import ReverseKL
from opdlab.module import OPDModule
from opdlab.selectors import FullSelector
from opdlab.tasks import AdditionTask


class PoisonTeacher(L.Callback):
    """Fill the teacher's LM head with NaN before the listed steps, restore it after."""

    def __init__(self, bad_steps: set[int]) -> None:
        self.bad_steps, self.saved, self.calls = bad_steps, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        weight = pl_module.teacher.lm_head.weight
        if self.calls in self.bad_steps:
            self.saved = weight.detach().clone()
            with torch.no_grad():
                weight.fill_(float("nan"))
        self.calls += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.saved is not None:
            with torch.no_grad():
                pl_module.teacher.lm_head.weight.copy_(self.saved)
            self.saved = None


def fit(tiny_checkpoints, bad_steps, max_steps, max_bad_steps=2):
    module = OPDModule(
        student=tiny_checkpoints.student,
        teacher=tiny_checkpoints.teacher,
        selector=FullSelector(),
        divergence=ReverseKL(),
        rollout=dict(max_new_tokens=4),
        training=dict(max_bad_steps=max_bad_steps),
    )
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, inference_mode=False,
        callbacks=[PoisonTeacher(bad_steps)],
    )
    data = PromptDataModule(AdditionTask(digits=2, num_eval=8), batch_size=4, val_batch_size=8)
    trainer.fit(module, datamodule=data)
    return module, trainer


def test_a_nan_teacher_step_is_skipped_and_counted(tiny_checkpoints):
    with pytest.warns(UserWarning, match=rf"non-finite teacher log-probs \(teacher {tiny_checkpoints.teacher}\)"):
        module, trainer = fit(tiny_checkpoints, bad_steps={1}, max_steps=3)
    assert module.guard.skipped == 1
    assert trainer.global_step == 3  # the skipped batch did not count as an optimizer step
    assert all(torch.isfinite(p).all() for p in module.student.parameters())


def test_repeated_non_finite_steps_stop_training(tiny_checkpoints):
    with pytest.raises(FloatingPointError, match="3 consecutive steps.*max_bad_steps=2"):
        fit(tiny_checkpoints, bad_steps={0, 1, 2, 3, 4}, max_steps=5, max_bad_steps=2)


def test_checkpoint_carries_rng_and_skip_counter(tiny_checkpoints):
    import random

    import numpy as np

    module = OPDModule(student=tiny_checkpoints.student, teacher=tiny_checkpoints.teacher)
    module.configure_model()
    module.guard.skipped = 3
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    expected = (torch.rand(3), random.random(), np.random.rand())
    module.guard.skipped = 0
    module.on_load_checkpoint(checkpoint)  # rewinds the global RNGs to the save point
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]
    assert module.guard.skipped == 3


def test_non_finite_weights_are_refused_at_load_naming_the_model(tiny_checkpoints, tmp_path):
    from opdlab.models import load_causal_lm

    model = load_causal_lm(tiny_checkpoints.teacher)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, :3] = float("nan")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"model '{tmp_path}' has 3 non-finite .* 'model.layers.0.mlp.up_proj.weight'"):
        load_causal_lm(str(tmp_path))


def test_model_directory_without_tokenizer_files_says_so(tiny_checkpoints, tmp_path):
    from opdlab.models import load_causal_lm, load_tokenizer

    load_causal_lm(tiny_checkpoints.student).save_pretrained(tmp_path)  # weights and config, no tokenizer
    with pytest.raises(FileNotFoundError, match=rf"no tokenizer in {tmp_path} \(looked for tokenizer.json"):
        load_tokenizer(str(tmp_path))


# --------------------------------------------------------------------------------------------- checkpoint files
def test_full_disk_at_checkpoint_names_the_path_and_free_space(tmp_path, monkeypatch):
    from opdlab.checkpointing import AtomicCheckpointIO

    def full_disk(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    target = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(OSError, match=rf"could not write checkpoint {target} .*MiB free on {target.parent}.*"
                                      "Nothing was written"):
        AtomicCheckpointIO().save_checkpoint({"x": 1}, target)
    assert list(target.parent.iterdir()) == []  # no partial file left behind
    target.write_bytes(b"the last good checkpoint")
    with pytest.raises(OSError, match="The previous version of this file is intact"):
        AtomicCheckpointIO().save_checkpoint({"x": 1}, target)
    assert target.read_bytes() == b"the last good checkpoint"


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated zip"])
def test_unreadable_checkpoint_file_gets_a_clear_message(tmp_path, content):
    from opdlab.checkpointing import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"checkpoint {path} \({len(content)} bytes\) is not a readable checkpoint") as err:
        AtomicCheckpointIO().load_checkpoint(path)
    assert "weights_only" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "missing.ckpt")


def test_garbage_ckpt_path_through_fit(tiny_checkpoints, tmp_path, monkeypatch):
    path = tmp_path / "garbage.ckpt"
    path.write_bytes(b"garbage")
    module = OPDModule(
        student=tiny_checkpoints.student,
        teacher=tiny_checkpoints.teacher,
        rollout=dict(max_new_tokens=2),
    )
    from opdlab.checkpointing import AtomicCheckpointIO

    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, plugins=[AtomicCheckpointIO()])
    with pytest.raises(ValueError, match="is not a readable checkpoint"):
        trainer.fit(module, datamodule=PromptDataModule(AdditionTask(digits=2), batch_size=4), ckpt_path=str(path))
