"""train.variable_length: AWD-LSTM's variable-length BPTT against hand-computed references.

The length draw is recomputed here in plain Python integers and floats; the
windows are compared token by token with the stream they cut; one real
training step is compared with its SGD update computed by hand. Two mirrored
replicas against one device and a bitwise stop/resume with this and every
other recipe option on are in
``test_awd_regularizers.py::test_every_recipe_option_on_mirrored_equals_one_device_and_resume_is_bitwise``;
2 worker processes (multi-worker and Horovod) against one device are at the end of this file.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tensorflow as tf

from conftest import assert_one_line_error, run_cli, shakespeare_prefix, tiny_config
from dist_rnn.app import check_epoch_invariant_keys
from dist_rnn.data.variable_length import VariableLengthBatcher, window_lengths
from dist_rnn.distribution import Backend
from dist_rnn.errors import UserError
from dist_rnn.run_dir import RunDirectory
from dist_rnn.runtime import set_precision
from dist_rnn.summaries import MetricsLogger
from dist_rnn.training.factory import build_trainer
from dist_rnn.training.steps import token_loss_sum

MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """SplitMix64's mixing function, in Python integers."""
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def reference_length(seed: int, step: int, num_steps: int) -> tuple[int, float, bool]:
    """AWD-LSTM's rule by hand: (length, the unclipped draw, whether the half-length branch was taken)."""
    key = _mix((seed & MASK) ^ 0x56415220424F5054)
    per_step = _mix(key ^ step)
    u0, u1, u2 = ((_mix((per_step + i) & MASK) >> 11) / 2 ** 53 for i in range(3))
    half = not u0 < 0.95
    base = num_steps / 2 if half else num_steps
    draw = base + 5 * math.sqrt(-2 * math.log(1 - u1)) * math.cos(2 * math.pi * u2)
    return min(max(5, int(draw)), num_steps + 20), draw, half


@pytest.mark.parametrize("seed, num_steps", [(0, 70), (1234, 8), (-7, 35)])
def test_length_draw_matches_the_rule_computed_by_hand(seed, num_steps):
    steps = range(4000)
    want = [reference_length(seed, s, num_steps) for s in steps]
    got = window_lengths(seed, np.array(steps), num_steps)
    assert got.tolist() == [length for length, _, _ in want]
    # Every branch of the rule occurred: the half length, the lower clip, and the cap (four standard
    # deviations out: found among more steps, then checked by hand).
    assert any(half for _, _, half in want)
    if num_steps == 8:
        assert any(draw < 5 for _, draw, _ in want)
        at_cap = np.flatnonzero(window_lengths(seed, np.arange(200_000), num_steps) == 28)
        by_hand = [reference_length(seed, int(step), num_steps) for step in at_cap]
        assert all(length == 28 for length, _, _ in by_hand)
        assert any(draw >= 29 for _, draw, _ in by_hand), by_hand  # cut down by the cap


def test_length_distribution_is_awds():
    lengths = window_lengths(3, np.arange(200_000), 70)
    half = lengths < 52  # the two modes, N(70, 5) and N(35, 5), never meet this far out
    assert half.mean() == pytest.approx(0.05, abs=0.002)
    # int() truncates toward zero: the mean of int(70 + 5 z) is 69.5.
    assert lengths[~half].mean() == pytest.approx(69.5, abs=0.05)
    assert lengths[~half].std() == pytest.approx(5.0, abs=0.05)
    assert lengths[half].mean() == pytest.approx(34.5, abs=0.2)
    assert lengths.min() >= 5 and lengths.max() <= 90
    # A pure function of (seed, step): another seed draws other lengths, the same one the same.
    assert not np.array_equal(window_lengths(4, np.arange(50), 70), lengths[:50])
    assert np.array_equal(window_lengths(3, np.arange(10, 60), 70), lengths[10:60])


def _walk(batcher: VariableLengthBatcher, epoch: int, step: int, token: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x.numpy(), y.numpy()) for x, y in batcher.dataset(epoch, 0, step, token)]


def test_windows_tile_each_row_without_gap_or_overlap():
    # Token i of the stream is i: each window says exactly which tokens it read.
    batch, num_steps, tokens = 3, 8, 3 * 301
    batcher = VariableLengthBatcher(np.arange(tokens), batch, num_steps, seed=5, random_offset=True)
    rows = np.arange(tokens).reshape(batch, -1)
    assert len({batcher.offset(epoch) for epoch in (1, 2, 3)}) > 1  # the seeded offsets move the windows
    step = 0
    for epoch in (1, 2, 3):
        windows = _walk(batcher, epoch, step)
        lengths = [x.shape[1] for x, _ in windows]
        offset = batcher.offset(epoch)
        # The lengths are the steps' draws, the epoch's last one cut to the tokens left ...
        assert lengths[:-1] == window_lengths(5, np.arange(step, step + len(lengths) - 1), num_steps).tolist()
        assert 1 <= lengths[-1] <= window_lengths(5, np.array([step + len(lengths) - 1]), num_steps)[0]
        # ... and the windows read every row from the offset to its end, each token once.
        inputs = np.concatenate([x for x, _ in windows], axis=1)
        targets = np.concatenate([y for _, y in windows], axis=1)
        np.testing.assert_array_equal(inputs, rows[:, offset:-1])
        np.testing.assert_array_equal(targets, rows[:, offset + 1:])
        assert batcher.windows_in_epoch(epoch, step, 0, 0) == len(windows)
        # From the middle of the epoch (the saved step and tokens per row) the walk goes on unchanged.
        middle = len(windows) // 2
        rest = _walk(batcher, epoch, step + middle, sum(lengths[:middle]))
        assert len(rest) == len(windows) - middle
        for (x, y), (x2, y2) in zip(windows[middle:], rest):
            np.testing.assert_array_equal(x, x2)
            np.testing.assert_array_equal(y, y2)
        assert batcher.windows_in_epoch(epoch, step + middle, middle, sum(lengths[:middle])) == len(windows)
        step += len(windows)
        assert batcher.steps_through_epoch(epoch, 1, 0, 0, 0) == step
    # The count of later epochs follows from where the current one stands.
    assert batcher.steps_through_epoch(3, 2, 10, 4, 30) == 10 + len(_walk(batcher, 2, 10, 30)) + len(
        _walk(batcher, 3, 10 + len(_walk(batcher, 2, 10, 30))))


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    return shakespeare_prefix(tmp_path_factory.mktemp("data"), 3000)


NO_EVALUATION = {"split": [1.0, 0.0, 0.0]}  # the runs below train only (no evaluation to trace)


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_step_trains_on_its_window_with_the_rate_scaled_by_its_length(small_text, tmp_path):
    # Step 0 of seed 2 draws 16 tokens at num_steps 20: the SGD update is lr * 16/20 times the
    # gradient of the mean loss over those 16 x 8 tokens, and the carried state is the one after token 16.
    num_steps, lr, batch = 20, 0.5, 8
    length = int(window_lengths(2, np.array([0]), num_steps)[0])
    assert length == 16
    config = tiny_config(small_text, data=NO_EVALUATION, model={"dropout": 0.0},
                         optimizer={"name": "sgd", "learning_rate": lr, "clip_norm": 0.0},
                         train={"batch_size": batch, "num_steps": num_steps, "max_steps": 1, "seed": 2,
                                "log_every": 1, "variable_length": True})
    set_precision("float32")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trainer = build_trainer(config, RunDirectory(run_dir), backend=Backend(),
                            metrics=MetricsLogger(run_dir, True, tensorboard=False, progress="off"))
    model = trainer.model
    inputs, targets = trainer.train_batches.window_at(1, 0, length)
    before = [v.numpy().copy() for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        logits, states = model(inputs, model.initial_state(batch), training=True, seed=tf.constant([2, 0], tf.int64),
                               rows=tf.constant([0, batch]))
        loss = token_loss_sum(targets, logits) / (batch * length)
    grads = [tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, model.trainable_variables)]

    trainer.train()

    for v, w, g in zip(model.trainable_variables, before, grads):
        expected = w - lr * length / num_steps * g
        assert np.abs(v.numpy() - expected).max() <= 1e-6 * max(np.abs(w).max(), 1.0), v.path
    # The fixed-length rate would have moved the weights 20/16 as far.
    moved = max(np.abs(v.numpy() - w).max() for v, w in zip(model.trainable_variables, before))
    assert moved > 1e-4
    for carried, state in zip(trainer.state.carried, states):
        np.testing.assert_allclose(carried.numpy(), state.numpy(), atol=1e-6)
    assert int(trainer.stream_position.tokens_in_epoch.numpy()) == length
    train_record = [r for r in _records(run_dir) if r["split"] == "train"][-1]
    assert train_record["learning_rate"] == pytest.approx(lr * length / num_steps, rel=1e-12)
    assert train_record["loss"] == pytest.approx(float(loss), rel=1e-5)  # per token of the 16-token window


def test_an_epoch_ends_when_its_rows_are_used_up(small_text, tmp_path):
    config = tiny_config(small_text, data=NO_EVALUATION, train={"batch_size": 4, "num_steps": 12, "max_steps": None, "max_epochs": 2,
                                            "log_every": 1000, "variable_length": True})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trainer = build_trainer(config, RunDirectory(run_dir), backend=Backend(),
                            metrics=MetricsLogger(run_dir, True, tensorboard=False, progress="off"))
    first = trainer.train_batches.windows_in_epoch(1, 0, 0, 0)
    total = trainer.train_batches.steps_through_epoch(2, 1, 0, 0, 0)
    assert first > 10 and total > first
    assert trainer.train()["step"] == total
    assert (int(trainer.state.epoch), int(trainer.state.batch_in_epoch)) == (3, 0)
    assert int(trainer.stream_position.tokens_in_epoch.numpy()) == 0
    # Each epoch ended with a log point.
    assert [r["step"] for r in _records(run_dir) if r["split"] == "train"] == [first, total]


@pytest.mark.parametrize("override, expected", [
    ("train={variable_length: true, loss_normalization: sequence}", "train.loss_normalization 'sequence'"),
    ("train={variable_length: true, num_steps: 4}", "at least 5"),
    ("train.variable_length=sometimes", "train.variable_length"),
])
def test_bad_variable_length_settings_are_one_line_errors(override, expected, small_text, tmp_path, capsys):
    run_dir = tmp_path / "run"
    line = assert_one_line_error(*run_cli(["train", "--run-dir", run_dir, "--set", "data.corpus=file",
                                           "--set", f"data.path={small_text}", "--set", override], capsys))
    assert "train.variable_length" in line and expected in line, line
    assert not run_dir.exists()


def test_variable_length_may_be_switched_only_at_an_epoch_start(small_text, tmp_path):
    fixed = tiny_config(small_text)
    variable = tiny_config(small_text, train={"variable_length": True})
    run_dir = RunDirectory(tmp_path)
    for saved, config in ((fixed, variable), (variable, fixed)):
        check_epoch_invariant_keys(saved, config, 2, 0, run_dir)  # at an epoch's start: allowed
        with pytest.raises(UserError, match=r"in the middle of epoch 2 \(after its batch 7\) with "
                                            r"train.variable_length: (False -> True|True -> False)"):
            check_epoch_invariant_keys(saved, config, 2, 7, run_dir)
    check_epoch_invariant_keys(variable, variable, 2, 7, run_dir)


def test_the_padded_step_keeps_cudnn_on_a_gpu(small_text, tmp_path):
    # The step slices the padded window to its length before the model: Keras' LSTM sees an
    # unknown time dimension, which cuDNN accepts (checked with a faked GPU, as test_gpu_paths does).
    from test_gpu_paths import faked_gpu, op_types

    config = tiny_config(small_text, data=NO_EVALUATION, train={"variable_length": True})
    set_precision("float32")
    with faked_gpu():
        trainer = build_trainer(config, RunDirectory(tmp_path), backend=Backend())
        width = 20 + 20  # num_steps + the cap's 20
        window = tf.zeros([8, width], tf.int32)
        graph = trainer.steps.compiled_train_step.get_concrete_function(
            window, window, trainer.model.initial_state(8), tf.constant([0, 0], tf.int64),
            tf.constant(13, tf.int32)).graph.as_graph_def()
    assert "CudnnRNNV3" in op_types(graph)


# One device against 2 worker processes (multi-worker and Horovod): every worker must draw the same
# window lengths from the step seed and advance its rows by them, so the runs stay equal. Adam with
# clipping and loss normalized per token of the (varying) window.
TWO_WORKER_ARGS = [
    "--set", "model={cell: lstm, num_layers: 2, hidden_size: 16, embedding_size: 16}",
    "--set", "optimizer={name: adam, learning_rate: 0.01, clip_norm: 0.25}",
    "--set", "train={batch_size: 4, num_steps: 12, max_steps: 6, max_epochs: null, log_every: 1, sample_length: 0, "
             "eval_every: 3, deterministic: true, variable_length: true}",
    "--set", "checkpoint={every_steps: 3, keep: 5}", "--set", "logging={progress: off, tensorboard: false}",
]


@pytest.fixture(scope="module")
def variable_length_one_device(small_text, tmp_path_factory):
    from dist_rnn.cli import main

    run_dir = tmp_path_factory.mktemp("variable_length") / "one"
    data = ["--set", f"data={{corpus: file, path: {small_text}, split: [0.9, 0.1, 0.0]}}"]
    assert main(["train", "--run-dir", str(run_dir), *data, *TWO_WORKER_ARGS]) == 0
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["multiworker", "horovod"])
def test_two_workers_draw_the_same_windows_and_equal_one_device(backend, variable_length_one_device, small_text,
                                                                tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import REPO
    from equivalence import TOLERANCE, assert_close_variables, variables

    if backend == "horovod":
        pytest.importorskip("horovod.tensorflow", reason="Horovod is not installed (tools/install_horovod.sh)")
    data = ["--set", f"data={{corpus: file, path: {small_text}, split: [0.9, 0.1, 0.0]}}"]
    one_dir, two_dir = variable_length_one_device, tmp_path / backend
    env = {**os.environ, "PYTHON": sys.executable, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # its horovodrun
    proc = subprocess.run([str(REPO / "launch" / f"{backend}.sh"), "-n", "2", "--", "--run-dir", str(two_dir),
                           *data, *TWO_WORKER_ARGS], cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 replica(s), 2 worker(s)" in proc.stdout
    one, two = variables(one_dir), variables(two_dir)
    position = "stream_position/tokens_in_epoch/.ATTRIBUTES/VARIABLE_VALUE"
    lengths = window_lengths(0, np.arange(6), 12)
    assert len(set(lengths.tolist())) > 1  # the windows really vary
    assert int(one[position]) == int(two[position]) == lengths.sum()
    assert_close_variables(one, two, TOLERANCE)
    # The logged rate of step s (1-based) is scaled by the length drawn for step s - 1 (0-based), on both layouts.
    rates = [[r["learning_rate"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "train"] for d in (one_dir, two_dir)]
    assert len(rates[0]) == 6 and rates[0] == pytest.approx(rates[1], rel=1e-6)
    assert np.allclose(np.array(rates[0]) / 0.01, lengths / 12, rtol=1e-5)
