"""Dynamic evaluation (``dist-rnn eval --dynamic``): scoring before adapting, the SGD and RMS rules, the CLI.

The reference of the rules walks the segments by hand: numpy copies of the
weights, one model call per segment from the carried state, the gradient of
the segment's mean loss from a tape, and the update formula written out in
numpy; it shares no code with :mod:`dist_rnn.training.dynamic_eval` but the
model.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import tensorflow as tf

from conftest import assert_one_line_error, run_cli, shakespeare_prefix, tiny_config
from dist_rnn.cli import main
from dist_rnn.data.batching import EvalBatcher
from dist_rnn.models.model import build_model
from dist_rnn.training.dynamic_eval import DynamicUpdate, evaluate_dynamic, gradient_rms

# ============================================================ the rules against a hand-written walk


@pytest.fixture(scope="module")
def tiny_model(shakespeare_slice):
    config = tiny_config(shakespeare_slice, model={"num_layers": 1, "hidden_size": 8, "embedding_size": 4})
    model = build_model(config.model, 11, seed=3)
    model(tf.zeros([1, 2], tf.int32))  # builds the weights
    return model


def reference_walk(model, ids: np.ndarray, segment: int, lr: float, divisors: list, decay_rates: list) -> float:
    """Summed loss of one row of ``ids`` read in segments, each scored first, then the weights moved:
    ``theta += decay_rate * (theta_0 - theta) - lr * g / divisor`` in numpy."""
    variables = model.trainable_variables
    theta_0 = [v.numpy().astype(np.float64) for v in variables]
    theta = [t.copy() for t in theta_0]
    states, total = None, 0.0
    try:
        for start in range(0, len(ids) - 1, segment):
            inputs = ids[None, start:min(start + segment, len(ids) - 1)]
            targets = ids[None, start + 1:start + 1 + inputs.shape[1]]
            for v, t in zip(variables, theta):
                v.assign(t.astype(np.float32))
            with tf.GradientTape() as tape:
                logits, states = model(tf.constant(inputs), states, training=False)
                losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
                mean = tf.reduce_mean(losses)
            total += float(tf.reduce_sum(tf.cast(losses, tf.float64)))
            grads = [tf.convert_to_tensor(g).numpy() for g in tape.gradient(mean, variables)]
            theta = [t + np.asarray(d) * (t0 - t) - lr * g / np.asarray(s)
                     for t, t0, g, s, d in zip(theta, theta_0, grads, divisors, decay_rates)]
    finally:
        for v, t0 in zip(variables, theta_0):
            v.assign(t0.astype(np.float32))
    return total


IDS = np.random.RandomState(5).randint(0, 11, size=14).astype(np.int32)  # 13 targets: segments of 5, 5, 3


def test_sgd_rule_matches_the_hand_walk_and_scores_before_adapting(tiny_model):
    before = [v.numpy() for v in tiny_model.trainable_variables]
    batches = EvalBatcher(IDS, 1, 5)
    n = len(tiny_model.trainable_variables)
    static, _ = evaluate_dynamic(tiny_model, batches, DynamicUpdate.sgd(n, 0.0, 0.3))
    no_decay, _ = evaluate_dynamic(tiny_model, batches, DynamicUpdate.sgd(n, 2.0, 0.0))
    dynamic, tokens = evaluate_dynamic(tiny_model, batches, DynamicUpdate.sgd(n, 2.0, 0.3))
    assert tokens == 13
    assert static == pytest.approx(reference_walk(tiny_model, IDS, 5, 0.0, [1.0] * n, [0.3] * n), abs=5e-5)
    assert no_decay == pytest.approx(reference_walk(tiny_model, IDS, 5, 2.0, [1.0] * n, [0.0] * n), abs=5e-5)
    assert dynamic == pytest.approx(reference_walk(tiny_model, IDS, 5, 2.0, [1.0] * n, [0.3] * n), abs=5e-5)
    # The first segment is scored with theta_0 in every case; the second with theta_0 - lr * g1 (the decay
    # term is 0 at theta_0); the third sees the decay: all three totals differ.
    assert abs(dynamic - static) > 1e-2 and abs(dynamic - no_decay) > 1e-3
    for v, b in zip(tiny_model.trainable_variables, before):
        np.testing.assert_array_equal(v.numpy(), b)  # theta_0 again afterwards


def test_rms_rule_matches_the_hand_walk(tiny_model):
    variables = tiny_model.trainable_variables
    rng = np.random.RandomState(0)
    rms = [rng.uniform(0.01, 1.0, v.shape).astype(np.float32) for v in variables]
    lr, decay, epsilon = 0.05, 0.6, 0.01  # rms / mean reaches ~2 > 1 / decay: some rates are clipped
    # decay * min(rms / mean of the tensors' means, 1 / decay), written out
    mean_rms = np.mean([r.mean() for r in rms])
    rates = [decay * np.minimum(r / mean_rms, 1 / decay) for r in rms]
    assert max(float(r.max()) for r in rates) == pytest.approx(1.0)  # the clip is reached
    update = DynamicUpdate.rms([tf.constant(r) for r in rms], lr, decay, epsilon)
    dynamic, _ = evaluate_dynamic(tiny_model, EvalBatcher(IDS, 1, 5), update)
    expected = reference_walk(tiny_model, IDS, 5, lr, [r + epsilon for r in rms], rates)
    assert dynamic == pytest.approx(expected, abs=5e-5)


def test_gradient_rms_is_the_root_mean_square_over_windows(tiny_model):
    ids = np.random.RandomState(1).randint(0, 11, size=41).astype(np.int32)
    batches = EvalBatcher(ids, 2, 6)  # rows of 20 targets: windows of 6, 6, 6, 2
    rms = gradient_rms(tiny_model, batches, max_windows=2)
    variables = tiny_model.trainable_variables
    squares, states = [0.0] * len(variables), None
    for index in range(2):
        inputs, targets, _ = batches.window(index)
        with tf.GradientTape() as tape:
            logits, states = tiny_model(tf.constant(inputs), states, training=False)
            mean = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits))
        grads = [tf.convert_to_tensor(g).numpy() for g in tape.gradient(mean, variables)]
        squares = [s + g.astype(np.float64) ** 2 for s, g in zip(squares, grads)]
    for got, s in zip(rms, squares):
        np.testing.assert_allclose(got.numpy(), np.sqrt(s / 2), rtol=1e-4, atol=1e-7)


# ============================================================ the command on a trained run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A char LSTM trained 60 steps on 20k characters of tiny-shakespeare, with an EMA of its weights."""
    root = tmp_path_factory.mktemp("dyneval")
    data = shakespeare_prefix(root, 20_000)
    run_dir = root / "run"
    code = main(["train", "--run-dir", str(run_dir),
                 "--set", f"data={{corpus: file, path: {data}, split: [0.85, 0.15, 0.0]}}",
                 "--set", "model={num_layers: 1, hidden_size: 48, embedding_size: 16}",
                 "--set", "optimizer={name: adam, learning_rate: 0.01, clip_norm: 5.0, ema_decay: 0.9}",
                 "--set", "train={batch_size: 8, num_steps: 25, max_steps: 60, max_epochs: null, "
                          "eval_every: 0, eval_batch_size: 3, log_every: 60, sample_length: 0}",
                 "--set", "checkpoint.every_steps=0", "--set", "logging={tensorboard: false, progress: 'off'}"])
    assert code == 0
    return run_dir


def eval_json(capsys, run_dir, *args) -> dict:
    code, out, err = run_cli(["eval", "--run-dir", run_dir, *args], capsys)
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def file_hashes(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def test_lr_zero_gives_the_static_loss_of_the_averaged_weights(trained_run, capsys):
    # The static eval's layout: 3 rows, windows of num_steps. Static eval uses the EMA weights; so must this.
    result = eval_json(capsys, trained_run, "--dynamic", "--dynamic-lr", "0", "--dynamic-batch", "3")
    assert result["dynamic"] == {"rule": "sgd", "learning_rate": 0.0, "decay": 0.002, "segment": 25, "batch": 3}
    assert result["loss"] == pytest.approx(result["static_loss"], abs=1e-6)
    assert result["tokens"] == 2999
    plain = eval_json(capsys, trained_run)
    assert plain["loss"] == pytest.approx(result["static_loss"], abs=1e-7)


@pytest.mark.parametrize("rule_args", [["--dynamic-rule", "sgd", "--dynamic-lr", "0.3"],
                                       ["--dynamic-rule", "rms", "--dynamic-lr", "0.003",
                                        "--dynamic-stat-batches", "5"]])
def test_dynamic_eval_lowers_the_validation_loss_and_leaves_the_run_untouched(trained_run, capsys, rule_args):
    before = file_hashes(trained_run)
    result = eval_json(capsys, trained_run, "--dynamic", "--dynamic-batch", "2", *rule_args)
    assert file_hashes(trained_run) == before
    assert result["tokens"] == 2999 and result["dynamic"]["rule"] == rule_args[1]
    assert result["bpc"] == pytest.approx(result["loss"] / np.log(2))
    # A 60-step model adapts to the text it reads: well below its static loss.
    assert result["loss"] < result["static_loss"] - 0.02, result


# ============================================================ bad input


def test_dynamic_on_a_run_without_checkpoint(trained_run, tmp_path, capsys):
    run_dir = tmp_path / "nockpt"
    run_dir.mkdir()
    shutil.copy(trained_run / "config.yaml", run_dir)
    shutil.copy(trained_run / "vocab.json", run_dir)
    before = file_hashes(run_dir)
    line = assert_one_line_error(*run_cli(["eval", "--run-dir", run_dir, "--dynamic"], capsys))
    assert "holds no checkpoint" in line and str(run_dir) in line
    assert file_hashes(run_dir) == before


@pytest.mark.parametrize("args, option", [
    (["--dynamic", "--dynamic-lr", "-0.1"], "--dynamic-lr"),
    (["--dynamic", "--dynamic-decay", "1.5"], "--dynamic-decay"),
    (["--dynamic", "--dynamic-segment", "0"], "--dynamic-segment"),
    (["--dynamic", "--dynamic-batch", "0"], "--dynamic-batch"),
    (["--dynamic", "--dynamic-epsilon", "0"], "--dynamic-epsilon"),
    (["--dynamic", "--dynamic-lr", "nan"], "--dynamic-lr"),
    (["--dynamic", "--dynamic-rule", "adam"], "--dynamic-rule"),
    (["--dynamic-lr", "0.1"], "--dynamic-lr"),  # without --dynamic
])
def test_bad_dynamic_options(tmp_path, capsys, args, option):
    # Checked before the run is read: the run directory need not exist.
    line = assert_one_line_error(*run_cli(["eval", "--run-dir", tmp_path / "run", *args], capsys))
    assert option in line
    assert not (tmp_path / "run").exists()
