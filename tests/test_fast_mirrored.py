"""A fast 2-replica mirrored check of the gradient path against one device.

Logical CPU devices must exist before TensorFlow initializes, so the checks
run in one fresh interpreter (``python tests/test_fast_mirrored.py``) that
builds a one-device and a 2-replica trainer from the same config and compares
them step by step: clipping active (per-replica clipping would change the
update), dropout on (masks drawn per global row), the optimizer's
second all-reduce disabled, and a float16 overflow skipped on both replicas.
The slow end-to-end comparisons (whole runs, multi-worker, Horovod) are in
test_distributed.py and test_horovod.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent


def test_two_replica_mirrored_step_matches_one_device(shakespeare_slice):
    proc = subprocess.run([sys.executable, str(Path(__file__)), str(shakespeare_slice)], cwd=TESTS.parent,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    checked = [line for line in proc.stdout.splitlines() if line.startswith("checked: ")]
    assert checked == ["checked: optimizer applies the reduced gradient once",
                       "checked: 3 clipped dropout steps equal one device",
                       "checked: float16 overflow skipped on both replicas"], proc.stdout


# ----------------------------------------------------------------- subprocess


def _replica_values(variable) -> list[np.ndarray]:
    """Every replica's copy of a (Keras or tf) variable."""
    import keras

    inner = variable.value if isinstance(variable, keras.Variable) else variable
    return [np.asarray(v) for v in getattr(inner, "values", (inner,))]


def _trainer(config, backend, run_dir):
    import tensorflow as tf

    from dist_rnn.runtime import set_precision
    from dist_rnn.training.factory import build_trainer

    tf.keras.utils.set_random_seed(config.train.seed)
    set_precision(config.train.precision)
    run_dir.mkdir(parents=True, exist_ok=True)
    return build_trainer(config, run_dir, backend=backend)


def check_optimizer_applies_reduced_gradient_once(mirrored):
    """SGD lr 1 on a gradient of ones, applied the project's way: each weight moves by exactly -1."""
    import keras
    import tensorflow as tf

    from dist_rnn.config import OptimizerConfig
    from dist_rnn.training.optimizers import build_optimizer

    def moved(optimizer):
        with mirrored.scope():
            variable = tf.Variable([0.0, 0.0])
            optimizer.build([variable])

        @tf.function
        def step():
            def replica():
                grads = mirrored.all_reduce_sum([tf.ones([2]) / mirrored.num_replicas])
                mirrored.apply_if_finite(lambda g: optimizer.apply(g, [variable]), grads, tf.constant(True),
                                         lambda finite: None)
            mirrored.run(replica, ())

        step()
        return [v.tolist() for v in _replica_values(variable)]

    assert moved(build_optimizer(OptimizerConfig(name="sgd", learning_rate=1.0))) == [[-1.0, -1.0]] * 2
    # Control: Keras' own optimizer sums the reduced gradient over the replicas again.
    assert moved(keras.optimizers.SGD(learning_rate=1.0)) == [[-2.0, -2.0]] * 2
    print("checked: optimizer applies the reduced gradient once")


def check_clipped_dropout_steps(data, one, mirrored, tmp):
    import tensorflow as tf

    from conftest import tiny_config

    # Clip 0.05 is below the gradient norm (0.27 at the first step), so the clip scales
    # every step; per-replica clipping or a doubled gradient would change the
    # update by >10%. Different float32 summation orders stay below 1e-5.
    config = tiny_config(data, optimizer={"name": "sgd", "learning_rate": 1.0, "clip_norm": 0.05},
                         model={"dropout": 0.3})
    trainers = [_trainer(config, one, tmp / "one"), _trainer(config, mirrored, tmp / "two")]
    states = [t.model.initial_state(8) for t in trainers]
    states[1] = mirrored.shard(states[1])
    for step in range(3):
        inputs, targets = trainers[0].train_batches.window(1, step)
        seed = tf.constant([0, step], tf.int64)
        results = []
        for i, (t, backend) in enumerate(zip(trainers, (one, mirrored))):
            t.optimizer.learning_rate.assign(1.0)
            x, y = backend.shard((tf.constant(inputs), tf.constant(targets)))
            loss, states[i], norm, finite = t.steps.train_step(x, y, states[i], seed)
            assert bool(finite)
            results.append((float(loss), float(norm)))
        (loss1, norm1), (loss2, norm2) = results
        assert norm1 > 0.1, norm1  # the clip (0.05) is active
        np.testing.assert_allclose([loss2, norm2], [loss1, norm1], rtol=1e-5, err_msg=f"step {step}")
    gathered = mirrored.gather(states[1])
    for a, b in zip(states[0], gathered):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    for v1, v2 in zip(trainers[0].model.trainable_variables, trainers[1].model.trainable_variables):
        copies = _replica_values(v2)
        assert len(copies) == 2 and np.array_equal(copies[0], copies[1]), v2.path
        np.testing.assert_allclose(copies[0], v1.numpy(), rtol=1e-5, atol=1e-7, err_msg=v1.path)
    print("checked: 3 clipped dropout steps equal one device")


def check_float16_overflow_skipped_on_both_replicas(data, mirrored, tmp):
    import tensorflow as tf

    from conftest import tiny_config

    # A loss scale of 1e12 overflows float16 activation gradients for real.
    config = tiny_config(data, train={"precision": "mixed_float16",
                                      "loss_scale": {"initial": 1e12, "max_scale": 1e12, "backoff": 1e-8,
                                                     "growth_interval": 100}})
    trainer = _trainer(config, mirrored, tmp / "f16")
    variables = trainer.model.trainable_variables
    before = [_replica_values(v) for v in variables]
    inputs, targets = trainer.train_batches.window(1, 0)
    x, y = mirrored.shard((tf.constant(inputs), tf.constant(targets)))
    states = mirrored.shard(trainer.model.initial_state(8))
    _, _, _, finite = trainer.steps.train_step(x, y, states, tf.constant([0, 0], tf.int64))
    assert not bool(finite)
    for b, v in zip(before, variables):
        for old, new in zip(b, _replica_values(v)):
            np.testing.assert_array_equal(old, new, err_msg=v.path)
    assert int(trainer.optimizer.iterations.numpy()) == 0
    assert [float(s) for s in _replica_values(trainer.loss_scale.scale)] == [1e4, 1e4]
    assert int(trainer.loss_scale.skipped_steps.numpy()) == 1
    _, _, _, finite = trainer.steps.train_step(x, y, states, tf.constant([0, 1], tf.int64))
    assert bool(finite)
    for b, v in zip(before, variables):
        copies = _replica_values(v)
        assert np.array_equal(copies[0], copies[1]) and not np.array_equal(copies[0], b[0]), v.path
    print("checked: float16 overflow skipped on both replicas")


def main(data: str) -> None:
    import tempfile

    sys.path.insert(0, str(TESTS))
    from dist_rnn.config import DistributeConfig
    from dist_rnn.distribution import Backend, MirroredBackend, configure_devices

    configure_devices(DistributeConfig(backend="mirrored", cpu_devices=2))
    from dist_rnn.runtime import set_precision

    one, mirrored = Backend(), MirroredBackend(cpu_devices=2)
    assert mirrored.num_replicas == 2
    with tempfile.TemporaryDirectory() as tmp:
        check_optimizer_applies_reduced_gradient_once(mirrored)
        check_clipped_dropout_steps(Path(data), one, mirrored, Path(tmp))
        check_float16_overflow_skipped_on_both_replicas(Path(data), mirrored, Path(tmp))
    set_precision("float32")


if __name__ == "__main__":
    main(sys.argv[1])
