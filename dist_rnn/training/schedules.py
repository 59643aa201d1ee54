"""Learning-rate schedules as pure functions of (step, epoch).

The trainer evaluates the schedule on the host before each step and assigns the
value to the optimizer, so schedules may depend on the epoch (the PTB recipe),
not only on the step.
"""

from __future__ import annotations

import math

from dist_rnn.config import OptimizerConfig


def learning_rate_at(config: OptimizerConfig, step: int, epoch: int, max_steps: int | None = None,
                     num_replicas: int = 1, plateau_decays: int = 0) -> float:
    """Returns the learning rate of optimizer step ``step`` (0-based) in ``epoch`` (1-based).

    Args:
        config: The ``optimizer`` section (base rate and schedule).
        step: Number of steps taken before this one.
        epoch: Current epoch, counted from 1.
        max_steps: The run's length in steps (``train.max_steps``, or the
            steps of ``train.max_epochs`` epochs if fewer): the cosine horizon
            unless ``schedule.total_steps`` is set.
        num_replicas: Replica count, for ``scale_lr_with_replicas``.
        plateau_decays: Decays of the ``plateau`` schedule so far (see
            :func:`dist_rnn.training.stopping.plateau_decays`).

    Returns:
        The learning rate.
    """
    s = config.schedule
    lr = config.learning_rate
    if s.name == "exponential":
        exponent = step / s.decay_steps
        if s.staircase:
            exponent = math.floor(exponent)
        lr = lr * s.decay_rate ** exponent
    elif s.name == "epoch":
        lr = lr * s.decay_rate ** max(epoch - s.decay_start_epoch, 0)
    elif s.name == "cosine":
        total = s.total_steps if s.total_steps is not None else max_steps
        if total is None:
            raise ValueError("the cosine schedule needs schedule.total_steps or the run's length (max_steps)")
        if s.warmup_steps and step < s.warmup_steps:
            lr = lr * (step + 1) / s.warmup_steps
        else:
            progress = min(1.0, (step - s.warmup_steps) / max(1, total - s.warmup_steps))
            lr = s.min_learning_rate + (lr - s.min_learning_rate) * 0.5 * (1 + math.cos(math.pi * progress))
    elif s.name == "plateau":
        lr = lr * s.factor ** plateau_decays
    if config.scale_lr_with_replicas and num_replicas > 1:
        ramp = 1.0 if not s.warmup_steps else min(1.0, (step + 1) / s.warmup_steps)
        lr = lr * (1 + (num_replicas - 1) * ramp)
    return lr
