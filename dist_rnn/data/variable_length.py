"""Variable-length truncated BPTT (``train.variable_length``): AWD-LSTM's window lengths.

Merity et al. (2017) draw each training step's BPTT length around
``num_steps``: ``num_steps`` with probability 0.95, else ``num_steps / 2``,
plus a normal jitter of standard deviation 5, truncated to an integer and
at least 5 tokens; the step's learning rate is scaled by ``length /
num_steps``. Here the length is also capped at ``num_steps + 20`` (four
standard deviations above ``num_steps``): a bound on the activation memory of
a step, which the normal jitter alone does not have.

A length is a pure function of (``train.seed``, global step), so every
replica and worker draws the same one without communicating, and a resumed
run draws what the uninterrupted run drew. The random numbers come from a
counter-based hash (SplitMix64's mixing function) rather than a numpy
generator: it is the same on every numpy version (numpy does not promise
stable streams for ``Generator``), can be recomputed by hand, and draws the
lengths of a whole epoch in one vectorized call (the number of steps of a
750-epoch run is known at start-up in well under a second).

The windows of an epoch tile each row without gap or overlap: step ``s``
starts where step ``s - 1`` ended; the epoch's last window is cut to the
tokens left (as in AWD-LSTM), so every target of the rows is trained on.
Because the lengths vary, the batch count alone does not say where an epoch
stands: checkpoints hold the tokens of each row consumed in the epoch
(:class:`~dist_rnn.training.checkpoints.StreamPosition`).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import tensorflow as tf

from dist_rnn.data.batching import StreamBatcher, window_pipeline

MIN_LENGTH = 5  # AWD-LSTM's lower bound on a window
JITTER_STD = 5.0  # standard deviation of the normal jitter, in tokens
HALF_PROBABILITY = 0.05  # chance of drawing around num_steps / 2 instead of num_steps
EXTRA_LENGTH = 20  # a window is at most num_steps + EXTRA_LENGTH tokens
SALT = 0x56415220424F5054  # keeps these draws apart from every other use of the step seed

_MASK = (1 << 64) - 1


def max_window_length(num_steps: int) -> int:
    """The longest window drawn for ``num_steps``: ``num_steps + 20``."""
    return num_steps + EXTRA_LENGTH


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's mixing function of uint64 words (arithmetic modulo 2**64)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def step_uniforms(seed: int, steps: np.ndarray, count: int) -> np.ndarray:
    """``count`` uniform numbers in [0, 1) for each global step, a pure function of (seed, step).

    Args:
        seed: ``train.seed`` (any integer; taken modulo 2**64).
        steps: Global step numbers (0-based: the steps done before the step).
        count: Numbers per step.

    Returns:
        float64 ``[len(steps), count]``: the top 53 bits of
        ``mix(mix(mix(seed ^ SALT) ^ step) + i)`` over 2**53, ``i = 0 .. count - 1``.
    """
    key = _mix(np.array([(seed & _MASK) ^ SALT], np.uint64))
    per_step = _mix(key ^ np.asarray(steps, np.int64).astype(np.uint64).reshape(-1, 1))
    words = _mix(per_step + np.arange(count, dtype=np.uint64))
    return (words >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def window_lengths(seed: int, steps: np.ndarray, num_steps: int) -> np.ndarray:
    """The BPTT length drawn for each global step (before an epoch's last window is cut to what is left).

    ``u0, u1, u2`` = :func:`step_uniforms` of the step; ``base`` is
    ``num_steps`` if ``u0 < 0.95`` else ``num_steps / 2``; the normal number
    is Box-Muller's ``sqrt(-2 ln(1 - u1)) cos(2 pi u2)``; the length is
    ``base + 5 * normal`` truncated toward zero (Python's ``int``), then
    clipped to ``[5, num_steps + 20]``.

    Args:
        seed: ``train.seed``.
        steps: Global step numbers (0-based).
        num_steps: ``train.num_steps``.

    Returns:
        int64 lengths, one per step.
    """
    u = step_uniforms(seed, steps, 3)
    base = np.where(u[:, 0] < 1.0 - HALF_PROBABILITY, float(num_steps), num_steps / 2.0)
    normal = np.sqrt(-2.0 * np.log1p(-u[:, 1])) * np.cos(2.0 * np.pi * u[:, 2])
    drawn = np.trunc(base + JITTER_STD * normal)
    return np.clip(drawn, MIN_LENGTH, max_window_length(num_steps)).astype(np.int64)


class VariableLengthBatcher(StreamBatcher):
    """A :class:`StreamBatcher` whose windows have the lengths :func:`window_lengths` draws.

    Same arguments as :class:`StreamBatcher` (``seed`` is ``train.seed``,
    which also draws the lengths). Where an epoch stands is given by the
    global step of its next window and the tokens of each row already
    consumed in the epoch (``token``), not by a window index.
    """

    def lengths_from(self, epoch: int, step: int, token: int) -> np.ndarray:
        """Lengths of the windows left in ``epoch``: the first is global step ``step``'s.

        Args:
            epoch: The epoch (1-based; sets the random offset).
            step: Global step (0-based) of the next window.
            token: Tokens of each row consumed in the epoch so far.

        Returns:
            int64 lengths summing to the targets left in each row; the last
            is cut to what is left. Empty when the epoch is done.
        """
        left = self.row_length - 1 - self.offset(epoch) - token
        if left <= 0:
            return np.zeros(0, np.int64)
        # Draw about a third more windows than the mean length needs, and more if that falls short.
        drawn = np.zeros(0, np.int64)
        chunk = left // max(MIN_LENGTH, 3 * self.num_steps // 4) + 1
        while drawn.sum() < left:
            first = step + len(drawn)
            drawn = np.concatenate([drawn, window_lengths(self.seed, np.arange(first, first + chunk), self.num_steps)])
        ends = np.cumsum(drawn)
        count = int(np.searchsorted(ends, left)) + 1
        lengths = drawn[:count].copy()
        lengths[-1] -= ends[count - 1] - left
        return lengths

    def windows_in_epoch(self, epoch: int, step: int, index: int, token: int) -> int:
        """Windows of ``epoch`` when ``index`` of them (``token`` tokens per row) are done before global step ``step``."""
        return index + len(self.lengths_from(epoch, step, token))

    def steps_through_epoch(self, last_epoch: int, epoch: int, step: int, index: int, token: int) -> int:
        """The global step count at the end of ``last_epoch``, training standing at (epoch, step, token).

        The epochs after the current one start at token 0 with the step count
        the previous one ended at.
        """
        if epoch > last_epoch:
            return step
        step += len(self.lengths_from(epoch, step, token))
        for later in range(epoch + 1, last_epoch + 1):
            step += len(self.lengths_from(later, step, 0))
        return step

    def window_at(self, epoch: int, token: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """The window of ``length`` tokens starting ``token`` tokens into ``epoch``'s rows (int32 inputs, targets)."""
        return self.read(self.offset(epoch) + token, length)

    def dataset(self, epoch: int, start_index: int = 0, step: int = 0, token: int = 0) -> tf.data.Dataset:
        """The windows left in ``epoch`` from global step ``step`` and ``token`` tokens per row on, prefetched.

        ``start_index`` is not needed (the token position says where the
        epoch stands); it is accepted for the :class:`StreamBatcher` interface.
        """
        lengths = self.lengths_from(epoch, step, token)

        def windows() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            start = token
            for length in lengths:
                yield self.window_at(epoch, start, int(length))
                start += int(length)

        spec = tf.TensorSpec([self.batch_size, None], tf.int32)
        return window_pipeline(windows, (spec, spec))
