"""One gradient path for every backend.

Order, identical on one device, many replicas and many workers:

1. per-replica gradients of (loss sum of the replica's rows / a global
   denominator: the global batch's tokens, or its rows under
   ``train.loss_normalization: sequence``), scaled by the loss scale under
   float16;
2. all-reduce (sum): the gradient of the global-batch objective;
3. unscale;
4. one finite check, agreed by construction since every replica now holds the
   same reduced gradient;
5. clip by the global norm of the reduced gradient (norm logged before
   clipping);
6. apply (skipped on every replica when not finite; the loss scale backs off).

Embedding and sampled-softmax gradients stay ``tf.IndexedSlices`` through
this path when the optimizer's sparse update is exact
(:mod:`dist_rnn.training.sparse_updates`); the functions below then work on
their values.

Keras' optimizers would instead clip and check each replica's local gradient
before the all-reduce; they are built without clipping and the update is
applied from cross-replica context, where Keras does not all-reduce again.
"""

from __future__ import annotations

import tensorflow as tf

from dist_rnn.config import LossScaleConfig


def densify(grads: list) -> list[tf.Tensor]:
    """Turns IndexedSlices (embedding gradients) into dense tensors.

    Every backend then all-reduces plain tensors the same way.
    """
    return [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]


def values_of(grad):
    """The entries of a gradient: the tensor, or the values of ``tf.IndexedSlices``."""
    return grad.values if isinstance(grad, tf.IndexedSlices) else grad


def map_values(fn, grad):
    """``fn`` applied to a gradient's entries; ``tf.IndexedSlices`` keep their indices."""
    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(fn(grad.values), grad.indices, grad.dense_shape)
    return fn(grad)


def add(a, b):
    """Sum of two gradients of one variable (``tf.IndexedSlices``: rows concatenated, indices may repeat)."""
    if isinstance(a, tf.IndexedSlices) and isinstance(b, tf.IndexedSlices):
        return tf.IndexedSlices(tf.concat([a.values, b.values], 0), tf.concat([a.indices, b.indices], 0),
                                a.dense_shape)
    return tf.convert_to_tensor(a) + tf.convert_to_tensor(b)


def all_finite(grads: list) -> tf.Tensor:
    """Returns a scalar bool: every gradient entry is finite."""
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(values_of(g))) for g in grads])


def global_norm(grads: list) -> tf.Tensor:
    """Returns the float32 global L2 norm of all gradients.

    ``tf.IndexedSlices`` must have unique indices (see
    :func:`~dist_rnn.training.sparse_updates.combine_duplicates`): the norm of
    a row split over repeated indices is not the norm of its sum.
    """
    return tf.linalg.global_norm([tf.cast(values_of(g), tf.float32) for g in grads])


def clip_by_global_norm(grads: list[tf.Tensor], clip_norm: float, norm: tf.Tensor) -> list[tf.Tensor]:
    """Scales gradients so that their global norm is at most ``clip_norm``.

    Args:
        grads: Reduced, unscaled gradients.
        clip_norm: Maximum global norm; 0 disables clipping.
        norm: Their global norm (already computed for logging).

    Returns:
        The clipped gradients (unchanged when the norm is below the bound).
    """
    if not clip_norm:
        return grads
    scale = tf.minimum(1.0, clip_norm / tf.maximum(norm, 1e-12))
    return [map_values(lambda v: v * tf.cast(scale, v.dtype), g) for g in grads]


class DynamicLossScale(tf.Module):
    """Loss scale for float16: halve after a non-finite step, double after a run of finite ones.

    Create inside the strategy scope; call :meth:`update` from cross-replica
    context (or on the single device), with the agreed finite flag.

    Args:
        config: ``train.loss_scale``.
    """

    def __init__(self, config: LossScaleConfig):
        super().__init__(name="loss_scale")
        self.config = config
        self.scale = tf.Variable(config.initial, dtype=tf.float32, trainable=False, name="scale",
                                 synchronization=tf.VariableSynchronization.ON_WRITE,
                                 aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="good_steps",
                                      synchronization=tf.VariableSynchronization.ON_WRITE,
                                      aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.skipped_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_steps",
                                         synchronization=tf.VariableSynchronization.ON_WRITE,
                                         aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    def update(self, finite: tf.Tensor) -> None:
        """Adjusts the scale after a step whose gradients were (not) finite."""
        c = self.config

        def on_finite():
            grow = self.good_steps + 1 >= c.growth_interval
            new_scale = tf.where(grow, tf.minimum(self.scale * 2.0, c.max_scale), self.scale)
            return tf.group(self.scale.assign(new_scale),
                            self.good_steps.assign(tf.where(grow, tf.constant(0, tf.int64), self.good_steps + 1)))

        def on_overflow():
            return tf.group(self.scale.assign(tf.maximum(self.scale * c.backoff, 1.0)),
                            self.good_steps.assign(0), self.skipped_steps.assign_add(1))

        tf.cond(finite, on_finite, on_overflow)
