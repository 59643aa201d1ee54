"""Variational recurrent dropout (Gal & Ghahramani 2016), drawn statelessly.

With ``recurrent_dropout > 0``, ``training=True`` and a ``seed`` passed to a
recurrent layer's call, one mask of shape ``(batch, units)`` is drawn per call
(per sequence) and multiplied, with the ``1 / (1 - rate)`` scaling, into ``h``
before the recurrent matmul at every timestep. Only the matmul input is
masked; the carried state is not (in every recurrent layer of dist-rnn). The
mask is a pure function of the call's ``seed``, the layer's ``dropout_salt``
and the row's index in the global batch (``rows``), so it is the same after a
resume and on any replica layout. Without a ``seed`` nothing is dropped.
"""

from __future__ import annotations

import tensorflow as tf

__all__ = ["recurrent_dropout_mask", "call_dropout_mask"]


def recurrent_dropout_mask(rate, units, batch, dtype, seed, salt, rows=None):
    """The variational recurrent-dropout mask of one layer for one call.

    Drawn statelessly for the whole global batch and sliced to this replica's
    rows, as the non-recurrent dropout of ``dist_rnn.models.model.StatelessDropout``:
    row ``g`` of the global batch gets the same mask however the rows are
    spread over replicas, and the same mask again when a step is re-run
    (after a resume).

    Args:
        rate: Fraction of units dropped, in ``(0, 1)``.
        units: Width of the state.
        batch: Rows of this replica (scalar int tensor).
        dtype: dtype of the mask.
        seed: int ``[2]`` stateless seed of the call (the training step's).
        salt: Folded into ``seed`` so that each layer draws its own mask.
        rows: int ``[2]``: (first global row of this replica's batch, global
            batch rows), or None when ``batch`` is the whole batch.

    Returns:
        ``(batch, units)`` tensor of ``0`` and ``1 / (1 - rate)``.
    """
    layer_seed = tf.random.experimental.stateless_fold_in(seed, salt)
    if rows is None:
        keep = tf.random.stateless_uniform(tf.stack([batch, units]), seed=layer_seed) >= rate
    else:
        uniform = tf.random.stateless_uniform(tf.stack([rows[1], units]), seed=layer_seed)
        keep = uniform[rows[0]:rows[0] + batch] >= rate
    return tf.cast(keep, dtype) * tf.cast(1.0 / (1.0 - rate), dtype)


def call_dropout_mask(rate, units, batch, dtype, training, seed, salt, rows):
    """The mask of one layer's call: :func:`recurrent_dropout_mask` when it drops, else None.

    A call drops when ``rate > 0``, ``training`` is not False/None and a
    ``seed`` is given; a tensor ``training`` decides in the graph (all ones
    when it is False).

    Args:
        rate, units, batch, dtype, seed, salt, rows: As for :func:`recurrent_dropout_mask`.
        training: The call's ``training`` argument (bool, None or bool tensor).

    Returns:
        The ``(batch, units)`` mask, or None when the call cannot drop.
    """
    if rate == 0.0 or seed is None or training is None or training is False:
        return None
    if training is True:
        return recurrent_dropout_mask(rate, units, batch, dtype, seed, salt, rows)
    return tf.cond(tf.cast(training, tf.bool),
                   lambda: recurrent_dropout_mask(rate, units, batch, dtype, seed, salt, rows),
                   lambda: tf.ones(tf.stack([batch, units]), dtype))
