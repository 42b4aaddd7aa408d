"""What an opdlab checkpoint holds: the student's weights (an adapter's alone when it has one; the frozen teacher
and base are reloaded from their paths, so checkpoints stay student-sized), the global RNG states, the count of
skipped steps and what the adapter's weights mean; and the check that a checkpoint fits the run resuming it.
"""

from __future__ import annotations

from opdlab.adapters import adapter_config, is_adapted
from opdlab.checkpointing import capture_rng_state, restore_rng_state


def saved_student_keys(student, state_dict_keys) -> set[str]:
    """The state-dict keys a checkpoint holds: the student's (the adapter's alone when it has one)."""
    if not is_adapted(student):
        return {k for k in state_dict_keys if k.startswith("student.")}
    return {f"student.{name}" for name, param in student.named_parameters() if param.requires_grad}


def adapter_signature(student) -> dict | None:
    """What an adapter's weights mean (rank, alpha, targets); None for full fine-tuning."""
    config = adapter_config(student)
    if config is None:
        return None
    return {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}


def strip_to_student(checkpoint: dict, kept: set[str], skipped_steps: int, signature: dict | None) -> None:
    """Keep only the student's saved keys, and add opdlab's own record (RNG states, skipped steps, adapter)."""
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                if not k.startswith(("teacher.", "student.")) or k in kept}
    # Sampling is seeded per prompt and step; the global RNGs are saved too, for user code that uses them.
    checkpoint["opdlab"] = {"rng": capture_rng_state(), "skipped_steps": skipped_steps, "adapter": signature}


def check_fits(checkpoint: dict, kept: set[str], signature: dict | None) -> None:
    """Refuse a checkpoint trained with another adapter (or without one), or missing student weights."""
    saved = checkpoint.get("opdlab", {}).get("adapter", None)
    if "opdlab" in checkpoint and saved != signature:
        def kind(value: dict | None) -> str:
            return "full fine-tuning" if value is None else f"the LoRA adapter {value}"

        raise ValueError(f"the checkpoint was trained with {kind(saved)}, this run has {kind(signature)}; continue "
                         "it with the same --model.student_adapter.* options")
    missing = sorted(kept - set(checkpoint["state_dict"]))
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} student weights (e.g. {missing[:3]}); is it an opdlab checkpoint?")


def on_save(checkpoint: dict, student, state_dict: dict, guard) -> None:
    """`OPDModule.on_save_checkpoint`: the student's keys only, and opdlab's record (`guard`: the skipped steps)."""
    kept = saved_student_keys(student, state_dict)
    strip_to_student(checkpoint, kept, guard.skipped, adapter_signature(student))


def on_load(checkpoint: dict, student, state_dict: dict, guard) -> None:
    """`OPDModule.on_load_checkpoint`: refuse a checkpoint that does not fit, then restore the RNG states and the
    count of skipped steps."""
    check_fits(checkpoint, saved_student_keys(student, state_dict), adapter_signature(student))
    if "opdlab" in checkpoint:
        restore_rng_state(checkpoint["opdlab"]["rng"])
        guard.skipped = checkpoint["opdlab"]["skipped_steps"]
