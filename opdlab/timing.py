"""Wall time of the named stages of a training step (logged as `time/<stage>`)."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class StageTimer:
    """Wall time of named stages of a step (synchronising CUDA so GPU time lands in the right stage): `seconds`
    (stage -> duration) and `spans` (stage, start, duration), the starts in `time.perf_counter()` seconds, the
    clock a trace of the run (`opdlab.callbacks.trace.StageTrace`) places them on."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, {}
        self.spans: list[tuple[str, float, float]] = []

    @contextmanager
    def __call__(self, name: str):
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        yield
        sync()
        self.seconds[name] = time.perf_counter() - start
        self.spans.append((name, start, self.seconds[name]))
