"""Evaluation scores every token of a split except the first, exactly once.

The oracle runs the model over each row's token range in one call from zero
state, straight from the split's ids, so it shares no batching code with the
trainer: the trainer's windowed, padded, state-carrying walk must give the
same loss sum and count ``N - 1`` tokens.
"""

from __future__ import annotations

import json
import os
import math
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, assert_one_line_error, run_cli, shakespeare_prefix, tiny_config
from dist_rnn.distribution import Backend
from dist_rnn.summaries import MetricsLogger
from dist_rnn.runtime import set_precision
from dist_rnn.training.factory import build_trainer
from dist_rnn.training.trainer import Trainer


@pytest.fixture(scope="module")
def shakespeare_20k(tmp_path_factory):
    """The first 20,000 characters of tiny-shakespeare: a 4,000-token validation split at [0.8, 0.2]."""
    return shakespeare_prefix(tmp_path_factory.mktemp("data"), 20_000)


def make_trainer(config, run_dir) -> Trainer:
    tf.keras.utils.set_random_seed(config.train.seed)
    set_precision(config.train.precision)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLogger(run_dir, True, tensorboard=False, progress="off")
    return build_trainer(config, run_dir, backend=Backend(), metrics=metrics)


def oracle_loss_sum(model, ids: np.ndarray, rows: int) -> float:
    """Sum of cross-entropies of targets 1..N-1, each row's range run once from zero state.

    The targets are dealt to ``rows`` contiguous runs (sizes differ by at most
    one, as ``np.array_split`` does); a row reads from the token before its
    first target.
    """
    ids = np.asarray(ids, dtype=np.int32)  # a prepared split is a uint8/16/32 memmap
    total = 0.0
    for targets in np.array_split(np.arange(1, len(ids)), rows):
        if len(targets) == 0:
            continue
        tokens = ids[targets[0] - 1:targets[-1] + 1][None, :]
        logits, _ = model(tf.constant(tokens[:, :-1]), None, training=False)
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tokens[:, 1:], logits=logits)
        total += float(tf.reduce_sum(tf.cast(losses, tf.float64)))
    return total


@pytest.fixture(scope="module")
def trained(shakespeare_20k, tmp_path_factory):
    """A tiny model trained 30 steps, so carried state clearly matters to its predictions."""
    config = tiny_config(shakespeare_20k, train={"max_steps": 30, "eval_batch_size": 6, "num_steps": 17})
    run_dir = tmp_path_factory.mktemp("trained")
    trainer = make_trainer(config, run_dir)
    trainer.train()
    trainer.metrics.close()
    return trainer


@pytest.mark.parametrize("n, rows, steps", [(20, 3, 4), (23, 4, 5), (101, 8, 7), (5, 8, 3), (2, 4, 10), (1000, 1, 64)])
def test_eval_windows_predict_every_position_once_from_its_predecessor(n, rows, steps):
    from dist_rnn.data.batching import EvalBatcher

    ids = np.arange(n) + 100  # the id tells the position
    b = EvalBatcher(ids, rows, steps)
    seen, inputs_of = [], {}
    for i in range(b.num_windows):
        x, y, w = b.window(i)
        assert x.shape == y.shape == w.shape and 1 <= x.shape[1] <= steps and x.shape[0] == rows
        real = w == 1
        assert np.all((w == 0) | real)
        seen.extend(y[real] - 100)
        np.testing.assert_array_equal(x[real], y[real] - 1)  # each target is read right after its predecessor
        # The walk is contiguous per row: window i+1 starts where window i ended.
        if i + 1 < b.num_windows:
            np.testing.assert_array_equal(b.window(i + 1)[0][:, 0], y[:, -1])
    assert sorted(seen) == list(range(1, n))
    assert b.tokens == n - 1


def test_evaluation_scores_every_valid_token_once_and_equals_per_row_oracle(trained):
    ids = trained.corpus.valid
    assert len(ids) == 4000
    result = trained.evaluate("valid")
    assert result.tokens == len(ids) - 1  # the old cut to whole rows and windows scored 3,978 of them
    expected = oracle_loss_sum(trained.model, ids, 6)
    assert result.loss * result.tokens == pytest.approx(expected, rel=1e-6)
    # Sensitivity: resetting the state at every window moves the loss far beyond that tolerance.
    batches = trained.eval_batches["valid"]
    reset = sum(float(trained.steps.eval_step(*batches.window(i), trained.model.initial_state(6))[0])
                for i in range(batches.num_windows))
    assert abs(reset - expected) > 1e-3 * expected


def test_split_with_fewer_targets_than_eval_rows_still_scores_every_token(shakespeare_20k, tmp_path):
    text = shakespeare_20k.read_text(encoding="utf-8")
    train_file, valid_file = tmp_path / "train.txt", tmp_path / "valid.txt"
    train_file.write_text(text[:16_000], encoding="utf-8")
    valid_file.write_text("First", encoding="utf-8")  # 5 tokens, 4 targets, 8 evaluation rows
    # Used to be an error blaming train.batch_size, though only train.eval_batch_size was too large.
    config = tiny_config(shakespeare_20k, data={"corpus": "file", "path": None, "train_file": str(train_file),
                                                "valid_file": str(valid_file)},
                         train={"batch_size": 4, "eval_batch_size": 8})
    trainer = make_trainer(config, tmp_path / "run")
    result = trainer.evaluate("valid")
    assert result.tokens == 4
    # Four rows of one target each (from zero state), four rows of padding only.
    assert result.loss * 4 == pytest.approx(oracle_loss_sum(trainer.model, trainer.corpus.valid, 8), rel=1e-6)


def test_one_token_split_is_a_one_line_error_naming_the_split(shakespeare_20k, tmp_path, capsys):
    train_file, valid_file = tmp_path / "train.txt", tmp_path / "valid.txt"
    train_file.write_text(shakespeare_20k.read_text(encoding="utf-8")[:16_000], encoding="utf-8")
    valid_file.write_text("F", encoding="utf-8")
    run_dir = tmp_path / "run"
    code, out, err = run_cli(["train", "--run-dir", run_dir,
                              "--set", f"data={{corpus: file, train_file: {train_file}, valid_file: {valid_file}}}",
                              "--set", "train={batch_size: 8, num_steps: 20, max_steps: 2, max_epochs: null}",
                              "--set", "logging.progress=off"], capsys)
    line = assert_one_line_error(code, out, err)
    assert "valid split has 1 token" in line and "at least 2" in line, line
    assert not run_dir.exists()


def test_eval_cli_reports_every_token_of_the_split(shakespeare_20k, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run_cli(["train", "--run-dir", run_dir,
                              "--set", f"data={{corpus: file, path: {shakespeare_20k}, split: [0.8, 0.2, 0.0]}}",
                              "--set", "model={cell: gru, num_layers: 1, hidden_size: 16, embedding_size: 8}",
                              "--set", "train={batch_size: 8, num_steps: 20, max_steps: 2, max_epochs: null, "
                                       "sample_length: 0, eval_batch_size: 12}",
                              "--set", "checkpoint.every_steps=0", "--set", "logging.progress=off"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["eval", "--run-dir", run_dir, "--split", "valid"], capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["tokens"] == 3999
    assert math.isfinite(result["loss"])


MIRRORED_EVAL = """
import json, sys
sys.path.insert(0, {tests!r})
from conftest import tiny_config
from dist_rnn.distribution import create_backend
config = tiny_config({data!r}, train={train!r}, distribute={{"backend": "mirrored", "cpu_devices": 2}})
backend = create_backend(config.distribute)  # logical CPU devices before TensorFlow initializes
import tensorflow as tf
from dist_rnn.runtime import set_precision
from dist_rnn.training.factory import build_trainer
tf.keras.utils.set_random_seed(config.train.seed)
set_precision(config.train.precision)
trainer = build_trainer(config, {run_dir!r}, backend=backend)
result = trainer.evaluate("valid")
print(json.dumps({{"replicas": backend.num_replicas, "loss": result.loss, "tokens": result.tokens}}))
"""


@pytest.mark.slow
def test_mirrored_evaluation_equals_one_device(shakespeare_20k, tmp_path):
    # 3,999 targets over 6 rows: rows of 667 and 666 targets, 3 rows per replica, a short last window.
    train = {"eval_batch_size": 6, "num_steps": 100}
    script = MIRRORED_EVAL.format(tests=str(REPO / "tests"), data=str(shakespeare_20k), train=train,
                                  run_dir=str(tmp_path / "mirrored"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    mirrored = json.loads(proc.stdout.strip().splitlines()[-1])
    single = make_trainer(tiny_config(shakespeare_20k, train=train), tmp_path / "single").evaluate("valid")
    assert mirrored["replicas"] == 2
    assert mirrored["tokens"] == single.tokens == 3999
    assert mirrored["loss"] == pytest.approx(single.loss, rel=1e-6)
