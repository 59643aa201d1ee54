"""The dropouts of AWD-LSTM (Merity et al. 2017), drawn statelessly.

Three kinds, each off at rate 0:

- **Weight drop** (``model.weight_drop``): DropConnect on each layer's
  recurrent kernel. One ``(units, gates)`` mask per training step multiplies
  the kernel itself (scaled by ``1 / (1 - rate)``), so every time step and
  every row of the step uses the same dropped matrix, and the recurrence that
  runs (cuDNN, dist-rnn's fused recurrence) is the one that runs without it.
- **Embedding dropout** (``model.embedding_dropout``): drops whole word
  types, i.e. rows of the embedding matrix, with one ``(vocab,)`` mask per step
  shared by every row of the batch; kept rows are scaled by ``1 / (1 - rate)``.
  A tied output projection keeps the whole matrix (as in AWD-LSTM).
- **Locked (variational) dropout** (``model.dropout_input`` /
  ``dropout_hidden`` / ``dropout_output``): one ``(rows, features)`` mask per
  sequence row, shared by all its time steps.

Every mask is a pure function of the step seed, a per-site salt and, for
the locked masks, the row's index in the global batch (the scheme of
:mod:`dist_rnn.models.dropout`). Weight-drop and embedding masks do not depend
on rows at all, so every replica draws the same one. Resumed runs redraw the
same masks, and every replica layout draws the same ones.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from dist_rnn.models.dropout import recurrent_dropout_mask

__all__ = ["WEIGHT_DROP_SALT", "EMBEDDING_DROPOUT_SALT", "LOCKED_DROPOUT_SALT", "weight_drop_mask",
           "dropped_weight", "embedding_dropout", "LockedDropout"]

#: Recurrent layer ``i`` folds ``WEIGHT_DROP_SALT + i`` into the step seed for its weight-drop mask.
WEIGHT_DROP_SALT = 2000
#: Salt of the embedding-dropout mask.
EMBEDDING_DROPOUT_SALT = 3000
#: Locked-dropout site ``j`` (0: embedding output, ``i``: after layer ``i - 1``) uses ``LOCKED_DROPOUT_SALT + j``.
LOCKED_DROPOUT_SALT = 4000


def _drops(rate: float, training, seed) -> bool:
    return rate > 0.0 and seed is not None and training is not None and training is not False


def _keep_scale(uniform, rate, dtype):
    return tf.cast(uniform >= rate, dtype) * tf.cast(1.0 / (1.0 - rate), dtype)


def weight_drop_mask(rate: float, shape, dtype, seed, salt: int) -> tf.Tensor:
    """The DropConnect mask of one recurrent kernel for one step.

    Args:
        rate: Fraction of weights dropped, in ``(0, 1)``.
        shape: Shape of the kernel, ``(units, gates * units)``.
        dtype: dtype of the mask.
        seed: int ``[2]`` stateless seed of the step.
        salt: Folded into ``seed`` so that each layer draws its own mask.

    Returns:
        Tensor of ``shape`` holding ``0`` and ``1 / (1 - rate)``.
    """
    site_seed = tf.random.experimental.stateless_fold_in(seed, salt)
    return _keep_scale(tf.random.stateless_uniform(shape, seed=site_seed), rate, dtype)


def dropped_weight(kernel: tf.Tensor, rate: float, training, seed, salt: int) -> tf.Tensor:
    """``kernel`` with weight drop applied when the call drops, else ``kernel`` unchanged.

    A call drops when ``rate > 0``, ``training`` is not False/None and a
    ``seed`` is given; a tensor ``training`` decides in the graph.

    Args:
        kernel: The recurrent kernel as a tensor (in the compute dtype).
        rate, seed, salt: As for :func:`weight_drop_mask`.
        training: The call's ``training`` argument (bool, None or bool tensor).
    """
    if not _drops(rate, training, seed):
        return kernel
    mask = weight_drop_mask(rate, kernel.shape, kernel.dtype, seed, salt)
    if training is True:
        return kernel * mask
    return tf.cond(tf.cast(training, tf.bool), lambda: kernel * mask, lambda: kernel)


def embedding_dropout(embedded: tf.Tensor, tokens: tf.Tensor, vocab_size: int, rate: float, training,
                      seed) -> tf.Tensor:
    """Drops whole word types from an embedding lookup.

    Equivalent to looking ``tokens`` up in the embedding matrix whose rows are
    multiplied by a ``(vocab,)`` keep-and-scale mask, without forming that
    matrix: the mask is gathered at ``tokens`` instead, so the embedding's
    gradient stays sparse.

    Args:
        embedded: ``(rows, time, features)`` lookup of ``tokens``.
        tokens: int ``(rows, time)`` token ids.
        vocab_size: Rows of the embedding matrix.
        rate: Fraction of word types dropped.
        training: Whether to drop (Python bool).
        seed: int ``[2]`` stateless seed of the step (None: no dropout).
    """
    if not _drops(rate, training, seed):
        return embedded
    site_seed = tf.random.experimental.stateless_fold_in(seed, EMBEDDING_DROPOUT_SALT)
    mask = _keep_scale(tf.random.stateless_uniform([vocab_size], seed=site_seed), rate, embedded.dtype)
    return embedded * tf.gather(mask, tokens)[..., tf.newaxis]


@keras.saving.register_keras_serializable(package="dist_rnn")
class LockedDropout(keras.layers.Layer):
    """Variational dropout of a sequence: one mask per row, shared across time.

    Args:
        rate: Fraction of features dropped.
        salt: Folded into the seed so that each site draws its own mask.
    """

    def __init__(self, rate: float, salt: int, **kwargs):
        super().__init__(**kwargs)
        self.rate = rate
        self.salt = salt

    def call(self, inputs, seed=None, rows=None, training=False):
        """Drops features of ``(rows, time, features)`` inputs when ``training`` and a seed is given.

        Args:
            inputs: ``[rows, time, features]`` activations of this replica.
            seed: int ``[2]`` stateless seed of the step.
            rows: int ``[2]``: (first global row of ``inputs``, global batch
                rows); None means ``inputs`` is the whole batch.
            training: Whether to drop.
        """
        if not training or not _drops(self.rate, training, seed):
            return inputs
        # Static sizes where known, so that a one-row mask keeps its row count
        # (broadcasting against it would make the row count unknown).
        rows_here = inputs.shape[0] if inputs.shape[0] is not None else tf.shape(inputs)[0]
        features = inputs.shape[2] if inputs.shape[2] is not None else tf.shape(inputs)[2]
        mask = recurrent_dropout_mask(self.rate, features, rows_here, inputs.dtype, seed, self.salt, rows)
        return inputs * mask[:, tf.newaxis, :]

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "salt": self.salt}
