"""dist_rnn.models.keras_rnn.LSTM/GRU: Keras' layers with the fused recurrence off cuDNN.

They must compute exactly what Keras' generic cell computes (values and
gradients), keep Keras' weights, and really take the fused path on a CPU.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from dist_rnn.models import keras_rnn

PAIRS = {"lstm": (keras_rnn.LSTM, keras.layers.LSTM, 2), "gru": (keras_rnn.GRU, keras.layers.GRU, 1)}


@pytest.fixture(autouse=True)
def _float32_policy():
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


def _pair(cell, units=12, input_dim=5, seed=0):
    fused_cls, keras_cls, n_states = PAIRS[cell]
    kwargs = dict(return_sequences=True, return_state=True)
    fused = fused_cls(units, **kwargs)
    generic = keras_cls(units, use_cudnn=False, **kwargs)
    x = tf.zeros([1, 1, input_dim])
    fused(x)
    generic(x)
    rng = np.random.default_rng(seed)
    weights = [0.5 * rng.standard_normal(w.shape).astype(np.float32) for w in generic.get_weights()]
    generic.set_weights(weights)
    fused.set_weights(weights)
    return fused, generic, n_states


def _outputs_and_grads(layer, x, states, jit=False):
    def fn(x, states):
        with tf.GradientTape() as tape:
            tape.watch(x)
            tape.watch(states)
            out = layer(x, initial_state=states)
            weights = tf.sin(tf.range(out[0].shape[-1], dtype=tf.float32))
            loss = tf.reduce_sum(tf.cast(out[0], tf.float32) * weights)
            loss += sum(tf.reduce_sum(tf.square(tf.cast(s, tf.float32))) for s in out[1:])
        grads = tape.gradient(loss, [x] + list(states) + layer.trainable_variables)
        return out, grads

    if jit:
        fn = tf.function(fn, jit_compile=True)
    out, grads = fn(x, states)
    return [o.numpy() for o in out], [tf.convert_to_tensor(g).numpy() for g in grads]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_fused_matches_keras_generic_values_and_gradients(cell, mode, monkeypatch):
    fused, generic, n_states = _pair(cell)
    rng = np.random.default_rng(1)
    x = tf.constant(rng.standard_normal((3, 9, 5)), tf.float32)
    states = [tf.constant(0.5 * rng.standard_normal((3, 12)), tf.float32) for _ in range(n_states)]
    ref_out, ref_grads = _outputs_and_grads(generic, x, states)
    # The fused layer must not fall back to Keras' generic loop on a CPU.
    def no_fallback(*args, **kwargs):
        raise AssertionError("fell back to keras' generic recurrence")

    monkeypatch.setattr(PAIRS[cell][1], "inner_loop", no_fallback)
    out, grads = _outputs_and_grads(fused, x, states, jit=mode == "xla")
    assert len(out) == 1 + n_states
    for a, b in zip(out, ref_out):
        np.testing.assert_allclose(a, b, atol=2e-5)
    for a, b in zip(grads, ref_grads):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_fused_weights_and_config_are_keras(cell):
    fused, generic, _ = _pair(cell)
    assert [w.path.split("/")[-1] for w in fused.weights] == [w.path.split("/")[-1] for w in generic.weights]
    assert [w.shape for w in fused.weights] == [w.shape for w in generic.weights]
    clone = type(fused).from_config(fused.get_config())
    assert clone.units == fused.units and clone.use_cudnn == fused.use_cudnn


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_unsupported_configurations_fall_back_to_keras(cell):
    fused_cls, keras_cls, n_states = PAIRS[cell]
    rng = np.random.default_rng(2)
    x = tf.constant(rng.standard_normal((2, 6, 4)), tf.float32)
    for kwargs in ({"go_backwards": True}, {"activation": "relu"}):
        fused = fused_cls(8, return_sequences=True, **kwargs)
        generic = keras_cls(8, return_sequences=True, use_cudnn=False, **kwargs)
        fused(x)
        generic(x)
        generic.set_weights(fused.get_weights())
        np.testing.assert_allclose(fused(x).numpy(), generic(x).numpy(), atol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_fused_under_mixed_bfloat16(cell):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    fused, generic, n_states = _pair(cell)
    rng = np.random.default_rng(3)
    x = tf.constant(rng.standard_normal((2, 7, 5)), tf.float32)
    states = [tf.constant(0.5 * rng.standard_normal((2, 12)), tf.float32) for _ in range(n_states)]
    out = fused(x, initial_state=states)
    ref = generic(x, initial_state=states)
    assert out[0].dtype == tf.bfloat16
    assert all(w.dtype == "float32" for w in fused.weights)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(tf.cast(a, tf.float32).numpy(), tf.cast(b, tf.float32).numpy(), atol=0.05)
