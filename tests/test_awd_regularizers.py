"""The AWD-LSTM regularizers of issue #19 against hand-computed references.

Weight drop, embedding dropout and locked dropout draw their masks statelessly
from (step seed, site, global row); AR/TAR enter the training objective only;
``optimizer.weight_decay`` adds ``decay * w`` after the clip. One test turns
every option on at once (variable-length BPTT too) and checks 2 mirrored
replicas against one device and a stop/resume against the uninterrupted run;
two more do the same (without the resume) with NT-ASGD on 2 multi-worker
processes and 2 Horovod ranks, and check the best checkpoint the chief saved
holds the averaged weights.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, assert_one_line_error, run_cli, tiny_config
from equivalence import TOLERANCE, assert_close_variables
from dist_rnn.config import ModelConfig
from dist_rnn.data.variable_length import window_lengths
from dist_rnn.distribution import Backend
from dist_rnn.models.awd_dropout import (EMBEDDING_DROPOUT_SALT, LockedDropout, embedding_dropout,
                                         weight_drop_mask)
from dist_rnn.models.model import build_model, kernel_report, recurrent_layer
from dist_rnn.runtime import set_precision
from dist_rnn.summaries import MetricsLogger
from dist_rnn.training.factory import build_trainer
from dist_rnn.training.regularization import ActivationPenalties
from dist_rnn.training.steps import token_loss_sum

ALL_CELLS = ["lstm", "gru", "ln_lstm", "ln_gru", "rnn"]
KERAS_TF_RNN = importlib.import_module("keras.src.backend.tensorflow.rnn")
RNG = np.random.default_rng(19)


@pytest.fixture(autouse=True)
def _float32_policy():
    set_precision("float32")
    yield
    set_precision("float32")


def _seed(step: int) -> tf.Tensor:
    return tf.constant([0, step], tf.int64)


# ----------------------------------------------------------------------------
# Locked dropout: one mask per row, shared by every time step
# ----------------------------------------------------------------------------


def test_locked_dropout_shares_each_rows_mask_across_time_and_replica_layouts():
    layer = LockedDropout(0.4, salt=4001)
    x = tf.constant(RNG.uniform(1.0, 2.0, size=(6, 9, 20)), tf.float32)
    out = layer(x, seed=_seed(3), training=True).numpy()
    mask = out / x.numpy()
    np.testing.assert_allclose(mask, np.broadcast_to(mask[:, :1, :], mask.shape), atol=1e-6)  # locked in time
    np.testing.assert_allclose(np.unique(np.round(mask, 5)), [0.0, round(1 / 0.6, 5)])
    assert 0.25 < float(np.mean(mask == 0)) < 0.55
    assert np.any(mask[0, 0] != mask[1, 0])  # rows draw their own masks
    # Rows 3..5 of the global batch held by a second replica get the same masks.
    half = layer(x[3:], seed=_seed(3), rows=tf.constant([3, 6]), training=True).numpy()
    np.testing.assert_array_equal(half, out[3:])
    # Another step, another mask; no mask in evaluation.
    assert np.abs(layer(x, seed=_seed(4), training=True).numpy() - out).max() > 0.5
    np.testing.assert_array_equal(layer(x, seed=_seed(3), training=False).numpy(), x.numpy())


def test_the_model_applies_locked_dropout_at_each_site_with_its_own_rate():
    tokens = tf.constant(RNG.integers(0, 30, size=(4, 7)), tf.int32)
    model = build_model(ModelConfig(cell="lstm", num_layers=2, hidden_size=12, embedding_size=8,
                                    dropout_output=0.5), 30, seed=0)
    _, _, (raw, dropped) = model(tokens, training=True, seed=_seed(1), return_activations=True)
    ratio = np.divide(dropped.numpy(), raw.numpy())
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :1], ratio.shape), atol=1e-5)
    np.testing.assert_allclose(np.unique(np.round(ratio, 4)), [0.0, 2.0])
    assert [d.rate for d in model.locked_dropouts] == [0.0, 0.0, 0.5]


# ----------------------------------------------------------------------------
# Weight drop: one dropped recurrent kernel per step
# ----------------------------------------------------------------------------


def _recurrent_kernel(layer):
    return layer.cell.recurrent_kernel if hasattr(layer, "cell") else layer.recurrent_kernel


@pytest.mark.parametrize("cell", ALL_CELLS)
def test_weight_drop_runs_every_time_step_with_one_dropped_kernel(cell):
    rate = 0.5
    dropping = recurrent_layer(ModelConfig(cell=cell, num_layers=1, hidden_size=6, weight_drop=rate), 0)
    plain = recurrent_layer(ModelConfig(cell=cell, num_layers=1, hidden_size=6), 0)
    x = tf.constant(RNG.standard_normal((4, 9, 5)), tf.float32)
    states = [tf.constant(0.5 * RNG.standard_normal((4, 6)), tf.float32)
              for _ in range(2 if cell in ("lstm", "ln_lstm") else 1)]
    dropping(x, initial_state=states)
    plain(x, initial_state=states)
    plain.set_weights(dropping.get_weights())
    variable = _recurrent_kernel(dropping)
    weights = variable.numpy().copy()
    mask = weight_drop_mask(rate, weights.shape, tf.float32, _seed(5), dropping.weight_drop_salt).numpy()
    np.testing.assert_array_equal(np.unique(mask), [0.0, 2.0])
    assert 0.3 < float(np.mean(mask == 0)) < 0.7

    # Reference: the layer without weight drop whose kernel IS the dropped matrix,
    # for all 9 time steps; a mask redrawn per time step would not match it.
    _recurrent_kernel(plain).assign(weights * mask)
    with tf.GradientTape(persistent=True) as tape:
        got = dropping(x, initial_state=states, training=True, seed=_seed(5))
        want = plain(x, initial_state=states, training=True, seed=_seed(5))
        probe = tf.sin(tf.range(6, dtype=tf.float32))
        got_loss, want_loss = (tf.reduce_sum(o[0] * probe) + tf.reduce_sum(o[1]) for o in (got, want))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), atol=1e-6)
    # The gradient reaches the variable through the mask.
    np.testing.assert_allclose(tape.gradient(got_loss, variable).numpy(),
                               tape.gradient(want_loss, _recurrent_kernel(plain)).numpy() * mask, atol=1e-5)
    # The variable is untouched and still the layer's recurrent kernel.
    assert _recurrent_kernel(dropping) is variable
    np.testing.assert_array_equal(variable.numpy(), weights)

    # Another step draws another mask; evaluation drops nothing.
    other = dropping(x, initial_state=states, training=True, seed=_seed(6))
    assert np.abs(other[0].numpy() - got[0].numpy()).max() > 1e-3
    _recurrent_kernel(plain).assign(weights)
    for g, w in zip(dropping(x, initial_state=states, training=False, seed=_seed(5)),
                    plain(x, initial_state=states, training=False)):
        np.testing.assert_array_equal(g.numpy(), w.numpy())


class _CudnnCalled(Exception):
    pass


def _fake_gpu(monkeypatch):
    real = tf.config.list_logical_devices
    gpus = [tf.config.LogicalDevice("/device:GPU:0", "GPU")]
    monkeypatch.setattr(tf.config, "list_logical_devices",
                        lambda device_type=None: gpus if device_type == "GPU" else real(device_type))
    monkeypatch.setattr(KERAS_TF_RNN, "_is_gpu_available", lambda: True)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_weight_drop_keeps_the_kernel_choice_and_hands_cudnn_the_dropped_kernel(cell, monkeypatch):
    for gpu in (False, True):
        for cudnn in ("auto", "require", "off"):
            base = dict(cell=cell, num_layers=2, hidden_size=5, cudnn=cudnn)
            assert ([k.line() for k in kernel_report(ModelConfig(**base, weight_drop=0.5), gpu_visible=gpu)]
                    == [k.line() for k in kernel_report(ModelConfig(**base), gpu_visible=gpu)])
    # On a (faked) GPU the layer takes Keras' cuDNN path with the dropped kernel.
    received = []

    def cudnn(*args, **kwargs):
        received.append(args[4] if cell == "lstm" else args[3])  # the recurrent kernel argument
        raise _CudnnCalled

    monkeypatch.setattr(KERAS_TF_RNN, f"_cudnn_{cell}", cudnn)
    _fake_gpu(monkeypatch)
    layer = recurrent_layer(ModelConfig(cell=cell, num_layers=1, hidden_size=5, weight_drop=0.5), 0)
    x = tf.zeros([2, 3, 4])
    states = [tf.zeros([2, 5])] * (2 if cell == "lstm" else 1)
    layer.build(x.shape)
    assert layer.runs_cudnn()
    with pytest.raises(_CudnnCalled):
        layer(x, initial_state=states, training=True, seed=_seed(2))
    variable = layer.cell.recurrent_kernel
    mask = weight_drop_mask(0.5, variable.shape, tf.float32, _seed(2), layer.weight_drop_salt)
    np.testing.assert_array_equal(received[0].numpy(), variable.numpy() * mask.numpy())
    assert isinstance(layer.cell.recurrent_kernel, keras.Variable)  # restored after the raising call
    with pytest.raises(_CudnnCalled):
        layer(x, initial_state=states, training=False, seed=_seed(2))
    np.testing.assert_array_equal(received[1].numpy(), variable.numpy())  # evaluation: undropped


# ----------------------------------------------------------------------------
# Embedding dropout: whole word types
# ----------------------------------------------------------------------------


def test_embedding_dropout_drops_whole_word_types_the_same_on_every_row():
    vocab, rate = 40, 0.3
    tokens = tf.constant(RNG.integers(0, vocab, size=(8, 25)), tf.int32)
    table = tf.constant(RNG.uniform(1.0, 2.0, size=(vocab, 6)), tf.float32)
    embedded = tf.gather(table, tokens)
    out = embedding_dropout(embedded, tokens, vocab, rate, True, _seed(7)).numpy()
    scale = out / embedded.numpy()
    seen = np.unique(tokens.numpy())
    dropped = set()
    for token in seen:
        factors = scale[tokens.numpy() == token]
        assert np.allclose(factors, 0.0) or np.allclose(factors, 1 / (1 - rate)), token  # the whole type
        if np.allclose(factors, 0.0):
            dropped.add(int(token))
    assert 0 < len(dropped) < len(seen)
    # The same types are dropped in any subset of rows (a replica's share).
    part = embedding_dropout(embedded[5:], tokens[5:], vocab, rate, True, _seed(7)).numpy()
    np.testing.assert_array_equal(part, out[5:])
    # It is the row mask of the embedding matrix: lookup in the masked matrix.
    keep = tf.random.stateless_uniform([vocab], seed=tf.random.experimental.stateless_fold_in(
        _seed(7), EMBEDDING_DROPOUT_SALT)).numpy() >= rate
    np.testing.assert_allclose(out, (table.numpy() * keep[:, None] / (1 - rate))[tokens.numpy()], rtol=1e-6)
    assert np.abs(embedding_dropout(embedded, tokens, vocab, rate, True, _seed(8)).numpy() - out).max() > 0.5
    np.testing.assert_array_equal(embedding_dropout(embedded, tokens, vocab, rate, False, _seed(7)).numpy(),
                                  embedded.numpy())


# ----------------------------------------------------------------------------
# AR/TAR and weight decay: one training step against a hand computation
# ----------------------------------------------------------------------------


def test_ar_and_tar_values_against_numpy():
    raw = RNG.standard_normal((3, 5, 4)).astype(np.float32)
    dropped = raw * (RNG.uniform(size=raw.shape) > 0.5) * 2.0
    # This replica holds 3 of the global batch's 6 rows: its share uses the global count.
    terms = ActivationPenalties(ar=2.0, tar=0.5).terms(tf.constant(raw), tf.constant(dropped), global_batch=6)
    ar = 2.0 * np.sum(dropped.astype(np.float64) ** 2) / (6 * 5 * 4)
    tar = 0.5 * np.sum(np.diff(raw.astype(np.float64), axis=1) ** 2) / (6 * 4 * 4)
    np.testing.assert_allclose(float(terms["ar_loss"]), ar, rtol=1e-6)
    np.testing.assert_allclose(float(terms["tar_loss"]), tar, rtol=1e-6)
    assert ActivationPenalties(tar=1.0).terms(tf.constant(raw), tf.constant(dropped), 6).keys() == {"tar_loss"}


def _trainer(config, run_dir):
    run_dir.mkdir(parents=True, exist_ok=True)
    return build_trainer(config, run_dir, backend=Backend(),
                         metrics=MetricsLogger(run_dir, True, tensorboard=False, progress="off"))


def _sgd_step_against_hand_computation(trainer, global_batch: int, ar: float, tar: float, decay: float,
                                       clip_norm: float):
    """One real train_step against its update computed here; returns the step's penalties."""
    model, seed = trainer.model, _seed(0)
    inputs, targets = trainer.train_batches.window(1, 0)
    states = model.initial_state(global_batch)
    before = [v.numpy().copy() for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        logits, _, (raw, dropped) = model(inputs, states, training=True, seed=seed,
                                          rows=tf.constant([0, global_batch]), return_activations=True)
        loss_sum = token_loss_sum(targets, logits)
        h, d = tf.cast(raw, tf.float64), tf.cast(dropped, tf.float64)
        ar_value = ar * tf.reduce_mean(d ** 2)
        tar_value = tar * tf.reduce_mean((h[:, 1:] - h[:, :-1]) ** 2)
        objective = tf.cast(loss_sum, tf.float64) / float(np.prod(targets.shape)) + ar_value + tar_value
    grads = [tf.convert_to_tensor(g).numpy().astype(np.float64) for g in
             tape.gradient(objective, model.trainable_variables)]
    norm = np.sqrt(sum(np.sum(g ** 2) for g in grads))
    factor = min(1.0, clip_norm / norm) if clip_norm else 1.0
    lr = 0.5
    want = [w - lr * (factor * g + decay * w) for w, g in zip(before, grads)]
    trainer.optimizer.learning_rate.assign(lr)
    got_loss, _, got_norm, finite = trainer.steps.train_step(inputs, targets, states, seed)
    assert bool(finite)
    # The returned (logged) loss is the cross-entropy alone.
    np.testing.assert_allclose(float(got_loss), float(loss_sum), rtol=1e-6)
    np.testing.assert_allclose(float(got_norm), norm, rtol=1e-4)  # the loss gradient's norm, before the decay
    for w, expected in zip(model.trainable_variables, want):
        scale = max(np.abs(expected).max(), 1e-3)
        assert np.abs(w.numpy() - expected).max() / scale < 1e-5, w.path
    return {k: float(v) for k, v in trainer.steps.last_penalties.items()}, float(ar_value), float(tar_value)


def test_ar_and_tar_enter_the_update_but_not_the_logged_loss(shakespeare_slice, tmp_path):
    config = tiny_config(shakespeare_slice, model={"dropout_output": 0.5, "dropout_input": 0.2},
                         optimizer={"name": "sgd", "learning_rate": 0.5, "clip_norm": 0.0},
                         train={"ar": 100.0, "tar": 2000.0})
    penalties, ar, tar = _sgd_step_against_hand_computation(_trainer(config, tmp_path / "run"), 8, 100.0, 2000.0,
                                                           0.0, 0.0)
    # The starting activations are small (mean h^2 ~ 1e-5): coefficients large enough for
    # each penalty to move the update far beyond the tolerance.
    assert penalties.keys() == {"ar_loss", "tar_loss"} and ar > 5e-4 and tar > 5e-4, (ar, tar)
    np.testing.assert_allclose([penalties["ar_loss"], penalties["tar_loss"]], [ar, tar], rtol=1e-5)


def test_weight_decay_is_added_after_the_clip(shakespeare_slice, tmp_path):
    # clip_norm 0.1 is active (the gradient norm is ~1): a decay added before the
    # clip, or counted in the norm, would be scaled down with it.
    config = tiny_config(shakespeare_slice, optimizer={"name": "sgd", "learning_rate": 0.5, "clip_norm": 0.1,
                                                       "weight_decay": 0.05})
    trainer = _trainer(config, tmp_path / "run")
    assert trainer.steps.weight_decay == 0.05
    penalties, _, _ = _sgd_step_against_hand_computation(trainer, 8, 0.0, 0.0, 0.05, 0.1)
    assert penalties == {}


def test_adamw_keeps_its_decoupled_decay_alone(shakespeare_slice, tmp_path):
    config = tiny_config(shakespeare_slice, optimizer={"name": "adamw", "weight_decay": 0.05})
    trainer = _trainer(config, tmp_path / "run")
    assert trainer.steps.weight_decay == 0.0 and trainer.optimizer.weight_decay == 0.05


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("override, key", [
    ("model.weight_drop=1.0", "model.weight_drop"),
    ("model.embedding_dropout=-0.1", "model.embedding_dropout"),
    ("model.dropout_input=1.5", "model.dropout_input"),
    ("model.dropout_hidden=1", "model.dropout_hidden"),
    ("model.dropout_output=-1", "model.dropout_output"),
    ("train.ar=-1", "train.ar"),
    ("train.tar=-0.5", "train.tar"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay"),
])
def test_bad_regularizer_values_are_one_line_errors(override, key, shakespeare_slice, tmp_path, capsys):
    run_dir = tmp_path / "run"
    line = assert_one_line_error(*run_cli(["train", "--run-dir", run_dir, "--set", "data.corpus=file",
                                           "--set", f"data.path={shakespeare_slice}", "--set", override], capsys))
    assert f"config key '{key}'" in line
    assert not run_dir.exists()


# ----------------------------------------------------------------------------
# Every option on: 2 mirrored replicas equal one device, resume is bitwise
# ----------------------------------------------------------------------------

ALL_ON = ("model={cell: lstm, num_layers: 2, hidden_size: 16, embedding_size: 16, tie_embeddings: true, "
          "dropout: 0.0, weight_drop: 0.3, embedding_dropout: 0.1, dropout_input: 0.2, dropout_hidden: 0.25, "
          "dropout_output: 0.3}")

# One process for all runs: 2 logical CPUs exist before TensorFlow initializes;
# the one-device runs use the first.
SCRIPT = textwrap.dedent("""
    import sys
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    from dist_rnn.cli import main

    out, data, model = sys.argv[1], sys.argv[2], sys.argv[3]
    base = ["--set", "data={corpus: file, path: %s, split: [0.9, 0.1, 0.0]}" % data, "--set", model,
            "--set", "optimizer={name: adam, learning_rate: 0.01, clip_norm: 0.25, weight_decay: 0.001, ema_decay: 0.9, "
                         "schedule: {name: plateau, factor: 0.5, patience: 1}}",
            "--set", "train={batch_size: 4, num_steps: 12, max_steps: 6, max_epochs: null, log_every: 2, "
                     "sample_length: 0, eval_every: 3, ar: 2.0, tar: 1.0, deterministic: true, accumulate_steps: 2, "
                     "early_stopping: {patience: 3, min_delta: 0.0}, variable_length: true}",
            "--set", "checkpoint.every_steps=0", "--set", "logging={progress: off, tensorboard: false}"]
    def train(name, *extra):
        assert main(["train", "--run-dir", "%s/%s" % (out, name), *base, *extra]) == 0, name
    train("full")
    train("resumed", "--set", "train.max_steps=3")
    train("resumed", "--set", "train.max_steps=6")
    train("mirrored", "--set", "distribute={backend: mirrored, cpu_devices: 2}")
""")


def _saved(run_dir) -> dict:
    prefix = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    reader = tf.train.load_checkpoint(prefix)
    return {n: reader.get_tensor(n) for n, _ in tf.train.list_variables(prefix)
            if n.endswith("VARIABLE_VALUE") and not n.startswith("save_counter")}


def _numbers(tree) -> list[float]:
    """Every number in a parsed JSON value, in order."""
    if isinstance(tree, dict):
        return [x for key in sorted(tree) for x in _numbers(tree[key])]
    if isinstance(tree, list):
        return [x for item in tree for x in _numbers(item)]
    return [float(tree)] if isinstance(tree, (int, float)) else []


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_every_recipe_option_on_mirrored_equals_one_device_and_resume_is_bitwise(shakespeare_slice, tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(shakespeare_slice), ALL_ON],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full, resumed, mirrored = (_saved(tmp_path / name) for name in ("full", "resumed", "mirrored"))
    assert int(full["training_state/step/.ATTRIBUTES/VARIABLE_VALUE"]) == 6
    # Variable-length BPTT: the rows stand at the sum of the 6 drawn lengths (seed 0), saved for the resume.
    assert int(full["stream_position/tokens_in_epoch/.ATTRIBUTES/VARIABLE_VALUE"]) == window_lengths(
        0, np.arange(6), 12).sum() != 6 * 12
    assert full.keys() == resumed.keys()
    for name in full:
        assert np.array_equal(full[name], resumed[name]), name
    # The validation history is a JSON string of losses: equal to float32 reduction order, not bitwise.
    history = "evaluation_history/record_json/.ATTRIBUTES/VARIABLE_VALUE"
    one, two = (json.loads(run.pop(history)) for run in (full, mirrored))
    assert np.allclose(np.array(_numbers(one)), np.array(_numbers(two)), rtol=1e-5), (one, two)
    assert len(_numbers(one)) >= 2
    assert_close_variables(full, mirrored, TOLERANCE)  # Adam: its slots make > 20 compared variables
    # The recipe's other options were live: EMA weights and the validation history are checkpointed.
    assert any(n.startswith("weight_average/") for n in full)  # (the history was popped above: it exists)
    # AR/TAR are logged beside the loss, on training records only, and agree across layouts.
    train_full = [r for r in _records(tmp_path / "full") if r["split"] == "train"]
    train_mirrored = [r for r in _records(tmp_path / "mirrored") if r["split"] == "train"]
    assert len(train_full) == 3 and all(r["ar_loss"] > 0 and r["tar_loss"] > 0 for r in train_full)
    assert not any("ar_loss" in r for r in _records(tmp_path / "full") if r["split"] != "train")
    for a, b in zip(train_full, train_mirrored):
        for key in ("loss", "ar_loss", "tar_loss"):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (key, a, b)


# ----------------------------------------------------------------------------
# Every option on with NT-ASGD: 2 worker processes equal one device
# ----------------------------------------------------------------------------

# The AWD recipe's optimizer at a rate that makes the validation loss bounce:
# evaluations at steps 2, 4, 6, 8 give 3.67, 4.15, 3.72, 3.49 (measured), so the
# plateau schedule halves the rate and NT-ASGD switches after step 6, the
# average of steps 7 and 8 makes the new best at step 8, and early stopping
# (3 evaluations without a gain of 0.2) ends the run there. The margins of these
# decisions (>= 0.02) are far above float32 reduction order.
NTASGD_ALL_ON = [
    "--set", ALL_ON,
    "--set", "optimizer={name: ntasgd, nonmono: 1, learning_rate: 30, clip_norm: 0.25, weight_decay: 0.001, "
             "schedule: {name: plateau, factor: 0.5, patience: 2}}",
    "--set", "train={batch_size: 4, num_steps: 12, max_steps: 12, max_epochs: null, log_every: 2, sample_length: 0, "
             "eval_every: 2, ar: 2.0, tar: 1.0, deterministic: true, accumulate_steps: 2, "
             "early_stopping: {patience: 3, min_delta: 0.2}}",
    "--set", "checkpoint={every_steps: 1, keep: 30}", "--set", "logging={progress: off, tensorboard: false}",
]


def _ntasgd_args(data) -> list[str]:
    return ["--set", f"data={{corpus: file, path: {data}, split: [0.9, 0.1, 0.0]}}", *NTASGD_ALL_ON]


@pytest.fixture(scope="module")
def ntasgd_one_device(shakespeare_slice, tmp_path_factory):
    from dist_rnn.cli import main

    run_dir = tmp_path_factory.mktemp("ntasgd") / "one"
    assert main(["train", "--run-dir", str(run_dir), *_ntasgd_args(shakespeare_slice)]) == 0
    return run_dir


def _best_and_latest(run_dir) -> tuple[dict, dict]:
    """The best and the latest checkpoint's values (the validation history's numbers apart)."""
    values = []
    for prefix in (str(run_dir / "best" / json.loads((run_dir / "best" / "best.json").read_text())["checkpoint"]),
                   tf.train.latest_checkpoint(str(run_dir / "checkpoints"))):
        reader = tf.train.load_checkpoint(prefix)
        values.append({n: reader.get_tensor(n) for n, _ in tf.train.list_variables(prefix)
                       if n.endswith("VARIABLE_VALUE") and not n.startswith("save_counter")})
    return values[0], values[1]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["multiworker", "horovod"])
def test_every_recipe_option_with_ntasgd_on_two_workers_equals_one_device(backend, ntasgd_one_device,
                                                                           shakespeare_slice, tmp_path):
    if backend == "horovod":
        pytest.importorskip("horovod.tensorflow", reason="Horovod is not installed (tools/install_horovod.sh)")
    from test_averaging import assert_weights_close, model_weights, raw_at

    run_dir = tmp_path / backend
    env = {**os.environ, "PYTHON": sys.executable, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # its horovodrun
    proc = subprocess.run([str(REPO / "launch" / f"{backend}.sh"), "-n", "2", "--", "--run-dir", str(run_dir),
                           *_ntasgd_args(shakespeare_slice)], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 replica(s), 2 worker(s)" in proc.stdout
    one_best, one_latest = _best_and_latest(ntasgd_one_device)
    two_best, two_latest = _best_and_latest(run_dir)
    # The same decisions: plateau decay and NT-ASGD's switch after step 6, the best and early stopping at 8.
    history = "evaluation_history/record_json/.ATTRIBUTES/VARIABLE_VALUE"
    one, two = (json.loads(run.pop(history)) for run in (one_latest, two_latest))
    assert [step for step, _ in one] == [step for step, _ in two] == [2, 4, 6, 8], (one, two)
    assert np.allclose(np.array(_numbers(one)), np.array(_numbers(two)), rtol=1e-5), (one, two)
    for run in (one_latest, two_latest):
        assert int(run["training_state/step/.ATTRIBUTES/VARIABLE_VALUE"]) == 8
        assert int(run["weight_average/count/.ATTRIBUTES/VARIABLE_VALUE"]) == 2  # steps 7 and 8
    assert json.loads((run_dir / "best" / "best.json").read_text())["step"] == 8
    assert_close_variables(one_latest, two_latest, TOLERANCE)
    for run in (one_best, two_best):
        run.pop(history)
    assert_close_variables(one_best, two_best, TOLERANCE)
    # The chief saved the average of the raw weights after steps 7 and 8 as the best model,
    # and generate/export read the same average from the latest checkpoint.
    raw7, raw8 = raw_at(run_dir, 7), raw_at(run_dir, 8)
    mean = [(a + b) / 2 for a, b in zip(raw7, raw8)]
    assert_weights_close(model_weights(run_dir, "best", raw=True), mean)
    assert_weights_close(model_weights(run_dir, "latest"), mean)
    assert not np.allclose(mean[0], raw8[0], rtol=1e-3)  # the average is not the raw weights
