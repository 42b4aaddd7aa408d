"""Run folders: where a fit writes, and which run `--resume` continues.

A run lives in `<save_dir>/<name>/<version>` of its logger (TensorBoard or CSV): its event files,
`config.yaml`, `checkpoints/` (when a ModelCheckpoint has no dirpath of its own) and the exported
`student/`. `--run_name` names the version folder; `--resume` continues the named run, or the most recent
one that has a `checkpoints/last.ckpt`, in the same folder (same curves), however often it crashed.
"""

from __future__ import annotations

from pathlib import Path


class RunError(ValueError):
    """A run folder that cannot be used as asked (nothing to resume, or a name already taken)."""


def latest_resumable_run(base: Path) -> Path:
    """The run folder under `base` whose `checkpoints/last.ckpt` was written most recently."""
    candidates = sorted(base.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise RunError(f"nothing to resume under {base}: no run there has checkpoints/last.ckpt (the configs'"
                       " ModelCheckpoint with save_last: true writes it); start without --resume")
    return candidates[-1].parent.parent


def resolve_run(base: Path, run_name: str | None, resume: bool) -> tuple[str | None, Path | None]:
    """(the logger version to use, the checkpoint to resume from) for a fit logging under `base`."""
    if resume:
        folder = base / run_name if run_name else latest_resumable_run(base)
        checkpoint = folder / "checkpoints" / "last.ckpt"
        if not checkpoint.is_file():
            raise RunError(f"nothing to resume in {folder}: no checkpoints/last.ckpt; start without --resume")
        return folder.name, checkpoint
    if run_name and (base / run_name / "checkpoints").exists():
        raise RunError(f"run {base / run_name} already has checkpoints; pass --resume to continue it, or another "
                       "--run_name")
    return run_name, None
