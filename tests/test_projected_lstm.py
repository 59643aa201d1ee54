"""The projected LSTM (model.projection_size): fused recurrence and hand-written backward vs plain ops."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dist_rnn.models.projected_lstm import ProjectedLSTM

UNITS, PROJ, FEATURES, BATCH, STEPS = 7, 3, 5, 4, 6


def reference(layer, x, h0, c0, mask=None):
    """Plain-op LSTMP, unrolled: Keras gate order (i, f, c, o), h = (o * tanh(c)) @ P."""
    kernel, rkernel, bias, pkernel = (tf.convert_to_tensor(v) for v in
                                      (layer.kernel, layer.recurrent_kernel, layer.bias, layer.projection_kernel))
    h, c, outputs = h0, c0, []
    for t in range(x.shape[1]):
        hm = h if mask is None else h * mask
        z = x[:, t] @ kernel + hm @ rkernel + bias
        i, f, g, o = tf.split(z, 4, axis=-1)
        c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
        h = (tf.sigmoid(o) * tf.tanh(c)) @ pkernel
        outputs.append(h)
    return tf.stack(outputs, axis=1), h, c


@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_forward_and_gradients_match_an_unrolled_plain_op_lstmp(dropout):
    layer = ProjectedLSTM(UNITS, PROJ, recurrent_dropout=dropout, dtype="float64",
                          kernel_initializer=tf.keras.initializers.RandomNormal(seed=1),
                          bias_initializer=tf.keras.initializers.RandomNormal(seed=2), dropout_salt=5)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(BATCH, STEPS, FEATURES)))
    h0 = tf.constant(rng.normal(size=(BATCH, PROJ)))
    c0 = tf.constant(rng.normal(size=(BATCH, UNITS)))
    layer.build(x.shape)
    seed = tf.constant([3, 4])
    # Loss weights on every output, so every output gradient enters the backward pass.
    w_seq = tf.constant(rng.normal(size=(BATCH, STEPS, PROJ)))
    w_h, w_c = tf.constant(rng.normal(size=(BATCH, PROJ))), tf.constant(rng.normal(size=(BATCH, UNITS)))

    def loss(outputs):
        seq, h, c = outputs
        return tf.reduce_sum(seq * w_seq) + tf.reduce_sum(h * w_h) + tf.reduce_sum(tf.sin(c) * w_c)

    sources = [x, h0, c0] + layer.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, h0, c0])
        fused = layer(x, initial_state=[h0, c0], training=True, seed=seed)
        if dropout:
            from dist_rnn.models.dropout import recurrent_dropout_mask

            mask = recurrent_dropout_mask(dropout, PROJ, BATCH, tf.float64, seed, 5)
            assert 0 < float(tf.reduce_mean(tf.cast(mask == 0, tf.float32))) < 1
        else:
            mask = None
        plain = reference(layer, x, h0, c0, mask)
        fused_loss, plain_loss = loss(fused), loss(plain)
    assert fused[0].shape == (BATCH, STEPS, PROJ) and fused[2].shape == (BATCH, UNITS)
    for a, b in zip(fused, plain):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12)
    fused_grads = tape.gradient(fused_loss, sources)
    plain_grads = tape.gradient(plain_loss, sources)
    assert len(layer.trainable_variables) == 4
    for var_name, a, b in zip(["x", "h0", "c0"] + [v.name for v in layer.trainable_variables],
                              fused_grads, plain_grads):
        assert float(tf.reduce_max(tf.abs(b))) > 0, var_name
        np.testing.assert_allclose(tf.convert_to_tensor(a).numpy(), tf.convert_to_tensor(b).numpy(),
                                   rtol=1e-9, atol=1e-11, err_msg=var_name)


def test_model_with_projection_carries_a_narrow_h_and_reports_its_kernel():
    from dist_rnn.config import ModelConfig
    from dist_rnn.models.model import build_model, kernel_report

    config = ModelConfig(cell="lstm", num_layers=2, hidden_size=16, embedding_size=8, projection_size=6,
                         tie_embeddings=True)
    model = build_model(config, 30, seed=0)
    assert model.state_sizes == [6, 16, 6, 16]
    logits, states = model(tf.zeros([2, 3], tf.int32))
    assert logits.shape == (2, 3, 30) and [s.shape[-1] for s in states] == [6, 16, 6, 16]
    assert tuple(model.recurrent_layers[1].kernel.shape) == (6, 64)  # layer 1 reads the projected h
    # Tied through a projection from the projected h (6) to the embedding (8).
    assert tuple(model.projection.tie_projection.shape) == (6, 8)
    lines = [k.line() for k in kernel_report(config, gpu_visible=True)]
    assert all("dist-rnn fused recurrence (projected LSTM: Keras' LSTM exposes no cuDNN projection)" in line
               for line in lines), lines
