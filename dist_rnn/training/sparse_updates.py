"""Row-sparse updates: gradients of gathered rows stay ``tf.IndexedSlices`` where that is exact.

The input embedding and the sampled softmax's output kernel and bias are read
by gathering rows, so their gradients are ``tf.IndexedSlices``: a few hundred
or thousand rows of a ``[vocab, width]`` matrix. Densified, each is a full
``[vocab, width]`` tensor (548 MB at 267,735 x 512) that the all-reduce, norm,
clip and update then sweep every step. Kept sparse, the gradient path of
:mod:`dist_rnn.training.gradients` runs on the rows only:

1. per replica: the slices of the rows it gathered (accumulated blocks'
   slices concatenated);
2. all-reduce: indices and values of ``tf.IndexedSlices`` are gathered from
   every replica in replica order, the same on every replica (``tf.distribute``'s
   own all-reduce does this; on Horovod, whose 0.28.1 ``grouped_allreduce``
   mispairs slices in a mixed list, ``HorovodBackend.all_reduce_sum`` calls
   ``hvd.allgather`` on them);
3. :func:`combine_duplicates`: one row per index, summed (a row gathered by
   several tokens or replicas appears once per gather before this);
4. unscale, finite check, global norm, clip: on the values (the norm is only
   right after step 3);
5. apply: scatter updates of those rows.

This equals the dense update only when a row with a zero gradient does not
change: plain SGD (no momentum) and Adagrad (its accumulator grows by ``0``,
its step is ``0 / sqrt(acc + eps)``), without L2 weight decay (AWD's
``decay * w`` touches every row). Momentum, Adam, AdamW and RMSprop move every
row by their slots, so they keep the dense path (:func:`sparse_update_rule`).

A variable in TensorFlow that was once read or written by a sparse op
(``ResourceGather``, a scatter) is in "copy-on-read" mode: every later dense
read or dense update copies the whole variable first. So the model reads the
rows of a sparsely updated variable with ``ResourceGather`` (see
``LanguageModel.use_row_sparse_reads``) and nothing in the training step reads
it whole; with dense updates it keeps plain reads.

On GPUs, summing duplicate rows (``unsorted_segment_sum``) may use atomic
adds, whose order is not fixed: replicas could then differ in the last bits
unless ``train.deterministic`` is on (not run on a GPU here).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from dist_rnn.training.optimizers import RowSparseAdagrad


def sparse_update_rule(optimizer: keras.optimizers.Optimizer, weight_decay: float) -> str | None:
    """Why a row-sparse update of this optimizer equals its dense update, or None when it does not.

    Args:
        optimizer: The Keras optimizer (built by
            :func:`~dist_rnn.training.optimizers.build_optimizer`).
        weight_decay: The L2 decay added to every gradient (0: off).

    Returns:
        A short description of the exact sparse rule (``"sgd"`` or
        ``"adagrad"``), or None when rows with a zero gradient would move.
    """
    if weight_decay or getattr(optimizer, "weight_decay", None) or getattr(optimizer, "use_ema", False):
        return None
    if isinstance(optimizer, keras.optimizers.SGD) and not optimizer.momentum:
        return "sgd"
    if isinstance(optimizer, RowSparseAdagrad):
        return "adagrad"
    return None


def combine_duplicates(slices: tf.IndexedSlices) -> tf.IndexedSlices:
    """One row per index: the values of repeated indices summed.

    Args:
        slices: Gradient rows, an index possibly repeated.

    Returns:
        ``tf.IndexedSlices`` with unique indices (in order of first
        appearance) and the same dense value.
    """
    unique, positions = tf.unique(slices.indices)
    values = tf.math.unsorted_segment_sum(slices.values, positions, tf.shape(unique)[0])
    return tf.IndexedSlices(values, unique, slices.dense_shape)


def sparse_variable_names(grads: list, variables: list) -> list[str]:
    """Paths of the variables whose gradient is ``tf.IndexedSlices`` (for the run log)."""
    return [getattr(v, "path", v.name) for g, v in zip(grads, variables) if isinstance(g, tf.IndexedSlices)]
