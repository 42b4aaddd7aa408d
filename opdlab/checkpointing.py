"""Checkpoint plumbing: crash-safe checkpoint files, and the global RNG states a checkpoint carries.

A checkpoint is written beside its target and renamed into place.

A process killed mid-save (SIGKILL, pre-emption, OOM) leaves the previous checkpoint intact and at most
a stray `*.tmp` file, never a truncated `.ckpt` that `--ckpt_path` would then fail to load.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose saves are atomic on POSIX file systems (write, fsync, rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.is_file()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as err:  # a full disk surfaces as "enforce fail at inline_container.cc"
            free = shutil.disk_usage(path.parent).free
            raise OSError(f"could not write checkpoint {path} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                          f"{free / 2**20:,.0f} MiB free on {path.parent}: free space or point the checkpoint "
                          "callback's dirpath elsewhere. "
                          + ("The previous version of this file is intact." if existed else "Nothing was written.")) from err
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path, *args, **kwargs) -> dict:
        """Load, refusing missing, empty and unreadable local files with a message that says which and what
        to do (torch's own error for a garbage file advises `weights_only=False`, which would not help)."""
        if "://" in str(path):  # remote (fsspec) paths: Lightning's own handling
            return super().load_checkpoint(path, *args, **kwargs)
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist; pass a .ckpt file of a run (e.g. "
                                    "runs/<name>/version_<n>/checkpoints/last.ckpt)")
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - zip, pickle and torch errors alike: the file is not a checkpoint
            raise ValueError(f"checkpoint {path} ({path.stat().st_size} bytes) is not a readable checkpoint "
                             f"({type(err).__name__}); it may be truncated or another kind of file: pass the "
                             "last.ckpt (or an every_n_train_steps checkpoint) that opdlab fit wrote") from None


def capture_rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # Plain tensors and numbers only, so the checkpoint loads with torch.load(weights_only=True).
    numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
