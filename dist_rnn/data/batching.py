"""Batching for stateful truncated BPTT, as in the classic PTB iterator.

The token stream is cut into ``batch_size`` contiguous rows and walked
``num_steps`` tokens at a time, so row ``i`` of batch ``k + 1`` continues row
``i`` of batch ``k``. The recurrent state of row ``i`` can therefore be carried
from one batch to the next.

Training (:class:`StreamBatcher`) cuts the split to whole rows and whole
windows (variable-length windows: :mod:`dist_rnn.data.variable_length`). Evaluation (:class:`EvalBatcher`) scores every token of the split
except the first exactly once: rows overlap by one token, may differ in length
by one (padded, with weight 0) and the last window may be shorter.

Both read the split lazily: ``ids`` may be a ``numpy.memmap`` of a prepared
token file, and each window reads only its own ``batch x (num_steps + 1)``
tokens from it, so memory does not grow with the corpus. With ``local_rows``
a process reads only the rows its replicas own (the rows of other workers'
replicas are served as zeros: the backend drops them when it shards the
global batch).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import tensorflow as tf

from dist_rnn.errors import UserError


def owned_rows(batch_size: int, num_replicas: int, replica_ids: list[int]) -> range:
    """The global rows held by the given replicas: replica ``r`` owns rows ``r*b .. r*b+b-1``, ``b = batch/replicas``.

    Args:
        batch_size: The global batch.
        num_replicas: Replicas in the whole job.
        replica_ids: Global ids of the replicas of this process (consecutive).
    """
    per = batch_size // num_replicas
    return range(min(replica_ids) * per, (max(replica_ids) + 1) * per)


class StreamBatcher:
    """Cuts a token stream into rows and serves (inputs, targets) windows.

    Args:
        ids: The whole split as token ids (an array or a read-only memmap; it
            is never copied whole).
        batch_size: Number of rows (the global batch).
        num_steps: Window length (truncated-BPTT length).
        split: Split name, for error messages.
        seed: Seed of the per-epoch random offset.
        random_offset: Shift each epoch's windows by a seeded offset in
            ``[0, num_steps)``.
        local_rows: The rows this process reads (default all); the others
            are zeros in every window.

    Raises:
        UserError: If the split cannot fill one window of every row.
    """

    def __init__(self, ids: np.ndarray, batch_size: int, num_steps: int, split: str = "train",
                 seed: int = 0, random_offset: bool = False, local_rows: range | None = None):
        self.batch_size = batch_size
        self.num_steps = num_steps
        self.seed = seed
        self.random_offset = random_offset
        self.local_rows = local_rows if local_rows is not None else range(batch_size)
        ids = np.asarray(ids) if not isinstance(ids, np.ndarray) else ids
        row_len = len(ids) // batch_size
        needed = batch_size * (num_steps + 1)
        if row_len < num_steps + 1:
            raise UserError(
                f"data: the {split} split has {len(ids)} tokens, too few for one batch "
                f"(train.batch_size {batch_size} x (train.num_steps {num_steps} + 1) = {needed}); "
                f"use more data or a smaller batch")
        # A view (of the memmap when ids is one): nothing is read here.
        self.rows = ids[: row_len * batch_size].reshape(batch_size, row_len)

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
        """Returns batch ``index`` of ``epoch`` as int32 numpy (inputs, targets), each ``[batch, num_steps]``."""
        return self.read(self.offset(epoch) + index * self.num_steps, self.num_steps)

    def read(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """The int32 (inputs, targets) of every row's tokens ``start .. start + length``, each ``[batch, length]``."""
        block = np.zeros((self.batch_size, length + 1), np.int32)
        rows = slice(self.local_rows.start, self.local_rows.stop)
        block[rows] = self.rows[rows, start:start + length + 1]
        return block[:, :-1], block[:, 1:]

    def windows_in_epoch(self, epoch: int, step: int, index: int, token: int) -> int:
        """Windows of ``epoch`` (the position arguments matter only for variable-length windows)."""
        return self.batches_in_epoch(epoch)

    def steps_through_epoch(self, last_epoch: int, epoch: int, step: int, index: int, token: int) -> int:
        """The global step count at the end of ``last_epoch``: every epoch's windows from epoch 1 on."""
        return sum(self.batches_in_epoch(e) for e in range(1, last_epoch + 1))

    def dataset(self, epoch: int, start_index: int = 0, step: int = 0, token: int = 0) -> tf.data.Dataset:
        """A tf.data pipeline of the epoch's windows from ``start_index`` on, prefetched.

        Deterministic: the windows depend only on the data, ``epoch`` and the
        seed. ``step`` and ``token`` (the global step and the tokens per row
        done) are used by variable-length windows only.
        """
        def windows() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for index in range(start_index, self.batches_in_epoch(epoch)):
                yield self.window(epoch, index)

        spec = tf.TensorSpec([self.batch_size, self.num_steps], tf.int32)
        return window_pipeline(windows, (spec, spec))


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
        ids: The whole split as token ids (an array or a read-only memmap; it
            is never copied whole).
        batch_size: Number of rows (``train.eval_batch_size``).
        num_steps: Window length; the last window may be shorter.
        split: Split name, for error messages.
        local_rows: The rows this process reads (default all); the others
            are zeros with weight 0 in every window.

    Raises:
        UserError: If the split has fewer than 2 tokens (nothing to predict).
    """

    def __init__(self, ids: np.ndarray, batch_size: int, num_steps: int, split: str = "valid",
                 local_rows: range | None = None):
        ids = np.asarray(ids) if not isinstance(ids, np.ndarray) else ids
        if len(ids) < 2:
            raise UserError(f"data: the {split} split has {len(ids)} token(s); evaluation needs at least 2 "
                            f"(the first token is only context)")
        self.ids = ids
        self.batch_size = batch_size
        self.num_steps = num_steps
        self.local_rows = local_rows if local_rows is not None else range(batch_size)
        self.tokens = len(ids) - 1
        lengths = np.full(batch_size, self.tokens // batch_size)
        lengths[: self.tokens % batch_size] += 1
        self.lengths = lengths
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # row i's first (input) token

    @property
    def row_length(self) -> int:
        """Targets of the longest row (the padded width)."""
        return int(self.lengths.max())

    @property
    def num_windows(self) -> int:
        """Windows of the walk, the last one possibly shorter than ``num_steps``."""
        return -(-self.row_length // self.num_steps)

    def window(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns window ``index`` as numpy (inputs, targets, weights), each ``[batch, <= num_steps]``."""
        start = index * self.num_steps
        end = min(start + self.num_steps, self.row_length)
        block = np.zeros((self.batch_size, end - start + 1), np.int32)
        for row in self.local_rows:
            # Row ``row`` holds tokens starts[row] .. starts[row] + lengths[row]; the rest is padding.
            first = self.starts[row] + start
            last = self.starts[row] + min(end, self.lengths[row])  # inclusive
            if last >= first:
                block[row, :last - first + 1] = self.ids[first:last + 1]
        weights = np.zeros((self.batch_size, end - start), np.float32)
        local = slice(self.local_rows.start, self.local_rows.stop)
        weights[local] = np.arange(start, end)[None, :] < self.lengths[local, None]
        return block[:, :-1], block[:, 1:], weights

    def dataset(self) -> tf.data.Dataset:
        """A tf.data pipeline of all windows in order, prefetched."""
        def windows():
            for index in range(self.num_windows):
                yield self.window(index)

        ids = tf.TensorSpec([self.batch_size, None], tf.int32)
        return window_pipeline(windows, (ids, ids, tf.TensorSpec([self.batch_size, None], tf.float32)))


def window_pipeline(windows, signature: tuple) -> tf.data.Dataset:
    """The windows of a generator as a tf.data pipeline, in order, prefetched.

    The windows are read from the (memory-mapped) split one at a time, two
    ahead of the step that consumes them.
    """
    return (tf.data.Dataset.from_generator(windows, output_signature=signature)
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
