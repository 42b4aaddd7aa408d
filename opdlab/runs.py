"""Run folders: where a fit writes, and which run `--resume` continues.

A run lives in `<save_dir>/<name>/<version>` of its logger (TensorBoard or CSV): its event files,
`config.yaml`, `checkpoints/` (when a ModelCheckpoint has no dirpath of its own) and the exported
`student/`. `--run_name` names the version folder; `--resume` continues the named run, or the most recent
one that has a `checkpoints/last.ckpt`, in the same folder (same curves), however often it crashed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from opdlab.console import OpdlabError


class RunError(OpdlabError, ValueError):
    """A run folder that cannot be used as asked (nothing to resume, or a name already taken)."""


def latest_run(base: Path) -> Path | None:
    """The run folder under `base` that was written most recently (its newest file), or None."""
    def last_written(folder: Path) -> float:
        return max((p.stat().st_mtime for p in folder.rglob("*") if p.is_file()), default=folder.stat().st_mtime)

    folders = [p for p in base.glob("*") if p.is_dir()] if base.is_dir() else []
    return max(folders, key=last_written, default=None)


def latest_resumable_run(base: Path) -> Path:
    """The most recent run under `base`; refused (named) when it has no `checkpoints/last.ckpt` to resume
    from, rather than silently continuing an older run."""
    latest = latest_run(base)
    if latest is None:
        raise RunError(f"nothing to resume under {base}: no runs there; start without --resume")
    if not (latest / "checkpoints" / "last.ckpt").is_file():
        older = sorted(p.parent.parent.name for p in base.glob("*/checkpoints/last.ckpt"))
        hint = f"; to continue an older run name it: --run_name {older[-1]} --resume" if older else ""
        raise RunError(f"the most recent run, {latest}, has no checkpoints/last.ckpt to resume from (save one with "
                       "a ModelCheckpoint with save_last: true; Ctrl-C and SIGTERM save one too); start without "
                       f"--resume{hint}")
    return latest


def remove_runs_without_results(base: Path, before: set[Path]) -> list[Path]:
    """Remove the run folders under `base` made since `before` that hold nothing but the saved config
    (a fit that failed before its first step); returns them."""
    removed = []
    for folder in sorted(p for p in base.glob("*") if p.is_dir() and p not in before):
        files = [p for p in folder.rglob("*") if p.is_file()]
        if all(p.name in ("config.yaml", "hparams.yaml", ".opdlab.lock") or p.name.startswith("events.out.tfevents")
               for p in files):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


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


def writable_folder(path: Path | str, what: str) -> Path:
    """`path`, created if needed; a folder that cannot be created or written (under a regular file, on a
    read-only disk, without permission) is refused in one line naming `what` (the option or variable)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".opdlab-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        reason = err.strerror or str(err)
        raise OSError(f"{what} {path} cannot be written ({type(err).__name__}: {reason}); choose a folder you can "
                      "write to") from None
    return path


def lock_run(folder: Path) -> None:
    """Claim a named run folder for this process until it exits: a second fit started with the same
    --run_name (or --resume of the same run) is refused instead of writing into the same files. A lock
    left by a process that no longer runs is taken over."""
    import atexit

    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".opdlab.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and process_alive(pid):
                raise RunError(f"run {folder} is in use by another opdlab fit (process {pid}); wait for it, or "
                               "choose another --run_name") from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        atexit.register(lambda: lock.unlink(missing_ok=True) if lock.is_file() and lock.read_text() == str(os.getpid())
                        else None)
        return


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
