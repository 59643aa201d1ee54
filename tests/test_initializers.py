"""Weight initialization: every variable draws its own values, determined by the seed."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli, tiny_config
from dist_rnn.config import ModelConfig
from dist_rnn.models.model import build_model

VOCAB = 50
# Embedding, kernels and projection all 16 wide, so layers' matrices have equal shapes: a shared
# seeded initializer would then hand them identical values.
SIZES = dict(num_layers=2, hidden_size=16, embedding_size=16)


def random_weights(model, init_scale):
    """``{path: values}`` of the variables drawn from a random initializer.

    Left out: layer-norm gains/shifts (ones/zeros), the output bias (zeros) and, without
    ``init_scale``, the recurrent biases (zeros, forget-gate ones).
    """
    out = {}
    for v in model.trainable_variables:
        name = v.path
        last = name.rsplit("/", 1)[-1]
        if name.endswith("projection/bias") or last.endswith(("_gamma", "_beta")):
            continue
        if init_scale is None and last == "bias":
            continue
        out[name] = v.numpy().ravel()
    return out


@pytest.mark.parametrize("cell", ["lstm", "gru", "ln_lstm", "ln_gru", "rnn"])
@pytest.mark.parametrize("init_scale", [None, 0.1])
def test_no_two_weights_share_values(cell, init_scale):
    model = build_model(ModelConfig(cell=cell, init_scale=init_scale, **SIZES), VOCAB, seed=3)
    weights = random_weights(model, init_scale)
    assert len(weights) >= 6  # embedding, 2 x (kernel, recurrent kernel), projection kernel
    for (a_name, a), (b_name, b) in itertools.combinations(weights.items(), 2):
        n = min(a.size, b.size)
        # Any stretch of equal values (same prefix, same sequence) shows a shared stream.
        assert np.mean(a[:n] == b[:n]) < 0.01, (a_name, b_name)
        assert np.intersect1d(a, b).size < 0.01 * n, (a_name, b_name)
    if init_scale:
        for name, values in weights.items():
            assert np.abs(values).max() <= init_scale, name
            assert values.std() > init_scale / 3, name  # uniform in [-s, s]: std s / sqrt(3)


@pytest.mark.parametrize("init_scale", [None, 0.1])
def test_same_seed_same_weights_other_seed_other_weights(init_scale):
    config = ModelConfig(cell="lstm", init_scale=init_scale, **SIZES)
    first = build_model(config, VOCAB, seed=7)
    again = build_model(config, VOCAB, seed=7)
    other = build_model(config, VOCAB, seed=8)
    for a, b, c in zip(first.trainable_variables, again.trainable_variables, other.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    for name, values in random_weights(first, init_scale).items():
        assert not np.any(values == random_weights(other, init_scale)[name]), name


# ------------------------------------------------------------ model.initializer: unit_scaling
# The pre-1.0 tf.get_variable default: uniform in +-sqrt(3 / fan_in), fan_in = the matrix's rows.
# Embedding 12 and hidden 20 differ so that layer 0 (fan_in 12 + 20) and layer 1 (20 + 20) differ.
UNIT = dict(num_layers=2, hidden_size=20, embedding_size=12, initializer="unit_scaling")


def unit_scaling_fan_ins(cell: str) -> dict[str, int]:
    """``{variable path suffix: fan_in}`` of the weights unit_scaling draws, for ``UNIT`` and ``VOCAB``."""
    cell_prefix = {"lstm": "lstm_cell/", "gru": "gru_cell/"}.get(cell, "")
    fans = {"embedding/embeddings": VOCAB, "projection/kernel": 20}
    for layer, fan_in in ((0, 12 + 20), (1, 20 + 20)):
        for kernel in ("kernel", "recurrent_kernel"):  # the two row blocks of one [input, state] matrix
            fans[f"{cell}_{layer}/{cell_prefix}{kernel}"] = fan_in
    return fans


@pytest.mark.parametrize("cell", ["lstm", "gru", "ln_lstm", "ln_gru", "rnn"])
def test_unit_scaling_draws_each_matrix_within_its_fan_in_bound(cell):
    model = build_model(ModelConfig(cell=cell, **UNIT), VOCAB, seed=5)
    variables = {v.path: v.numpy() for v in model.trainable_variables}
    fans = unit_scaling_fan_ins(cell)
    drawn = {}
    for suffix, fan_in in fans.items():
        (path,) = [p for p in variables if p.endswith(suffix)]
        values, limit = variables[path].ravel(), np.sqrt(3.0 / fan_in)
        assert np.abs(values).max() <= limit, path
        assert np.abs(values).max() > 0.97 * limit, path        # fills the range: not a narrower default
        assert values.std() == pytest.approx(limit / np.sqrt(3.0), rel=0.1), path  # uniform: std = limit / sqrt(3)
        drawn[path] = values
    # The embedding 0.215-wide for 65 symbols is what the tutorial's code started with.
    assert np.sqrt(3.0 / 65) == pytest.approx(0.215, abs=5e-4)
    # Every weight its own stream: no two share a stretch of values (a shared seeded initializer would).
    for (a_name, a), (b_name, b) in itertools.combinations(drawn.items(), 2):
        n = min(a.size, b.size)
        assert np.mean(a[:n] == b[:n]) < 0.01, (a_name, b_name)
        assert np.mean(np.abs(a[:n]) / np.abs(a).max() == np.abs(b[:n]) / np.abs(b).max()) < 0.01, (a_name, b_name)


def test_unit_scaling_gru_gate_biases_start_at_one():
    gru = build_model(ModelConfig(cell="gru", **UNIT), VOCAB, seed=5)
    for layer in gru.recurrent_layers:
        bias = layer.cell.bias.numpy()  # (2, 3U) z r h: input row, recurrent row; the gates add both
        np.testing.assert_array_equal(bias[0], [1.0] * 40 + [0.0] * 20)
        np.testing.assert_array_equal(bias[1], np.zeros(60))
    ln_gru = build_model(ModelConfig(cell="ln_gru", **UNIT), VOCAB, seed=5)
    for layer in ln_gru.recurrent_layers:
        np.testing.assert_array_equal(layer.gate_beta.numpy(), np.ones(40))      # z, r shifts
        np.testing.assert_array_equal(layer.candidate_beta.numpy(), np.zeros(20))
    # The other cells' biases keep their starts: zeros, LSTM forget gate 1.
    lstm = build_model(ModelConfig(cell="lstm", **UNIT), VOCAB, seed=5)
    np.testing.assert_array_equal(lstm.recurrent_layers[0].cell.bias.numpy(), [0.0] * 20 + [1.0] * 20 + [0.0] * 40)  # i f c o


def test_unit_scaling_gru_gate_bias_acts_on_the_fused_recurrence():
    # With zero weights the z gate is sigmoid(bias): a bias of 1 keeps sigmoid(1) = 0.731 of the old state.
    import tensorflow as tf

    model = build_model(ModelConfig(cell="gru", num_layers=1, hidden_size=4, embedding_size=3,
                                    initializer="unit_scaling"), VOCAB, seed=0)
    layer = model.recurrent_layers[0]
    layer.cell.kernel.assign(tf.zeros_like(layer.cell.kernel))
    layer.cell.recurrent_kernel.assign(tf.zeros_like(layer.cell.recurrent_kernel))
    h0 = tf.fill([2, 4], 0.5)
    _, h1 = layer(tf.zeros([2, 1, 3]), initial_state=[h0])
    # candidate tanh(0) = 0, so h1 = z * h0.
    np.testing.assert_allclose(h1.numpy(), 0.5 / (1.0 + np.exp(-1.0)), rtol=1e-6)


@pytest.mark.parametrize("cell", ["lstm", "gru", "ln_lstm", "ln_gru", "rnn"])
def test_keras_initializer_is_the_default(cell):
    default = build_model(ModelConfig(cell=cell, **SIZES), VOCAB, seed=2)
    explicit = build_model(ModelConfig(cell=cell, initializer="keras", **SIZES), VOCAB, seed=2)
    for a, b in zip(default.trainable_variables, explicit.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    # Keras' embedding default, +-0.05, not unit scaling's +-sqrt(3 / 50) = 0.245.
    assert np.abs(default.embedding.embeddings.numpy()).max() <= 0.05


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_unit_scaling_keeps_cudnn_where_a_gpu_would_run_it(cell, shakespeare_slice, tmp_path):
    from test_gpu_paths import faked_gpu, first_batch, make_trainer, op_types, train_step_graph

    config = tiny_config(shakespeare_slice, model={"cell": cell, "initializer": "unit_scaling"})
    with faked_gpu():
        trainer = make_trainer(config, tmp_path / "run")
        graph = train_step_graph(trainer, first_batch(trainer))
    assert "CudnnRNNV3" in op_types(graph)
    assert all(k.fused for k in trainer.kernels)


@pytest.mark.parametrize("cell", ["gru", "ln_lstm"])
def test_unit_scaling_trains_through_the_cli_on_the_fused_cpu_path(cell, shakespeare_slice, tmp_path, capsys):
    import json
    import math

    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  corpus: file\n  path: {shakespeare_slice}\n", encoding="utf-8")
    settings = [f"model.cell={cell}", "model.initializer=unit_scaling", "model.num_layers=2", "model.hidden_size=32",
                "model.embedding_size=16", "optimizer.learning_rate=0.01", "train.batch_size=8",
                "train.num_steps=20", "train.max_steps=30", "train.log_every=5", "train.sample_length=0",
                "checkpoint.every_steps=0", "logging.progress=off", "logging.tensorboard=false"]
    code, out, err = run_cli(["train", config, "--run-dir", tmp_path / "run", *sum((["--set", s] for s in settings), [])],
                             capsys)
    assert code == 0, err
    assert "kernel: dist-rnn fused recurrence" in out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("split") == "train"]
    vocab = len(json.loads((tmp_path / "run" / "vocab.json").read_text(encoding="utf-8"))["tokens"])
    assert abs(losses[0] - math.log(vocab)) < 0.3      # starts near uniform guessing
    assert losses[-1] < losses[0] - 0.5                # and learns


def test_bad_initializer_is_a_one_line_cli_error(shakespeare_slice, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  corpus: file\n  path: {shakespeare_slice}\n", encoding="utf-8")
    line = assert_one_line_error(*run_cli(["train", config, "--run-dir", tmp_path / "run",
                                           "--set", "model.initializer=unit-scaling"], capsys))
    assert "config key 'model.initializer'" in line and "unit_scaling" in line
    assert not (tmp_path / "run").exists()
