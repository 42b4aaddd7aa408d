"""What opdlab's commands print besides their results: the one-line error format, the traceback switch, and the
Lightning messages that say nothing about an opdlab run. Every command imports this small module (and nothing
here imports the commands), so there is one place for each."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import NoReturn

TRACEBACK_ENV = "OPDLAB_TRACEBACK"


class OpdlabError(Exception):
    """A problem with the user's input (an option, a file, a folder, a plugin) that opdlab states in one line.
    Raise it (or a subclass) anywhere; `opdlab.cli.main` prints it with `error_exit`."""


def traceback_wanted() -> bool:
    """OPDLAB_TRACEBACK=1 (anything but empty or 0): show tracebacks instead of one-line errors."""
    return os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0")


def error_line(message: object, prog: str = "opdlab") -> str:
    """`<prog>: error: <message>` on one line (whitespace and line breaks of the message collapsed)."""
    return f"{prog}: error: {' '.join(str(message).split())}"


def error_exit(message: object, prog: str = "opdlab", code: int = 1, hint: str | None = None) -> NoReturn:
    """Print the one-line error (and a hint line: by default, how to see the traceback) and exit with `code`."""
    hint = f"(set {TRACEBACK_ENV}=1 to see where it was raised)" if hint is None else hint
    text = error_line(message, prog) + (f"\n{hint}" if hint else "")
    if code == 1:
        sys.exit(text)  # Python prints it to stderr; callers in-process read it from SystemExit.code
    sys.stderr.write(text + "\n")
    raise SystemExit(code)


def transformers_bars_only_on_a_terminal() -> None:
    """transformers' "Loading weights" / "Writing model shards" bars: on a terminal as they are; in a log file
    (CI, a scheduler's output) they would be lines of carriage returns, so they are turned off there."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def drop_advertising(record: logging.LogRecord) -> bool:
    """Lightning's tip to install a cloud logger, printed at every fit: not ours to pass on."""
    return "litlogger" not in record.getMessage()


def silence_lightning_noise() -> None:
    """Lightning's messages that say nothing about an opdlab run (every command that trains calls this)."""
    # The frozen teacher is in eval mode on purpose; Lightning warns about it at every fit.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # Validation metrics are torchmetrics metrics, which sync across ranks when computed; Lightning asks for
    # sync_dist as soon as a process group exists (the vllm engine makes one even in a single process).
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('val/")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(drop_advertising)
