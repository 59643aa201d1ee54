"""Progress of a long pass over bytes: a bar on a terminal, log lines elsewhere."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("dist_rnn")


class ByteProgress:
    """Reports bytes done, MB/s and the estimated time left of one pass.

    Args:
        label: What the pass does (``encoding``, ``counting``, ...).
        total: Bytes expected (0 if unknown: no ETA).
        mode: ``bar`` (redrawn on stderr, for a terminal), ``log`` (a line on
            the ``dist_rnn`` logger every ``log_every`` seconds and at the end)
            or ``off``; None picks ``bar`` when stderr is a terminal, else ``log``.
        log_every: Seconds between log lines.
    """

    def __init__(self, label: str, total: int, mode: str | None = None, log_every: float = 10.0):
        self.label, self.total = label, max(int(total), 0)
        self.mode = mode or ("bar" if sys.stderr.isatty() else "log")
        self.log_every = log_every
        self.done = 0
        self._start = self._last = time.monotonic()

    def update(self, n: int) -> None:
        """Adds ``n`` bytes done; redraws or logs when due."""
        self.done += n
        now = time.monotonic()
        if self.mode == "bar" and now - self._last >= 0.2:
            self._last = now
            sys.stderr.write("\r" + self.line(now) + "\033[K")
            sys.stderr.flush()
        elif self.mode == "log" and now - self._last >= self.log_every:
            self._last = now
            log.info(self.line(now))

    def close(self) -> None:
        """Reports the pass' end (total bytes and mean speed)."""
        line = self.line(time.monotonic(), final=True)
        if self.mode == "bar":
            sys.stderr.write("\r" + line + "\033[K\n")
            sys.stderr.flush()
        elif self.mode == "log":
            log.info(line)

    def line(self, now: float, final: bool = False) -> str:
        """``label: done/total MB, speed MB/s, ETA h:mm:ss``."""
        elapsed = max(now - self._start, 1e-9)
        speed = self.done / elapsed
        text = f"{self.label}: {self.done / 1e6:.1f}"
        if self.total:
            text += f"/{self.total / 1e6:.1f}"
        text += f" MB, {speed / 1e6:.1f} MB/s"
        if final:
            return text + f", {elapsed:.1f} s"
        if self.total and speed > 0:
            left = max(self.total - self.done, 0) / speed
            text += f", ETA {int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"
        return text


class _CurrentStdout(logging.StreamHandler):
    """A handler writing to whatever ``sys.stdout`` is at the time of each line (tests swap it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def log_to_stdout() -> None:
    """Sends the ``dist_rnn`` logger's INFO lines (the pass lines of ``dist-rnn prepare``) to stdout."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO)
    handler = _CurrentStdout()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
