"""Tests of dist_rnn.models' own layers (LayerNormLSTM, LayerNormGRU, VanillaRNN) against NumPy
re-implementations of the documented equations."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from dist_rnn.models import LN_EPSILON, LayerNormGRU, LayerNormLSTM, VanillaRNN

LAYERS = [LayerNormLSTM, LayerNormGRU, VanillaRNN]
WEIGHT_NAMES = {
    LayerNormLSTM: ["kernel", "recurrent_kernel", "gate_gamma", "gate_beta", "cell_gamma", "cell_beta"],
    LayerNormGRU: [
        "kernel", "recurrent_kernel", "gate_gamma", "gate_beta", "candidate_gamma", "candidate_beta",
    ],
    VanillaRNN: ["kernel", "recurrent_kernel", "bias"],
}


# ----------------------------------------------------------------------------
# Independent NumPy references, written from the docstring equations (float64)
# ----------------------------------------------------------------------------


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _ln(x, gamma, beta):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * gamma + beta


def ref_lnlstm(x, states, weights, mask=None, forget_bias=1.0):
    W, Uk, gg, gb, cg, cb = weights
    h, c = states
    n = h.shape[-1]
    part = lambda v, k: v[..., k * n:(k + 1) * n]  # noqa: E731
    outs = []
    for t in range(x.shape[1]):
        hm = h if mask is None else h * mask
        pre = x[:, t] @ W + hm @ Uk
        i, j, f, o = (_ln(part(pre, k), part(gg, k), part(gb, k)) for k in range(4))
        c = c * _sigmoid(f + forget_bias) + _sigmoid(i) * np.tanh(j)  # carried unnormalized
        h = np.tanh(_ln(c, cg, cb)) * _sigmoid(o)
        outs.append(h)
    return np.stack(outs, axis=1), [h, c]


def ref_lngru(x, states, weights, mask=None):
    W, Uk, gg, gb, ng, nb = weights
    (h,) = states
    n = h.shape[-1]
    outs = []
    for t in range(x.shape[1]):
        hm = h if mask is None else h * mask
        xw, hu = x[:, t] @ W, hm @ Uk
        z = _sigmoid(_ln(xw[:, :n] + hu[:, :n], gg[:n], gb[:n]))
        r = _sigmoid(_ln(xw[:, n:2 * n] + hu[:, n:2 * n], gg[n:], gb[n:]))
        cand = np.tanh(_ln(xw[:, 2 * n:] + r * hu[:, 2 * n:], ng, nb))
        h = z * h + (1.0 - z) * cand
        outs.append(h)
    return np.stack(outs, axis=1), [h]


def ref_vanilla(x, states, weights, mask=None):
    W, Uk, b = weights
    (h,) = states
    outs = []
    for t in range(x.shape[1]):
        hm = h if mask is None else h * mask
        h = np.tanh(x[:, t] @ W + hm @ Uk + b)
        outs.append(h)
    return np.stack(outs, axis=1), [h]


REFERENCES = {LayerNormLSTM: ref_lnlstm, LayerNormGRU: ref_lngru, VanillaRNN: ref_vanilla}


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _float32_policy():
    keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def make_layer(cls, units, input_dim, rng, dtype=None, **kwargs):
    """A built layer with random weights (gains around 1, shifts around 0)."""
    layer = cls(units, dtype=dtype, **kwargs)
    layer.build((None, None, input_dim))
    weights = []
    for var in layer.weights:
        name = var.path.split("/")[-1]
        if name.endswith("gamma"):
            w = 1.0 + 0.3 * rng.standard_normal(var.shape)
        elif name.endswith("beta") or name == "bias":
            w = 0.3 * rng.standard_normal(var.shape)
        else:
            w = 0.6 * rng.standard_normal(var.shape)
        weights.append(w)
    layer.set_weights(weights)
    return layer


def random_inputs(cls, rng, batch, steps, input_dim, units):
    x = rng.standard_normal((batch, steps, input_dim))
    states = [0.5 * rng.standard_normal((batch, units)) for _ in range(2 if cls is LayerNormLSTM else 1)]
    return x, states


def run(layer, x, states, training=False, graph=False, dtype="float32", seed=None):
    fn = layer
    if graph:
        fn = tf.function(lambda x, s: layer(x, initial_state=s, training=training, seed=seed))
        out = fn(tf.constant(x, dtype), [tf.constant(s, dtype) for s in states])
    else:
        out = layer(tf.constant(x, dtype), initial_state=[tf.constant(s, dtype) for s in states],
                    training=training, seed=seed)
    return [o.numpy() for o in out]


def get_weights64(layer):
    return [w.astype(np.float64) for w in layer.get_weights()]


# ----------------------------------------------------------------------------
# Forward pass
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", LAYERS)
def test_weights_and_attributes(cls):
    layer = make_layer(cls, 4, 5, np.random.default_rng(0))
    assert [v.path.split("/")[-1] for v in layer.weights] == WEIGHT_NAMES[cls]
    assert layer.state_size == ([4, 4] if cls is LayerNormLSTM else [4])
    assert cls.fused_kernel_reason == "custom cell"
    assert LN_EPSILON == 1e-5  # the references below hard-code the documented epsilon
    assert keras.saving.get_registered_name(cls) == f"dist_rnn>{cls.__name__}"


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("cls", LAYERS)
def test_forward_matches_numpy(cls, graph):
    rng = np.random.default_rng(1)
    layer = make_layer(cls, 4, 5, rng)
    x, states = random_inputs(cls, rng, 3, 7, 5, 4)
    kwargs = {"forget_bias": 1.0} if cls is LayerNormLSTM else {}
    want_seq, want_states = REFERENCES[cls](x, states, get_weights64(layer), **kwargs)
    seq, *got_states = run(layer, x, states, graph=graph)
    assert seq.shape == (3, 7, 4) and seq.dtype == np.float32
    np.testing.assert_allclose(seq, want_seq, rtol=1e-5, atol=1e-5)
    assert len(got_states) == len(want_states)
    for got, want in zip(got_states, want_states):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Final h is the last output step.
    np.testing.assert_array_equal(got_states[0], seq[:, -1])


def test_lnlstm_forward_bias_is_used():
    rng = np.random.default_rng(2)
    layer = make_layer(LayerNormLSTM, 4, 5, rng, forget_bias=-0.7)
    x, states = random_inputs(LayerNormLSTM, rng, 2, 4, 5, 4)
    weights = get_weights64(layer)
    seq = run(layer, x, states)[0]
    np.testing.assert_allclose(seq, ref_lnlstm(x, states, weights, forget_bias=-0.7)[0], atol=1e-5)
    assert np.abs(seq - ref_lnlstm(x, states, weights, forget_bias=1.0)[0]).max() > 1e-3


@pytest.mark.parametrize("cls", LAYERS)
def test_single_step_variable_batch_and_zero_state(cls):
    rng = np.random.default_rng(3)
    layer = make_layer(cls, 4, 5, rng)
    weights = get_weights64(layer)
    step = tf.function(lambda x, s: layer(x, initial_state=s))
    for batch in (1, 6):  # same traced function, new batch sizes
        x, states = random_inputs(cls, rng, batch, 1, 5, 4)
        out = step(tf.constant(x, tf.float32), [tf.constant(s, tf.float32) for s in states])
        want_seq, want_states = REFERENCES[cls](x, states, weights)
        assert out[0].shape == (batch, 1, 4)
        np.testing.assert_allclose(out[0].numpy(), want_seq, atol=1e-5)
        for got, want in zip(out[1:], want_states):
            np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    # Token-by-token with carried states equals one call over the sequence.
    x, states = random_inputs(cls, rng, 2, 4, 5, 4)
    full = run(layer, x, states)
    carried = [tf.constant(s, tf.float32) for s in states]
    for t in range(4):
        out = layer(tf.constant(x[:, t:t + 1], tf.float32), initial_state=carried)
        np.testing.assert_allclose(out[0].numpy()[:, 0], full[0][:, t], atol=1e-6)
        carried = out[1:]
    # initial_state=None means zeros.
    zeros = [np.zeros_like(s) for s in states]
    np.testing.assert_allclose(
        layer(tf.constant(x, tf.float32))[0].numpy(), REFERENCES[cls](x, zeros, weights)[0], atol=1e-5
    )


@pytest.mark.parametrize("cls", LAYERS)
def test_functional_model_and_bad_state(cls):
    inputs = keras.Input((None, 5))
    outputs = cls(4)(inputs)
    assert [tuple(o.shape) for o in outputs] == [(None, None, 4)] + [(None, 4)] * len(outputs[1:])
    model = keras.Model(inputs, outputs)
    got = model(np.ones((2, 3, 5), np.float32))
    assert got[0].shape == (2, 3, 4)
    with pytest.raises(ValueError, match="initial state"):
        cls(4)(np.ones((2, 3, 5), np.float32), initial_state=[np.zeros((2, 4), np.float32)] * 3)


@pytest.mark.parametrize("cls", LAYERS)
def test_return_sequences_and_state_flags(cls):
    rng = np.random.default_rng(12)
    full = make_layer(cls, 4, 5, rng)
    x, states = random_inputs(cls, rng, 2, 3, 5, 4)
    want = run(full, x, states)
    for seqs, state in itertools.product([True, False], repeat=2):
        layer = cls(4, return_sequences=seqs, return_state=state)
        layer.build((None, None, 5))
        layer.set_weights(full.get_weights())
        out = layer(tf.constant(x, tf.float32), initial_state=[tf.constant(s, tf.float32) for s in states])
        spec = layer.compute_output_spec(keras.KerasTensor((None, 3, 5)))
        if not state:
            out, spec = [out], [spec]
        assert len(out) == len(spec) == (1 + len(states) if state else 1)
        np.testing.assert_allclose(out[0].numpy(), want[0] if seqs else want[0][:, -1], atol=1e-6)
        assert tuple(spec[0].shape) == ((None, 3, 4) if seqs else (None, 4))
        for got, w in zip(out[1:], want[1:]):
            np.testing.assert_allclose(got.numpy(), w, atol=1e-6)


# ----------------------------------------------------------------------------
# Gradients (float64 layers against central finite differences)
# ----------------------------------------------------------------------------


def _fd_check(layer, x, states, training, graph):
    """Analytic gradients (eager or tf.function) vs central differences, float64."""
    seed = tf.constant([7, 3], tf.int64) if training else None  # the same mask at every evaluation
    rng = np.random.default_rng(11)
    probes = [rng.standard_normal((x.shape[0], x.shape[1], layer.units))] + [
        rng.standard_normal(s.shape) for s in states
    ]
    weights = list(layer.trainable_weights)
    xs = tf.Variable(x)
    ss = [tf.Variable(s) for s in states]

    def loss_fn():
        out = layer(xs, initial_state=[tf.convert_to_tensor(s) for s in ss], training=training, seed=seed)
        return tf.add_n([tf.reduce_sum(o * p) for o, p in zip(out, probes)])

    def analytic():
        with tf.GradientTape() as tape:
            loss = loss_fn()
        return tape.gradient(loss, weights + [xs] + ss)

    grads = (tf.function(analytic) if graph else analytic)()
    assert all(g is not None for g in grads)
    loss_value = tf.function(loss_fn)
    eps = 1e-6
    for var, g in zip(weights + [xs] + ss, grads):
        value = var.numpy()
        num = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            for sign in (1.0, -1.0):
                shifted = value.copy()
                shifted[idx] += sign * eps
                var.assign(shifted)
                num[idx] += sign * float(loss_value()) / (2 * eps)
        var.assign(value)
        # float64: truncation error ~eps^2 * f''' ~ 1e-12, round-off ~1e-16 / eps ~ 1e-10.
        np.testing.assert_allclose(g.numpy(), num, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "cls,training,graph",
    [(c, False, False) for c in LAYERS] + [(c, True, True) for c in LAYERS],
    ids=lambda v: v.__name__ if isinstance(v, type) else str(v),
)
def test_gradients_match_finite_differences(cls, training, graph):
    rng = np.random.default_rng(4)
    layer = make_layer(cls, 2, 3, rng, dtype="float64", recurrent_dropout=0.5 if training else 0.0)
    x, states = random_inputs(cls, rng, 2, 3, 3, 2)
    _fd_check(layer, x, states, training, graph)


@pytest.mark.parametrize("cls", LAYERS)
def test_gradients_under_xla_match_eager(cls):
    rng = np.random.default_rng(5)
    layer = make_layer(cls, 3, 4, rng)
    x, states = random_inputs(cls, rng, 2, 5, 4, 3)
    xt = tf.constant(x, tf.float32)
    st = [tf.constant(s, tf.float32) for s in states]

    def grads(x, s):
        with tf.GradientTape() as tape:
            tape.watch([x] + s)
            out = layer(x, initial_state=s)
            loss = tf.reduce_sum(out[0] ** 2) + tf.add_n([tf.reduce_sum(o) for o in out[1:]])
        return tape.gradient(loss, list(layer.trainable_weights) + [x] + s)

    want = grads(xt, st)
    got = tf.function(grads, jit_compile=True)(xt, st)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# Serialization
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", LAYERS)
def test_get_config_round_trip(cls):
    kwargs = dict(recurrent_dropout=0.25, kernel_initializer="he_normal",
                  recurrent_initializer="glorot_normal", dropout_salt=3, name="rnn_x")
    if cls is LayerNormLSTM:
        kwargs["forget_bias"] = 0.5
    if cls is VanillaRNN:
        kwargs["bias_initializer"] = "ones"
    if cls is LayerNormGRU:
        kwargs["gate_beta_initializer"] = "ones"
    rng = np.random.default_rng(6)
    layer = make_layer(cls, 4, 5, rng, **kwargs)
    config = layer.get_config()
    for key, value in kwargs.items():
        got = config[key]
        if key.endswith("initializer"):
            got = got["class_name"]
            value = keras.initializers.get(value).__class__.__name__
        assert got == value, key
    for clone in (
        cls.from_config(config),
        keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer)),
    ):
        assert type(clone) is cls
        assert clone.get_config() == config
        if not clone.built:  # deserialize_keras_object builds from the build config
            clone.build((None, None, 5))
        clone.set_weights(layer.get_weights())
        x, states = random_inputs(cls, rng, 2, 3, 5, 4)
        np.testing.assert_array_equal(run(clone, x, states)[0], run(layer, x, states)[0])


# ----------------------------------------------------------------------------
# Recurrent dropout
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", LAYERS)
def test_recurrent_dropout_training_flag(cls):
    rng = np.random.default_rng(8)
    dropped = make_layer(cls, 4, 5, rng, recurrent_dropout=0.4, dropout_salt=1)
    plain = cls(4)
    plain.build((None, None, 5))
    plain.set_weights(dropped.get_weights())
    x, states = random_inputs(cls, rng, 3, 6, 5, 4)
    seed_a, seed_b = tf.constant([1, 2], tf.int64), tf.constant([1, 3], tf.int64)
    inference = run(dropped, x, states, training=False, seed=seed_a)
    for a, b in zip(inference, run(plain, x, states, training=True, seed=seed_a)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(run(dropped, x, states, training=True)[0], inference[0])  # no seed: no mask
    train_a = run(dropped, x, states, training=True, seed=seed_a)
    assert np.abs(train_a[0] - inference[0]).max() > 1e-2
    # The mask is a pure function of (seed, salt): the same seed again gives it
    # again, another seed or another layer salt another one.
    np.testing.assert_array_equal(run(dropped, x, states, training=True, seed=seed_a)[0], train_a[0])
    assert np.abs(run(dropped, x, states, training=True, seed=seed_b)[0] - train_a[0]).max() > 1e-2
    twin = cls(4, recurrent_dropout=0.4, dropout_salt=1)
    twin.build((None, None, 5))
    twin.set_weights(dropped.get_weights())
    np.testing.assert_array_equal(run(twin, x, states, training=True, seed=seed_a)[0], train_a[0])
    other = cls(4, recurrent_dropout=0.4, dropout_salt=2)
    other.build((None, None, 5))
    other.set_weights(dropped.get_weights())
    assert np.abs(run(other, x, states, training=True, seed=seed_a)[0] - train_a[0]).max() > 1e-2


@pytest.mark.parametrize("cls", LAYERS)
def test_recurrent_dropout_mask_is_constant_over_time(cls):
    """The training output is reproduced by the reference with ONE mask per sequence.

    With 3 units and rate 0.5 each row's mask is one of 8 vectors in
    {0, 2}^3. For every row exactly one of them, held fixed over all 6 steps,
    must reproduce the layer's whole output sequence; a mask redrawn per step
    (or unscaled, or applied to the carried state) would match none.
    """
    rate, units, batch, steps = 0.5, 3, 16, 6
    rng = np.random.default_rng(9)
    layer = make_layer(cls, units, 4, rng, dtype="float64", recurrent_dropout=rate)
    x, states = random_inputs(cls, rng, batch, steps, 4, units)
    weights = get_weights64(layer)
    out = run(layer, x, states, training=True, dtype="float64", seed=tf.constant([5, 0], tf.int64))
    candidates = [np.array(m, np.float64) / (1 - rate) for m in itertools.product([0, 1], repeat=units)]
    found = []
    for b in range(batch):
        xb, sb = x[b:b + 1], [s[b:b + 1] for s in states]
        matches = [
            m for m in candidates
            if np.allclose(REFERENCES[cls](xb, sb, weights, mask=m)[0], out[0][b:b + 1], atol=1e-10)
        ]
        assert len(matches) == 1, f"row {b}: {len(matches)} constant masks reproduce the output"
        found.append(matches[0])
    found = np.stack(found)
    assert 0.2 < (found == 0).mean() < 0.8  # dropout really dropped, at about the rate
    assert len({m.tobytes() for m in found}) > 1  # masks differ across the batch


# ----------------------------------------------------------------------------
# Mixed precision
# ----------------------------------------------------------------------------


def layer_mixed_precision_errors(cls, policy: str) -> dict:
    """Runs a layer in ``policy`` and in float32 from the same weights and inputs.

    Returns:
        ``max`` and ``mean`` absolute error over the outputs and states.
    """
    rng = np.random.default_rng(10)
    ref_layer = make_layer(cls, 16, 8, rng)
    # Recurrent kernel with spectral norm 0.9: a contracting recurrence, so the
    # comparison measures this layer's rounding, not a chaotic random net's
    # exponential amplification of it (the vanilla RNN with the default random
    # weights of these tests has gain ~2.4 per step).
    weights = ref_layer.get_weights()
    weights[1] *= 0.9 / np.linalg.norm(weights[1], 2)
    ref_layer.set_weights(weights)
    x, states = random_inputs(cls, rng, 4, 12, 8, 16)
    want = run(ref_layer, x, states)
    keras.mixed_precision.set_global_policy(policy)
    try:
        layer = cls(16)
        layer.build((None, None, 8))
        layer.set_weights(ref_layer.get_weights())
        compute = policy.split("_")[1]
        assert layer.compute_dtype == compute
        assert all(v.dtype == "float32" for v in layer.weights)
        with tf.GradientTape() as tape:
            out = layer(tf.constant(x, tf.float32), initial_state=[tf.constant(s, tf.float32) for s in states],
                        training=True)
            loss = tf.reduce_sum(tf.cast(out[0], tf.float32) ** 2)
        assert all(o.dtype == compute for o in out)
        grads = tape.gradient(loss, layer.trainable_weights)
        assert all(g.dtype == tf.float32 and np.isfinite(g.numpy()).all() for g in grads)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    errors = [np.abs(tf.cast(got, tf.float32).numpy() - ref) for got, ref in zip(out, want)]
    return {"max": max(float(e.max()) for e in errors), "mean": max(float(e.mean()) for e in errors)}


# Worst error over the three layers, measured with tests/equivalence.py
# --mixed (oneDNN default and oneDNN off; the AVX2 and AVX512_CORE limits crash
# TensorFlow's mixed-precision ops on the development machine). Inputs, weights
# and every op's result are rounded to 8 (bfloat16) or 11 (float16)
# significand bits (2^-9 ~ 2e-3, 2^-12 ~ 2.4e-4 relative per op); the largest
# errors sit on the LSTM cell state, whose values are O(1) to O(3). The bounds
# are 3x.
LAYER_MIXED_MEASURED = {"mixed_bfloat16": {"max": 0.0183, "mean": 0.0029},
                        "mixed_float16": {"max": 0.00187, "mean": 0.000318}}
LAYER_MIXED_MARGIN = 3.0


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
@pytest.mark.parametrize("cls", LAYERS)
def test_mixed_precision(cls, policy):
    errors = layer_mixed_precision_errors(cls, policy)
    for key, measured in LAYER_MIXED_MEASURED[policy].items():
        assert errors[key] <= LAYER_MIXED_MARGIN * measured, (key, errors)
