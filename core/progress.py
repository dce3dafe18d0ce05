"""Progress bars that stay readable in log files.

On a terminal a bar redraws in place; written to a file or a pipe (CI logs, `make demo > log`), tqdm's
carriage-return frames would pile up on one line, so there it becomes a plain status line every 30 s and one
at the end.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


class _Lines:
    """A text stream for tqdm that writes each redraw as its own line (and drops the blank clearing writes)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.strip("\r\n")
        if text.strip():
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, file: IO[str] | None = None,
                 **kwargs: Any) -> tqdm:
    """tqdm on `file` (stderr by default): redrawn on a TTY, plain periodic lines elsewhere."""
    stream = file or sys.stderr
    if stream.isatty():
        return tqdm(iterable, file=stream, disable=not enabled, dynamic_ncols=True, **kwargs)
    return tqdm(iterable, file=_Lines(stream), disable=not enabled, delay=LOG_INTERVAL_S, mininterval=LOG_INTERVAL_S,
                ncols=100, **kwargs)
