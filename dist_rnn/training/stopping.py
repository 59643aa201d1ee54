"""Decisions taken on the validation losses: early stopping, plateau decay and the NT-ASGD switch.

Every decision is a pure function of the run's validation losses in
evaluation order, kept in :class:`EvaluationHistory`, which checkpoints save:
a resumed run continues every count exactly where the interrupted one was.
All workers evaluate the same global loss, so they take the same decisions.
"""

from __future__ import annotations

import json
import math

import tensorflow as tf

from dist_rnn.config import Config


def evaluations_without_improvement(losses: list[float], min_delta: float = 0.0) -> int:
    """Evaluations since the last one that beat the lowest loss before it by more than ``min_delta``.

    The lowest loss moves only on such an improvement (a smaller gain does not
    restart the count). The first evaluation always improves.
    """
    best, count = math.inf, 0
    for loss in losses:
        if loss < best - min_delta:
            best, count = loss, 0
        else:
            count += 1
    return count


def plateau_decays(losses: list[float], patience: int) -> int:
    """How often the ``plateau`` schedule decayed: once per ``patience`` evaluations in a row without a new lowest loss.

    The count of flat evaluations restarts after each decay.
    """
    best, flat, decays = math.inf, 0, 0
    for loss in losses:
        if loss < best:
            best, flat = loss, 0
        else:
            flat += 1
            if flat >= patience:
                decays, flat = decays + 1, 0
    return decays


def ntasgd_switch_index(losses: list[float], nonmono: int) -> int | None:
    """Index of the evaluation at which NT-ASGD starts averaging, or None.

    Merity et al. (2017): at an evaluation with more than ``nonmono``
    evaluations before it, switch when its loss is above the lowest loss of
    those before the last ``nonmono`` of them.
    """
    for i, loss in enumerate(losses):
        earlier = losses[:i]
        if len(earlier) > nonmono and loss > min(earlier[:-nonmono]):
            return i
    return None


class EvaluationHistory(tf.Module):
    """The validation losses of a run, by step, saved in its checkpoints.

    Held as one JSON string variable so a checkpoint carries it beside the
    weights; :meth:`record` updates it at once, so any save after an
    evaluation includes that evaluation.

    Args:
        config: The run config (patience, factor, nonmono).
    """

    def __init__(self, config: Config):
        super().__init__(name="evaluation_history")
        self.config = config
        self.record_json = tf.Variable("[]", dtype=tf.string, trainable=False, name="record")

    @property
    def entries(self) -> list[list]:
        """``[step, loss]`` of every evaluation so far."""
        return json.loads(self.record_json.numpy().decode())

    @property
    def losses(self) -> list[float]:
        """The validation losses in evaluation order."""
        return [loss for _, loss in self.entries]

    def record(self, step: int, loss: float) -> bool:
        """Adds the validation loss evaluated after ``step``; a second one at the same step is ignored.

        Returns:
            Whether it was added.
        """
        entries = self.entries
        if entries and entries[-1][0] == step:
            return False
        # A non-finite loss is no improvement (stored as infinity: it compares, NaN does not).
        self.record_json.assign(json.dumps(entries + [[step, float(loss) if math.isfinite(loss) else math.inf]]))
        return True

    def plateau_decays(self) -> int:
        """Decays of the ``plateau`` schedule so far (0 under any other schedule)."""
        schedule = self.config.optimizer.schedule
        return plateau_decays(self.losses, schedule.patience) if schedule.name == "plateau" else 0

    def should_stop(self) -> bool:
        """Whether ``train.early_stopping`` ends the run now."""
        stopping = self.config.train.early_stopping
        return bool(stopping.patience) and (
            evaluations_without_improvement(self.losses, stopping.min_delta) >= stopping.patience)

    def averaging_since(self) -> int | None:
        """``ntasgd``: the step after which the weights are averaged, or None (not switched, or not NT-ASGD)."""
        if self.config.optimizer.name != "ntasgd":
            return None
        index = ntasgd_switch_index(self.losses, self.config.optimizer.nonmono)
        return None if index is None else self.entries[index][0]


def history_needed(config: Config) -> bool:
    """Whether a run's decisions read its validation history (else checkpoints hold none, as before)."""
    return (config.train.early_stopping.patience > 0 or config.optimizer.schedule.name == "plateau"
            or config.optimizer.name == "ntasgd")
