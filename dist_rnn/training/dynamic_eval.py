"""Dynamic evaluation (Krause et al. 2018): the weights adapt to the evaluated text as it is scored.

The split is read as consecutive segments (windows of
:class:`~dist_rnn.data.batching.EvalBatcher`, the recurrent state carried
across them, as in static evaluation). Each segment is first scored with the
current weights, and its loss is what is reported, so no token is ever scored
by weights that have seen it; then the gradient ``g`` of that segment's mean
token loss (no dropout) moves the weights:

* ``sgd``: ``theta <- theta - lr * g + decay * (theta_0 - theta)``.
* ``rms``: ``theta <- theta - lr * g / (rms + epsilon) + decay * r * (theta_0 - theta)``,
  where ``rms`` is the root mean square of each weight's gradient over
  :attr:`DynamicSettings.stat_batches` windows of the training split (batches
  of ``train.batch_size`` rows, collected before evaluating, with the starting
  weights), and ``r = rms / mean(rms)`` (the mean over the weight tensors of
  each tensor's mean), clipped at ``1 / decay`` so a decay step never
  overshoots ``theta_0``. These are the formulas of the paper and of its
  reference code (Krause's ``dynamiceval.py``).

``theta_0`` are the weights eval would use: the averaged weights (EMA or
NT-ASGD) when the run keeps them. The adapted weights live only in memory:
the model holds ``theta_0`` again afterwards and nothing is written to the run
directory.

Streams: :attr:`DynamicSettings.batch` rows read the split as that many
contiguous parts side by side (the layout of static evaluation). The rows are
independent streams of state but share one set of weights, which adapt to the
mean loss of all rows of a segment (as the reference code does with a batch
of more than one row). One row is the paper's setting and adapts to the text
strictly in order, but on a CPU a segment of one row costs nearly as much as
one of 16 (each time step reads every weight once, whatever the rows): for a
3 x LSTM 512 char model one row took over 1 s per 100-token segment, i.e.
about 20 minutes for a 111k-character split, on the loaded 2-core
development machine. The default of 16 rows reads the split ~16 times
faster; each update then mixes text from 16 far apart positions, which
gains less per update than one row.

Single device: ``dist-rnn eval`` builds a one-device (``distribute.backend:
none``) float32 model, and dynamic evaluation runs on it; distribution
strategies are not used.
"""

from __future__ import annotations

import tensorflow as tf

from dist_rnn.data.batching import EvalBatcher
from dist_rnn.training.evaluation import EvalResult
from dist_rnn.training.dynamic_settings import DynamicSettings
from dist_rnn.training.gradients import densify


def _segment_loss_and_gradient(model, variables, inputs, targets, weights, states):
    """Summed loss of a segment's scored tokens, the gradient of their mean, and the new states."""
    with tf.GradientTape() as tape:
        losses, new_states = model(inputs, states, training=False, targets=targets)
        weights = tf.cast(weights, losses.dtype)
        loss_sum = tf.reduce_sum(losses * weights)
        mean_loss = loss_sum / tf.maximum(tf.reduce_sum(weights), 1.0)
    grads = densify(tape.gradient(mean_loss, variables))
    # A weight the exact loss does not read (none in the built-in models) simply does not move by gradient.
    grads = [tf.zeros_like(v) if g is None else g for v, g in zip(variables, grads)]
    return loss_sum, grads, new_states


def gradient_rms(model, batches: EvalBatcher, max_windows: int) -> list[tf.Tensor]:
    """Root mean square of each weight's gradient over the first windows of ``batches``.

    Each window's gradient is that of its mean token loss (no dropout), the
    state carried from window to window; the weights do not change.

    Args:
        model: The language model.
        batches: Windows of the training split.
        max_windows: At most this many windows are read.

    Returns:
        One float32 tensor per trainable variable, of its shape.
    """
    variables = model.trainable_variables
    step = tf.function(lambda i, t, w, s: _segment_loss_and_gradient(model, variables, i, t, w, s))
    squares = [tf.zeros(v.shape, tf.float32) for v in variables]
    states = model.initial_state(batches.batch_size)
    count = min(max_windows, batches.num_windows)
    for index in range(count):
        _, grads, states = step(*batches.window(index), states)
        squares = [s + tf.square(tf.cast(g, tf.float32)) for s, g in zip(squares, grads)]
    return [tf.sqrt(s / count) for s in squares]


class DynamicUpdate:
    """The per-weight update ``theta -= lr * g / divisor; theta += decay_rate * (theta_0 - theta)``.

    Args:
        learning_rate: ``lr``.
        divisors: Per variable, a tensor of its shape or a scalar.
        decay_rates: Per variable, a tensor of its shape or a scalar.
    """

    def __init__(self, learning_rate: float, divisors: list, decay_rates: list):
        self.learning_rate = learning_rate
        self.divisors = divisors
        self.decay_rates = decay_rates

    @classmethod
    def sgd(cls, num_variables: int, learning_rate: float, decay: float) -> DynamicUpdate:
        """``theta <- theta - lr * g + decay * (theta_0 - theta)``."""
        return cls(learning_rate, [1.0] * num_variables, [decay] * num_variables)

    @classmethod
    def rms(cls, rms: list[tf.Tensor], learning_rate: float, decay: float, epsilon: float) -> DynamicUpdate:
        """``theta <- theta - lr * g / (rms + epsilon) + decay * min(rms / mean(rms), 1 / decay) * (theta_0 - theta)``.

        ``mean(rms)`` is the mean over the variables of each variable's mean RMS.
        """
        mean_rms = tf.add_n([tf.reduce_mean(r) for r in rms]) / len(rms)
        decay_rates = []
        for r in rms:
            scale = r / mean_rms if float(mean_rms) > 0 else tf.ones_like(r)
            decay_rates.append(decay * tf.minimum(scale, 1.0 / decay) if decay > 0 else tf.zeros_like(r))
        return cls(learning_rate, [r + epsilon for r in rms], decay_rates)


def evaluate_dynamic(model, batches: EvalBatcher, update: DynamicUpdate) -> tuple[float, int]:
    """Scores every window of ``batches`` in order, adapting the weights after each one.

    The weights are ``theta_0`` again when this returns (or raises).

    Args:
        model: The language model holding ``theta_0``.
        batches: The evaluated split cut into segments (its ``num_steps``)
            of ``batch_size`` streams.
        update: The rule.

    Returns:
        ``(summed loss in nats, scored tokens)``: every token but the first, once.
    """
    variables = model.trainable_variables
    start = [tf.Variable(v, trainable=False) for v in variables]  # theta_0
    lr = tf.constant(update.learning_rate, tf.float32)

    @tf.function
    def step(inputs, targets, weights, states):
        loss_sum, grads, new_states = _segment_loss_and_gradient(model, variables, inputs, targets, weights,
                                                                 states)
        for v, v0, g, divisor, decay in zip(variables, start, grads, update.divisors, update.decay_rates):
            v.assign_add(decay * (v0 - v) - lr * g / divisor)
        return loss_sum, new_states

    total = tf.constant(0.0, tf.float64)
    states = model.initial_state(batches.batch_size)
    try:
        for index in range(batches.num_windows):
            loss_sum, states = step(*batches.window(index), states)
            total += tf.cast(loss_sum, tf.float64)
    finally:
        for v, v0 in zip(variables, start):
            v.assign(v0)
    return float(total), batches.tokens


def evaluate_split_dynamically(trainer, split: str, settings: DynamicSettings) -> dict:
    """``dist-rnn eval --dynamic``: the static and the dynamic result of a restored trainer on a split.

    Both start from the weights static evaluation uses (the average, when the run keeps one).

    Args:
        trainer: A :class:`~dist_rnn.training.trainer.Trainer` with its checkpoint restored.
        split: ``valid`` or ``test``.
        settings: The options (None values take their defaults).

    Returns:
        The eval JSON of the dynamic result (``loss``, ``perplexity``,
        ``tokens``, ``bpc``/``bpb``), with ``static_loss`` and ``dynamic``
        (the settings used) added.

    Raises:
        UserError: If the split is empty.
    """
    static = trainer.evaluate(split)  # refuses an empty split
    settings = settings.resolved(trainer.config.train.num_steps)
    corpus = trainer.corpus
    batches = EvalBatcher(corpus.split(split), settings.batch, settings.segment, split)

    def run() -> float:
        model = trainer.model
        if settings.rule == "rms":
            train = EvalBatcher(corpus.train, trainer.config.train.batch_size, settings.segment, "train")
            rms = gradient_rms(model, train, settings.stat_batches)
            update = DynamicUpdate.rms(rms, settings.learning_rate, settings.decay, settings.epsilon)
        else:
            update = DynamicUpdate.sgd(len(model.trainable_variables), settings.learning_rate, settings.decay)
        loss_sum, tokens = evaluate_dynamic(model, batches, update)
        return loss_sum / tokens

    loss = trainer.recipe.with_average(run)
    result = EvalResult(split, loss, batches.tokens, corpus.tokenizer.kind,
                        corpus.bits_per_byte(split, loss)).as_dict()
    result["static_loss"] = static.loss
    result["dynamic"] = settings.as_dict()
    return result
