"""The numbers of the float16 gradient path: unscaling, the reported norm, scale growth and its checkpoint.

Loss-curve comparisons cannot see a gradient left multiplied by the loss scale
(Adam normalizes it away, clipping bounds it), so these tests compare the
reported gradient norm and a plain SGD update of float16 with float32 on the
same batch, and follow the scale itself through growth, its cap and a
stop/resume.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from dist_rnn.distribution import Backend
from dist_rnn.summaries import MetricsLogger
from dist_rnn.runtime import set_precision
from dist_rnn.training.factory import build_trainer
from dist_rnn.training.trainer import Trainer

SEED = tf.constant([0, 0], tf.int64)


@pytest.fixture(autouse=True)
def _float32_afterwards():
    yield
    set_precision("float32")


def make_trainer(config, run_dir) -> Trainer:
    tf.keras.utils.set_random_seed(config.train.seed)
    set_precision(config.train.precision)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLogger(run_dir, True, tensorboard=False, progress="off")
    return build_trainer(config, run_dir, backend=Backend(), metrics=metrics)


def one_sgd_step(data, run_dir, precision, loss_scale=None):
    """One SGD step (lr 1, no clipping, no dropout) on batch 0; returns (reported norm, update, trainer)."""
    train = {"precision": precision}
    if loss_scale:
        train["loss_scale"] = loss_scale
    config = tiny_config(data, optimizer={"name": "sgd", "learning_rate": 1.0, "clip_norm": 0.0},
                         model={"dropout": 0.0}, train=train)
    trainer = make_trainer(config, run_dir)
    before = [v.numpy().copy() for v in trainer.model.trainable_variables]
    inputs, targets = trainer.train_batches.window(1, 0)
    trainer.optimizer.learning_rate.assign(1.0)
    _, _, norm, finite = trainer.steps.train_step(inputs, targets, trainer.model.initial_state(8), SEED)
    assert bool(finite)
    update = [b - v.numpy() for b, v in zip(before, trainer.model.trainable_variables)]
    return float(norm), update, trainer


def flat(arrays) -> np.ndarray:
    return np.concatenate([a.astype(np.float64).ravel() for a in arrays])


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-30))


def test_float16_reports_and_applies_the_unscaled_gradient(shakespeare_slice, tmp_path):
    # Default scale 32768, growth_interval 2000: a fixed scale for this one
    # step, and no overflow at this size. float16 forward/backward rounds at
    # 2^-11 relative; the gradient of a whole batch drifts ~1e-3 from float32
    # (measured 1-4e-3), so 3% bounds float16 noise while a gradient left
    # scaled is off by 32768x.
    norm32, update32, _ = one_sgd_step(shakespeare_slice, tmp_path / "f32", "float32")
    norm16, update16, trainer = one_sgd_step(shakespeare_slice, tmp_path / "f16", "mixed_float16")
    assert float(trainer.loss_scale.scale.numpy()) == 32768.0  # unchanged: no overflow, no growth yet
    assert int(trainer.loss_scale.skipped_steps.numpy()) == 0
    assert norm16 == pytest.approx(norm32, rel=0.03)
    assert 0.1 < norm32 < 100  # a real, unclipped gradient of a fresh model
    # Compared over all weights at once: single entries of ~1e-8 (recurrent
    # kernels at the first step) sit at float32's resolution of the weights.
    assert relative_error(flat(update16), flat(update32)) < 0.03
    assert float(np.linalg.norm(flat(update32))) == pytest.approx(norm32, rel=1e-3)  # lr 1: update = gradient


def test_loss_scale_doubles_after_growth_interval_up_to_max_scale(shakespeare_slice, tmp_path):
    config = tiny_config(shakespeare_slice, optimizer={"name": "sgd", "learning_rate": 0.01},
                         train={"precision": "mixed_float16",
                                "loss_scale": {"initial": 4.0, "growth_interval": 3, "max_scale": 16.0}})
    trainer = make_trainer(config, tmp_path)
    states = trainer.model.initial_state(8)
    scales, good = [], []
    for step in range(10):
        inputs, targets = trainer.train_batches.window(1, step)
        _, states, _, finite = trainer.steps.train_step(inputs, targets, states, tf.constant([0, step], tf.int64))
        assert bool(finite)
        scales.append(float(trainer.loss_scale.scale.numpy()))
        good.append(int(trainer.loss_scale.good_steps.numpy()))
    # Doubles after every 3rd finite step, capped at max_scale 16 (the counter keeps cycling).
    assert scales == [4, 4, 8, 8, 8, 16, 16, 16, 16, 16]
    assert good == [1, 2, 0, 1, 2, 0, 1, 2, 0, 1]
    assert int(trainer.loss_scale.skipped_steps.numpy()) == 0


def saved(run_dir) -> dict[str, np.ndarray]:
    prefix = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    reader = tf.train.load_checkpoint(prefix)
    return {n: reader.get_tensor(n) for n, _ in tf.train.list_variables(prefix)
            if n.endswith("VARIABLE_VALUE") and not n.startswith("save_counter")}


@pytest.fixture(scope="module")
def small_slice(shakespeare_slice, tmp_path_factory):
    """6,000 characters: a validation split of 7 batches keeps each run's evaluation short."""
    path = tmp_path_factory.mktemp("small") / "shakespeare_6k.txt"
    path.write_text(shakespeare_slice.read_text(encoding="utf-8")[:6000], encoding="utf-8")
    return path


def train_float16(data, run_dir, max_steps):
    config = tiny_config(data, model={"dropout": 0.2},
                         train={"precision": "mixed_float16", "max_steps": max_steps, "log_every": 1,
                                "loss_scale": {"initial": 8.0, "growth_interval": 2, "max_scale": 1024.0}})
    trainer = make_trainer(config, run_dir)
    restored = trainer.restore()
    try:
        trainer.train()
    finally:
        trainer.metrics.close()
    return trainer, restored


def test_float16_stop_and_resume_is_bitwise_identical_and_restores_the_scale(small_slice, tmp_path):
    full, _ = train_float16(small_slice, tmp_path / "full", 7)
    assert float(full.loss_scale.scale.numpy()) == 8.0 * 2 ** 3  # grew at steps 2, 4, 6
    _, restored = train_float16(small_slice, tmp_path / "resumed", 3)  # stops between two growths
    assert restored is None
    resumed, restored = train_float16(small_slice, tmp_path / "resumed", 7)
    assert restored and restored.endswith("ckpt-3")
    reference, result = saved(tmp_path / "full"), saved(tmp_path / "resumed")
    assert reference["loss_scale/scale/.ATTRIBUTES/VARIABLE_VALUE"] == 64.0
    assert reference["loss_scale/good_steps/.ATTRIBUTES/VARIABLE_VALUE"] == 1
    assert reference.keys() == result.keys()
    for name in reference:
        assert np.array_equal(reference[name], result[name]), name
