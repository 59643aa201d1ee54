"""Compiled training and evaluation steps.

Each step runs per replica on that replica's rows and carried state, and
returns the replica's new state. The training step follows the gradient path
of :mod:`dist_rnn.training.gradients`, with the regularizers of
:mod:`dist_rnn.training.regularization` (AR/TAR in the objective, L2 weight
decay after the clip).
"""

from __future__ import annotations

import logging

import tensorflow as tf

from dist_rnn.training import accumulation, gradients
from dist_rnn.training.sparse_updates import combine_duplicates, sparse_update_rule, sparse_variable_names
from dist_rnn.training.regularization import ActivationPenalties, add_weight_decay
from dist_rnn.distribution import Backend

log = logging.getLogger("dist_rnn")


def token_losses(targets: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Cross-entropy (nats) of every target token: the one definition of the loss.

    Args:
        targets: Token ids, ``[batch, time]``.
        logits: ``[batch, time, vocab]``.

    Returns:
        ``[batch, time]`` losses.
    """
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(targets, tf.int32), logits=logits)


def token_loss_sum(targets: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Sum of token cross-entropies (nats) over a window."""
    return tf.reduce_sum(token_losses(targets, logits))


def loss_denominator(loss_normalization: str, global_batch: int, num_steps: int) -> float:
    """What the summed token losses of the global batch are divided by to form the objective.

    Args:
        loss_normalization: ``token``: mean over every token of the global
            batch. ``sequence``: sum over the time steps of a row, mean over
            the rows (the TensorFlow PTB tutorial's loss), whose gradient is
            ``num_steps`` times the ``token`` one.
        global_batch: Rows of the global training batch.
        num_steps: Window length.

    Returns:
        ``global_batch * num_steps`` or ``global_batch``.
    """
    if loss_normalization == "token":
        return float(global_batch * num_steps)
    if loss_normalization == "sequence":
        return float(global_batch)
    raise ValueError(f"unknown loss normalization {loss_normalization!r}")


class StepFunctions:
    """Builds the tf.functions of one run.

    Args:
        model: The language model.
        optimizer: A built Keras optimizer (without Keras-side clipping).
        backend: The distribution backend.
        global_batch: Rows of the global training batch.
        num_steps: Window length.
        clip_norm: Global-norm clip of the reduced gradient (0: off).
        loss_scale: A :class:`~dist_rnn.training.gradients.DynamicLossScale` under
            float16, else None.
        jit_compile: Compile the per-replica step with XLA.
        loss_normalization: ``train.loss_normalization`` (see
            :func:`loss_denominator`); it sets the objective that is
            differentiated, never the returned loss sum.
        penalties: AR/TAR added to the objective (not to the returned loss
            sum); their values of the last step are in :attr:`last_penalties`.
        weight_decay: L2 decay added to the clipped gradient (0: off; not
            for ``adamw``, whose optimizer decays by itself).
        accumulate_steps: ``train.accumulate_steps``: row blocks per replica
            processed in sequence, gradients summed before the all-reduce
            (see :mod:`dist_rnn.training.accumulation`).
        weight_average: A :class:`~dist_rnn.training.averaging.WeightAverage`
            updated after every applied step, or None.
        sparse_updates: Keep row gradients (embedding, sampled softmax)
            ``tf.IndexedSlices`` and update only their rows
            (:mod:`dist_rnn.training.sparse_updates`). None (default): when
            that is exact for the optimizer (SGD without momentum, Adagrad,
            no weight decay); False: always dense (for comparisons).
    """

    def __init__(self, model, optimizer, backend: Backend, global_batch: int, num_steps: int,
                 clip_norm: float, loss_scale=None, jit_compile: bool = False, loss_normalization: str = "token",
                 penalties: ActivationPenalties = ActivationPenalties(), weight_decay: float = 0.0,
                 accumulate_steps: int = 1, weight_average=None, sparse_updates: bool | None = None):
        self.model = model
        self.optimizer = optimizer
        self.backend = backend
        self.global_batch = global_batch
        self.denominator = loss_denominator(loss_normalization, global_batch, num_steps)
        self.loss_normalization, self.num_steps = loss_normalization, num_steps
        self.clip_norm = clip_norm
        self.loss_scale = loss_scale
        self.accumulate_steps = accumulate_steps
        self.weight_average = weight_average
        self.variables = list(model.trainable_variables)
        self.penalties = penalties
        self.weight_decay = weight_decay
        #: ``{"ar_loss": float tensor, "tar_loss": ...}`` of the last training step (active penalties only).
        self.last_penalties: dict = {}
        #: The exact row-sparse rule in use (``"sgd"``, ``"adagrad"``), or None: dense updates.
        self.sparse_rule = sparse_update_rule(optimizer, weight_decay) if sparse_updates is not False else None
        if sparse_updates and self.sparse_rule is None:
            raise ValueError("sparse updates are exact only for sgd without momentum and adagrad, without weight decay")
        if self.sparse_rule is not None and hasattr(model, "use_row_sparse_reads"):
            model.use_row_sparse_reads()
        #: Paths of the variables updated row by row (known once the step is traced).
        self.sparse_variables: list[str] = []
        self._forward_backward = tf.function(self._forward_backward_impl, jit_compile=jit_compile)
        #: The step as a tf.function (also returns the AR/TAR values); :meth:`train_step` calls it.
        self.compiled_train_step = tf.function(self._train_step)
        self.eval_step = tf.function(self._eval_step)

    def _forward_backward_impl(self, inputs, targets, states, seed, rows, scale):
        penalty_terms = {}
        with tf.GradientTape() as tape:
            # The output layer's training loss per token (full softmax: the
            # cross-entropy of its logits; sampled: from this step's seed).
            if self.penalties.active:
                losses, new_states, (raw, dropped) = self.model(inputs, states, training=True, seed=seed, rows=rows,
                                                                targets=targets, return_activations=True)
                penalty_terms = self.penalties.terms(raw, dropped, self.global_batch)
            else:
                losses, new_states = self.model(inputs, states, training=True, seed=seed, rows=rows, targets=targets)
            loss_sum = tf.reduce_sum(losses)
            # Loss of this replica's rows as a share of the global objective
            # (the denominator is global, not per replica): the all-reduced
            # SUM of these gradients is the gradient of the global objective.
            denominator = self._denominator(targets)
            if penalty_terms:
                objective = (loss_sum / denominator + tf.add_n(list(penalty_terms.values()))) * scale
            else:
                objective = loss_sum / denominator * scale
        grads = tape.gradient(objective, self.variables)
        if self.sparse_rule is None:
            grads = gradients.densify(grads)
        elif self.sparse_variables != sparse_variable_names(grads, self.variables):
            self.sparse_variables = sparse_variable_names(grads, self.variables)
            log.info(f"row-sparse updates ({self.sparse_rule}, exact): {', '.join(self.sparse_variables) or 'none'}")
        return loss_sum, new_states, grads, penalty_terms

    def _denominator(self, targets):
        """The objective's denominator; per token it counts this window's tokens (``train.variable_length``)."""
        if self.loss_normalization == "token" and targets.shape[1] != self.num_steps:
            return tf.cast(self.global_batch * tf.shape(targets)[1], tf.float32)
        return self.denominator

    def _replica_train(self, inputs, targets, states, seed, length=None):
        if length is not None:  # a variable-length window, padded to one shape: its first ``length`` steps
            inputs, targets = inputs[:, :length], targets[:, :length]
        local_rows = tf.shape(inputs)[0]
        rows = tf.stack([self.backend.replica_id() * local_rows, tf.constant(self.global_batch, tf.int32)])
        scale = self.loss_scale.scale.read_value() if self.loss_scale is not None else tf.constant(1.0)
        if self.accumulate_steps == 1:
            loss_sum, new_states, grads, penalty_terms = self._forward_backward(
                inputs, targets, states, seed, rows, scale)
        else:
            loss_sum, new_states, grads, penalty_terms = accumulation.accumulate(
                self._forward_backward, self.accumulate_steps, inputs, targets, states, seed, rows, scale)
        grads = self.backend.all_reduce_sum(grads)
        # Row-sparse gradients arrive as every replica's rows: one row per index
        # before the norm (the norm of a row's parts is not the norm of the row).
        grads = [combine_duplicates(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        if self.loss_scale is not None:
            grads = [gradients.map_values(lambda v: v / scale, g) for g in grads]
        finite = gradients.all_finite(grads)
        grad_norm = gradients.global_norm(grads)
        grads = gradients.clip_by_global_norm(grads, self.clip_norm, grad_norm)
        grads = add_weight_decay(grads, self.variables, self.weight_decay)
        self.backend.apply_if_finite(self._apply, grads, finite, self._after_apply)
        return loss_sum, new_states, grad_norm, finite, penalty_terms

    def _apply(self, grads):
        self.optimizer.apply(grads, self.variables)

    def _after_apply(self, finite):
        if self.loss_scale is not None:
            self.loss_scale.update(finite)
        if self.weight_average is not None:
            self.weight_average.update(finite)

    def train_step(self, inputs, targets, states, seed, length=None):
        """One optimizer step; returns (global loss sum, per-replica new states, grad norm, finite flag).

        The global AR/TAR values of the step go to :attr:`last_penalties`.
        ``length`` (an int32 scalar tensor, ``train.variable_length``): the
        step trains on the first ``length`` time steps of windows padded to one
        width, so one trace serves every length and the carried state is the
        one after the window's last real token.
        """
        loss_sum, states, grad_norm, finite, self.last_penalties = self.compiled_train_step(
            inputs, targets, states, seed, length)
        return loss_sum, states, grad_norm, finite

    def _train_step(self, inputs, targets, states, seed, length=None):
        args = (inputs, targets, states, seed) + ((length,) if length is not None else ())
        loss_sum, states, grad_norm, finite, penalty_terms = self.backend.run(self._replica_train, args)
        penalties = {name: self.backend.reduce_sum(value) for name, value in penalty_terms.items()}
        return (self.backend.reduce_sum(loss_sum), states, self.backend.first(grad_norm),
                self.backend.first(finite), penalties)

    def _replica_eval(self, inputs, targets, weights, states):
        # Exact per-token losses in row slices of bounded memory (every output layer).
        losses, new_states = self.model(inputs, states, training=False, targets=targets)
        # Padded targets (weight 0) add nothing.
        return tf.reduce_sum(losses * tf.cast(weights, losses.dtype)), new_states

    def _eval_step(self, inputs, targets, weights, states):
        """Returns (global weighted loss sum, per-replica new states).

        ``weights`` (float ``[batch, time]``) is 1 for a real target and 0 for
        padding (see :class:`~dist_rnn.data.batching.EvalBatcher`).
        """
        loss_sum, states = self.backend.run(self._replica_eval, (inputs, targets, weights, states))
        return self.backend.reduce_sum(loss_sum), states
