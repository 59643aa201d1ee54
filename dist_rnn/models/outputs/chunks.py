"""Exact per-token losses computed a few batch rows at a time, so memory stays bounded.

A full-vocabulary evaluation of a word model would hold ``[batch, time,
vocab]`` float32 logits at once (2.5 GB for 20 x 35 tokens at 267k words).
:func:`chunked_token_nll` runs the exact loss over slices of the batch rows
instead, each at most :data:`LOGITS_BUDGET` floats of logits; a batch that fits
runs as one slice, i.e. exactly the unchunked computation.
"""

from __future__ import annotations

import tensorflow as tf

#: Most float32 logits one slice of rows may hold (64 MB).
LOGITS_BUDGET = 2 ** 24


def chunked_token_nll(token_nll, hidden: tf.Tensor, targets: tf.Tensor, width: int,
                      budget: int = LOGITS_BUDGET) -> tf.Tensor:
    """Applies ``token_nll`` to slices of the batch rows and concatenates the results.

    Args:
        token_nll: ``(hidden [b, T, D], targets [b, T]) -> float32 [b, T]``.
        hidden: ``[B, T, D]`` last-layer outputs.
        targets: int ``[B, T]`` target ids.
        width: Logits per token that ``token_nll`` materializes (the vocabulary size).
        budget: Most logits one slice may hold.

    Returns:
        float32 ``[B, T]`` per-token negative log-likelihoods.
    """
    batch, steps = tf.shape(hidden)[0], tf.shape(hidden)[1]
    rows = tf.maximum(1, tf.cast(budget // width, tf.int32) // tf.maximum(steps, 1))
    count = (batch + rows - 1) // rows

    def body(i, out):
        start = i * rows
        end = tf.minimum(start + rows, batch)
        return i + 1, out.write(i, token_nll(hidden[start:end], targets[start:end]))

    _, out = tf.while_loop(lambda i, _: i < count, body,
                           (tf.constant(0), tf.TensorArray(tf.float32, size=count, infer_shape=False)))
    return tf.reshape(out.concat(), tf.shape(targets))
