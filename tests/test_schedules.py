"""Learning-rate schedules, checked against values computed by hand."""

from __future__ import annotations

import math

import pytest

from dist_rnn.config import OptimizerConfig, ScheduleConfig, load_config
from dist_rnn.training.schedules import learning_rate_at


def opt(lr: float, scale: bool = False, **schedule) -> OptimizerConfig:
    return OptimizerConfig(learning_rate=lr, scale_lr_with_replicas=scale, schedule=ScheduleConfig(**schedule))


def test_constant():
    config = opt(0.002)
    for step, epoch in ((0, 1), (1, 1), (10_000, 7), (10**7, 100)):
        assert learning_rate_at(config, step, epoch) == 0.002


@pytest.mark.parametrize("step, expected", [(0, 10.0), (4999, 10.0), (5000, 1.0), (9999, 1.0), (12000, 0.1)])
def test_exponential_staircase(step, expected):
    config = opt(10.0, name="exponential", decay_rate=0.1, decay_steps=5000, staircase=True)
    assert learning_rate_at(config, step, 1) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("step, expected", [
    (0, 10.0),
    (2500, 10.0 * 0.1 ** 0.5),       # 3.1623
    (5000, 1.0),
    (12000, 10.0 * 0.1 ** 2.4),      # 0.039811
])
def test_exponential_smooth(step, expected):
    config = opt(10.0, name="exponential", decay_rate=0.1, decay_steps=5000, staircase=False)
    assert learning_rate_at(config, step, 1) == pytest.approx(expected, rel=1e-12)


def test_exponential_smooth_hand_values():
    config = opt(10.0, name="exponential", decay_rate=0.1, decay_steps=5000, staircase=False)
    assert learning_rate_at(config, 2500, 1) == pytest.approx(3.16227766, rel=1e-8)
    assert learning_rate_at(config, 12000, 1) == pytest.approx(0.0398107171, rel=1e-8)


@pytest.mark.parametrize("epoch, expected", [(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0), (5, 0.5), (6, 0.25),
                                              (13, 0.5 ** 9)])
def test_epoch_decay_ptb_small(epoch, expected):
    config = opt(1.0, name="epoch", decay_rate=0.5, decay_start_epoch=4)
    # The step does not matter, only the epoch.
    assert learning_rate_at(config, 0, epoch) == expected
    assert learning_rate_at(config, 123_456, epoch) == expected


def cosine() -> OptimizerConfig:
    return opt(1.0, name="cosine", warmup_steps=10, total_steps=110, min_learning_rate=0.1)


@pytest.mark.parametrize("step, expected", [
    (0, 0.1),                     # first step: 1/10 of the rate
    (4, 0.5),                     # 5/10
    (9, 1.0),                     # last warmup step reaches the full rate
    (10, 1.0),                    # cosine progress 0
    (35, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25))),   # 0.868198
    (60, 0.55),                   # midpoint: halfway between 1.0 and 0.1
    (110, 0.1),                   # end: the floor
    (500, 0.1),                   # stays at the floor
])
def test_cosine_with_warmup(step, expected):
    assert learning_rate_at(cosine(), step, 1) == pytest.approx(expected, abs=1e-12)


def test_cosine_is_monotone_after_warmup():
    values = [learning_rate_at(cosine(), s, 1) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1)


def test_cosine_defaults_to_max_steps():
    config = opt(2.0, name="cosine", warmup_steps=0, total_steps=None, min_learning_rate=0.0)
    assert learning_rate_at(config, 0, 1, max_steps=200) == pytest.approx(2.0)
    assert learning_rate_at(config, 100, 1, max_steps=200) == pytest.approx(1.0)
    assert learning_rate_at(config, 200, 1, max_steps=200) == pytest.approx(0.0, abs=1e-15)
    assert learning_rate_at(config, 100, 1, max_steps=400) == pytest.approx(1.0 + math.cos(math.pi / 4))


def test_quickstart_like_cosine_from_config():
    config = load_config([], ["optimizer.learning_rate=0.003", "optimizer.schedule.name=cosine",
                              "optimizer.schedule.warmup_steps=20", "optimizer.schedule.min_learning_rate=0.0003",
                              "train.max_steps=400", "train.max_epochs=null"])
    o, t = config.optimizer, config.train
    assert learning_rate_at(o, 0, 1, t.max_steps) == pytest.approx(0.003 / 20)
    assert learning_rate_at(o, 210, 1, t.max_steps) == pytest.approx(0.00165)
    assert learning_rate_at(o, 399, 1, t.max_steps) == pytest.approx(
        0.0003 + 0.0027 * 0.5 * (1 + math.cos(math.pi * 379 / 380)))


@pytest.mark.parametrize("step, expected", [
    (0, 0.1 * (1 + 3 * 0.1)),     # 0.13
    (4, 0.1 * (1 + 3 * 0.5)),     # 0.25
    (9, 0.4),                     # ramp complete: 4 replicas x 0.1
    (1000, 0.4),
])
def test_scale_lr_with_replicas_ramp(step, expected):
    config = opt(0.1, scale=True, name="constant", warmup_steps=10)
    assert learning_rate_at(config, step, 1, num_replicas=4) == pytest.approx(expected, rel=1e-12)


def test_scale_lr_with_replicas_edge_cases():
    no_warmup = opt(0.1, scale=True, warmup_steps=0)
    assert learning_rate_at(no_warmup, 0, 1, num_replicas=8) == pytest.approx(0.8)
    # One replica: nothing to scale.
    assert learning_rate_at(opt(0.1, scale=True, warmup_steps=10), 0, 1, num_replicas=1) == 0.1
    # Switched off: replicas do not matter.
    assert learning_rate_at(opt(0.1, scale=False, warmup_steps=10), 0, 1, num_replicas=8) == 0.1


def test_scale_lr_with_replicas_composes_with_epoch_decay():
    config = opt(1.0, scale=True, name="epoch", decay_rate=0.5, decay_start_epoch=1, warmup_steps=0)
    assert learning_rate_at(config, 50, 3, num_replicas=2) == pytest.approx(2 * 0.25)


# ---------------------------------------------------------------- horizons the user did not write


def train_records(argv: list, capsys) -> list[dict]:
    """Runs ``dist-rnn train ARGV``; returns its training records of metrics.jsonl."""
    import json
    from pathlib import Path

    from conftest import run_cli

    code, out, err = run_cli(argv, capsys)
    assert code == 0, err[-2000:]
    run_dir = Path(argv[argv.index("--run-dir") + 1])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == "train"]


def test_a_run_shorter_than_the_warmup_just_runs(tmp_path, capsys):
    # quickstart.yaml warms up over 20 steps and sets no total_steps: 10 steps end inside the warmup.
    from conftest import REPO

    records = train_records(["train", REPO / "configs" / "quickstart.yaml", "--set", "train.max_steps=10",
                             "--set", "train={log_every: 5, eval_every: 0, sample_length: 0}",
                             "--set", "data.max_chars=100000", "--set", "logging.progress=off",
                             "--run-dir", tmp_path / "run"], capsys)
    assert [r["step"] for r in records] == [5, 10]
    # Logged after step s: the rate of step s - 1 (0-based) of the 20-step warmup from 0.004.
    assert [r["learning_rate"] for r in records] == pytest.approx([0.004 * 5 / 20, 0.004 * 10 / 20])


def test_cosine_horizon_defaults_to_the_length_of_an_epoch_bounded_run(shakespeare_slice, tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text(shakespeare_slice.read_text(encoding="utf-8")[:8001], encoding="utf-8")
    # A training split of about 6,400 characters: about 40 steps in the one epoch, the cosine horizon.
    records = train_records(["train", "--run-dir", tmp_path / "run",
                             "--set", f"data={{corpus: file, path: {data}, split: [0.8, 0.2, 0.0]}}",
                             "--set", "model={num_layers: 1, hidden_size: 16, embedding_size: 8}",
                             "--set", "optimizer={name: adam, learning_rate: 0.01, schedule: "
                                      "{name: cosine, warmup_steps: 4, min_learning_rate: 0.001}}",
                             "--set", "train={batch_size: 8, num_steps: 20, max_steps: null, max_epochs: 1, "
                                      "log_every: 10, sample_length: 0}",
                             "--set", "checkpoint.every_steps=0", "--set", "logging.progress=off"], capsys)
    epoch = records[-1]["step"]
    assert [r["step"] for r in records] == [10, 20, 30, epoch] and 30 < epoch <= 40
    steps = (10, 20, 30, epoch)
    expected = [0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi * (s - 1 - 4) / (epoch - 4))) for s in steps]
    assert [r["learning_rate"] for r in records] == pytest.approx(expected, rel=1e-9)


def test_total_steps_zero_is_not_taken_for_unset():
    from dist_rnn.errors import UserError

    with pytest.raises(UserError, match=r"config key 'optimizer.schedule.total_steps': must be at least 1"):
        load_config([], ["optimizer.schedule.name=cosine", "optimizer.schedule.total_steps=0", "train.max_steps=100"])
    config = opt(1.0, name="cosine", total_steps=50)
    assert learning_rate_at(config, 50, 1, max_steps=1000) == pytest.approx(0.0, abs=1e-12)
