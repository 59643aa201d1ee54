"""Optimizer construction.

Optimizers are built without Keras' own clipping (``clipnorm``,
``global_clipnorm``): Keras clips each replica's local gradient before the
all-reduce. dist-rnn clips the reduced gradient itself (see
:mod:`dist_rnn.training.gradients`).
"""

from __future__ import annotations

import keras

from dist_rnn.config import OptimizerConfig


def build_optimizer(config: OptimizerConfig) -> keras.optimizers.Optimizer:
    """Creates the configured Keras optimizer (call inside the strategy scope).

    Args:
        config: The ``optimizer`` section. The learning rate is a variable
            the trainer assigns each step from the schedule.

    Returns:
        The optimizer, not yet built, applying gradients as given (already
        all-reduced by dist-rnn).
    """
    return applying_reduced_gradients(_create(config))


def applying_reduced_gradients(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """Stops the optimizer from summing gradients over replicas a second time.

    Keras' TensorFlow optimizer all-reduces (sums) gradients in replica context
    right before its update (``_all_reduce_sum_gradients``). dist-rnn hands it
    gradients that are already reduced, unscaled and clipped, so that sum would
    multiply them by the replica count. Making it the identity on this instance
    keeps one all-reduce per step; ``tests/test_distributed.py`` checks the
    result against a single device, and ``tests/test_gradient_path.py`` fails
    if a Keras upgrade drops the hook.
    """
    if not hasattr(optimizer, "_all_reduce_sum_gradients"):
        raise RuntimeError("this Keras optimizer has no _all_reduce_sum_gradients hook; "
                           "dist-rnn's gradient path needs revisiting for this Keras version")
    optimizer._all_reduce_sum_gradients = lambda grads_and_vars: list(grads_and_vars)
    return optimizer


def _create(config: OptimizerConfig) -> keras.optimizers.Optimizer:
    lr = config.learning_rate
    if config.name in ("sgd", "ntasgd"):  # ntasgd: plain SGD; the averaging is dist_rnn.training.averaging's
        return keras.optimizers.SGD(learning_rate=lr, momentum=config.momentum)
    if config.name == "adam":
        return keras.optimizers.Adam(learning_rate=lr, beta_1=config.beta_1, beta_2=config.beta_2,
                                     epsilon=config.epsilon)
    if config.name == "adamw":
        return keras.optimizers.AdamW(learning_rate=lr, beta_1=config.beta_1, beta_2=config.beta_2,
                                      epsilon=config.epsilon, weight_decay=config.weight_decay)
    if config.name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=lr, momentum=config.momentum, epsilon=config.epsilon)
    if config.name == "adagrad":
        return keras.optimizers.Adagrad(learning_rate=lr, epsilon=config.epsilon)
    raise ValueError(f"unknown optimizer {config.name}")
