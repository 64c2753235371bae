"""Progress on stderr: a redrawn bar on a terminal, a few plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
TTY_INTERVAL = 0.1
LINE_INTERVAL = 10.0
BAR = 24


def human(n: float) -> str:
    """Binary units: ``1.5 GiB``."""
    for unit in UNITS:
        if abs(n) < 1024 or unit == UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def rate(n: float, seconds: float) -> str:
    return f"{human(n / seconds)}/s" if seconds > 0 else "-"


class Progress:
    """``start(label, total)``, ``advance(n)``... ``done()``; ``note(text)`` for messages.

    On a terminal the bar is redrawn at most every 0.1 s; on anything else a
    line is written every 10 % or 10 s, whichever comes first, so logs stay short.
    """

    def __init__(self, stream: TextIO | None = None, *, quiet: bool = False, tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.tty = self.stream.isatty() if tty is None else tty
        self.label = ""
        self.total = 0
        self.done_bytes = 0
        self.started = 0.0
        self._last_draw = 0.0
        self._last_tenth = -1
        self._drawn = False

    def note(self, text: str) -> None:
        """A message the operator should see (never suppressed by ``quiet``)."""
        self._clear()
        print(f"nbdfleece-backup: {text}", file=self.stream, flush=True)

    def info(self, text: str) -> None:
        """A message that ``quiet`` suppresses."""
        if not self.quiet:
            self.note(text)

    def start(self, label: str, total: int) -> None:
        self.label, self.total, self.done_bytes = label, total, 0
        self.started = self._last_draw = time.monotonic()
        self._last_tenth = -1
        self._draw(force=True)

    def advance(self, n: int) -> None:
        self.done_bytes += n
        self._draw(force=False)

    def finish(self) -> float:
        """End the bar; returns the seconds since ``start``."""
        elapsed = time.monotonic() - self.started
        self._draw(force=True, final=True)
        return elapsed

    def _clear(self) -> None:
        if self._drawn and self.tty:
            print("\r\033[K", end="", file=self.stream, flush=True)
            self._drawn = False

    def _draw(self, *, force: bool, final: bool = False) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        elapsed = now - self.started
        fraction = self.done_bytes / self.total if self.total else 1.0
        if self.tty:
            if not force and now - self._last_draw < TTY_INTERVAL:
                return
            filled = int(BAR * fraction)
            eta = ""
            if 0 < self.done_bytes < self.total and elapsed > 0:
                left = (self.total - self.done_bytes) * elapsed / self.done_bytes
                eta = f"  ETA {int(left) // 60}:{int(left) % 60:02d}"
            line = (f"{self.label} [{'#' * filled}{'.' * (BAR - filled)}] {fraction:4.0%} "
                    f"{human(self.done_bytes)} / {human(self.total)}  {rate(self.done_bytes, elapsed)}{eta}")
            print("\r\033[K" + line, end="\n" if final else "", file=self.stream, flush=True)
            self._drawn = not final
        else:
            tenth = int(fraction * 10)
            recent = now - self._last_draw < LINE_INTERVAL
            if not final and not force and tenth == self._last_tenth and recent:
                return
            if final and self._last_tenth == 10:
                return
            self._last_tenth = tenth
            print(f"{self.label}: {fraction:.0%} ({human(self.done_bytes)} of {human(self.total)}, "
                  f"{rate(self.done_bytes, elapsed)})", file=self.stream, flush=True)
        self._last_draw = now
