"""A status line rewritten in place on a terminal; silent when output is not a terminal."""

import sys
from typing import TextIO


class StatusLine:
    def __init__(self, stream: TextIO | None = None, interval: float = 0.5) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.interval = interval
        self._last = float("-inf")
        self._width = 0

    def update(self, text: str, now: float, force: bool = False) -> None:
        if not self.enabled or (not force and now - self._last < self.interval):
            return
        self._last = now
        pad = max(0, self._width - len(text))
        self._width = len(text)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
