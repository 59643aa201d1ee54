"""Output layers (model.output: softmax, sampled, adaptive): exact numbers on small real weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from dist_rnn.config import ModelConfig
from dist_rnn.models.model import build_model
from dist_rnn.models.outputs.adaptive import AdaptiveSoftmax, cluster_dims
from dist_rnn.models.outputs.chunks import chunked_token_nll
from dist_rnn.models.outputs.sampled import (SampledSoftmax, draw_candidates, log_uniform_log_probs,
                                             sampled_token_nll)

VOCAB = 60
SIZES = dict(cell="lstm", num_layers=1, hidden_size=12, embedding_size=8)


def tokens(shape, seed=0, vocab=VOCAB):
    return tf.constant(np.random.default_rng(seed).integers(0, vocab, shape), tf.int32)


def model(output="softmax", vocab=VOCAB, **extra):
    extra.setdefault("cutoffs", [10, 25] if output == "adaptive" else [])
    return build_model(ModelConfig(**SIZES, output=output, **extra), vocab, seed=3)


@pytest.mark.parametrize("tie", [False, True])
def test_adaptive_log_probabilities_sum_to_one_over_the_vocabulary(tie):
    m = model("adaptive", tie_embeddings=tie)  # tied: hidden 12 != embedding 8, through tie_projection
    log_probs, _ = m(tokens([3, 7]))
    assert log_probs.shape == (3, 7, VOCAB) and log_probs.dtype == tf.float32
    total = np.exp(log_probs.numpy().astype(np.float64)).sum(axis=-1)
    np.testing.assert_allclose(total, 1.0, atol=2e-6)
    # Not uniform: the weights shape the distribution.
    assert np.ptp(log_probs.numpy()) > 0.1


@pytest.mark.parametrize("training", [False, True])
def test_adaptive_token_loss_is_minus_the_log_probability_of_each_target(training):
    m = model("adaptive", cutoffs=[5, 20, 40])
    x, y = tokens([4, 9], 1), tokens([4, 9], 2)
    log_probs, _ = m(x)
    nll, _ = m(x, targets=y, training=training, seed=tf.constant([1, 2]))
    expected = -tf.gather(log_probs, y, batch_dims=2)
    np.testing.assert_allclose(nll.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    # Targets fall in the head and in every tail cluster.
    assert {int(c) for c in np.searchsorted([5, 20, 40], y.numpy().ravel(), side="right")} == {0, 1, 2, 3}


def test_adaptive_tail_clusters_shrink_by_div_value():
    assert cluster_dims(512, [10, 20, 30], 4.0) == [128, 32, 8]
    assert cluster_dims(12, [10, 20, 30], 4.0) == [3, 1, 1]
    layer = model("adaptive", cutoffs=[10, 25], div_value=2.0).projection
    assert tuple(layer.tail_0_projection.shape) == (12, 6) and tuple(layer.tail_1_projection.shape) == (12, 3)
    assert tuple(layer.tail_1_kernel.shape) == (3, VOCAB - 25)


def test_sampled_softmax_over_every_class_with_unit_counts_equals_the_full_softmax():
    # Every class sampled once, expected counts 1 (log 0): after the target's
    # own accidental hit is removed, the sampled softmax is the full softmax.
    rng = np.random.default_rng(0)
    hidden = tf.constant(rng.normal(size=(30, 6)), tf.float32)
    weights = tf.constant(rng.normal(size=(VOCAB, 6)), tf.float32)
    bias = tf.constant(rng.normal(size=VOCAB), tf.float32)
    targets = tokens([30], 4)
    nll = sampled_token_nll(hidden, targets, lambda ids: tf.gather(weights, ids), bias, tf.range(VOCAB),
                            tf.zeros([VOCAB]), tf.zeros([30]))
    full = tf.nn.sparse_softmax_cross_entropy_with_logits(targets, tf.matmul(hidden, weights, transpose_b=True) + bias)
    np.testing.assert_allclose(nll.numpy(), full.numpy(), rtol=1e-5)


def test_sampled_softmax_matches_a_hand_computation_with_hits_and_corrections():
    hidden = np.array([[1.0, -0.5], [0.2, 0.3]])
    weights = np.array([[0.5, 1.0], [-1.0, 0.25], [2.0, 0.0], [0.1, -0.3]])
    bias = np.array([0.1, -0.2, 0.3, 0.0])
    targets = np.array([2, 1])
    candidates = np.array([0, 2, 2, 3])  # with replacement; row 0 hits twice
    log_counts = np.log([0.9, 0.4, 0.4, 0.2])
    log_targets = np.log([0.4, 0.6])
    expected = []
    for h, t, lt in zip(hidden, targets, log_targets):
        true = h @ weights[t] + bias[t] - lt
        others = [h @ weights[c] + bias[c] - lc for c, lc in zip(candidates, log_counts) if c != t]
        expected.append(np.log(np.exp(true) + np.sum(np.exp(others))) - true)
    got = sampled_token_nll(tf.constant(hidden, tf.float32), tf.constant(targets, tf.int32),
                            lambda ids: tf.gather(tf.constant(weights, tf.float32), ids),
                            tf.constant(bias, tf.float32), tf.constant(candidates, tf.int32),
                            tf.constant(log_counts, tf.float32), tf.constant(log_targets, tf.float32))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


def test_log_uniform_sampler_draws_the_zipfian_distribution_from_the_seed():
    vocab, draws = 50, 200_000
    first = draw_candidates(tf.constant([4, 5]), draws, vocab).numpy()
    assert np.array_equal(first, draw_candidates(tf.constant([4, 5]), draws, vocab).numpy())
    assert not np.array_equal(first, draw_candidates(tf.constant([4, 6]), draws, vocab).numpy())
    p = np.exp(log_uniform_log_probs(tf.range(vocab), vocab).numpy().astype(np.float64))
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(p[0], math.log(2) / math.log(vocab + 1), rtol=1e-6)
    freq = np.bincount(first, minlength=vocab) / draws
    sigma = np.sqrt(p * (1 - p) / draws)
    assert np.all(np.abs(freq - p) < 5 * sigma + 1e-12), np.max(np.abs(freq - p) / sigma)


def test_sampled_output_trains_on_samples_and_evaluates_the_exact_softmax():
    sampled = model("sampled", num_sampled=20)
    softmax = model("softmax")
    # Same weights and checkpoint names as softmax (same seed, same initializers);
    # sampled stores its untied kernel [vocab, width], the softmax's transposed.
    assert [v.path for v in sampled.weights] == [v.path for v in softmax.weights]
    for a, b in zip(sampled.weights, softmax.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy().T if a.path.endswith("projection/kernel") else b.numpy())
    x, y = tokens([2, 5], 5), tokens([2, 5], 6)
    exact, _ = softmax(x, targets=y)
    np.testing.assert_allclose(sampled(x, targets=y)[0].numpy(), exact.numpy(), rtol=1e-5)
    seed = tf.constant([7, 8])
    train_a, _ = sampled(x, targets=y, training=True, seed=seed)
    train_b, _ = sampled(x, targets=y, training=True, seed=seed)
    np.testing.assert_array_equal(train_a.numpy(), train_b.numpy())  # candidates come from the seed
    assert not np.allclose(train_a.numpy(), exact.numpy(), rtol=1e-3)


@pytest.mark.parametrize("output", ["softmax", "sampled", "adaptive"])
def test_tied_output_weights_are_the_embedding_variable(output):
    m = model(output, tie_embeddings=True, num_sampled=20)
    embedding = m.embedding.embeddings
    big = [v for v in m.trainable_variables if VOCAB in v.shape and len(v.shape) == 2]
    assert big == [embedding]  # the only [vocab, *] matrix
    assert sum(v is embedding for v in m.trainable_variables) == 1
    # The output side trains it: a row never fed as input still gets a gradient.
    x, y = tf.fill([2, 4], 3), tf.fill([2, 4], 9)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(m(x, targets=y, training=True, seed=tf.constant([1, 1]))[0])
    grad = tf.convert_to_tensor(tape.gradient(loss, embedding))
    assert float(tf.reduce_max(tf.abs(grad[9]))) > 0


@pytest.mark.parametrize("output", ["sampled", "adaptive"])
def test_output_layers_compute_in_float32_under_mixed_bfloat16(output):
    from dist_rnn.runtime import set_precision

    set_precision("mixed_bfloat16")
    try:
        m = model(output, num_sampled=20)
        layer = m.projection
        assert layer.compute_dtype == "float32" and all(v.dtype == "float32" for v in layer.weights)
        x, y = tokens([2, 5], 5), tokens([2, 5], 6)
        nll, _ = m(x, targets=y, training=True, seed=tf.constant([1, 2]))
        assert nll.dtype == tf.float32
        hidden = tf.cast(tf.random.stateless_normal([2, 5, 12], seed=[1, 1]), tf.bfloat16)
        # Same numbers as the layer fed float32: nothing inside is rounded to bfloat16.
        np.testing.assert_array_equal(layer(hidden).numpy(), layer(tf.cast(hidden, tf.float32)).numpy())
    finally:
        set_precision("float32")


@pytest.mark.parametrize("output", ["softmax", "adaptive"])
def test_evaluation_in_row_slices_equals_the_whole_batch(output):
    m = model(output)
    x, y = tokens([6, 5], 7), tokens([6, 5], 8)
    hidden = tf.random.stateless_normal([6, 5, 12], seed=[3, 4])
    whole = m.projection.exact_token_nll(hidden, y)
    sliced = chunked_token_nll(m.projection.exact_token_nll, hidden, y, VOCAB, budget=2 * 5 * VOCAB)  # 2 rows
    np.testing.assert_allclose(sliced.numpy(), whole.numpy(), rtol=1e-6)
    # The default budget holds this batch in one slice: today's numbers, bit for bit.
    np.testing.assert_array_equal(m.projection(hidden, targets=y).numpy(), whole.numpy())


@pytest.mark.parametrize("output,key,value,vocab", [
    ("sampled", "model.num_sampled", 60, VOCAB),
    ("adaptive", "model.cutoffs", [10, 60], VOCAB),
])
def test_values_beyond_the_vocabulary_are_refused_naming_the_key(output, key, value, vocab):
    from dist_rnn.errors import UserError

    extra = {"num_sampled": value} if key == "model.num_sampled" else {"cutoffs": value}
    with pytest.raises(UserError, match=f"config key '{key}'.*vocabulary size \\({vocab}\\)"):
        model(output, vocab=vocab, **extra)


@pytest.mark.parametrize("cutoffs,ok", [([10, 30], True), ([5], True), ([30, 10], False), ([10, 10], False),
                                        ([0, 10], False), ([-5], False)])
def test_cutoffs_must_be_positive_and_strictly_increasing(cutoffs, ok):
    from dist_rnn.config import load_config
    from dist_rnn.errors import UserError

    overrides = ["model.output=adaptive", f"model.cutoffs={cutoffs}"]
    if ok:
        assert load_config([], overrides).model.cutoffs == cutoffs
    else:
        with pytest.raises(UserError, match="config key 'model.cutoffs': must be positive and strictly increasing"):
            load_config([], overrides)


def test_fingerprint_covers_the_output_keys_only_away_from_their_defaults():
    from dist_rnn.config import LATER_INVARIANT_DEFAULTS, RESUME_INVARIANT_KEYS, flatten, load_config
    from dist_rnn.training.checkpoints import fingerprint, run_fingerprint

    vocab = ["<unk>", "a"]
    default = load_config([], [])
    flat = flatten(default.to_dict())
    before_18 = {k: flat[k] for k in RESUME_INVARIANT_KEYS if k not in LATER_INVARIANT_DEFAULTS}
    # A run at the defaults keeps the fingerprint its checkpoints were written with before #18.
    assert run_fingerprint(default, vocab) == fingerprint(before_18, vocab)
    adaptive = load_config([], ["model.output=adaptive", "model.cutoffs=[1]"])
    projected = load_config([], ["model.projection_size=8"])
    assert len({run_fingerprint(c, vocab) for c in (default, adaptive, projected)}) == 3


def test_sampled_training_of_a_unigram_model_reaches_the_full_softmax_optimum():
    # Logits = bias only: the full-softmax optimum is softmax(bias) = the target distribution p.
    # Sampled training (20 of 50 classes per step, log-uniform candidates, corrected logits)
    # must get there too; p is not the sampler's distribution, so the correction matters.
    vocab, num_sampled = 50, 20
    p = np.exp(-0.5 * np.abs(np.arange(vocab) - 10.0))
    p /= p.sum()
    bias = tf.Variable(tf.zeros([vocab]))
    optimizer = tf.keras.optimizers.Adam(0.05)
    targets_all = tf.constant(np.random.default_rng(0).choice(vocab, size=(400, 256), p=p), tf.int32)

    @tf.function
    def step(i):
        targets = targets_all[i]
        candidates = draw_candidates(tf.stack([i, 1]), num_sampled, vocab)
        log_count = math.log(num_sampled)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(sampled_token_nll(
                tf.zeros([256, 1]), targets, lambda ids: tf.zeros([tf.size(ids), 1]), bias, candidates,
                log_uniform_log_probs(candidates, vocab) + log_count,
                log_uniform_log_probs(targets, vocab) + log_count))
        optimizer.apply([tape.gradient(loss, bias)], [bias])

    def kl():
        q = tf.nn.softmax(bias).numpy().astype(np.float64)
        return float(np.sum(p * np.log(p / q)))

    start = kl()
    for i in range(400):
        step(tf.constant(i))
    # Measured: KL 1.56 at the start, 0.025 after 400 steps (Adam's noise and the finite sample's bias).
    assert kl() < 0.05 < start / 20, (start, kl())


def _training_gradient_graph(m, batch, steps, vocab):
    """The graph (with its nested functions) of one training loss's gradient of ``m``."""
    @tf.function
    def gradient(x, y):
        with tf.GradientTape() as tape:
            losses, _ = m(x, training=True, seed=tf.constant([1, 2]), targets=y)
            loss = tf.reduce_mean(losses)
        grads = tape.gradient(loss, m.trainable_variables)
        assert all(g is not None for g in grads)
        return grads

    spec = tf.TensorSpec([batch, steps], tf.int32)
    return _graph_ops(gradient.get_concrete_function(spec, spec).graph)


def _graph_ops(graph):
    """Every op of ``graph`` and of the functions nested in it."""
    graphs, todo = [], [graph]
    while todo:
        graphs.append(todo.pop())
        todo.extend(f.graph for f in graphs[-1]._functions.values() if hasattr(f, "graph"))
    return [op for g in graphs for op in g.get_operations()]


@pytest.mark.parametrize("output", ["softmax", "sampled", "adaptive"])
def test_training_gradient_builds_no_tensor_larger_than_the_logits_or_a_weight(output):
    # A [B, T, D] x [D, V] matmul broadcasts (BatchMatMul) and builds the
    # kernel's gradient per batch row, [B, D, V] (4 GB at 20 x 512 x 100k).
    batch, steps, vocab = 6, 3, 500
    m = model(output, vocab=vocab, num_sampled=20, cutoffs=[50, 200] if output == "adaptive" else [])
    limit = max(batch * steps * vocab, SIZES["hidden_size"] * vocab, SIZES["embedding_size"] * vocab)
    sizes = {op.name: int(np.prod(t.shape)) for op in _training_gradient_graph(m, batch, steps, vocab)
             for t in op.outputs if t.shape.rank and t.shape.is_fully_defined()}
    assert sizes and max(sizes.values()) <= limit, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


@pytest.fixture
def without_op_determinism():
    """Op determinism off for the test, as it was after.

    An earlier in-process run with ``train.deterministic: true`` leaves it on, and
    then TensorFlow's sparse cross-entropy falls back to log_softmax + gather.
    """
    from tensorflow.python.framework import config as tf_config

    was_on = tf_config.is_op_determinism_enabled()
    tf_config.disable_op_determinism()
    yield
    if was_on:
        tf_config.enable_op_determinism()


@pytest.mark.parametrize("tie", [False, True])
def test_adaptive_training_gradient_keeps_few_token_by_cluster_tensors(tie, without_op_determinism):
    # At 267k words the head's [700, 20003] and the 160k-word cluster's
    # [~90, 160000] tensors are ~56 MB each. log_softmax + gather built seven
    # of each per softmax (logits, +bias, log-softmax, the gather's dense
    # gradient, exp, mul, sub); the fused sparse cross-entropy builds four
    # (logits, +bias, softmax-minus-one-hot, its product with the upstream gradient).
    batch, steps, vocab, cutoffs = 6, 3, 500, [50, 200]
    m = model("adaptive", vocab=vocab, cutoffs=cutoffs, tie_embeddings=tie)
    ops = _training_gradient_graph(m, batch, steps, vocab)
    sizes = {"head": cutoffs[0] + len(cutoffs), "tail 0": cutoffs[1] - cutoffs[0], "tail 1": vocab - cutoffs[1]}
    per_softmax = {name: sorted(f"{op.type} {op.name}" for op in ops for t in op.outputs
                                if t.shape.rank == 2 and t.shape[-1] == size and t.shape[0] in (None, batch * steps))
                   for name, size in sizes.items()}
    assert all(0 < len(names) <= 4 for names in per_softmax.values()), per_softmax
    assert not [op.name for op in ops if op.type == "LogSoftmax"]


def test_sampled_training_gives_the_untied_kernel_a_row_sparse_gradient():
    # Gathering columns of a [D, V] kernel cost a dense [D, V] scatter and
    # transposes (two of each when targets and candidates were gathered
    # apart). The [V, D] kernel's rows are gathered once: its gradient is
    # tf.IndexedSlices, and nothing is scattered into a vocabulary-sized tensor.
    vocab = 500
    m = model("sampled", vocab=vocab, num_sampled=20)
    ops = _training_gradient_graph(m, 6, 3, vocab)
    scatters = [op for op in ops if op.type == "UnsortedSegmentSum"
                and op.outputs[0].shape.as_list()[:1] == [vocab]]
    assert not scatters, [op.name for op in scatters]
    assert tuple(m.projection.kernel.shape) == (vocab, SIZES["hidden_size"])
    # The same initial weights as the full softmax's [D, V] kernel of the same seed, transposed.
    np.testing.assert_array_equal(m.projection.kernel.numpy(), model("softmax", vocab=vocab).projection.kernel.numpy().T)


@pytest.mark.parametrize("sparse", [None, False])
def test_sampled_adagrad_training_step_builds_no_vocabulary_by_width_tensor(sparse):
    # The whole step (forward, backward, all-reduce, norm, clip, Adagrad):
    # row-sparse updates keep the embedding's and the output kernel's
    # gradients, their accumulators and updates to the rows of the step,
    # and read those variables by rows only (a dense read of a scattered
    # variable copies it whole). The dense path (sparse=False) is the control.
    from dist_rnn.config import OptimizerConfig
    from dist_rnn.distribution import Backend
    from dist_rnn.training.optimizers import build_optimizer
    from dist_rnn.training.steps import StepFunctions

    batch, steps, vocab = 6, 3, 2000
    m = model("sampled", vocab=vocab, num_sampled=20)
    optimizer = build_optimizer(OptimizerConfig(name="adagrad", learning_rate=0.1))
    optimizer.build(m.trainable_variables)
    step = StepFunctions(m, optimizer, Backend(), batch, steps, clip_norm=1.0, sparse_updates=sparse)
    spec = tf.TensorSpec([batch, steps], tf.int32)
    states = tuple(tf.TensorSpec([batch, size], tf.float32) for size in m.state_sizes)
    graph = step.compiled_train_step.get_concrete_function(spec, spec, states, tf.TensorSpec([2], tf.int64)).graph
    limit = vocab * min(SIZES["hidden_size"], SIZES["embedding_size"])
    large = {op.name: int(np.prod(t.shape)) for op in _graph_ops(graph) for t in op.outputs
             if t.shape.rank and t.shape.is_fully_defined() and np.prod(t.shape) >= limit}
    if sparse is None:
        assert step.sparse_rule == "adagrad" and not large, sorted(large.items(), key=lambda kv: -kv[1])[:5]
        assert step.sparse_variables == ["language_model/embedding/embeddings", "language_model/projection/kernel",
                                         "language_model/projection/bias"]
    else:
        assert step.sparse_rule is None and large  # densified gradients, their all-reduce and update


@pytest.mark.parametrize("output", ["sampled", "adaptive"])
def test_histogram_pass_builds_full_vocabulary_logits_only_for_the_last_step(output):
    from types import SimpleNamespace

    from dist_rnn.training.trainer import Trainer

    m = model(output, num_sampled=20)
    layer = m.projection
    full = "log_probs" if output == "adaptive" else "logits"
    shapes, original = [], getattr(layer, full)
    setattr(layer, full, lambda inputs: shapes.append(tuple(inputs.shape)) or original(inputs))
    written = {}
    metrics = SimpleNamespace(histograms=lambda step, weights, grads: written.update(weights=weights, grads=grads))
    trainer = SimpleNamespace(model=m, metrics=metrics, config=SimpleNamespace(train=SimpleNamespace(seed=5)))
    Trainer._write_histograms(trainer, 10, tokens([3, 7], 1), tokens([3, 7], 2))
    assert all(shape[1] == 1 for shape in shapes), shapes  # [batch, time, vocab] never built
    assert set(written["grads"]) == {v.path for v in m.trainable_variables}
    for name, grad in written["grads"].items():
        assert np.all(np.isfinite(grad.numpy())), name
    output_grads = [g for name, g in written["grads"].items() if name.startswith("language_model/projection")]
    assert output_grads and all(np.abs(g.numpy()).max() > 0 for g in output_grads)
