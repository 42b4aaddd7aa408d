"""Progress that reads well both on a terminal and in a log file: one helper for `opdlab fit`'s step bar
(opdlab.callbacks.progress) and `opdlab eval`'s problem count.

On a terminal (or a Jupyter cell) a tqdm bar redraws in place. Anywhere else (a file, a pipe, CI, a
scheduler's log) a bar would write a line of carriage returns and escape codes per refresh, so progress is a
plain line instead, and only when one is due (`line_due`): at the first step, every `fraction` of the total,
after `interval` seconds without one, and at the end; never twice for the same count.

This module imports neither Lightning nor torch: `opdlab eval` uses it before any model loads.
"""

from __future__ import annotations

import math
import sys
import time


def is_interactive(stream) -> bool:
    """A stream a bar can redraw in place: a terminal, or a Jupyter cell's output (which reads `\\r`)."""
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    return type(stream).__module__.startswith("ipykernel")


def line_due(n: int, total: int | None, *, first: int, last: int, last_time: float, interval: float,
             fraction: float | None = None, now: float | None = None) -> bool:
    """Whether a plain progress line is due at count `n` (steps, problems ...).

    Args:
        n: the count now.
        total: the count at the end (None or <= 0: unknown, then only `interval` applies besides the first).
        first: the count when progress started (a resumed run starts where it was).
        last: the count of the last line (`first` before any): a count is printed once, a stalled one never again.
        last_time: `time.monotonic()` of the last line.
        interval: the most seconds between two lines.
        fraction: a line every this share of `total` too (None or 0: none).
        now: `time.monotonic()`, for tests.
    """
    if n == last:
        return False
    total = total if total and total > 0 else None
    every = max(1, math.ceil(total * fraction)) if total and fraction and fraction > 0 else None
    now = time.monotonic() if now is None else now
    return (n == first + 1
            or (total is not None and n >= total)
            or (every is not None and n % every == 0)
            or now - last_time >= interval)


class Progress:
    """A count out of `total` (e.g. problems) on `stream` (stderr by default): tqdm where the stream is
    interactive, else plain lines `<desc>: 12/48 problems (25%) <note>` when `line_due`."""

    def __init__(self, total: int, initial: int, desc: str, unit: str = "problem", interval: float = 30.0,
                 fraction: float | None = None, stream=None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.n, self.first, self.last = total, initial, initial, initial
        self.desc, self.unit, self.interval, self.fraction = desc, unit, interval, fraction
        self.last_time = float("-inf")  # no line yet: the first update prints one
        self.bar = None
        if is_interactive(self.stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=self.stream)

    def update(self, n: int, note: str = "") -> None:
        self.n += n
        if self.bar is not None:
            self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(n)
        elif line_due(self.n, self.total, first=self.first, last=self.last, last_time=self.last_time,
                      interval=self.interval, fraction=self.fraction):
            self.last, self.last_time = self.n, time.monotonic()
            print(f"{self.desc}: {self.n}/{self.total} {self.unit}s ({self.n / max(self.total, 1):.0%})"
                  f"{' ' + note if note else ''}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
