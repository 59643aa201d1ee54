"""Graceful stop on SIGTERM/SIGINT: finish the step, save, exit 0.

The first signal only raises a flag that the trainer checks after a step: after
every step on one process; on multi-process backends every ``train.log_every``
steps, when all workers agree through one collective (so all stop after the
same step). A second signal exits at once.
"""

from __future__ import annotations

import os
import signal
import sys


class StopRequest:
    """Installs SIGTERM/SIGINT handlers for the duration of a ``with`` block.

    Attributes:
        requested: The signal name once one arrived, else None.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested is not None:
            sys.stderr.write(f"\nsecond signal ({signal.Signals(signum).name}): exiting now without saving\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.requested = signal.Signals(signum).name
        sys.stderr.write(f"\n{self.requested}: finishing this step, then saving (send again to exit at once)\n")
        sys.stderr.flush()

    def __enter__(self) -> "StopRequest":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
