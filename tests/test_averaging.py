"""Averaged weights: ``optimizer.ema_decay`` and ``optimizer.name: ntasgd`` (issue #19).

The average is checked against a hand computation from the raw weights of
every step's checkpoint; ``generate``/``export`` (inference) and the best
checkpoint hold the average, the rolling checkpoints the raw weights a resume
continues from bitwise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml

from conftest import assert_one_line_error, run_cli, shakespeare_prefix, small_sgd_run_args, train_ok
from test_stopping import SCRIPT, assert_bitwise_equal, latest_weights, scripted_validation  # noqa: F401

from dist_rnn.training.averaging import WeightAverage


def test_weight_average_by_hand():
    weights = [tf.Variable([1.0, -2.0]), tf.Variable([[4.0]])]
    ema = WeightAverage(weights, "ema", decay=0.75)
    mean = WeightAverage(weights, "ntasgd")
    values = [([2.0, 0.0], [[8.0]]), ([4.0, 4.0], [[0.0]]), ([0.0, 8.0], [[4.0]])]
    expected_ema = None
    for i, (a, b) in enumerate(values):
        weights[0].assign(a)
        weights[1].assign(b)
        if i == 1:
            mean.start()  # NT-ASGD switches before the second step: the first is not averaged
        for average in (ema, mean):
            average.update(tf.constant(True))
        current = [np.array(a), np.array(b)]
        d = min(0.75, (2 + i) / (11 + i))  # the warm-up: update n = i + 1 decays by min(decay, (1+n)/(10+n))
        expected_ema = current if expected_ema is None else [d * e + (1 - d) * c for e, c in zip(expected_ema, current)]
    ema.update(tf.constant(False))  # a skipped step changes nothing
    mean.update(tf.constant(False))
    for got, want in zip(ema.averages, expected_ema):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    np.testing.assert_allclose(mean.averages[0].numpy(), [2.0, 6.0], rtol=1e-6)  # mean of steps 2 and 3
    np.testing.assert_allclose(mean.averages[1].numpy(), [[2.0]], rtol=1e-6)
    assert int(mean.count.numpy()) == 2 and int(ema.count.numpy()) == 3
    with mean.applied():
        np.testing.assert_array_equal(weights[0].numpy(), mean.averages[0].numpy())
    np.testing.assert_array_equal(weights[0].numpy(), [0.0, 8.0])  # raw weights back


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return shakespeare_prefix(tmp_path_factory.mktemp("averaging_data"), 20_000)


def settings(data: Path, max_steps: int, *sets: str) -> list[str]:
    return small_sgd_run_args(data, max_steps, *sets, checkpoint='checkpoint={every_steps: 1, keep: 30}')


train = train_ok


def model_weights(run_dir: Path, checkpoint: str, raw: bool = False) -> list[np.ndarray]:
    """A checkpoint's weights as ``generate``/``export`` load them (the average), or its raw weights."""
    from dist_rnn.inference import load_model_for_inference

    model, _, _, path = load_model_for_inference(str(run_dir), checkpoint)
    if raw:
        tf.train.Checkpoint(model=model).restore(path).expect_partial()
    return [v.numpy() for v in model.trainable_variables]


def raw_at(run_dir: Path, step: int) -> list[np.ndarray]:
    return model_weights(run_dir, str(run_dir / "checkpoints" / f"ckpt-{step}"), raw=True)


def assert_weights_close(got: list, want: list) -> None:
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_ema_is_the_hand_average_of_the_steps(data, tmp_path, capsys):
    run = tmp_path / "ema"
    train(capsys, run, *settings(data, 4, "optimizer.ema_decay=0.5"))
    raws = [raw_at(run, step) for step in range(1, 5)]
    expected = raws[0]
    for n, raw in enumerate(raws[1:], start=2):
        d = min(0.5, (1 + n) / (10 + n))  # 0.25, 0.31, 0.36: the warm-up is below 0.5 for these steps
        expected = [d * e + (1 - d) * r for e, r in zip(expected, raw)]
    assert_weights_close(model_weights(run, "latest"), expected)
    assert not np.allclose(model_weights(run, "latest")[0], raws[-1][0])  # not the raw weights
    assert_weights_close(model_weights(run, "latest", raw=True), raws[-1])


def eval_loss(capsys, run: Path) -> float:
    code, out, err = run_cli(["eval", "--run-dir", run, "--split", "valid"], capsys)
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])["loss"]


def test_evaluation_reads_the_average(data, tmp_path, capsys):
    run = tmp_path / "ema"
    train(capsys, run, *settings(data, 4, "optimizer.ema_decay=0.5"))
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final_valid = [r["loss"] for r in logged if r["split"] == "valid" and r["step"] == 4][-1]
    averaged = eval_loss(capsys, run)
    assert averaged == pytest.approx(final_valid, rel=1e-6)
    # The same checkpoint read as a run without averaging gives its raw weights' loss: another number.
    raw_run = Path(shutil.copytree(run, tmp_path / "raw"))
    saved = yaml.safe_load((raw_run / "config.yaml").read_text())
    saved["optimizer"]["ema_decay"] = 0.0
    (raw_run / "config.yaml").write_text(yaml.safe_dump(saved))
    raw = eval_loss(capsys, raw_run)
    assert abs(raw - averaged) > 1e-4, (raw, averaged)


def test_ntasgd_averages_from_the_switch(data, tmp_path, capsys, scripted_validation):
    run = tmp_path / "ntasgd"
    train(capsys, run, *settings(data, 14, "optimizer={name: ntasgd, nonmono: 2}"))
    # SCRIPT's evaluation at step 10 triggers the switch (see test_stopping.test_counts_by_hand):
    # the average is the mean of the weights after steps 11..14.
    raws = {step: raw_at(run, step) for step in range(10, 15)}
    mean = [np.mean([raws[s][i] for s in range(11, 15)], axis=0) for i in range(len(raws[11]))]
    assert_weights_close(model_weights(run, "latest"), mean)
    # Before the switch the model is not averaged.
    assert_weights_close(model_weights(run, str(run / "checkpoints" / "ckpt-10")), raws[10])
    # The best checkpoint (step 12, loss 2.4) holds the average of steps 11 and 12.
    best_mean = [np.mean([raws[11][i], raws[12][i]], axis=0) for i in range(len(raws[11]))]
    assert_weights_close(model_weights(run, "best"), best_mean)


def test_ntasgd_resume_is_bitwise(data, tmp_path, capsys, scripted_validation):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    ntasgd = "optimizer={name: ntasgd, nonmono: 2}"
    train(capsys, whole, *settings(data, 14, ntasgd))
    train(capsys, resumed, *settings(data, 12, ntasgd))  # after the switch, in the middle of the average
    train(capsys, resumed, "--set", "train.max_steps=14")
    assert_bitwise_equal(latest_weights(whole), latest_weights(resumed))


@pytest.mark.parametrize("setting, key", [
    ("optimizer={name: ntasgd, momentum: 0.9}", "optimizer.momentum"),
    ("optimizer={name: ntasgd, ema_decay: 0.9}", "optimizer.ema_decay"),
    ("optimizer={name: ntasgd, nonmono: 0}", "optimizer.nonmono"),
    ("optimizer.ema_decay=1.0", "optimizer.ema_decay"),
])
def test_bad_values_are_one_line_errors(data, tmp_path, capsys, setting, key):
    line = assert_one_line_error(*run_cli(["train", "--run-dir", tmp_path / "r", *settings(data, 4, setting)], capsys))
    assert key in line, line
    assert not (tmp_path / "r").exists()
