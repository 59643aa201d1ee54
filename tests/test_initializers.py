"""Weight initialization: every variable draws its own values, determined by the seed."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

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
