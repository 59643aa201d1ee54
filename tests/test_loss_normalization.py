"""train.loss_normalization: the objective is the per-token mean or the tutorial's per-sequence sum."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from dist_rnn.distribution import Backend
from dist_rnn.runtime import set_precision
from dist_rnn.training.factory import build_trainer

NUM_STEPS = 20


def one_sgd_step(data, run_dir, normalization):
    """One SGD step (lr 1, no clipping) from the seed's weights; returns (loss sum, grad norm, update, weights)."""
    config = tiny_config(data, optimizer={"name": "sgd", "learning_rate": 1.0, "clip_norm": 0.0},
                         train={"num_steps": NUM_STEPS, "loss_normalization": normalization})
    set_precision("float32")
    run_dir.mkdir(parents=True)
    trainer = build_trainer(config, run_dir, backend=Backend())
    inputs, targets = trainer.train_batches.window(1, 0)
    before = [v.numpy().copy() for v in trainer.model.trainable_variables]
    trainer.optimizer.learning_rate.assign(1.0)
    loss_sum, _, norm, finite = trainer.steps.train_step(inputs, targets, trainer.model.initial_state(8),
                                                         tf.constant([0, 0], tf.int64))
    assert bool(finite)
    update = [b - v.numpy() for b, v in zip(before, trainer.model.trainable_variables)]
    return float(loss_sum), float(norm), update, before


def test_sequence_gradient_is_num_steps_times_token_gradient(shakespeare_slice, tmp_path):
    token = one_sgd_step(shakespeare_slice, tmp_path / "token", "token")
    sequence = one_sgd_step(shakespeare_slice, tmp_path / "sequence", "sequence")
    # Same weights (same seed), same batch: the loss itself does not change ...
    assert sequence[0] == pytest.approx(token[0], rel=1e-6)
    # ... its gradient does, by exactly the window length, variable by variable.
    assert sequence[1] == pytest.approx(NUM_STEPS * token[1], rel=1e-5)
    assert token[1] > 0.1
    for t, s, w in zip(token[2], sequence[2], token[3]):
        # An update read back as (weight before - weight after) is exact only to the weight's float32
        # spacing, which the factor NUM_STEPS multiplies.
        np.testing.assert_allclose(s, NUM_STEPS * t, rtol=1e-4, atol=2 * NUM_STEPS * np.spacing(np.abs(w).max()))


def test_default_is_the_per_token_mean(shakespeare_slice):
    assert tiny_config(shakespeare_slice).train.loss_normalization == "token"


@pytest.mark.parametrize("name", ["ptb_small", "ptb_medium", "ptb_large"])
def test_ptb_configs_use_the_tutorials_per_sequence_loss(name):
    from conftest import REPO
    from dist_rnn.config import load_config

    assert load_config([str(REPO / "configs" / f"{name}.yaml")]).train.loss_normalization == "sequence"


@pytest.mark.slow
def test_sequence_normalization_under_mirrored_equals_one_device(shakespeare_slice, tmp_path):
    # Each replica differentiates its rows' loss sum over the *global* row count: the all-reduced
    # sum is the one-device gradient. A per-replica denominator (a gradient 2x too large) would show
    # in the logged gradient norms, compared to 1e-4, and in the weights.
    from test_distributed import assert_same_run, train

    single, mirrored = tmp_path / "single", tmp_path / "mirrored"
    train(single, shakespeare_slice, "--set", "train.loss_normalization=sequence")
    train(mirrored, shakespeare_slice, "--set", "train.loss_normalization=sequence",
          "--set", "distribute={backend: mirrored, cpu_devices: 2}")
    assert_same_run(single, mirrored)
