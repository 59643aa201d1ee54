"""Early stopping, plateau decay and the NT-ASGD switch against scripted validation losses (issue #19).

The decisions are pure functions of the validation losses (checked by hand
below); the runs replace the validation loss by a script indexed by the step,
so each decision must fall at a known evaluation, and a run interrupted in
the middle of a count and resumed must take it at the same evaluation, with
bitwise the same weights, as an uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli, shakespeare_prefix, small_sgd_run_args, train_ok
from dist_rnn.training.stopping import evaluations_without_improvement, ntasgd_switch_index, plateau_decays

# Validation loss after each evaluated step (eval_every 2).
SCRIPT = {2: 3.0, 4: 2.5, 6: 2.6, 8: 2.45, 10: 2.7, 12: 2.4, 14: 2.5, 16: 2.6, 18: 2.7, 20: 2.8}


def test_counts_by_hand():
    losses = [3.0, 2.5, 2.6, 2.45, 2.7]
    # min_delta 0.1: 2.45 is not 0.1 below 2.5, so 2.6, 2.45, 2.7 are three without improvement.
    assert [evaluations_without_improvement(losses[:i], 0.1) for i in range(1, 6)] == [0, 0, 1, 2, 3]
    assert [evaluations_without_improvement(losses[:i], 0.0) for i in range(1, 6)] == [0, 0, 1, 0, 1]
    script = list(SCRIPT.values())
    # patience 2: flat at 2.6 (1), 2.45 is a new lowest (0), 2.7 (1), 2.4 lowest, 2.5 (1), 2.6 (2: decay), 2.7 (1), 2.8 (2: decay).
    assert [plateau_decays(script[:i], 2) for i in range(1, 11)] == [0, 0, 0, 0, 0, 0, 0, 1, 1, 2]
    # nonmono 2: at evaluation i the loss is compared with min(losses[:i-2]); the first above it is 2.7 at index 4
    # (min(3.0, 2.5) = 2.5), with more than 2 evaluations before it.
    assert ntasgd_switch_index(script, 2) == 4
    assert ntasgd_switch_index([3.0, 2.9, 2.8, 2.7, 2.6], 2) is None
    assert ntasgd_switch_index([3.0, 3.5, 3.6], 2) is None  # no evaluation has more than 2 before it


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return shakespeare_prefix(tmp_path_factory.mktemp("stopping_data"), 20_000)


@pytest.fixture
def scripted_validation(monkeypatch):
    """Every validation loss is SCRIPT[steps applied so far]; records the steps evaluated."""
    from dist_rnn.training.evaluation import EvalResult
    from dist_rnn.training.trainer import Trainer

    evaluated = []

    def evaluate(self, split):
        step = int(self.optimizer.iterations.numpy())
        evaluated.append(step)
        return EvalResult(split, SCRIPT[step], 1000, "char")

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    return evaluated


def settings(data: Path, max_steps: int, *sets: str) -> list[str]:
    return small_sgd_run_args(data, max_steps, *sets, checkpoint='checkpoint.every_steps=0')


train = train_ok


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def rates(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["learning_rate"] for r in records(run_dir) if r["split"] == "train"}


def latest_weights(run_dir: Path) -> dict:
    import tensorflow as tf

    prefix = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    reader = tf.train.load_checkpoint(prefix)
    return {n: reader.get_tensor(n) for n, _ in tf.train.list_variables(prefix)
            if n.endswith("VARIABLE_VALUE") and not n.startswith("save_counter")}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), set(a) ^ set(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), name


EARLY = "train.early_stopping={patience: 3, min_delta: 0.1}"
PLATEAU = "optimizer.schedule={name: plateau, factor: 0.5, patience: 2}"


def test_early_stopping_stops_at_the_right_evaluation(data, tmp_path, capsys, scripted_validation):
    train(capsys, tmp_path / "run", *settings(data, 20, EARLY))
    steps = [r["step"] for r in records(tmp_path / "run") if r["split"] == "train"]
    # Three evaluations without an improvement of 0.1: steps 6, 8, 10.
    assert max(steps) == 10, steps
    # The final evaluation reuses step 10's result: evaluated and logged once.
    assert scripted_validation == [2, 4, 6, 8, 10]
    assert [r["step"] for r in records(tmp_path / "run") if r["split"] == "valid"] == [2, 4, 6, 8, 10]


def test_early_stopping_resumed_mid_count_stops_at_the_same_step(data, tmp_path, capsys, scripted_validation):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(capsys, whole, *settings(data, 20, EARLY))
    train(capsys, resumed, *settings(data, 8, EARLY))  # two evaluations into the count
    train(capsys, resumed, "--set", "train.max_steps=20")
    assert max(rates(resumed)) == 10
    assert_bitwise_equal(latest_weights(whole), latest_weights(resumed))


def test_plateau_decays_after_patience_flat_evaluations(data, tmp_path, capsys, scripted_validation):
    train(capsys, tmp_path / "run", *settings(data, 20, PLATEAU))
    lr = rates(tmp_path / "run")
    # The decay of the evaluation at step 16 applies from step 17 on.
    assert [lr[s] for s in range(1, 21)] == [1.0] * 16 + [0.5] * 4, lr


def test_plateau_resumed_mid_count_decays_at_the_same_step(data, tmp_path, capsys, scripted_validation):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(capsys, whole, *settings(data, 20, PLATEAU))
    train(capsys, resumed, *settings(data, 14, PLATEAU))  # one flat evaluation (step 14) into the count
    train(capsys, resumed, "--set", "train.max_steps=20")
    assert rates(resumed) == rates(whole)
    assert_bitwise_equal(latest_weights(whole), latest_weights(resumed))


@pytest.mark.parametrize("setting, key", [
    ("train.early_stopping={patience: -1}", "train.early_stopping.patience"),
    ("train.early_stopping={patience: 2, min_delta: -0.1}", "train.early_stopping.min_delta"),
    ("optimizer.schedule={name: plateau, factor: 1.5}", "optimizer.schedule.factor"),
    ("optimizer.schedule={name: plateau, patience: 0}", "optimizer.schedule.patience"),
])
def test_bad_values_are_one_line_errors(data, tmp_path, capsys, setting, key):
    line = assert_one_line_error(*run_cli(["train", "--run-dir", tmp_path / "r", *settings(data, 4, setting)], capsys))
    assert key in line, line
    assert not (tmp_path / "r").exists()
