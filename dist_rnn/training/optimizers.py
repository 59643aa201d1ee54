"""Optimizer construction.

Optimizers are built without Keras' own clipping (``clipnorm``,
``global_clipnorm``): Keras clips each replica's local gradient before the
all-reduce. dist-rnn clips the reduced gradient itself (see
:mod:`dist_rnn.training.gradients`).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from dist_rnn.config import OptimizerConfig


def build_optimizer(config: OptimizerConfig) -> keras.optimizers.Optimizer:
    """Creates the configured Keras optimizer (call inside the strategy scope).

    Args:
        config: The ``optimizer`` section. The learning rate is a variable
            the trainer assigns each step from the schedule.

    Returns:
        The optimizer, not yet built, applying gradients as given (already
        all-reduced by dist-rnn).
    """
    return applying_reduced_gradients(_create(config))


def applying_reduced_gradients(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """Stops the optimizer from summing gradients over replicas a second time.

    Keras' TensorFlow optimizer all-reduces (sums) gradients in replica context
    right before its update (``_all_reduce_sum_gradients``). dist-rnn hands it
    gradients that are already reduced, unscaled and clipped, so that sum would
    multiply them by the replica count. Making it the identity on this instance
    keeps one all-reduce per step; ``tests/test_distributed.py`` checks the
    result against a single device, and ``tests/test_gradient_path.py`` fails
    if a Keras upgrade drops the hook.
    """
    if not hasattr(optimizer, "_all_reduce_sum_gradients"):
        raise RuntimeError("this Keras optimizer has no _all_reduce_sum_gradients hook; "
                           "dist-rnn's gradient path needs revisiting for this Keras version")
    optimizer._all_reduce_sum_gradients = lambda grads_and_vars: list(grads_and_vars)
    return optimizer


def _create(config: OptimizerConfig) -> keras.optimizers.Optimizer:
    lr = config.learning_rate
    if config.name in ("sgd", "ntasgd"):  # ntasgd: plain SGD; the averaging is dist_rnn.training.averaging's
        return keras.optimizers.SGD(learning_rate=lr, momentum=config.momentum)
    if config.name == "adam":
        return keras.optimizers.Adam(learning_rate=lr, beta_1=config.beta_1, beta_2=config.beta_2,
                                     epsilon=config.epsilon)
    if config.name == "adamw":
        return keras.optimizers.AdamW(learning_rate=lr, beta_1=config.beta_1, beta_2=config.beta_2,
                                      epsilon=config.epsilon, weight_decay=config.weight_decay)
    if config.name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=lr, momentum=config.momentum, epsilon=config.epsilon)
    if config.name == "adagrad":
        return RowSparseAdagrad(learning_rate=lr, epsilon=config.epsilon)
    raise ValueError(f"unknown optimizer {config.name}")


class RowSparseAdagrad(keras.optimizers.Adagrad):
    """Keras' Adagrad, with an exact row-sparse update for ``tf.IndexedSlices`` gradients.

    Keras' own update accepts slices but divides by ``sqrt(accumulator + eps)``
    over the whole ``[vocab, width]`` accumulator every step. Here only the
    gradient's rows are touched, with the same float operations in the same
    order, so the result equals the dense update (rows outside the slices
    would change by exactly 0 there)::

        acc[rows] += g ** 2
        w[rows] -= lr * g / sqrt(acc[rows] + eps)

    The slices' indices must be unique (see
    :func:`dist_rnn.training.sparse_updates.combine_duplicates`): a repeated
    row would add the square of each part instead of the square of their sum.
    Variables and checkpoint names are Keras Adagrad's.
    """

    def update_step(self, gradient, variable, learning_rate):
        """One update of ``variable``; row-sparse for ``tf.IndexedSlices``, Keras' rule otherwise."""
        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        lr = tf.cast(learning_rate, variable.dtype)
        values = tf.cast(gradient.values, variable.dtype)
        rows = gradient.indices
        accumulator = self._accumulators[self._get_variable_index(variable)]
        self.assign_add(accumulator, tf.IndexedSlices(tf.square(values), rows, gradient.dense_shape))
        # A sparse read (ResourceGather) after the scatter: a dense read of a
        # scattered variable would copy all of it.
        accumulated = tf.gather(accumulator.value, rows)
        self.assign_sub(variable, tf.IndexedSlices(lr * values / tf.sqrt(accumulated + self.epsilon), rows,
                                                   gradient.dense_shape))
