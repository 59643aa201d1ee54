"""The language model: weights shared across kernels, tying, dropout, state dtypes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from dist_rnn.config import ModelConfig
from dist_rnn.models.model import build_model
from dist_rnn.runtime import set_precision

TOKENS = tf.constant(np.random.default_rng(0).integers(0, 40, size=(3, 7)), tf.int32)


def test_state_threading_equals_one_long_call():
    model = build_model(ModelConfig(cell="lstm", num_layers=2, hidden_size=16, embedding_size=8), 40, seed=0)
    full_logits, full_states = model(TOKENS)
    first, states = model(TOKENS[:, :4])
    second, states = model(TOKENS[:, 4:], states)
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), full_logits.numpy(), atol=1e-5)
    for a, b in zip(states, full_states):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    assert len(full_states) == 4  # (h, c) per LSTM layer


def test_tied_embeddings_share_one_matrix():
    model = build_model(ModelConfig(cell="gru", num_layers=1, hidden_size=16, embedding_size=16, tie_embeddings=True),
                        40, seed=0)
    names = [v.path for v in model.trainable_variables]
    assert not any("projection/kernel" in n for n in names)
    logits, _ = model(TOKENS)
    assert logits.shape == (3, 7, 40)
    with tf.GradientTape() as tape:
        logits, _ = model(TOKENS)
        loss = tf.reduce_mean(logits)
    grad = tape.gradient(loss, model.embedding.embeddings)
    # The embedding gets gradient from the output side too: every row, not only the 7 input tokens' rows.
    assert np.count_nonzero(np.abs(tf.convert_to_tensor(grad).numpy()).sum(axis=1)) == 40


def test_dropout_is_a_pure_function_of_the_seed_and_only_in_training():
    model = build_model(ModelConfig(cell="lstm", num_layers=2, hidden_size=16, embedding_size=8, dropout=0.5),
                        40, seed=0)
    seed_a, seed_b = tf.constant([1, 2], tf.int64), tf.constant([1, 3], tf.int64)
    a1, _ = model(TOKENS, training=True, seed=seed_a)
    a2, _ = model(TOKENS, training=True, seed=seed_a)
    b, _ = model(TOKENS, training=True, seed=seed_b)
    eval1, _ = model(TOKENS, training=False, seed=seed_a)
    eval2, _ = model(TOKENS)
    np.testing.assert_array_equal(a1.numpy(), a2.numpy())
    assert np.abs(a1.numpy() - b.numpy()).max() > 1e-3
    np.testing.assert_array_equal(eval1.numpy(), eval2.numpy())
    assert np.abs(a1.numpy() - eval1.numpy()).max() > 1e-3


def test_mixed_precision_keeps_float32_logits_state_and_variables():
    try:
        set_precision("mixed_bfloat16")
        model = build_model(ModelConfig(cell="lstm", num_layers=2, hidden_size=16, embedding_size=8), 40, seed=0)
        logits, states = model(TOKENS)
        assert logits.dtype == tf.float32
        assert all(s.dtype == tf.float32 for s in states)
        assert {v.dtype for v in model.trainable_variables} == {"float32"}
        assert model.recurrent_layers[0].compute_dtype == "bfloat16"
    finally:
        set_precision("float32")


def test_checkpoint_of_the_model_alone_holds_every_weight(tmp_path):
    model = build_model(ModelConfig(cell="lstm", num_layers=3, hidden_size=8, embedding_size=4), 20, seed=0)
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    saved = {name for name, _ in tf.train.list_variables(path) if name.startswith("model/")}
    assert len(saved) == len(model.trainable_variables) == 1 + 3 * 3 + 2


def test_dropout_mask_of_a_row_does_not_depend_on_the_replica_layout():
    model = build_model(ModelConfig(cell="lstm", num_layers=1, hidden_size=16, embedding_size=8, dropout=0.5),
                        40, seed=0)
    tokens = tf.constant(np.random.default_rng(1).integers(0, 40, size=(4, 6)), tf.int32)
    seed = tf.constant([3, 7], tf.int64)
    whole, _ = model(tokens, training=True, seed=seed, rows=tf.constant([0, 4]))
    halves = [model(tokens[r:r + 2], training=True, seed=seed, rows=tf.constant([r, 4]))[0] for r in (0, 2)]
    np.testing.assert_allclose(np.concatenate(halves), whole.numpy(), atol=1e-6)


def test_kernel_report_gives_the_reason_the_custom_layer_class_declares(monkeypatch):
    from dist_rnn.models import LayerNormGRU, kernel_report

    monkeypatch.setattr(LayerNormGRU, "fused_kernel_reason", "reason declared by LayerNormGRU")
    report = kernel_report(ModelConfig(cell="ln_gru", num_layers=2), gpu_visible=True)
    assert [(k.fused, k.reason) for k in report] == [(False, "reason declared by LayerNormGRU")] * 2


# Registered names of the custom Keras classes: saved .keras models name them, so they never change.
REGISTERED_NAMES = {"LanguageModel", "StatelessDropout", "OutputProjection", "LSTM", "GRU", "LayerNormLSTM",
                    "LayerNormGRU", "VanillaRNN"}


def test_importing_the_models_package_registers_every_custom_keras_class():
    # A fresh process: in this one the test modules already imported dist_rnn.models.model.
    code = ("import json, keras, dist_rnn.models\n"
            "print(json.dumps({name: cls.__module__ for name, cls in keras.saving.get_custom_objects().items()}))")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    registered = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {f"dist_rnn>{name}" for name in REGISTERED_NAMES} <= set(registered)
    import dist_rnn.models

    for name in REGISTERED_NAMES - {"StatelessDropout", "OutputProjection"}:
        assert name in dist_rnn.models.__all__ and getattr(dist_rnn.models, name).__name__ == name
