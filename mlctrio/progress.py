"""Progress of long steps (downloads, hashing, weight loading) in a form a person can follow.

Rules:
- On a terminal (the stream's `isatty()`, and the logger enabled for INFO): one bar on the
  stream, redrawn in place with "\\r" at most `BAR_REDRAWS_PER_S` times a second, ended with a
  newline when the step completes or is closed.
- Anywhere else (a pipe, a log file, journald, pytest): INFO log lines through `logging`, at most
  one per tenth of the way plus the last, e.g. "loading weights: 12/21 tensors" or
  "downloading x.whl: 45.1/98.4 MB (46%)". A step smaller than `min_total` reports nothing.
- A step completes when `done` reaches `total`; `close()` (or leaving the `with` block) ends an
  unfinished one. No module-level state: every step makes its own reporter.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from types import TracebackType
from typing import Literal, TextIO

import attrs

BAR_WIDTH = 30
BAR_REDRAWS_PER_S = 10.0
STEPS = 10

Unit = Literal["items", "bytes"]

_default_logger = logging.getLogger(__name__)


def _stderr() -> TextIO:
    return sys.stderr


@attrs.define
class Progress:
    """One step's progress: `advance(n)` / `update_to(done)`, then completion or `close()`."""

    what: str
    total: int
    unit: Unit = "items"
    noun: str = ""  # what the items are, e.g. "tensors"
    min_total: int = 0
    logger: logging.Logger = _default_logger
    stream: TextIO = attrs.field(factory=_stderr)
    bar: bool | None = None  # None: a bar when `stream` is a terminal
    done: int = 0
    closed: bool = False
    _every: int = attrs.field(init=False, default=1)
    _next_mark: int = attrs.field(init=False, default=1)
    _last_draw: float = attrs.field(init=False, default=-math.inf)

    def __attrs_post_init__(self) -> None:
        if self.bar is None:
            self.bar = _is_tty(self.stream) and self.logger.isEnabledFor(logging.INFO)
        self._every = max(1, math.ceil(self.total / STEPS))
        self._next_mark = self._every
        self.closed = self.total < self.min_total or self.total <= 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def advance(self, n: int = 1) -> None:
        self.update_to(self.done + n)

    def update_to(self, done: int) -> None:
        self.done = done
        if self.closed:
            return
        if self.bar:
            now = time.monotonic()
            if done >= self.total or now - self._last_draw >= 1.0 / BAR_REDRAWS_PER_S:
                self._last_draw = now
                self._draw()
        elif done >= self._next_mark or done >= self.total:
            self._next_mark = (done // self._every + 1) * self._every
            self.logger.info("%s: %s", self.what, self.describe())
        if done >= self.total:
            self._finish()

    def close(self) -> None:
        """End the step where it is (a bar gets its newline); later updates report nothing."""
        if not self.closed:
            if self.bar:
                self._draw()
            self._finish()

    def describe(self) -> str:
        """ "12/21 tensors" or "45.1/98.4 MB (46%)"."""
        if self.unit == "bytes":
            percent = min(100, 100 * self.done // self.total)
            return f"{self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB ({percent}%)"
        return f"{self.done}/{self.total}" + (f" {self.noun}" if self.noun else "")

    def _draw(self) -> None:
        filled = min(BAR_WIDTH, BAR_WIDTH * self.done // self.total)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        self.stream.write(f"\r{self.what}: [{bar}] {self.describe()}")
        self.stream.flush()

    def _finish(self) -> None:
        self.closed = True
        if self.bar:
            self.stream.write("\n")
            self.stream.flush()


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream without a terminal
        return False
