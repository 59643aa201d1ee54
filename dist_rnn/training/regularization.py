"""The training-loss regularizers of AWD-LSTM: AR, TAR and L2 weight decay.

AR and TAR (Merity et al. 2017) are penalties on the last recurrent layer's
output ``h`` added to the training objective only; the logged and evaluated
loss stays the cross-entropy. Each is a mean over the global batch: a replica
adds its rows' share (its sum over the global count), so the all-reduced
gradient is that of the global mean on any replica layout, as for the
cross-entropy (:mod:`dist_rnn.training.gradients`).

L2 weight decay (``optimizer.weight_decay`` with an optimizer other than
``adamw``) is AWD-LSTM's (PyTorch's ``weight_decay``): ``decay * w`` added to
each gradient after the all-reduce, unscale, finite check and clip, right
before the update. It is the gradient of ``decay / 2 * sum(w ** 2)``, but
clipping and the logged gradient norm see only the loss gradient, as in
AWD-LSTM (``clip_grad_norm_`` then ``optimizer.step``). All replicas hold the
same weights, so no all-reduce is needed for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf


@dataclass(frozen=True)
class ActivationPenalties:
    """AR and TAR coefficients (``train.ar``, ``train.tar``).

    Attributes:
        ar: Coefficient of ``mean(dropped ** 2)``.
        tar: Coefficient of ``mean((raw_t - raw_{t-1}) ** 2)``.
    """

    ar: float = 0.0
    tar: float = 0.0

    @property
    def active(self) -> bool:
        """Whether any penalty is on."""
        return bool(self.ar or self.tar)

    def terms(self, raw: tf.Tensor, dropped: tf.Tensor, global_batch: int) -> dict[str, tf.Tensor]:
        """This replica's share of each active penalty (already times its coefficient).

        Args:
            raw: ``[rows, time, hidden]`` last-layer output before dropout.
            dropped: The same after dropout (what the projection receives).
            global_batch: Rows of the global batch (the mean's row count).

        Returns:
            ``{"ar_loss": ..., "tar_loss": ...}`` (active ones only): float32
            scalars whose sum over replicas is the global penalty.
        """
        terms = {}
        hidden = tf.cast(tf.shape(raw)[2], tf.float32)
        time = tf.cast(tf.shape(raw)[1], tf.float32)
        if self.ar:
            count = global_batch * time * hidden
            terms["ar_loss"] = self.ar * tf.reduce_sum(tf.square(tf.cast(dropped, tf.float32))) / count
        if self.tar:
            h = tf.cast(raw, tf.float32)
            step = h[:, 1:] - h[:, :-1]
            # A one-step window has no difference: the penalty is 0 there.
            count = global_batch * tf.maximum(time - 1.0, 1.0) * hidden
            terms["tar_loss"] = self.tar * tf.reduce_sum(tf.square(step)) / count
        return terms


def add_weight_decay(grads: list[tf.Tensor], variables: list, decay: float) -> list[tf.Tensor]:
    """Adds ``decay * w`` to each gradient (L2 weight decay; identity when ``decay`` is 0).

    Args:
        grads: Reduced, unscaled, clipped gradients.
        variables: The variables they belong to, in the same order.
        decay: ``optimizer.weight_decay``.
    """
    if not decay:
        return grads
    return [g + tf.cast(decay, g.dtype) * tf.cast(tf.convert_to_tensor(v), g.dtype)
            for g, v in zip(grads, variables)]
