"""Batches read from a memory-mapped prepared split equal today's list-based batches, token for token.

The reference below is the list-based batching as it was before the splits
were memory-mapped (commit 0f4b454): the whole split copied into one int32
array of rows. The memmap-based batchers must serve the same windows from a
prepared folder of the same tokens, and a process must read only its rows.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SHAKESPEARE
from dist_rnn.config import DataConfig
from dist_rnn.data.batching import EvalBatcher, StreamBatcher, owned_rows
from dist_rnn.data.encoding import encode_corpus
from dist_rnn.data.prepared import PreparedCorpus
from prepared_folder import write_prepared


def legacy_train_rows(ids, batch_size):
    """Today's StreamBatcher rows: the whole split copied to int32."""
    row_len = len(ids) // batch_size
    return np.asarray(ids[: row_len * batch_size], dtype=np.int32).reshape(batch_size, row_len)


def legacy_train_window(rows, num_steps, offset, index):
    """Today's StreamBatcher.window."""
    start = offset + index * num_steps
    return rows[:, start:start + num_steps], rows[:, start + 1:start + 1 + num_steps]


def legacy_eval_rows(ids, batch_size):
    """Today's EvalBatcher rows and weights over the whole split."""
    ids = np.asarray(ids, dtype=np.int32)
    tokens = len(ids) - 1
    lengths = np.full(batch_size, tokens // batch_size)
    lengths[: tokens % batch_size] += 1
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    column = np.arange(int(lengths.max()) + 1)
    positions = np.minimum(starts[:, None] + column, len(ids) - 1)
    rows = np.where(column <= lengths[:, None], ids[positions], 0).astype(np.int32)
    return rows, (column[:-1] < lengths[:, None]).astype(np.float32)


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    """Tiny-shakespeare encoded the list-based way, and the same tokens as a prepared folder."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"needs {SHAKESPEARE} (CI always has ../shared)")
    encoded = encode_corpus(DataConfig(corpus="file", path=str(SHAKESPEARE), split=[0.9, 0.05, 0.05]))
    folder = write_prepared(tmp_path_factory.mktemp("prepared") / "shakespeare",
                            {name: encoded.split(name) for name in ("train", "valid", "test")}, len(encoded.vocab))
    return encoded, PreparedCorpus.open(folder)


@pytest.mark.parametrize("batch_size, num_steps", [(8, 20), (20, 35), (3, 64)])
def test_training_windows_equal_the_list_based_ones(shakespeare, batch_size, num_steps):
    encoded, prepared = shakespeare
    assert isinstance(prepared.train, np.memmap) and prepared.train.dtype == np.uint8  # 65 characters
    batcher = StreamBatcher(prepared.train, batch_size, num_steps, seed=3, random_offset=True)
    rows = legacy_train_rows(encoded.train, batch_size)
    for epoch in (1, 2):
        n = batcher.batches_in_epoch(epoch)
        assert n == (len(encoded.train) // batch_size - 1 - batcher.offset(epoch)) // num_steps
        for index in range(n):
            x, y = batcher.window(epoch, index)
            ex, ey = legacy_train_window(rows, num_steps, batcher.offset(epoch), index)
            assert x.dtype == np.int32
            assert np.array_equal(x, ex) and np.array_equal(y, ey), (epoch, index)


def test_training_pipeline_resumes_at_the_saved_position(shakespeare):
    encoded, prepared = shakespeare
    batcher = StreamBatcher(prepared.train, 16, 50, seed=1, random_offset=True)
    start = batcher.batches_in_epoch(2) - 40
    got = [(x.numpy(), y.numpy()) for x, y in batcher.dataset(2, start)]
    rows = legacy_train_rows(encoded.train, 16)
    assert len(got) == 40
    for k, (x, y) in enumerate(got):
        ex, ey = legacy_train_window(rows, 50, batcher.offset(2), start + k)
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)


@pytest.mark.parametrize("batch_size, num_steps", [(8, 20), (13, 35)])
def test_evaluation_windows_equal_the_list_based_ones(shakespeare, batch_size, num_steps):
    encoded, prepared = shakespeare
    rows, weights = legacy_eval_rows(encoded.valid, batch_size)
    batcher = EvalBatcher(prepared.valid, batch_size, num_steps)
    assert batcher.num_windows == -(-weights.shape[1] // num_steps) and batcher.tokens == len(encoded.valid) - 1
    for (x, y, w), i in zip(batcher.dataset(), range(batcher.num_windows)):
        start, end = i * num_steps, min((i + 1) * num_steps, weights.shape[1])
        np.testing.assert_array_equal(x.numpy(), rows[:, start:end])
        np.testing.assert_array_equal(y.numpy(), rows[:, start + 1:end + 1])
        np.testing.assert_array_equal(w.numpy(), weights[:, start:end])
    assert i == batcher.num_windows - 1


class RecordingArray(np.ndarray):
    """An id array that records the rows (first index of a 2-D view) each read asks for."""

    reads: list

    def __getitem__(self, key):
        if self.ndim == 2 and isinstance(key, tuple):
            RecordingArray.reads.append(key[0])
        elif self.ndim == 1 and isinstance(key, slice) and key.start is not None:
            RecordingArray.reads.append(key)
        return super().__getitem__(key)


def test_a_worker_reads_only_the_rows_of_its_replicas():
    ids = np.arange(4 * 100, dtype=np.int32)
    # 4 replicas over 2 workers: worker 1 hosts replicas 2 and 3, i.e. rows 2..3 of a batch of 4.
    mine = owned_rows(4, 4, [2, 3])
    assert mine == range(2, 4)
    RecordingArray.reads = []
    train = StreamBatcher(ids.view(RecordingArray), 4, 10, local_rows=mine)
    RecordingArray.reads = []
    x, y = train.window(1, 3)
    assert RecordingArray.reads == [slice(2, 4)]
    full = StreamBatcher(ids, 4, 10).window(1, 3)
    np.testing.assert_array_equal(x[2:], full[0][2:])
    np.testing.assert_array_equal(y[2:], full[1][2:])
    assert not x[:2].any() and not y[:2].any()  # other workers' rows are never read: zeros, dropped by shard

    evaluation = EvalBatcher(ids.view(RecordingArray), 4, 10, local_rows=mine)
    RecordingArray.reads = []
    x, y, w = evaluation.window(2)
    # Rows 2 and 3 start at tokens 200 and 300 (399 targets: 100, 100, 100, 99); window 2 reads columns 20..30.
    assert [(s.start, s.stop) for s in RecordingArray.reads] == [(220, 231), (320, 331)]
    x_all, y_all, w_all = EvalBatcher(ids, 4, 10).window(2)
    np.testing.assert_array_equal(x[2:], x_all[2:])
    np.testing.assert_array_equal(w[2:], w_all[2:])
    assert not w[:2].any() and not x[:2].any()
