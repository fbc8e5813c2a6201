"""What a running job reports and polls, in one protocol (``Events``), and a progress bar that speaks it.

Front ends subclass ``Events``: the CLI prints to stderr (one updating line on a terminal, a line every 10 %
otherwise), the RELION job prints to run.out and polls RELION_JOB_ABORT_NOW, the cryoSPARC job writes its
event log. The engine only calls ``Progress`` (lines) and ``Events.check_abort`` (between batches).
"""

from __future__ import annotations

import sys
import time


class Events:
    """Sink for progress lines, messages and figures, and the abort poll. The base class prints messages to
    ``stream`` (default stdout) and progress to ``stream`` (default stderr), ignores figures, never aborts."""

    wants_figures = False  # front ends that show figures (the cryoSPARC event log) set True

    def __init__(self, stream=None):
        self._stream = stream

    @property
    def stream(self):
        """Where progress goes."""
        return self._stream or sys.stderr

    @property
    def interactive(self) -> bool:
        """True on a terminal: progress updates one line in place."""
        return hasattr(self.stream, "isatty") and self.stream.isatty()

    def message(self, text: str) -> None:
        """A line for the user (a step started or finished, a result)."""
        out = self._stream or sys.stdout
        out.write(text + "\n")
        out.flush()

    def progress(self, text: str, final: bool = False) -> None:
        """A progress line (the bar); on a terminal it overwrites the previous one."""
        if self.interactive:
            self.stream.write("\r" + text + ("\n" if final else ""))
            self.stream.flush()
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def figure(self, fig, title: str) -> None:
        """A matplotlib figure with a title (the cryoSPARC event log shows it; files are written by the steps)."""

    def check_abort(self) -> None:
        """Raise to stop the job (e.g. the user pressed Abort); called between batches."""


class Progress:
    """``Progress(total, label, events=...)``; ``update(k)`` after each k items (polls for abort);
    ``close()`` at the end. Lines go out every 10 % (every update on a terminal)."""

    def __init__(self, total: int, label: str, enabled: bool = True, events: Events | None = None,
                 unit: str = "particles"):
        self.total, self.label, self.enabled, self.unit = max(int(total), 1), label, enabled, unit
        self.events = events or Events()
        self.done, self.start, self._last_decile = 0, time.time(), -1

    def update(self, k: int = 1) -> None:
        self.done += k
        if self.enabled:
            frac = min(self.done / self.total, 1.0)
            decile = int(frac * 10)
            if self.events.interactive or decile != self._last_decile:
                self._last_decile = decile
                elapsed = time.time() - self.start
                rate = self.done / elapsed if elapsed > 0 else 0.0
                eta = (self.total - self.done) / rate if rate > 0 else 0.0
                bar = "#" * int(frac * 30)
                self.events.progress(f"{self.label:>12} [{bar:<30}] {self.done}/{self.total} {self.unit} "
                                     f"{rate:,.0f}/s elapsed {elapsed:,.0f}s eta {eta:,.0f}s")
        self.events.check_abort()

    def close(self) -> None:
        if self.enabled and self.events.interactive:
            self.events.stream.write("\n")
            self.events.stream.flush()

    @property
    def elapsed(self) -> float:
        return time.time() - self.start
