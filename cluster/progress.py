"""What bring-up tells the operator while it works, on stderr (stdout carries results): one-line
messages, and progress of long waits (workers loading their weights, Ray placing workers) as bars
redrawn in place on a terminal, or as plain lines every few seconds when stderr is a file or a pipe
(a log collector, `kubectl logs`).
"""

from __future__ import annotations

import sys
import time

PLAIN_EVERY_S = 5.0  # between plain lines: a log gets a line per 5 s of a long load, not one per poll
BAR_WIDTH = 24


def progress(message: str) -> None:
    """A bring-up message for the operator."""
    print(f"[expertmesh] {message}", file=sys.stderr, flush=True)


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if nbytes >= scale or unit == "MiB":
            return f"{nbytes / scale:.1f} {unit}"
    return ""


def _seconds(s: float) -> str:
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}min"


class Bars:
    """Named rows of (done, total) redrawn together: in place on a terminal, else a plain line per
    PLAIN_EVERY_S (and the first and the last). `unit` "bytes" shows sizes, a rate and time left."""

    def __init__(self, what: str, names: list[str], unit: str = "bytes", stream=None):
        self.what, self.names, self.unit = what, names, unit
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty()
        self.rows: dict[str, tuple[float, float]] = {name: (0.0, 0.0) for name in names}
        self.start = time.monotonic()
        self.elapsed: dict[str, float] = {}  # seconds each row's work has run, as its reporter measured them
        self.final = False  # the work is over: a row with nothing to do says so
        self._drawn = 0  # lines on the terminal to redraw over
        self._said = None  # when the last plain line went out

    def update(self, name: str, done: float, total: float, elapsed: float | None = None) -> None:
        """elapsed: how long the row's work has run (default: since the bars began)."""
        self.rows[name] = (done, total)
        self.elapsed[name] = elapsed if elapsed is not None else time.monotonic() - self.start

    def show(self, final: bool = False) -> None:
        self.final = final
        now = time.monotonic()
        if self.terminal:
            lines = [self._row(name, now) for name in self.names]
            # back over the last drawing, then each row cleared and drawn again
            back = f"\x1b[{self._drawn}F" if self._drawn else ""
            self.stream.write(back + "".join(f"\x1b[2K{line}\n" for line in lines))
            self.stream.flush()
            self._drawn = len(lines)
        elif final or self._said is None or now - self._said >= PLAIN_EVERY_S:
            self._said = now
            rows = "; ".join(self._row(name, now, bar=False) for name in self.names)
            print(f"[expertmesh] {self.what}: {rows}", file=self.stream, flush=True)

    def _row(self, name: str, now: float, bar: bool = True) -> str:
        done, total = self.rows[name]
        share = min(done / total, 1.0) if total else 0.0
        head = f"{self.what} {name} [{'#' * int(share * BAR_WIDTH):-<{BAR_WIDTH}}] " if bar else f"{name} "
        if self.unit != "bytes":
            return f"{head}{done:.0f}/{total:.0f} {self.unit}, {_seconds(now - self.start)}"
        if not total:
            return f"{head}{'nothing to load' if self.final else 'starting its process'}"
        rate = done / max(self.elapsed[name], 1e-3)
        tail = "done" if done >= total else f"{_seconds((total - done) / rate)} left" if rate > 0 else "reading"
        return f"{head}{_size(done)}/{_size(total)} ({share:.0%}), {_size(rate)}/s, {tail}"
