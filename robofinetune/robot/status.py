"""A one-line live status for deploy and record: rewritten in place on a terminal, printed every few seconds
otherwise (so CI logs stay readable)."""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO


class StatusLine:
    def __init__(self, stream: TextIO | None = None, enabled: bool = True, interval: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval
        self._last_print = 0.0
        self._shown = False

    def update(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        if self.tty:
            width = shutil.get_terminal_size((120, 20)).columns - 1
            self.stream.write("\r" + text[:width].ljust(width))
            self.stream.flush()
            self._shown = True
        elif force or time.monotonic() - self._last_print >= self.interval:
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last_print = time.monotonic()

    def message(self, text: str) -> None:
        """A line that stays (episode results), printed above the status line."""
        if not self.enabled:
            return
        if self.tty and self._shown:
            self.stream.write("\r" + " " * (shutil.get_terminal_size((120, 20)).columns - 1) + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()
        self._shown = False

    def close(self) -> None:
        if self.enabled and self.tty and self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False
