"""configs/quickstart.yaml itself, on its default corpus, trained in bfloat16, then evaluated and sampled.

A few steps of the real quickstart config (the embedded ``stdlib`` corpus,
its model and optimizer) with ``--set`` shortening the run and the corpus;
``eval`` and ``generate`` then read the bfloat16-trained checkpoint on one
float32 CPU device.
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import REPO, run_cli
from dist_rnn.runtime import set_precision


@pytest.fixture(autouse=True)
def _float32_afterwards():
    yield
    set_precision("float32")


def test_quickstart_config_trains_in_bfloat16_then_evaluates_and_generates(tmp_path, capsys):
    run_dir = tmp_path / "quickstart"
    code, out, err = run_cli(["train", REPO / "configs" / "quickstart.yaml", "--run-dir", run_dir,
                              "--set", "data.max_chars=300000", "--set", "train.precision=mixed_bfloat16",
                              "--set", "train={max_steps: 4, log_every: 2, sample_length: 20}",
                              "--set", "optimizer.schedule.warmup_steps=2",
                              "--set", "logging={progress: off, tensorboard: false}"], capsys)
    assert code == 0, err[-3000:]
    assert "stdlib: train 270,000" in out and "2 x lstm 128" in out and "precision       mixed_bfloat16" in out
    assert "\nsample:\n" in out  # the quickstart ends by printing a generated sample
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    valid = [r for r in records if r["split"] == "valid"][-1]
    assert len(train_losses) == 2 and all(math.isfinite(x) for x in train_losses)
    vocab_size = len(json.loads((run_dir / "vocab.json").read_text())["tokens"])
    assert 60 < vocab_size <= 128  # data.max_vocab 128; 270,000 characters of stdlib source hold fewer
    # Four steps from a uniform start: the loss is near log(vocab size), and below it.
    assert 3.0 < valid["loss"] < math.log(vocab_size) + 0.1

    code, out, err = run_cli(["eval", "--run-dir", run_dir], capsys)
    assert code == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["step"] == 4 and result["split"] == "valid"
    # float32 evaluation of bfloat16-trained weights: bfloat16 rounding of the
    # training-time evaluation (2^-8 relative per op) stays well under 2%.
    assert result["loss"] == pytest.approx(valid["loss"], rel=0.02)
    assert result["tokens"] == valid["tokens"]

    samples = []
    for _ in range(2):
        code, out, err = run_cli(["generate", "--run-dir", run_dir, "--prime", "def ", "--length", "40",
                                  "--seed", "7"], capsys)
        assert code == 0, err[-3000:]
        samples.append(out)
    assert samples[0] == samples[1] and samples[0].startswith("def ") and len(samples[0]) == len("def ") + 40 + 1
