"""What every benchmark prints and appends to its results file: a dated heading, the machine, the exact
command, the setting, then the table. (Scripts run as `python benchmarks/<name>.py`, so this imports
as `report`.)"""

from __future__ import annotations

import sys
from datetime import datetime, timezone


def publish(name: str, machine: str, setting: str, body: str, output: str | None) -> str:
    """Print the result and, with `output`, append it there; returns the markdown text.

    machine: the text after "Machine: " (no newline); setting: what was measured, ending in a newline.
    """
    text = (f"## {name} — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
            f"Machine: {machine}\n"
            f"Command: `python {' '.join(sys.argv)}`\n"
            f"{setting}\n{body}\n")
    print(text)
    if output:
        with open(output, "a") as f:
            f.write(text + "\n")
    return text
