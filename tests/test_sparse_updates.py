"""Row-sparse updates (dist_rnn.training.sparse_updates) equal the dense updates they replace.

Each comparison trains the same model from the same weights on real text
(tiny-shakespeare characters) for a few clipped steps twice, row-sparse and
forced dense, and compares weights and gradient norms. The 2-replica mirrored
comparison runs in a fresh interpreter (``python tests/test_sparse_updates.py
DATA``), since logical CPU devices must exist before TensorFlow initializes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
BATCH, STEPS, WINDOWS = 8, 10, 3
CLIP = 0.05  # below every step's gradient norm (about 0.3): the clip scales each update
OUTPUTS = {
    "softmax": {},
    "sampled": {"output": "sampled", "num_sampled": 20},
    "sampled_tied": {"output": "sampled", "num_sampled": 20, "tie_embeddings": True},
}
ROW_SPARSE = {
    "softmax": ["embedding/embeddings"],
    "sampled": ["embedding/embeddings", "projection/kernel", "projection/bias"],
    "sampled_tied": ["embedding/embeddings", "projection/bias"],
}


def windows(data: Path):
    """``WINDOWS`` (inputs, targets) pairs of ``[BATCH, STEPS]`` character ids, and the vocabulary size."""
    text = data.read_text(encoding="utf-8")
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text[:BATCH * WINDOWS * STEPS + 1]], np.int32)
    rows = [ids[i * WINDOWS * STEPS:(i + 1) * WINDOWS * STEPS + 1] for i in range(BATCH)]
    pairs = [(np.stack([r[w * STEPS:(w + 1) * STEPS] for r in rows]),
              np.stack([r[w * STEPS + 1:(w + 1) * STEPS + 1] for r in rows])) for w in range(WINDOWS)]
    return pairs, len(chars)


def train(backend, data: Path, output: str, optimizer: str, sparse: bool | None, accumulate_steps: int = 1):
    """Trains ``WINDOWS`` clipped steps; returns (weights by path: every replica's copy, grad norms, StepFunctions)."""
    import keras
    import tensorflow as tf

    from dist_rnn.config import ModelConfig, OptimizerConfig
    from dist_rnn.models.model import build_model
    from dist_rnn.training.optimizers import build_optimizer
    from dist_rnn.training.steps import StepFunctions

    pairs, vocab = windows(data)
    with backend.scope():
        model = build_model(ModelConfig(cell="lstm", num_layers=1, hidden_size=16, embedding_size=16,
                                        **OUTPUTS[output]), vocab, seed=5)
        opt = build_optimizer(OptimizerConfig(name=optimizer, learning_rate=0.5, clip_norm=CLIP))
        opt.build(model.trainable_variables)
    steps = StepFunctions(model, opt, backend, BATCH, STEPS, CLIP, sparse_updates=sparse,
                          accumulate_steps=accumulate_steps)
    states = backend.shard(model.initial_state(BATCH))
    norms = []
    for i, (inputs, targets) in enumerate(pairs):
        x, y = backend.shard((tf.constant(inputs), tf.constant(targets)))
        _, states, norm, finite = steps.train_step(x, y, states, tf.constant([0, i], tf.int64))
        assert bool(finite)
        norms.append(float(norm))

    def copies(variable):
        inner = variable.value if isinstance(variable, keras.Variable) else variable
        return [np.asarray(v) for v in getattr(inner, "values", (inner,))]

    weights = {v.path.split("/", 1)[1]: copies(v) for v in model.trainable_variables}
    return weights, norms, steps


def assert_same_training(sparse_run, dense_run):
    """Same gradient norms and weights (every replica's copy) up to float32 rounding."""
    (sparse_weights, sparse_norms, _), (dense_weights, dense_norms, _) = sparse_run, dense_run
    assert min(dense_norms) > CLIP, dense_norms  # the clip is active
    np.testing.assert_allclose(sparse_norms, dense_norms, rtol=1e-6)
    assert sparse_weights.keys() == dense_weights.keys()
    for name, copies in sparse_weights.items():
        reference = dense_weights[name][0]
        for copy in copies:
            np.testing.assert_allclose(copy, reference, rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
@pytest.mark.parametrize("output", sorted(OUTPUTS))
def test_row_sparse_training_equals_dense_on_one_device(shakespeare_slice, output, optimizer):
    from dist_rnn.distribution import Backend

    sparse = train(Backend(), shakespeare_slice, output, optimizer, None)
    assert sparse[2].sparse_rule == optimizer
    assert [name.split("/", 1)[1] for name in sparse[2].sparse_variables] == ROW_SPARSE[output]
    dense = train(Backend(), shakespeare_slice, output, optimizer, False)
    assert dense[2].sparse_rule is None and not dense[2].sparse_variables
    assert_same_training(sparse, dense)


def test_row_sparse_training_with_accumulated_blocks_equals_dense(shakespeare_slice):
    from dist_rnn.distribution import Backend

    # Two blocks' slices are concatenated before the all-reduce and combined after it.
    sparse = train(Backend(), shakespeare_slice, "sampled", "adagrad", None, accumulate_steps=2)
    dense = train(Backend(), shakespeare_slice, "sampled", "adagrad", False, accumulate_steps=2)
    assert_same_training(sparse, dense)


def test_gradient_norm_counts_each_row_once_when_tokens_repeat(shakespeare_slice):
    from dist_rnn.distribution import Backend

    # Every window repeats characters (and the sampled candidates repeat ids):
    # the embedding's slices hold the same row several times. The norm of the
    # parts (sqrt(3^2 + 4^2) = 5 for one row split 3 + 4) is not the norm of
    # the row (7); the step combines repeated rows before the norm.
    pairs, _ = windows(shakespeare_slice)
    assert all(len(np.unique(x)) < x.size / 2 for x, _ in pairs)
    sparse = train(Backend(), shakespeare_slice, "softmax", "sgd", None)
    dense = train(Backend(), shakespeare_slice, "softmax", "sgd", False)
    np.testing.assert_allclose(sparse[1], dense[1], rtol=1e-6)


def test_combine_duplicates_sums_repeated_rows():
    import tensorflow as tf

    from dist_rnn.training.gradients import global_norm
    from dist_rnn.training.sparse_updates import combine_duplicates

    slices = tf.IndexedSlices(tf.constant([[3.0, 0.0], [1.0, 1.0], [4.0, 0.0]]), tf.constant([2, 0, 2]),
                              tf.constant([4, 2]))
    combined = combine_duplicates(slices)
    assert combined.indices.numpy().tolist() == [2, 0]
    assert combined.values.numpy().tolist() == [[7.0, 0.0], [1.0, 1.0]]
    np.testing.assert_array_equal(tf.convert_to_tensor(combined), tf.convert_to_tensor(slices))
    assert float(global_norm([combined])) == pytest.approx(np.sqrt(51.0))
    assert float(global_norm([slices])) == pytest.approx(np.sqrt(27.0))  # what the norm was without combining


@pytest.mark.parametrize("config,exact", [
    ({"name": "sgd"}, "sgd"), ({"name": "ntasgd"}, "sgd"), ({"name": "adagrad"}, "adagrad"),
    ({"name": "sgd", "momentum": 0.9}, None), ({"name": "adam"}, None), ({"name": "rmsprop"}, None),
    ({"name": "adamw", "weight_decay": 0.01}, None),
])
def test_sparse_updates_only_where_zero_gradient_rows_stay_put(config, exact):
    from dist_rnn.config import OptimizerConfig
    from dist_rnn.training.optimizers import build_optimizer
    from dist_rnn.training.sparse_updates import sparse_update_rule

    optimizer = build_optimizer(OptimizerConfig(**config))
    assert sparse_update_rule(optimizer, 0.0) == exact
    # AWD's L2 decay adds decay * w to every row's gradient.
    assert sparse_update_rule(optimizer, 1.2e-6) is None


def test_two_replica_mirrored_row_sparse_training_equals_dense_one_device(shakespeare_slice):
    proc = subprocess.run([sys.executable, str(Path(__file__)), str(shakespeare_slice)], cwd=TESTS.parent,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    checked = [line for line in proc.stdout.splitlines() if line.startswith("checked: ")]
    assert checked == [f"checked: mirrored x2 {output} {optimizer}" for output in ("softmax", "sampled")
                       for optimizer in ("sgd", "adagrad")], proc.stdout


def main(data: str) -> None:
    sys.path.insert(0, str(TESTS))
    from dist_rnn.config import DistributeConfig
    from dist_rnn.distribution import Backend, MirroredBackend, configure_devices

    configure_devices(DistributeConfig(backend="mirrored", cpu_devices=2))
    mirrored = MirroredBackend(cpu_devices=2)
    for output in ("softmax", "sampled"):
        for optimizer in ("sgd", "adagrad"):
            sparse = train(mirrored, Path(data), output, optimizer, None)
            assert [n.split("/", 1)[1] for n in sparse[2].sparse_variables] == ROW_SPARSE[output]
            assert_same_training(sparse, train(Backend(), Path(data), output, optimizer, False))
            print(f"checked: mirrored x2 {output} {optimizer}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
