"""Averaged weights: an exponential moving average (``optimizer.ema_decay``) or NT-ASGD's running mean.

The average is kept in variables beside the model's, updated after every
applied optimizer step from the (identical) weights of the replicas, and saved
in every checkpoint with the raw weights, which training resumes from.
Evaluation, the best checkpoint, samples, ``generate`` and ``export`` read the
average instead (:meth:`WeightAverage.applied`, :func:`load_averaged_weights`).

* EMA: ``avg = d * avg + (1 - d) * w`` after the n-th applied step, with
  ``d = min(decay, (1 + n) / (10 + n))`` (the warm-up of TensorFlow's
  ``ExponentialMovingAverage`` with ``num_updates``), starting from the
  weights after the first applied step (of the run, or of a resume from a
  checkpoint without an average). Without the warm-up a long-horizon average
  (0.998) still holds a third of the first steps' weights after 500 steps,
  and averaging weights that far apart gives a model worse than any of them.
* NT-ASGD (``optimizer.name: ntasgd``): inactive until the switch
  (:func:`dist_rnn.training.stopping.ntasgd_switch_index`); from then on
  ``avg`` is the mean of the weights after every applied step since the
  switch, ``avg += (w - avg) / n``, as Merity et al.'s averaged SGD. Before
  the switch the average is the raw weights.
"""

from __future__ import annotations

import contextlib

import tensorflow as tf

from dist_rnn.config import Config

_SYNC = dict(trainable=False, synchronization=tf.VariableSynchronization.ON_WRITE,
             aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


def averaging_mode(config: Config) -> str | None:
    """``ema``, ``ntasgd`` or None: how a run averages its weights."""
    if config.optimizer.name == "ntasgd":
        return "ntasgd"
    return "ema" if config.optimizer.ema_decay > 0 else None


def ema_decay_at(count, decay: float):
    """The EMA's decay at its ``count``-th update: ``min(decay, (1 + count) / (10 + count))``.

    Args:
        count: The update's 1-based number (int or integer tensor).
        decay: ``optimizer.ema_decay``.

    Returns:
        The decay as a float32 tensor.
    """
    count = tf.cast(count, tf.float32)
    return tf.minimum(tf.constant(decay, tf.float32), (1.0 + count) / (10.0 + count))


class WeightAverage(tf.Module):
    """The averaged copy of a model's trainable weights.

    Create inside the strategy scope; call :meth:`update` from cross-replica
    context (where the loss scale is updated), with the agreed finite flag.

    Args:
        variables: The model's trainable variables.
        mode: ``ema`` or ``ntasgd``.
        decay: ``optimizer.ema_decay`` (``ema``).
    """

    def __init__(self, variables: list, mode: str, decay: float = 0.0):
        super().__init__(name="weight_average")
        self.mode = mode
        self.decay = decay
        self.model_variables = list(variables)
        self.averages = [tf.Variable(tf.zeros(v.shape, v.dtype), name=f"average_{i}", **_SYNC)
                         for i, v in enumerate(self.model_variables)]
        # Whether steps are averaged (NT-ASGD: since the switch), and how many were.
        self.active = tf.Variable(mode == "ema", dtype=tf.bool, name="active", **_SYNC)
        self.count = tf.Variable(0, dtype=tf.int64, name="count", **_SYNC)

    def update(self, finite: tf.Tensor) -> None:
        """Folds the current weights into the average after a step that applied (``finite``)."""
        def fold():
            count = self.count + 1
            # The new weights' share: 1/n for the running mean, 1 - d for
            # the EMA (see the module docstring), and 1 at its first step
            # (nothing to average yet).
            if self.mode == "ema":
                share = tf.where(count == 1, 1.0, 1.0 - ema_decay_at(count, self.decay))
            else:
                share = 1.0 / tf.cast(count, tf.float32)
            for avg, v in zip(self.averages, self.model_variables):
                avg.assign_add((tf.cast(tf.convert_to_tensor(v), avg.dtype) - avg) * share)
            self.count.assign(count)
            return tf.constant(True)

        tf.cond(tf.logical_and(finite, self.active), fold, lambda: tf.constant(False))

    def start(self) -> None:
        """NT-ASGD's switch: the average restarts with the next applied step (host side)."""
        if not bool(self.active.numpy()):
            self.count.assign(0)
            self.active.assign(True)

    @property
    def ready(self) -> bool:
        """Whether an average exists (at least one step folded in since it started)."""
        return bool(self.active.numpy()) and int(self.count.numpy()) > 0

    @contextlib.contextmanager
    def applied(self):
        """The model holds the averaged weights inside the block and its raw weights again after it."""
        if not self.ready:
            yield
            return
        raw = [tf.identity(tf.convert_to_tensor(v)) for v in self.model_variables]
        self.copy_into_model()
        try:
            yield
        finally:
            for v, value in zip(self.model_variables, raw):
                v.assign(value)

    def copy_into_model(self) -> None:
        """Overwrites the model's weights with the average (when there is one)."""
        if self.ready:
            for v, avg in zip(self.model_variables, self.averages):
                v.assign(tf.convert_to_tensor(avg))


def build_weight_average(config: Config, variables: list) -> WeightAverage | None:
    """The run's :class:`WeightAverage`, or None without averaging (call inside the strategy scope)."""
    mode = averaging_mode(config)
    return None if mode is None else WeightAverage(variables, mode, config.optimizer.ema_decay)


def load_averaged_weights(config: Config, model, path: str) -> bool:
    """Puts the average saved in checkpoint ``path`` into ``model`` (``generate``, ``export``, inference).

    Returns:
        Whether the model now holds averaged weights (False without
        averaging, before NT-ASGD's switch, or for a checkpoint without them).
    """
    average = build_weight_average(config, model.trainable_variables)
    if average is None:
        return False
    saved = {name.split("/", 1)[0] for name, _ in tf.train.list_variables(path)}
    if "weight_average" not in saved:
        return False
    tf.train.Checkpoint(weight_average=average).restore(path).expect_partial()
    average.copy_into_model()
    return average.ready
