"""Gradient accumulation (``train.accumulate_steps``) equals one block at the same global batch.

The comparison runs in one fresh interpreter with 2 logical CPU devices
(``python tests/test_accumulation.py DATA``): steps of a one-device run with
k=1 (the reference), k=2 and k=4, and of a 2-replica mirrored run with k=1
and k=2, with dropout and recurrent dropout on (masks drawn per global row)
and clipping active at every step, compared step by step (loss, gradient
norm) and at the end (weights, carried state) within the float32
reduction-order tolerances of ``tests/equivalence.py``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import assert_one_line_error, run_cli

TESTS = Path(__file__).resolve().parent
STEPS = 4


def test_accumulated_steps_equal_one_block_on_one_device_and_two_replicas(shakespeare_slice):
    proc = subprocess.run([sys.executable, str(Path(__file__)), str(shakespeare_slice)], cwd=TESTS.parent,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    checked = [line for line in proc.stdout.splitlines() if line.startswith("checked: ")]
    assert checked == [f"checked: {name} equals one device k=1 over {STEPS} steps"
                       for name in ("one device k=2", "one device k=4", "mirrored k=1", "mirrored k=2",
                                    "mirrored k=2 with EMA")], proc.stdout


def _tiny_args(data, *sets) -> list[str]:
    return ["train", "--set", f"data={{corpus: file, path: {data}, split: [0.8, 0.2, 0.0]}}",
            "--set", "model={num_layers: 1, hidden_size: 16, embedding_size: 8}",
            "--set", "train={batch_size: 8, num_steps: 10, max_steps: 2, max_epochs: null, sample_length: 0}",
            *[arg for s in sets for arg in ("--set", s)]]


def test_accumulate_steps_must_divide_the_rows(shakespeare_slice, tmp_path, capsys):
    line = assert_one_line_error(*run_cli([*_tiny_args(shakespeare_slice, "train.accumulate_steps=3"),
                                           "--run-dir", tmp_path / "a"], capsys))
    assert "train.accumulate_steps" in line and "3 does not divide" in line, line
    # 8 rows over 2 replicas are 4 per replica: 8 blocks do not fit.
    line = assert_one_line_error(*run_cli([*_tiny_args(shakespeare_slice, "train.accumulate_steps=8",
                                                       "distribute={backend: mirrored, cpu_devices: 2}"),
                                           "--run-dir", tmp_path / "b"], capsys))
    assert "train.accumulate_steps" in line and "4 rows per replica" in line, line
    line = assert_one_line_error(*run_cli([*_tiny_args(shakespeare_slice, "train.accumulate_steps=0"),
                                           "--run-dir", tmp_path / "c"], capsys))
    assert "train.accumulate_steps" in line, line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----------------------------------------------------------------- subprocess


def _replica_values(variable) -> list[np.ndarray]:
    import keras

    inner = variable.value if isinstance(variable, keras.Variable) else variable
    return [np.asarray(v) for v in getattr(inner, "values", (inner,))]


def _run_steps(data: Path, backend, accumulate_steps: int, run_dir: Path, ema_decay: float = 0.0):
    """Trains STEPS steps from fresh weights; returns (per-step (loss, norm), weights, gathered state).

    With ``ema_decay`` the weights include the moving average's.
    """
    import tensorflow as tf

    from conftest import tiny_config
    from dist_rnn.training.factory import build_trainer

    # Clip 0.05 is below every step's gradient norm: the clip scales each update.
    config = tiny_config(data, optimizer={"name": "sgd", "learning_rate": 1.0, "clip_norm": 0.05,
                                          "ema_decay": ema_decay},
                         model={"dropout": 0.3, "recurrent_dropout": 0.2},
                         train={"batch_size": 8, "accumulate_steps": accumulate_steps})
    tf.keras.utils.set_random_seed(config.train.seed)
    trainer = build_trainer(config, run_dir, backend=backend)
    states = backend.shard(trainer.model.initial_state(8))
    results = []
    for step in range(STEPS):
        inputs, targets = trainer.train_batches.window(1, step)
        x, y = backend.shard((tf.constant(inputs), tf.constant(targets)))
        loss, states, norm, finite = trainer.steps.train_step(x, y, states, tf.constant([0, step], tf.int64))
        assert bool(finite)
        results.append((float(loss), float(norm)))
    weights = {}
    for v in trainer.model.trainable_variables:
        copies = _replica_values(v)
        assert all(np.array_equal(copies[0], c) for c in copies), v.path  # replicas agree exactly
        weights[v.path] = copies[0]
    average = trainer.recipe.average
    for i, v in enumerate(average.averages if average is not None else []):
        copies = _replica_values(v)
        assert all(np.array_equal(copies[0], c) for c in copies), v.name
        weights[f"average_{i}"] = copies[0]
    return results, weights, [np.asarray(s) for s in backend.gather(states)]


def _assert_same(reference, other, name: str) -> None:
    from equivalence import TOLERANCE

    (ref_steps, ref_weights, ref_states), (steps, weights, states) = reference, other
    ref_steps, steps = np.array(ref_steps), np.array(steps)
    assert ref_steps[:, 1].min() > 0.05, ref_steps  # the clip was active at every step
    np.testing.assert_allclose(steps[:, 0], ref_steps[:, 0], rtol=TOLERANCE["perplexity"], err_msg=name)
    np.testing.assert_allclose(steps[:, 1], ref_steps[:, 1], rtol=TOLERANCE["grad_norm"], err_msg=name)
    assert weights.keys() == ref_weights.keys()
    for key, ref in ref_weights.items():
        error = np.max(np.abs(weights[key] - ref)) / np.max(np.abs(ref))
        assert error <= TOLERANCE["weights"], (name, key, error)
    for ref, got in zip(ref_states, states):
        error = np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1.0)
        assert error <= TOLERANCE["state"], (name, error)
    print(f"checked: {name} equals one device k=1 over {STEPS} steps", flush=True)


def main(data: str) -> None:
    import tempfile

    sys.path.insert(0, str(TESTS))
    from dist_rnn.config import DistributeConfig
    from dist_rnn.distribution import Backend, MirroredBackend, configure_devices

    configure_devices(DistributeConfig(backend="mirrored", cpu_devices=2))
    one, mirrored = Backend(), MirroredBackend(cpu_devices=2)
    assert mirrored.num_replicas == 2
    with tempfile.TemporaryDirectory() as tmp:
        reference = _run_steps(Path(data), one, 1, Path(tmp) / "ref")
        for name, backend, k in (("one device k=2", one, 2), ("one device k=4", one, 4),
                                 ("mirrored k=1", mirrored, 1), ("mirrored k=2", mirrored, 2)):
            _assert_same(reference, _run_steps(Path(data), backend, k, Path(tmp) / name.replace(" ", "_")), name)
        # The average is updated once per step from the reduced update, on every replica alike.
        reference = _run_steps(Path(data), one, 1, Path(tmp) / "ema_ref", ema_decay=0.5)
        assert len(reference[1]) == 2 * len(list(k for k in reference[1] if not k.startswith("average_")))
        _assert_same(reference, _run_steps(Path(data), mirrored, 2, Path(tmp) / "ema", ema_decay=0.5),
                     "mirrored k=2 with EMA")


if __name__ == "__main__":
    main(sys.argv[1])
