"""What the trainer asks of the validation-driven training recipe (issue #19).

One object holds a run's :class:`~dist_rnn.training.stopping.EvaluationHistory`
(early stopping, plateau decay, the NT-ASGD switch) and its
:class:`~dist_rnn.training.averaging.WeightAverage`, either of which may be
absent: with neither (every key at its default) every method is the identity
and the run is exactly as before.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

from dist_rnn.config import Config, OptimizerConfig
from dist_rnn.training.averaging import WeightAverage, build_weight_average
from dist_rnn.training.schedules import learning_rate_at
from dist_rnn.training.stopping import EvaluationHistory, history_needed

log = logging.getLogger("dist_rnn")


class TrainingRecipe:
    """Early stopping, plateau decay and averaged weights, as the trainer uses them.

    Args:
        history: The run's validation history, or None when no decision reads it.
        average: The averaged weights, or None without averaging.
    """

    def __init__(self, history: EvaluationHistory | None = None, average: WeightAverage | None = None):
        self.history = history
        self.average = average

    def learning_rate(self, config: OptimizerConfig, step: int, epoch: int, max_steps: int | None,
                      num_replicas: int) -> float:
        """The rate of the step after ``step``: :func:`~dist_rnn.training.schedules.learning_rate_at` with the plateau decays so far."""
        decays = self.history.plateau_decays() if self.history is not None else 0
        return learning_rate_at(config, step, epoch, max_steps, num_replicas, decays)

    def after_evaluation(self, step: int, loss: float) -> None:
        """Records the validation loss evaluated after ``step`` and takes NT-ASGD's switch when due."""
        if self.history is None or not self.history.record(step, loss):
            return
        since = self.history.averaging_since()
        if since is not None and self.average is not None and not bool(self.average.active.numpy()):
            self.average.start()
            log.info(f"NT-ASGD: the validation loss has not improved for optimizer.nonmono evaluations; "
                     f"averaging the weights from step {step + 1} on")

    def stop_due(self) -> bool:
        """Whether ``train.early_stopping`` ends the run after the last evaluation (logged once)."""
        if self.history is None or not self.history.should_stop():
            return False
        log.info(f"early stopping: {self.history.config.train.early_stopping.patience} evaluations without "
                 f"an improvement of the validation loss (train.early_stopping)")
        return True

    def with_average(self, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)`` with the averaged weights in the model (the raw weights otherwise or after)."""
        if self.average is None:
            return fn(*args, **kwargs)
        with self.average.applied():
            return fn(*args, **kwargs)

    def checkpoint_objects(self) -> dict:
        """The recipe's objects to save in checkpoints (none at the defaults, so checkpoints are as before)."""
        objects = {}
        if self.history is not None:
            objects["evaluation_history"] = self.history
        if self.average is not None:
            objects["weight_average"] = self.average
        return objects


def build_recipe(config: Config, variables: list, scope: Callable = contextlib.nullcontext) -> TrainingRecipe:
    """The run's recipe: a validation history when a decision reads it, an average when the run averages.

    Call outside the strategy scope.

    Args:
        config: The run config.
        variables: The model's trainable variables.
        scope: The backend's strategy scope (``Backend.scope``), in which the
            average's variables are created (mirrored like the model's).
    """
    # The history is host state every worker updates alike, as TrainingState: a
    # plain variable, since MultiWorkerMirroredStrategy broadcasts a variable's
    # initial value from the chief and its collectives carry no strings.
    history = EvaluationHistory(config) if history_needed(config) else None
    with scope():
        average = build_weight_average(config, variables)
    return TrainingRecipe(history, average)
