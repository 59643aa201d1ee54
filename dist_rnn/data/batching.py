"""Batching for stateful truncated BPTT, as in the classic PTB iterator.

The token stream is cut into ``batch_size`` contiguous rows and walked
``num_steps`` tokens at a time, so row ``i`` of batch ``k + 1`` continues row
``i`` of batch ``k``. The recurrent state of row ``i`` can therefore be carried
from one batch to the next.

Training (:class:`StreamBatcher`) cuts the split to whole rows and whole
windows. Evaluation (:class:`EvalBatcher`) scores every token of the split
except the first exactly once: rows overlap by one token, may differ in length
by one (padded, with weight 0) and the last window may be shorter.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from dist_rnn.errors import UserError


class StreamBatcher:
    """Cuts a token stream into rows and serves (inputs, targets) windows.

    Args:
        ids: The whole split as token ids.
        batch_size: Number of rows (the global batch).
        num_steps: Window length (truncated-BPTT length).
        split: Split name, for error messages.
        seed: Seed of the per-epoch random offset.
        random_offset: Shift each epoch's windows by a seeded offset in
            ``[0, num_steps)``.

    Raises:
        UserError: If the split cannot fill one window of every row.
    """

    def __init__(self, ids: np.ndarray, batch_size: int, num_steps: int, split: str = "train",
                 seed: int = 0, random_offset: bool = False):
        self.batch_size = batch_size
        self.num_steps = num_steps
        self.seed = seed
        self.random_offset = random_offset
        row_len = len(ids) // batch_size
        needed = batch_size * (num_steps + 1)
        if row_len < num_steps + 1:
            raise UserError(
                f"data: the {split} split has {len(ids)} tokens, too few for one batch "
                f"(train.batch_size {batch_size} x (train.num_steps {num_steps} + 1) = {needed}); "
                f"use more data or a smaller batch")
        self.rows = np.asarray(ids[: row_len * batch_size], dtype=np.int32).reshape(batch_size, row_len)

    @property
    def row_length(self) -> int:
        """Tokens per row."""
        return self.rows.shape[1]

    def offset(self, epoch: int) -> int:
        """Start of the first window in ``epoch`` (0 unless ``random_offset``)."""
        if not self.random_offset:
            return 0
        # Never shift so far that a row no longer holds one window.
        high = max(1, min(self.num_steps, self.row_length - self.num_steps))
        return int(np.random.default_rng([self.seed, epoch]).integers(0, high))

    def batches_in_epoch(self, epoch: int = 1) -> int:
        """Number of windows in an epoch."""
        return (self.row_length - 1 - self.offset(epoch)) // self.num_steps

    def tokens_per_epoch(self, epoch: int = 1) -> int:
        """Target tokens the epoch predicts."""
        return self.batches_in_epoch(epoch) * self.num_steps * self.batch_size

    def window(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns batch ``index`` of ``epoch`` as numpy (inputs, targets), each ``[batch, num_steps]``."""
        start = self.offset(epoch) + index * self.num_steps
        return (self.rows[:, start:start + self.num_steps],
                self.rows[:, start + 1:start + 1 + self.num_steps])

    def dataset(self, epoch: int, start_index: int = 0) -> tf.data.Dataset:
        """A tf.data pipeline of the epoch's windows from ``start_index`` on, prefetched.

        Deterministic: the windows depend only on the data, ``epoch`` and the seed.
        """
        rows = tf.constant(self.rows)
        offset, n = self.offset(epoch), self.num_steps

        def window(i):
            start = tf.cast(offset + i * n, tf.int32)
            return rows[:, start:start + n], rows[:, start + 1:start + 1 + n]

        return (tf.data.Dataset.range(start_index, self.batches_in_epoch(epoch))
                .map(window, num_parallel_calls=1, deterministic=True)
                .prefetch(2)
                .with_options(pipeline_options()))


class EvalBatcher:
    """Cuts a split into rows whose targets are every token but the first, once each.

    With ``N`` tokens and ``B`` rows, the ``N - 1`` targets (positions
    ``1 .. N-1``) are dealt out in contiguous runs whose lengths differ by at
    most one; row ``i`` reads from the last token of row ``i - 1`` (rows overlap
    by one token), so every target is predicted with the state carried from
    the tokens before it in its row. Short rows are padded at the end with id 0
    and weight 0; rows get no targets at all when ``N - 1 < B``. Nothing
    follows a padded position, so its recurrent state does not matter.

    Args:
        ids: The whole split as token ids.
        batch_size: Number of rows (``train.eval_batch_size``).
        num_steps: Window length; the last window may be shorter.
        split: Split name, for error messages.

    Raises:
        UserError: If the split has fewer than 2 tokens (nothing to predict).
    """

    def __init__(self, ids: np.ndarray, batch_size: int, num_steps: int, split: str = "valid"):
        ids = np.asarray(ids, dtype=np.int32)
        if len(ids) < 2:
            raise UserError(f"data: the {split} split has {len(ids)} token(s); evaluation needs at least 2 "
                            f"(the first token is only context)")
        self.batch_size = batch_size
        self.num_steps = num_steps
        self.tokens = len(ids) - 1
        lengths = np.full(batch_size, self.tokens // batch_size)
        lengths[: self.tokens % batch_size] += 1
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # row i's first (input) token
        width = int(lengths.max())
        column = np.arange(width + 1)
        positions = np.minimum(starts[:, None] + column, len(ids) - 1)
        self.rows = np.where(column <= lengths[:, None], ids[positions], 0).astype(np.int32)
        self.weights = (column[:-1] < lengths[:, None]).astype(np.float32)

    @property
    def row_length(self) -> int:
        """Targets of the longest row (the padded width)."""
        return self.weights.shape[1]

    @property
    def num_windows(self) -> int:
        """Windows of the walk, the last one possibly shorter than ``num_steps``."""
        return -(-self.row_length // self.num_steps)

    def window(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns window ``index`` as numpy (inputs, targets, weights), each ``[batch, <= num_steps]``."""
        start = index * self.num_steps
        end = min(start + self.num_steps, self.row_length)
        return self.rows[:, start:end], self.rows[:, start + 1:end + 1], self.weights[:, start:end]

    def dataset(self) -> tf.data.Dataset:
        """A tf.data pipeline of all windows in order, prefetched."""
        rows, weights = tf.constant(self.rows), tf.constant(self.weights)
        n, width = self.num_steps, self.row_length

        def window(i):
            start = tf.cast(i * n, tf.int32)
            end = tf.minimum(start + n, width)
            return rows[:, start:end], rows[:, start + 1:end + 1], weights[:, start:end]

        return (tf.data.Dataset.range(self.num_windows)
                .map(window, num_parallel_calls=1, deterministic=True)
                .prefetch(2)
                .with_options(pipeline_options()))


def pipeline_options() -> tf.data.Options:
    """tf.data options of the window pipelines: autotuning off.

    With autotuning on, each iterator runs a model thread whose optimization
    period doubles up to a minute; deleting the iterator at an epoch's or an
    evaluation's end then blocked until that period ran out (up to 36 s
    measured, idle CPU, stack in ``~RootDataset::Iterator``). The pipeline has
    fixed parallelism, so autotuning has nothing to tune.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return options
