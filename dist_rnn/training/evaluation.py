"""Evaluation of a whole split: the loss per scored token, with the state carried across windows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import tensorflow as tf

from dist_rnn.data.batching import EvalBatcher
from dist_rnn.distribution import Backend
from dist_rnn.summaries import perplexity
from dist_rnn.training.steps import StepFunctions


@dataclass
class EvalResult:
    """Loss over a whole split, in nats per token."""

    split: str
    loss: float
    tokens: int
    level: str

    def as_dict(self) -> dict:
        """``split``, ``loss``, ``perplexity``, ``tokens`` and ``bpc`` (char level)."""
        out = {"split": self.split, "loss": self.loss, "perplexity": perplexity(self.loss), "tokens": self.tokens}
        if self.level == "char":
            out["bpc"] = self.loss / math.log(2)
        return out


def evaluate_split(split: str, batches: EvalBatcher, steps: StepFunctions, backend: Backend, states,
                   level: str) -> EvalResult:
    """Evaluates every window of ``batches`` in order, carrying the recurrent state from window to window.

    Every token but the first is scored exactly once (see
    :class:`~dist_rnn.data.batching.EvalBatcher`); ``tokens`` counts them.

    Args:
        split: The split's name (``valid`` or ``test``).
        batches: The split's windows.
        steps: The run's compiled steps (``eval_step``).
        backend: The distribution backend.
        states: The sharded initial state (zeros) of ``batches.batch_size`` rows.
        level: ``char`` or ``word`` (char level adds bits per character).

    Returns:
        The summed loss divided by the scored tokens.
    """
    total = tf.constant(0.0, tf.float64)
    for inputs, targets, weights in batches.dataset():
        loss_sum, states = steps.eval_step(*backend.shard((inputs, targets, weights)), states)
        total += tf.cast(loss_sum, tf.float64)
    return EvalResult(split, float(total) / batches.tokens, batches.tokens, level)
