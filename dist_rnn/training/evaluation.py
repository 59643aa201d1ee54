"""Evaluation of a whole split: the loss per scored token, with the state carried across windows."""

from __future__ import annotations

import math
from typing import Callable
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
    bpb: float | None = None

    def as_dict(self) -> dict:
        """``split``, ``loss``, ``perplexity``, ``tokens``, ``bpc`` (char level) and ``bpb`` (bits per source
        byte, when the corpus knows its bytes)."""
        out = {"split": self.split, "loss": self.loss, "perplexity": perplexity(self.loss), "tokens": self.tokens}
        if self.level == "char":
            out["bpc"] = self.loss / math.log(2)
        if self.bpb is not None:
            out["bpb"] = self.bpb
        return out

    def metrics(self) -> dict:
        """The values :meth:`MetricsLogger.evaluation` records: ``loss``, ``tokens`` and ``bpb`` if known."""
        values = {"loss": self.loss, "tokens": self.tokens}
        if self.bpb is not None:
            values["bpb"] = self.bpb
        return values


def evaluate_split(split: str, batches: EvalBatcher, steps: StepFunctions, backend: Backend, states,
                   level: str, bits_per_byte: Callable[[str, float], float | None] | None = None) -> EvalResult:
    """Evaluates every window of ``batches`` in order, carrying the recurrent state from window to window.

    Every token but the first is scored exactly once (see
    :class:`~dist_rnn.data.batching.EvalBatcher`); ``tokens`` counts them.

    Args:
        split: The split's name (``valid`` or ``test``).
        batches: The split's windows.
        steps: The run's compiled steps (``eval_step``).
        backend: The distribution backend.
        states: The sharded initial state (zeros) of ``batches.batch_size`` rows.
        level: The tokenizer kind (char level adds bits per character).
        bits_per_byte: ``(split, nats per token) -> bits per source byte``
            (the corpus'), or None.

    Returns:
        The summed loss divided by the scored tokens.
    """
    total = tf.constant(0.0, tf.float64)
    for inputs, targets, weights in batches.dataset():
        loss_sum, states = steps.eval_step(*backend.shard((inputs, targets, weights)), states)
        total += tf.cast(loss_sum, tf.float64)
    loss = float(total) / batches.tokens
    bpb = bits_per_byte(split, loss) if bits_per_byte else None
    return EvalResult(split, loss, batches.tokens, level, bpb)
