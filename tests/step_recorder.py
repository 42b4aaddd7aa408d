"""A test-only callback that appends one JSON line per optimizer step (used by subprocess runs).

Each line: global step, the prompt stream indices of the batch, the logged loss, for rank 0 of a sharded
run what it saw of the teacher (sharded? any grad? in the optimizer?), and how far the rollout's sampling
log-probs are from the step's own student log-probs.
"""

from __future__ import annotations

import json
import os

import lightning as L


class StepRecorder(L.Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        def sharded(model) -> bool:
            # Decoder layers stay sharded between uses (the root unit is kept gathered after forward).
            layer = model.get_decoder().layers[0]
            return isinstance(model, FSDPModule) and all(isinstance(p, DTensor) for p in layer.parameters())

        teacher = pl_module.teacher  # None: the teacher is on a server
        teacher_params = list(teacher.parameters()) if teacher is not None else []
        opt_ids = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        row = {
            "rank": trainer.global_rank,
            "step": trainer.global_step,
            "indices": list(batch["indices"]),
            "loss": float(outputs["loss"]) if isinstance(outputs, dict) and "loss" in outputs else (
                float(outputs) if outputs is not None else None),
            "teacher_sharded": sharded(teacher) if teacher is not None else None,
            "teacher_has_grad": any(p.grad is not None for p in teacher_params),
            "teacher_in_optimizer": any(id(p) in opt_ids for p in teacher_params),
            "student_sharded": sharded(pl_module.student),
            "sampling_logp_gap": sampling_logp_gap(outputs),
        }
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def sampling_logp_gap(outputs) -> float | None:
    """Largest |engine's sampling log-prob - the step's own student log-prob| of a sampled token. At
    temperature 1 and top-p 1 both are log p_student(token) with the same weights: a stale engine (weights of
    an earlier step) shows up here."""
    record = outputs.get("record") if isinstance(outputs, dict) else None
    if record is None:
        return None
    valid = record.rollout.response_mask.bool()
    gap = (record.rollout.sampling_logp - record.stats.student_token_logp).abs()[valid]
    return float(gap.max()) if gap.numel() else 0.0


def read_records(path, rank: int = 0) -> list[dict]:
    with open(f"{path}.rank{rank}") as f:
        return [json.loads(line) for line in f]
