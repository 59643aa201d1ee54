"""Steps skipped for a non-finite gradient: logged with their numbers, fatal after too many in a row."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from dist_rnn.runtime import set_precision


def train(data, run_dir, capsys, optimizer: str, train: str, *extra):
    argv = ["train", "--run-dir", run_dir,
            "--set", f"data={{corpus: file, path: {data}, split: [0.8, 0.2, 0.0]}}",
            "--set", "model={num_layers: 1, hidden_size: 16, embedding_size: 8}",
            "--set", f"optimizer={optimizer}",
            "--set", "train={batch_size: 8, num_steps: 20, max_steps: 30, max_epochs: null, sample_length: 0}",
            "--set", f"train={train}", "--set", "logging.progress=off", *extra]
    try:
        return run_cli(argv, capsys)
    finally:
        set_precision("float32")


def test_float32_logs_skipped_steps_and_stops_after_too_many_in_a_row(shakespeare_slice, tmp_path, capsys):
    # From step 5 on the learning rate is 0.1 * 1e300, infinite in float32: step 5's (finite) gradient
    # turns the weights into inf/NaN, so from step 6 on the gradient is not finite (a real overflow,
    # not a mocked flag) and every step is skipped.
    run = tmp_path / "run"
    code, out, err = train(shakespeare_slice, run, capsys,
                           "{name: sgd, learning_rate: 0.1, clip_norm: 0.0, schedule: "
                           "{name: exponential, decay_rate: 1.0e300, decay_steps: 4, staircase: true}}",
                           "{log_every: 100, max_consecutive_skips: 3}", "--set", "checkpoint.every_steps=4")
    assert code == 1, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: 3 steps in a row (steps 6-8) were skipped"), err[-2000:]
    assert "train.max_consecutive_skips: 3" in last
    assert f"the last good checkpoint is {run / 'checkpoints' / 'ckpt-4'} " in last
    assert "Traceback" not in err
    log = (run / "train.log").read_text(encoding="utf-8")
    assert "warning: skipped 3 step(s) whose all-reduced gradient was not finite" in log
    assert "step 6, 7, 8; 3 skipped since this process started" in log
    # Nothing is saved after the skips began.
    assert sorted(p.name for p in (run / "checkpoints").glob("ckpt-*.index")) == ["ckpt-4.index"]


def test_float16_stops_when_the_gradient_stays_non_finite(shakespeare_slice, tmp_path, capsys):
    # A loss scale of 1e12 overflows float16 gradients; backing off by 0.9 it stays above 1e11 for
    # 20 steps: before max_consecutive_skips existed, all 30 steps were skipped and the run "succeeded".
    code, out, err = train(shakespeare_slice, tmp_path / "run", capsys, "{name: adam, learning_rate: 0.01}",
                           "{precision: mixed_float16, log_every: 2, max_consecutive_skips: 6, "
                           "loss_scale: {initial: 1.0e12, max_scale: 1.0e12, backoff: 0.9}}",
                           "--set", "checkpoint.every_steps=0")
    assert code == 1, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: 6 steps in a row (steps 1-6) were skipped"), err[-2000:]
    assert "the last good checkpoint is none" in last
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_steps"]) for r in records if r["split"] == "train"] == [(2, 2), (4, 4)]
    log = (tmp_path / "run" / "train.log").read_text(encoding="utf-8")
    for steps in ("step 1, 2;", "step 3, 4;", "step 5, 6;"):
        assert steps in log, log[-3000:]


def test_float16_skips_at_the_start_then_trains(shakespeare_slice, tmp_path, capsys):
    # Backing off by 1e-3 per skip: 1e12 -> 1e9 -> 1e6 -> 1e3, then the gradients are finite.
    code, out, err = train(shakespeare_slice, tmp_path / "run", capsys, "{name: adam, learning_rate: 0.01}",
                           "{precision: mixed_float16, log_every: 10, max_steps: 10, "
                           "loss_scale: {initial: 1.0e12, max_scale: 1.0e12, backoff: 0.001}}",
                           "--set", "checkpoint.every_steps=0")
    assert code == 0, err[-2000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    skipped = train_records[-1]["skipped_steps"]
    assert 1 <= skipped < 10
    log = (tmp_path / "run" / "train.log").read_text(encoding="utf-8")
    assert "step " + ", ".join(str(s) for s in range(1, skipped + 1)) + ";" in log


def test_max_consecutive_skips_must_be_positive(tmp_path, capsys):
    from conftest import REPO, assert_one_line_error

    line = assert_one_line_error(*run_cli(["train", REPO / "configs" / "quickstart.yaml", "--run-dir", tmp_path / "run",
                                           "--set", "train.max_consecutive_skips=0"], capsys))
    assert "config key 'train.max_consecutive_skips': must be at least 1, got 0 (from --set)" in line
    assert not (tmp_path / "run").exists()
