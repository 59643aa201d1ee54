"""Weights of a model built for cuDNN load into the ``model.cudnn: off`` build and compute the same function.

No GPU exists here, so the cuDNN side is checked in two parts: with a GPU
faked visible, the ``auto`` layers decline dist-rnn's fused path (on a GPU
Keras would run cuDNN), and the reference outputs come from Keras' own generic
kernel on those weights (the function cuDNN computes, by Keras' contract).
The restored ``off`` build runs dist-rnn's fused recurrence: two different
kernels, not one kernel compared with itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dist_rnn.models import keras_rnn
from dist_rnn.config import ModelConfig
from dist_rnn.models.model import build_model

TOKENS = tf.constant(np.random.default_rng(0).integers(0, 40, size=(3, 7)), tf.int32)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cudnn_build_weights_run_in_the_off_build_with_keras_generic_outputs(cell, tmp_path, monkeypatch):
    size = dict(cell=cell, num_layers=2, hidden_size=24, embedding_size=8)
    source = build_model(ModelConfig(**size), 40, seed=1)
    real_devices = tf.config.list_logical_devices
    with monkeypatch.context() as fake_gpu:
        fake_gpu.setattr(tf.config, "list_logical_devices",
                         lambda kind=None: [tf.config.LogicalDevice("/device:GPU:0", "GPU")] if kind == "GPU"
                         else real_devices(kind))
        assert [layer._fused_eligible(None) for layer in source.recurrent_layers] == [False, False]
    with monkeypatch.context() as generic:
        generic.setattr(keras_rnn._FusedFallback, "_fused_eligible", lambda self, mask: False)
        reference_logits, reference_states = source(TOKENS)
    path = tf.train.Checkpoint(model=source).save(str(tmp_path / "ckpt"))

    off = build_model(ModelConfig(**size, cudnn="off"), 40, seed=2)
    assert not np.allclose(off.recurrent_layers[0].get_weights()[0], source.recurrent_layers[0].get_weights()[0])
    tf.train.Checkpoint(model=off).restore(path).assert_existing_objects_matched()
    assert all(layer._fused_eligible(None) for layer in off.recurrent_layers)  # dist-rnn's fused kernel runs
    logits, states = off(TOKENS)
    np.testing.assert_allclose(logits.numpy(), reference_logits.numpy(), atol=1e-5)
    for a, b in zip(states, reference_states):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
