"""A small progress bar with rate and time estimate, on stderr (one updating line on a terminal,
a line every 10 % otherwise, so log files stay short)."""

from __future__ import annotations

import sys
import time

DEFAULT_STREAM = None  # None: sys.stderr; the RELION adapter sets sys.stdout (RELION's run.out)


class Progress:
    """``Progress(total, label)``; ``update(k)`` after each k items; ``close()`` at the end."""

    def __init__(self, total: int, label: str, enabled: bool = True, stream=None, unit: str = "particles"):
        self.total, self.label, self.enabled, self.unit = max(int(total), 1), label, enabled, unit
        self.stream = stream or DEFAULT_STREAM or sys.stderr
        self.done, self.start, self._last_decile = 0, time.time(), -1
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, k: int = 1) -> None:
        self.done += k
        if not self.enabled:
            return
        frac = min(self.done / self.total, 1.0)
        decile = int(frac * 10)
        if not self.tty and decile == self._last_decile:
            return
        self._last_decile = decile
        elapsed = time.time() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        bar = "#" * int(frac * 30)
        text = (f"{self.label:>12} [{bar:<30}] {self.done}/{self.total} {self.unit} "
                f"{rate:,.0f}/s elapsed {elapsed:,.0f}s eta {eta:,.0f}s")
        self.stream.write(("\r" + text) if self.tty else text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()

    @property
    def elapsed(self) -> float:
        return time.time() - self.start
