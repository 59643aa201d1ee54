"""Where a training run stands between steps: its position, log window, skipped steps and cadences.

The trainer (:mod:`dist_rnn.training.trainer`) keeps one of each while it
loops; none of them touches TensorFlow state, so they are plain objects.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import tensorflow as tf


class SkippedSteps:
    """Optimizer steps skipped because the reduced gradient was not finite.

    The finite flag is computed from the all-reduced gradient, so every
    replica and worker records the same skips and stops at the same step.

    Args:
        max_consecutive: ``train.max_consecutive_skips``.
    """

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.total = 0
        self.consecutive: list[int] = []
        self.unreported: list[int] = []

    def record(self, step: int, finite: bool) -> bool:
        """Records whether ``step`` (1-based) applied its update.

        Returns:
            True when the last ``max_consecutive`` steps were all skipped.
        """
        if finite:
            self.consecutive = []
            return False
        self.total += 1
        self.consecutive.append(step)
        self.unreported.append(step)
        return len(self.consecutive) >= self.max_consecutive

    def report(self) -> str | None:
        """One line naming the skips since the last report (and clearing them), or None."""
        if not self.unreported:
            return None
        steps = self.unreported
        shown = ", ".join(str(s) for s in steps[:20]) + (f", ... {steps[-1]}" if len(steps) > 20 else "")
        self.unreported = []
        return (f"skipped {len(steps)} step(s) whose all-reduced gradient was not finite (weights and "
                f"optimizer state unchanged): step {shown}; {self.total} skipped since this process started")


@dataclass
class Position:
    """Where training is: steps done, the epoch (1-based), the batches of that epoch done and their tokens per row."""

    step: int
    epoch: int
    index: int
    token: int = 0

    def next_epoch(self) -> None:
        """Moves to the start of the next epoch."""
        self.epoch, self.index, self.token = self.epoch + 1, 0, 0


class LogWindow:
    """The steps since the last log point: their loss sums and when the window started.

    Args:
        step: The step the window starts after.
    """

    def __init__(self, step: int):
        self.losses: list[tf.Tensor] = []
        self.tokens = 0  # target tokens of the global batch in ``losses`` (window lengths may vary)
        self.start_step = step
        self.start_time = time.perf_counter()

    def restart(self, step: int) -> None:
        """Starts a new window after ``step`` (a log point was just written)."""
        self.losses, self.tokens, self.start_step, self.start_time = [], 0, step, time.perf_counter()

    def restart_clock(self) -> None:
        """Leaves an evaluation or checkpoint save out of the window's time."""
        self.start_time = time.perf_counter()


def due(every: int | None, step: int) -> bool:
    """Whether a cadence of ``every`` steps (0 or None: off) falls on ``step``."""
    return bool(every) and step % every == 0
