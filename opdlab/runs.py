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


def check_run_name(name: str) -> str:
    """`--run_name` names one folder under `<save_dir>/<name>`: a path (`a/b`, `../x`, `/abs`), `.`/`..`, an empty
    name or one with control characters would write elsewhere, or into the experiment's own folder."""
    problem = ("is empty" if not name.strip() else
               "is '.' or '..'" if name.strip() in (".", "..") else
               "contains a path separator" if "/" in name or "\\" in name or (os.sep in name) else
               "has control characters" if any(ord(ch) < 32 for ch in name) else
               "starts with '-'" if name.startswith("-") else
               "starts with '.' (a hidden folder)" if name.startswith(".") else None)
    if problem:
        raise RunError(f"--run_name {name!r} {problem}: it names one folder under <save_dir>/<name> (e.g. --run_name "
                       "lr3e-4); to write elsewhere set --trainer.logger.init_args.save_dir")
    return name


def results_in(folder: Path) -> list[str]:
    """What a run folder already holds (files and folders other than the fit lock), for refusing to overwrite it."""
    if not folder.is_dir():
        return []
    first = {"student/": 0, "summary.json": 1, "checkpoints/": 2, "eval/": 3}  # what a user would miss most, first
    names = [p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if p.name != ".opdlab.lock"]
    return sorted(names, key=lambda name: (first.get(name, len(first)), name))


def resolve_run(base: Path, run_name: str | None, resume: bool,
                chosen: str | None = None) -> tuple[str | None, Path | None]:
    """(the logger version to use, the checkpoint to resume from) for a fit logging under `base`. With `--resume`,
    `chosen` (`--ckpt_path`) picks another checkpoint of the run's `checkpoints/` than `last.ckpt` (e.g. when that
    one is damaged), and the run continues in its own folder."""
    if run_name is not None:
        check_run_name(run_name)
    if resume:
        folder = base / run_name if run_name else (base / Path(chosen).parent.parent.name if chosen
                                                    else latest_resumable_run(base))
        if chosen is not None:
            checkpoint = Path(chosen)
            if not checkpoint.is_file() or checkpoint.resolve().parent != (folder / "checkpoints").resolve():
                raise RunError(f"--resume --ckpt_path {chosen}: not a checkpoint file in {folder / 'checkpoints'}; "
                               "with --resume, --ckpt_path picks one of the run's own checkpoints (to start another "
                               "run from a checkpoint, drop --resume)")
            return folder.name, checkpoint
        checkpoint = folder / "checkpoints" / "last.ckpt"
        if not checkpoint.is_file():
            others = sorted((folder / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
            hint = (f"; the newest checkpoint there is {others[-1].name}: continue from it with --resume "
                    f"--run_name {folder.name} --ckpt_path {others[-1]}") if others else "; start without --resume"
            raise RunError(f"nothing to resume in {folder}: no checkpoints/last.ckpt{hint}")
        return folder.name, checkpoint
    if run_name and (base / run_name / "checkpoints").exists():
        raise RunError(f"run {base / run_name} already has checkpoints; pass --resume to continue it, or another "
                       "--run_name")
    held = results_in(base / run_name) if run_name else []
    if held:  # a finished run without checkpoints (e.g. configs/fast.yaml), or files put there by hand
        shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        raise RunError(f"run {base / run_name} already holds {shown}; a run folder is never overwritten: choose "
                       "another --run_name (or move that folder away to reuse the name)")
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
                command = process_command(pid)
                if command is not None and "opdlab" not in command:  # the fit that wrote it is gone; its id was reused
                    raise RunError(f"run {folder} has a lock file naming process {pid}, which is now {command[:60]!r}, "
                                   f"not an opdlab fit: the lock is probably stale (left by a fit that was killed). If "
                                   f"no opdlab fit uses this run, delete {lock} and start again") from None
                raise RunError(f"run {folder} is in use by another opdlab fit (process {pid}); wait for it, or choose "
                               f"another --run_name (if that process is not using this run, delete {lock})") from None
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


def process_command(pid: int) -> str | None:
    """The command line of a running process (Linux /proc), or None where it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.replace(b"\0", b" ").decode(errors="replace").strip() or None
