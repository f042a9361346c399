"""A status line on a terminal (stderr), shown once work has run for a couple of seconds: builds and
evaluations say what they are doing; logs that are not a terminal get none of it."""

from __future__ import annotations

import os
import sys
import time

SHOW_AFTER_S = float(os.environ.get("MLQPIPE_PROGRESS_AFTER", "2"))  # seconds before a status line appears


class StatusLine:
    def __init__(self, after_s: float | None = None):
        self.after_s = SHOW_AFTER_S if after_s is None else after_s
        self.started = time.monotonic()
        self.tty = bool(getattr(sys.stderr, "isatty", lambda: False)())
        self.shown = False

    def show(self, text: str) -> None:
        """Replace the line with `text`, once the work has run long enough (terminals only)."""
        if self.tty and time.monotonic() - self.started > self.after_s:
            sys.stderr.write("\r\x1b[2K" + text[:200])
            sys.stderr.flush()
            self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()
            self.shown = False
