"""Ctrl-C and SIGTERM (what SLURM and most schedulers send before killing a job) end a fit cleanly.

The step under way finishes, a checkpoint is written to the run's `checkpoints/last.ckpt` (where
`opdlab fit --resume` looks), and `opdlab fit` exits with 128 + the signal number and prints how to
continue. A second Ctrl-C stops at once (nothing more is saved). With several processes the ranks agree
each step whether any of them was signalled, so all of them save together (the save is a collective).
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import lightning as L
import torch

from opdlab.distributed import all_reduce_sum

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SaveOnInterrupt(L.Callback):
    """Checkpoint at the end of the current step on SIGINT/SIGTERM, then stop training."""

    def __init__(self) -> None:
        self.received: int | None = None  # the signal this process got
        self.stopped_by: int | None = None  # the signal the run stopped for (any rank's)
        self.saved: Path | None = None
        self.previous: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        """Installed after Lightning's own SIGTERM handler (registered when the run starts), replacing it for
        the length of training: Lightning's stops the loop with exit code 0 and no checkpoint."""
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for sig in SIGNALS:
            self.previous[sig] = signal.signal(sig, self.handle)

    def handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.received = signum
        print(f"\nopdlab fit: {signal.Signals(signum).name} received: saving a checkpoint when this step ends "
              "(Ctrl-C again to stop at once, without one)", file=sys.stderr, flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        flag = torch.tensor(float(self.received or 0), device=pl_module.device)
        signum = int(all_reduce_sum(flag).item()) if trainer.world_size > 1 else int(flag.item())
        if not signum:
            return
        self.stopped_by = self.received or signal.SIGTERM
        self.saved = self.checkpoint_path(trainer)
        trainer.save_checkpoint(str(self.saved))
        trainer.should_stop = True

    @staticmethod
    def checkpoint_path(trainer) -> Path:
        """`last.ckpt` beside the run's other checkpoints (a ModelCheckpoint's folder, else the run's)."""
        callback = trainer.checkpoint_callback
        if callback is not None and getattr(callback, "dirpath", None):
            return Path(callback.dirpath) / "last.ckpt"
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / "last.ckpt"

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
