"""Recurrent dropout: stateless masks per (step seed, layer, global row), the masked fused
recurrence of lstm/gru and its gradient, and which kernel each layer runs.

The masks must not come from a stateful generator: a resumed run has to redraw
exactly the masks of the uninterrupted run, and a row has to get the same mask
whichever replica holds it.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from equivalence import assert_close_variables
from dist_rnn.models import dropout, keras_rnn
from dist_rnn.config import ModelConfig
from dist_rnn.errors import UserError
from dist_rnn.models.model import build_model, check_cudnn_requirement, kernel_report, recurrent_layer

ALL_CELLS = ["lstm", "gru", "ln_lstm", "ln_gru", "rnn"]
# The module (``keras.src.backend.tensorflow.rnn`` as an attribute is its function ``rnn``).
KERAS_TF_RNN = importlib.import_module("keras.src.backend.tensorflow.rnn")
TOKENS = tf.constant(np.random.default_rng(0).integers(0, 30, size=(4, 7)), tf.int32)


@pytest.fixture(autouse=True)
def _float32_policy():
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


def _model(cell, rate=0.5):
    return build_model(ModelConfig(cell=cell, num_layers=2, hidden_size=12, embedding_size=8,
                                   recurrent_dropout=rate), 30, seed=0)


# ----------------------------------------------------------------------------
# The model's masks: pure functions of (step seed, layer, global row)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("cell", ALL_CELLS)
def test_mask_of_a_row_does_not_depend_on_the_replica_layout(cell):
    model = _model(cell)
    seed = tf.constant([3, 7], tf.int64)
    whole, whole_states = model(TOKENS, training=True, seed=seed, rows=tf.constant([0, 4]))
    halves = [model(TOKENS[r:r + 2], training=True, seed=seed, rows=tf.constant([r, 4])) for r in (0, 2)]
    # A batch of 4 and two of 2 run differently blocked matmuls: ~1e-6 apart
    # (measured up to 1.2e-6); a mask drawn per local row is off by ~0.1.
    np.testing.assert_allclose(np.concatenate([h[0] for h in halves]), whole.numpy(), atol=1e-5)
    for i, state in enumerate(whole_states):
        np.testing.assert_allclose(np.concatenate([h[1][i] for h in halves]), state.numpy(), atol=1e-5)
    # Recurrent dropout is the only dropout here, and it is active.
    evaluation, _ = model(TOKENS, training=False)
    assert np.abs(whole.numpy() - evaluation.numpy()).max() > 1e-3


@pytest.mark.parametrize("cell", ALL_CELLS)
def test_mask_is_redrawn_from_the_step_seed_alone(cell):
    model = _model(cell)
    step_5, step_6 = tf.constant([0, 5], tf.int64), tf.constant([0, 6], tf.int64)
    first, _ = model(TOKENS, training=True, seed=step_5)
    model(TOKENS, training=True, seed=step_6)  # another step in between changes nothing
    again, _ = model(TOKENS, training=True, seed=step_5)
    np.testing.assert_array_equal(again.numpy(), first.numpy())
    # A fresh model with the same weights (a resumed run) draws the same masks.
    twin = _model(cell)
    twin.set_weights(model.get_weights())
    np.testing.assert_array_equal(twin(TOKENS, training=True, seed=step_5)[0].numpy(), first.numpy())
    other, _ = model(TOKENS, training=True, seed=step_6)
    assert np.abs(other.numpy() - first.numpy()).max() > 1e-3
    # No mask in evaluation, seed or not.
    np.testing.assert_array_equal(model(TOKENS, training=False, seed=step_5)[0].numpy(), model(TOKENS)[0].numpy())


def test_each_layer_draws_its_own_mask():
    masks = [dropout.recurrent_dropout_mask(0.5, 64, 8, tf.float32, tf.constant([1, 2], tf.int64), salt)
             for salt in (1000, 1001)]
    assert np.abs(masks[0].numpy() - masks[1].numpy()).max() == 2.0
    values = np.unique(np.concatenate([m.numpy().ravel() for m in masks]))
    np.testing.assert_array_equal(values, [0.0, 2.0])  # dropped, or kept and scaled by 1 / (1 - rate)
    assert 0.4 < float(np.mean(masks[0].numpy() == 0)) < 0.6
    layers = _model("lstm").recurrent_layers
    assert [layer.dropout_salt for layer in layers] == [1000, 1001]


# ----------------------------------------------------------------------------
# lstm/gru: the masked fused recurrence against a plain-op reference
# ----------------------------------------------------------------------------


def _reference_lstm(x, states, weights, mask):
    """Keras' LSTM equations (gates i, f, c, o) in plain ops, ``mask`` on h before the recurrent matmul."""
    kernel, rkernel, bias = weights
    h, c = states
    outputs = []
    for t in range(x.shape[1]):
        i, f, g, o = tf.split(x[:, t] @ kernel + (h * mask) @ rkernel + bias, 4, axis=-1)
        c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
        h = tf.sigmoid(o) * tf.tanh(c)
        outputs.append(h)
    return [tf.stack(outputs, axis=1), h, c]


def _reference_gru(x, states, weights, mask):
    """Keras' GRU equations (``reset_after``, gates z, r, h) in plain ops, ``mask`` on h before the matmul."""
    kernel, rkernel, bias = weights
    (h,) = states
    outputs = []
    for t in range(x.shape[1]):
        xz, xr, xh = tf.split(x[:, t] @ kernel + bias[0], 3, axis=-1)
        hz, hr, hh = tf.split((h * mask) @ rkernel + bias[1], 3, axis=-1)
        z, r = tf.sigmoid(xz + hz), tf.sigmoid(xr + hr)
        candidate = tf.tanh(xh + r * hh)
        h = z * h + (1.0 - z) * candidate
        outputs.append(h)
    return [tf.stack(outputs, axis=1), h]


REFERENCES = {"lstm": (keras_rnn.LSTM, keras.layers.LSTM, _reference_lstm, 2),
              "gru": (keras_rnn.GRU, keras.layers.GRU, _reference_gru, 1)}


def _loss(outputs):
    probe = tf.sin(tf.range(outputs[0].shape[-1], dtype=outputs[0].dtype))
    return tf.reduce_sum(outputs[0] * probe) + tf.add_n([tf.reduce_sum(tf.square(s)) for s in outputs[1:]])


def _value_and_grads(fn, x, states, variables):
    with tf.GradientTape() as tape:
        tape.watch([x] + states)
        outputs = fn(x, states)
        loss = _loss(outputs)
    return outputs, tape.gradient(loss, [x] + states + variables)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_masked_fused_recurrence_and_its_gradient_match_the_reference(cell, monkeypatch):
    fused_cls, keras_cls, reference, n_states = REFERENCES[cell]
    units, rate, salt = 6, 0.5, 1001
    layer = fused_cls(units, recurrent_dropout=rate, dropout_salt=salt, return_sequences=True, return_state=True,
                      dtype="float64")
    generic = keras_cls(units, use_cudnn=False, return_sequences=True, return_state=True, dtype="float64")
    rng = np.random.default_rng(12)
    x = tf.constant(rng.standard_normal((5, 8, 4)))
    states = [tf.constant(0.5 * rng.standard_normal((5, units))) for _ in range(n_states)]
    layer(x)
    generic(x)
    weights = [0.5 * rng.standard_normal(w.shape) for w in layer.get_weights()]
    layer.set_weights(weights)
    generic.set_weights(weights)
    variables = list(layer.trainable_variables)

    def plain(mask):
        return lambda x, s: reference(x, s, variables, mask)

    # The reference is Keras' LSTM/GRU when nothing is dropped.
    ones = tf.ones([5, units], tf.float64)
    for got, want in zip(plain(ones)(x, states), generic(x, initial_state=states)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-12)

    seed = tf.constant([4, 9], tf.int64)
    mask = dropout.recurrent_dropout_mask(rate, units, 5, tf.float64, seed, salt)
    assert 0.2 < float(np.mean(mask.numpy() == 0)) < 0.8
    want_out, want_grads = _value_and_grads(plain(mask), x, states, variables)

    def no_keras(*args, **kwargs):
        raise AssertionError("ran Keras' generic cell")

    monkeypatch.setattr(keras_cls, "inner_loop", no_keras)
    def fused(x, s):
        return _value_and_grads(lambda x, s: layer(x, initial_state=s, training=True, seed=seed), x, s, variables)

    for mode in ("eager", "graph"):
        got_out, got_grads = (fused if mode == "eager" else tf.function(fused))(x, states)
        assert len(got_out) == 1 + n_states
        for got, want in zip(got_out, want_out):
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-12, err_msg=mode)
        for got, want in zip(got_grads, want_grads):
            np.testing.assert_allclose(tf.convert_to_tensor(got).numpy(), tf.convert_to_tensor(want).numpy(),
                                       rtol=1e-10, atol=1e-12, err_msg=mode)
    # Evaluation: no mask.
    for got, want in zip(layer(x, initial_state=states, training=False, seed=seed), plain(ones)(x, states)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-12)


# ----------------------------------------------------------------------------
# Which kernel runs, on a faked GPU: the report says exactly the path taken
# ----------------------------------------------------------------------------


class _CudnnCalled(Exception):
    pass


class _GenericCalled(Exception):
    pass


def _fake_gpu(monkeypatch, visible: bool):
    real = tf.config.list_logical_devices
    gpus = [tf.config.LogicalDevice("/device:GPU:0", "GPU")] if visible else []
    monkeypatch.setattr(tf.config, "list_logical_devices",
                        lambda device_type=None: gpus if device_type == "GPU" else real(device_type))
    monkeypatch.setattr(KERAS_TF_RNN, "_is_gpu_available", lambda: visible)


def _path_taken(layer, x, states) -> str:
    """Runs ``layer`` (training, seeded); says which recurrence ran."""
    try:
        layer(x, initial_state=states, training=True, seed=tf.constant([1, 1], tf.int64))
    except _CudnnCalled:
        return "cudnn"
    except _GenericCalled:
        return "keras generic"
    return "fused"


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_kernel_report_names_the_path_each_layer_runs(cell, monkeypatch):
    def cudnn(*args, **kwargs):
        raise _CudnnCalled

    def generic(*args, **kwargs):
        raise _GenericCalled

    monkeypatch.setattr(KERAS_TF_RNN, f"_cudnn_{cell}", cudnn)
    monkeypatch.setattr(keras.layers.RNN, "inner_loop", generic)
    x = tf.zeros([2, 3, 4])
    seen = set()
    for gpu in (False, True):
        _fake_gpu(monkeypatch, gpu)
        for cudnn_mode in ("auto", "require", "off"):
            for rate in (0.0, 0.3):
                config = ModelConfig(cell=cell, num_layers=1, hidden_size=5, recurrent_dropout=rate, cudnn=cudnn_mode)
                report = kernel_report(config, gpu_visible=gpu)[0]
                layer = recurrent_layer(config, 0)
                states = [tf.zeros([2, 5])] * (2 if cell == "lstm" else 1)
                case = f"gpu={gpu} cudnn={cudnn_mode} recurrent_dropout={rate}: {report.line()}"
                if cudnn_mode == "require":
                    assert layer.use_cudnn is True, case  # Keras raises, never falls back
                    if not report.fused:
                        with pytest.raises(UserError):
                            check_cudnn_requirement(config, [report])
                        with pytest.raises(ValueError, match="use_cudnn=True"):
                            layer(x, initial_state=states, training=True)
                        continue
                path = _path_taken(layer, x, states)
                assert path == ("cudnn" if report.fused else "fused"), case
                seen.add((path, report.reason))
    assert seen == {("cudnn", ""), ("fused", "no GPU visible"), ("fused", "model.cudnn: off"),
                    ("fused", "recurrent dropout: cuDNN has none")}


def test_cudnn_require_raises_when_cudnn_cannot_run_at_trace_time(monkeypatch):
    # A GPU is visible but the cuDNN op cannot be placed: "auto" would quietly
    # run another kernel, "require" must fail.
    def missing(*args, **kwargs):
        raise tf.errors.NotFoundError(None, None, "no cuDNN kernel")

    monkeypatch.setattr(KERAS_TF_RNN, "_cudnn_lstm", missing)
    _fake_gpu(monkeypatch, True)
    config = ModelConfig(cell="lstm", num_layers=1, hidden_size=5, cudnn="require")
    check_cudnn_requirement(config, kernel_report(config, gpu_visible=True))
    with pytest.raises(ValueError, match="use_cudnn=True"):
        recurrent_layer(config, 0)(tf.zeros([2, 3, 4]))


# ----------------------------------------------------------------------------
# Real training runs: stop/resume and 2 mirrored replicas
# ----------------------------------------------------------------------------

RUN_CELLS = ["lstm", "ln_lstm"]

# One process for all runs (imports and TF start-up once): 2 logical CPUs are
# created before TensorFlow initializes; the one-device runs use the first.
SCRIPT = textwrap.dedent("""
    import sys
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    from dist_rnn.cli import main

    out, data = sys.argv[1], sys.argv[2]
    for cell in sys.argv[3:]:
        base = ["--set", "data={corpus: file, path: %s, split: [0.96, 0.02, 0.02]}" % data,
                "--set", "model={cell: %s, num_layers: 2, hidden_size: 16, embedding_size: 8, "
                         "dropout: 0.0, recurrent_dropout: 0.4}" % cell,
                "--set", "optimizer={name: adam, learning_rate: 0.01, clip_norm: 1.0}",
                "--set", "train={batch_size: 4, num_steps: 10, max_steps: 6, max_epochs: null, log_every: 3, "
                         "sample_length: 0, deterministic: true}",
                "--set", "checkpoint.every_steps=0", "--set", "logging={progress: off, tensorboard: false}"]
        def train(name, *extra):
            code = main(["train", "--run-dir", "%s/%s-%s" % (out, cell, name), *base, *extra])
            assert code == 0, (cell, name, code)
        train("full")
        train("resumed", "--set", "train.max_steps=3")
        assert main(["train", "--run-dir", "%s/%s-resumed" % (out, cell), "--set", "train.max_steps=6"]) == 0
        train("mirrored", "--set", "distribute={backend: mirrored, cpu_devices: 2}")
""")


@pytest.fixture(scope="module")
def runs(shakespeare_slice, tmp_path_factory):
    out = tmp_path_factory.mktemp("recurrent_dropout")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out), str(shakespeare_slice), *RUN_CELLS],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _saved(run_dir) -> dict:
    prefix = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    reader = tf.train.load_checkpoint(prefix)
    return {n: reader.get_tensor(n) for n, _ in tf.train.list_variables(prefix)
            if n.endswith("VARIABLE_VALUE") and not n.startswith("save_counter")}


@pytest.mark.slow
@pytest.mark.parametrize("cell", RUN_CELLS)
def test_stop_and_resume_with_recurrent_dropout_is_bitwise_identical(runs, cell):
    full, resumed = _saved(runs / f"{cell}-full"), _saved(runs / f"{cell}-resumed")
    assert int(full["training_state/step/.ATTRIBUTES/VARIABLE_VALUE"]) == 6
    assert full.keys() == resumed.keys()
    for name in full:
        assert np.array_equal(full[name], resumed[name]), name


RECURRENT_DROPOUT_TOLERANCE = {"lstm": {"weights": 6.4e-6, "state": 2.8e-6},
                               "ln_lstm": {"weights": 3.8e-3, "state": 1.2e-3}}


@pytest.mark.slow
@pytest.mark.parametrize("cell", RUN_CELLS)
def test_two_mirrored_replicas_with_recurrent_dropout_match_one_device(runs, cell):
    # Only float32 reduction order differs. Measured for these 6-step runs
    # (per-variable error of scale, as in tests/equivalence.py), oneDNN default
    # and ONEDNN_MAX_CPU_ISA=AVX2: lstm 6.4e-7 (state 2.8e-7); ln_lstm 3.8e-4
    # (state 1.2e-4, an Adam slot of a layer-norm gain: normalizing small
    # hidden vectors amplifies summation-order differences). Bounds: 10x.
    # Masks drawn per replica instead of per global row were off by 0.08.
    assert_close_variables(_saved(runs / f"{cell}-full"), _saved(runs / f"{cell}-mirrored"),
                           RECURRENT_DROPOUT_TOLERANCE[cell])


def test_a_cudnn_require_run_still_loads_for_sampling_on_a_cpu(shakespeare_slice, tmp_path):
    # `cudnn: require` builds use_cudnn=True for training; sampling and export
    # (same weights) must not inherit it where no GPU exists.
    from dist_rnn.inference import load_model_for_inference
    from dist_rnn.config import save_config
    from dist_rnn.run_dir import RunDirectory
    from dist_rnn.data.vocab import Vocabulary
    from conftest import tiny_config

    config = tiny_config(shakespeare_slice, model={"cudnn": "require", "hidden_size": 8, "embedding_size": 4})
    rd = RunDirectory(tmp_path / "run")
    rd.ensure()
    save_config(config, rd.config_file)
    vocab = Vocabulary.build("abcdefgh", "char")
    vocab.save(rd.vocab_file)
    trained = build_model(ModelConfig(cell="lstm", num_layers=2, hidden_size=8, embedding_size=4), len(vocab), seed=5)
    tf.train.Checkpoint(model=trained).save(str(rd.checkpoints / "ckpt"))
    model, _, _, _ = load_model_for_inference(str(rd.path))
    tokens = tf.constant([[1, 2, 3]], tf.int32)
    np.testing.assert_allclose(model(tokens)[0].numpy(), trained(tokens)[0].numpy(), atol=1e-6)
