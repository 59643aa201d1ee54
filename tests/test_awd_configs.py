"""The AWD-LSTM configs of issue #19 load, validate, and the CPU one trains with its recipe live.

``tests/test_config.py::test_shipped_config_loads_and_validates`` already loads every
``configs/*.yaml``; here the recipe's keys are checked to have reached the loaded configs, and
``configs/shakespeare_awd.yaml`` runs 3 steps at a tiny size through the CLI.
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import REPO, run_cli
from dist_rnn.config import load_config

AWD_CONFIGS = sorted(REPO.glob("configs/awd_*.yaml")) + [REPO / "configs" / "shakespeare_awd.yaml"]


def test_the_four_awd_configs_exist():
    assert [p.name for p in AWD_CONFIGS] == ["awd_lstm_enwik8.yaml", "awd_lstm_ptb.yaml", "awd_lstm_wikitext2.yaml",
                                             "shakespeare_awd.yaml"]


@pytest.mark.parametrize("path", AWD_CONFIGS, ids=[p.name for p in AWD_CONFIGS])
def test_awd_config_loads_with_the_recipe_on(path):
    config = load_config([str(path)])
    m, o, t = config.model, config.optimizer, config.train
    assert m.cell == "lstm" and m.num_layers == 3
    assert m.weight_drop > 0 and m.dropout_output > 0 and m.dropout_hidden > 0 and m.dropout_input > 0
    assert o.weight_decay == pytest.approx(1.2e-6)
    assert t.eval_every > 0  # NT-ASGD, plateau decay, EMA's best checkpoint and early stopping need evaluations
    if path.name.startswith("awd_lstm_"):
        assert (m.hidden_size, m.embedding_size, m.tie_embeddings, o.clip_norm) in {
            (1150, 400, True, 0.25), (1840, 400, True, 0.25)}


def test_word_level_awd_configs_are_the_papers_ntasgd_setting():
    for name, input_dropout, batch in (("awd_lstm_ptb.yaml", 0.4, 40), ("awd_lstm_wikitext2.yaml", 0.65, 80)):
        config = load_config([str(REPO / "configs" / name)])
        m, o, t = config.model, config.optimizer, config.train
        assert (o.name, o.learning_rate, o.nonmono) == ("ntasgd", 30.0, 5), name
        assert (m.dropout_input, m.dropout_hidden, m.dropout_output, m.embedding_dropout, m.weight_drop) == (
            input_dropout, 0.3, 0.4, 0.1, 0.5), name
        assert (t.ar, t.tar, t.num_steps, t.batch_size) == (2.0, 1.0, 70, batch), name
        assert t.variable_length, name  # AWD's variable-length BPTT around num_steps


def test_shakespeare_awd_trains_three_steps_with_ar_and_tar_logged(shakespeare_slice, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run_cli(["train", str(REPO / "configs" / "shakespeare_awd.yaml"), "--run-dir", run_dir,
                              "--set", f"data.path={shakespeare_slice}",
                              "--set", "model={hidden_size: 16, embedding_size: 8}",
                              "--set", "train={batch_size: 4, num_steps: 10, max_steps: 3, log_every: 1, "
                                       "eval_every: 3, sample_length: 0}",
                              "--set", "optimizer.schedule.warmup_steps=0",
                              "--set", "checkpoint.every_steps=0",
                              "--set", "logging={progress: off, tensorboard: false}"], capsys)
    assert code == 0, err[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        assert math.isfinite(r["loss"]) and 3.0 < r["loss"] < 5.0, r  # about ln(65) at the start
        assert math.isfinite(r["ar_loss"]) and r["ar_loss"] > 0, r
        assert math.isfinite(r["tar_loss"]) and r["tar_loss"] > 0, r
    valid = [r for r in records if r["split"] == "valid"]
    assert valid and all(math.isfinite(r["loss"]) for r in valid)
