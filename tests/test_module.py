"""The LightningModule: the teacher is a frozen function (no grad, eval mode, no optimizer state)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import response_hidden_states, score

from opdlab.data import PromptDataModule
from opdlab.module import OPDModule
from opdlab.scoring import TokenStats
from opdlab.selectors import TokenSelector
from opdlab.tasks import AdditionTask


class Probe(L.Callback):
    """Records, during real training steps, the teacher's mode and where gradients landed."""

    def __init__(self) -> None:
        self.teacher_training, self.teacher_grads, self.student_grad_norms, self.losses = [], [], [], []
        self.student_training, self.records = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.teacher_training.append(module.teacher.training)
        self.student_training.append(module.student.training)

    def on_after_backward(self, trainer, module):
        self.teacher_grads.append(any(p.grad is not None for p in module.teacher.parameters()))
        norms = [p.grad.norm() for p in module.student.parameters() if p.grad is not None]
        self.student_grad_norms.append(float(torch.stack(norms).norm()) if norms else 0.0)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(step_loss(outputs))
        self.records.append(outputs["record"])


def step_loss(outputs) -> float:
    """The loss a training step returned (a tensor, or Lightning's {"loss": tensor})."""
    loss = outputs["loss"] if isinstance(outputs, dict) else outputs
    return float(loss)


def make_trainer(tmp_path, max_steps: int, callbacks=()) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=tmp_path, callbacks=list(callbacks),
    )


@pytest.fixture(scope="module")
def fitted(tiny_checkpoints, tmp_path_factory):
    """Two real training steps of the tiny models on 2-digit addition."""
    torch.manual_seed(0)
    module = OPDModule(
        student=tiny_checkpoints.student,
        teacher=tiny_checkpoints.teacher,
        rollout=dict(max_new_tokens=4, num_samples=2),
    )
    datamodule = PromptDataModule(AdditionTask(digits=2, num_eval=16), batch_size=4, val_batch_size=16)
    probe = Probe()
    trainer = make_trainer(tmp_path_factory.mktemp("fit"), max_steps=2, callbacks=[probe])
    trainer.fit(module, datamodule=datamodule)
    return module, trainer, probe


def test_configure_model_freezes_teacher(tiny_module):
    module = tiny_module
    assert all(not p.requires_grad for p in module.teacher.parameters())
    assert all(p.requires_grad for p in module.student.parameters())
    module.train()
    assert module.student.training
    assert not module.teacher.training
    assert not any(m.training for m in module.teacher.modules())
    module.eval()
    module.train(True)
    assert not module.teacher.training


def test_configure_model_is_idempotent(tiny_module):
    student, teacher = tiny_module.student, tiny_module.teacher
    tiny_module.configure_model()
    assert tiny_module.student is student and tiny_module.teacher is teacher


def test_teacher_frozen_during_real_training(fitted):
    module, trainer, probe = fitted
    assert trainer.global_step == 2
    assert probe.teacher_training == [False, False]
    assert probe.teacher_grads == [False, False]
    assert all(norm > 0 for norm in probe.student_grad_norms), probe.student_grad_norms
    assert all(torch.isfinite(torch.tensor(probe.losses)))
    assert all(p.grad is None for p in module.teacher.parameters())


def test_student_in_train_mode_during_training(fitted):
    _, _, probe = fitted
    assert probe.student_training == [True, True]


def test_optimizer_holds_no_teacher_parameter_or_state(fitted):
    module, trainer, _ = fitted
    (optimizer,) = trainer.optimizers
    teacher_ids = {id(p) for p in module.teacher.parameters()}
    student_ids = {id(p) for p in module.student.parameters()}
    in_groups = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_groups.isdisjoint(teacher_ids)
    assert in_groups == student_ids
    state_ids = {id(p) for p in optimizer.state}
    assert state_ids.isdisjoint(teacher_ids)
    assert state_ids and state_ids <= student_ids  # the student was actually stepped


def test_training_changes_student_not_teacher(tiny_checkpoints, fitted):
    from transformers import AutoModelForCausalLM

    module, _, _ = fitted
    teacher0 = AutoModelForCausalLM.from_pretrained(tiny_checkpoints.teacher)
    student0 = AutoModelForCausalLM.from_pretrained(tiny_checkpoints.student)
    for (name, p), p0 in zip(module.teacher.named_parameters(), teacher0.parameters(), strict=True):
        assert torch.equal(p, p0), f"teacher parameter {name} changed"
    assert any(not torch.equal(p, p0) for p, p0 in zip(module.student.parameters(), student0.parameters(), strict=True))


def test_checkpoint_has_no_teacher_and_restores_student(fitted, tiny_checkpoints, tmp_path):
    module, trainer, _ = fitted
    path = tmp_path / "step.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and not any(k.startswith("teacher.") for k in keys)
    assert any(k.startswith("student.") for k in keys)
    assert ckpt["PromptDataModule"] == {"consumed": 8}  # 2 steps × 4 prompts

    fresh = OPDModule(student=tiny_checkpoints.student, teacher=tiny_checkpoints.teacher)
    fresh.configure_model()
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"], strict=False)
    for (name, p), q in zip(module.student.state_dict().items(), fresh.student.state_dict().values(), strict=True):
        assert torch.equal(p, q), name

    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("student.")}
    with pytest.raises(KeyError, match="student weights"):
        fresh.on_load_checkpoint(ckpt)


def test_step_generator_depends_on_seed_step_and_salt(tiny_module):
    draw = lambda g: torch.rand(4, generator=g)  # noqa: E731
    a, b = draw(tiny_module.step_generator()), draw(tiny_module.step_generator())
    assert torch.equal(a, b)
    assert not torch.equal(a, draw(tiny_module.step_generator(salt=1)))
    tiny_module.training_options.seed = 1
    assert not torch.equal(a, draw(tiny_module.step_generator()))


def fit_one_step(checkpoints, root, **module_kwargs) -> tuple[OPDModule, Probe]:
    module = OPDModule(
        student=checkpoints.student,
        teacher=checkpoints.teacher,
        **module_kwargs,
        rollout=dict(max_new_tokens=4, num_samples=2),
    )
    probe = Probe()
    make_trainer(root, max_steps=1, callbacks=[probe]).fit(
        module, datamodule=PromptDataModule(AdditionTask(digits=2, num_eval=16), batch_size=4, val_batch_size=16)
    )
    return module, probe


def test_loss_normalization_kept_vs_valid_in_training(tiny_checkpoints, tmp_path):
    """Same step, same kept tokens: the "valid" loss is the "kept" loss times kept / valid."""
    from opdlab.selectors import TeachabilitySelector

    by = {}
    for norm in ("kept", "valid"):
        module, probe = fit_one_step(tiny_checkpoints, tmp_path / norm, training={"loss_normalization": norm},
                                     selector=TeachabilitySelector(ratio=0.3, top_k=4))
        by[norm] = (probe.losses[0], probe.records[0].keep, probe.records[0].stats.valid)
    (kept_loss, keep, valid), (valid_loss, keep2, valid2) = by["kept"], by["valid"]
    assert torch.equal(keep, keep2) and torch.equal(valid, valid2), "the two runs must see the same step"
    assert 0 < keep.sum() < valid.sum()
    assert valid_loss == pytest.approx(kept_loss * float(keep.sum()) / float(valid.sum()), rel=1e-5, abs=1e-7)


class NothingSelector(TokenSelector):
    """Keeps no position at all (the budget rule would keep one per response; this one does not)."""

    def score(self, stats: TokenStats, generator=None):
        return torch.zeros_like(stats.valid, dtype=torch.float)

    def select(self, stats: TokenStats, generator=None):
        return torch.zeros_like(stats.valid)


@pytest.mark.parametrize("normalization", ["kept", "valid"])
def test_empty_selection_trains_to_zero_loss_without_nan(tiny_checkpoints, tmp_path, normalization):
    from transformers import AutoModelForCausalLM

    module, probe = fit_one_step(tiny_checkpoints, tmp_path, selector=NothingSelector(),
                                 training={"loss_normalization": normalization})
    assert probe.losses == [0.0]
    assert probe.student_grad_norms in ([0.0], [])  # backward ran (or was skipped) without NaN
    original = AutoModelForCausalLM.from_pretrained(tiny_checkpoints.student)
    for (name, p), p0 in zip(module.student.named_parameters(), original.parameters(), strict=True):
        assert torch.isfinite(p).all() and torch.equal(p, p0), name


class EverywhereSelector(TokenSelector):
    """A broken selector that keeps padding positions too."""

    def score(self, stats: TokenStats, generator=None):
        return torch.ones_like(stats.valid, dtype=torch.float)

    def select(self, stats: TokenStats, generator=None):
        return torch.ones_like(stats.valid)


def test_selector_keeping_outside_response_mask_is_refused(tiny_module):
    from opdlab.rollout import encode_prompts

    module = tiny_module
    module.selector = EverywhereSelector()
    prompts = encode_prompts(module.tokenizer, ["12+34=", "99+99="], ["", ""])
    rollout = module.rollout(prompts)
    # Force a padded row so that "everywhere" really is outside the response mask.
    rollout.response_mask[0, 1:] = False
    s, t = response_hidden_states(module, rollout)
    stats = score(module, s, t, rollout)
    with pytest.raises(RuntimeError, match="outside the response mask"):
        module.select(stats)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rollout": {"num_samples": 0}}, "num_samples"),
        ({"rollout": {"max_new_tokens": 0}}, "max_new_tokens"),
        ({"rollout": {"temperature": 0.0}}, "temperature must be > 0"),
        ({"training": {"loss_normalization": "mean"}}, "loss_normalization must be"),
    ],
)
def test_invalid_module_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OPDModule(**kwargs)
