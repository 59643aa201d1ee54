"""The reference-experiment configs of docs/results.md: their numbers, and their pipelines end to end.

PTB's training split and text8 are not on this machine, so their pipelines run
on stand-ins: PTB with ptb.valid.txt as the training file (ptb.valid/ptb.test
as themselves), text8 with tiny-shakespeare rewritten in text8's alphabet
(lowercase a-z and single spaces, one line).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from conftest import PTB, REPO, SHAKESPEARE, run_cli
from dist_rnn.config import load_config
from dist_rnn.training.schedules import learning_rate_at

CONFIGS = REPO / "configs"

# The TensorFlow PTB tutorial's SmallConfig/MediumConfig/LargeConfig (Zaremba et al. 2014):
# layers, hidden, init_scale, num_steps, keep_prob, lr_decay, max_epoch (epochs at lr 1.0),
# max_max_epoch, max_grad_norm, batch 20, SGD lr 1.0.
ZAREMBA = {
    "ptb_small": dict(hidden=200, init_scale=0.1, num_steps=20, keep_prob=1.0, lr_decay=0.5,
                      max_epoch=4, max_max_epoch=13, max_grad_norm=5.0),
    "ptb_medium": dict(hidden=650, init_scale=0.05, num_steps=35, keep_prob=0.5, lr_decay=0.8,
                       max_epoch=6, max_max_epoch=39, max_grad_norm=5.0),
    "ptb_large": dict(hidden=1500, init_scale=0.04, num_steps=35, keep_prob=0.35, lr_decay=1 / 1.15,
                      max_epoch=14, max_max_epoch=55, max_grad_norm=10.0),
}


def train_and_read(config: str, overrides: list[str], run: Path, capsys) -> dict[str, list[dict]]:
    """``dist-rnn train configs/CONFIG --set ...``; returns its metrics.jsonl records by split."""
    argv = ["train", CONFIGS / config, "--run-dir", run, "--set", "logging.progress=off"]
    for override in overrides:
        argv += ["--set", override]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {split: [r for r in records if r["split"] == split] for split in ("train", "valid", "test")}


# ------------------------------------------------------------------ experiment 1


def test_compare_config_is_the_reference_setup_with_one_eval_per_epoch():
    config = load_config([str(CONFIGS / "shakespeare_compare.yaml")],
                         [f"data.path={SHAKESPEARE}"])
    m, o, t = config.model, config.optimizer, config.train
    assert (m.cell, m.num_layers, m.hidden_size, m.dropout) == ("lstm", 3, 100, 0.0)
    assert (t.batch_size, t.num_steps, t.max_epochs) == (32, 80, 20)
    assert (o.name, o.learning_rate, o.schedule.name) == ("adam", 1e-4, "constant")
    assert config.data.split == [0.9, 0.1, 0.0]
    # eval_every is one epoch of the 90% training split: (1,003,855 - 1) // 32 // 80 = 392 steps,
    # so every validation point of the results table is an epoch end.
    train_tokens = round(len(SHAKESPEARE.read_text(encoding="utf-8")) * 0.9)
    assert train_tokens == 1_003_855
    assert t.eval_every == (train_tokens - 1) // t.batch_size // t.num_steps == 392
    assert t.eval_every % t.log_every == 0


# ------------------------------------------------------------------ experiment 3: PTB


@pytest.mark.parametrize("name", sorted(ZAREMBA))
def test_ptb_config_matches_the_tensorflow_tutorial(name):
    ref = ZAREMBA[name]
    config = load_config([str(CONFIGS / f"{name}.yaml")])
    m, o, t = config.model, config.optimizer, config.train
    assert (config.data.corpus, config.data.level) == ("ptb", "word")
    assert (m.cell, m.num_layers, m.hidden_size, m.embedding_size) == ("lstm", 2, ref["hidden"], ref["hidden"])
    assert m.init_scale == ref["init_scale"]
    assert m.dropout == pytest.approx(1 - ref["keep_prob"])
    assert (t.batch_size, t.num_steps, t.max_epochs, t.max_steps) == (20, ref["num_steps"], ref["max_max_epoch"], None)
    assert (o.name, o.learning_rate, o.clip_norm) == ("sgd", 1.0, ref["max_grad_norm"])
    # The tutorial's rate in its 0-based epoch i: lr_decay ** max(i + 1 - max_epoch, 0).
    for i in range(ref["max_max_epoch"]):
        expected = ref["lr_decay"] ** max(i + 1 - ref["max_epoch"], 0.0)
        assert learning_rate_at(o, 0, i + 1) == pytest.approx(expected, rel=1e-12), i


def ptb_folder(tmp_path: Path, lines: int | None = None) -> Path:
    """A PTB folder whose training file is ptb.valid.txt (the training split is not available)."""
    folder = tmp_path / "ptb"
    folder.mkdir()
    for target, source in (("ptb.train.txt", "ptb.valid.txt"), ("ptb.valid.txt", "ptb.valid.txt"),
                           ("ptb.test.txt", "ptb.test.txt")):
        if lines is None:
            shutil.copyfile(PTB / source, folder / target)
        else:
            text = (PTB / source).read_text(encoding="utf-8").splitlines(keepends=True)
            (folder / target).write_text("".join(text[:lines]), encoding="utf-8")
    return folder


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ptb_small_trains_evaluates_and_tests_end_to_end(tmp_path, capsys):
    folder = ptb_folder(tmp_path)
    run = tmp_path / "run"
    splits = train_and_read("ptb_small.yaml", [f"data.path={folder}",
                                                "train={max_epochs: 1, log_every: 46, eval_every: 92}"], run, capsys)
    train, valid, test = splits["train"], splits["valid"], splits["test"]
    # 73,760 training tokens (words and <eos>): (73,760 - 1) // 20 // 20 = 184 steps per epoch.
    assert train[-1]["step"] == 184 and train[-1]["epoch"] == 1
    # The epoch schedule keeps lr 1.0 through epoch 4.
    assert {r["learning_rate"] for r in train} == {1.0}
    assert len(json.loads((run / "vocab.json").read_text(encoding="utf-8"))["tokens"]) == 6022
    # Uniform guessing over 6,022 words is ppl 6,022; one epoch of the small model gets far below.
    assert [r["step"] for r in valid] == [92, 184]
    assert valid[-1]["perplexity"] < 1000, valid
    assert valid[-1]["perplexity"] < valid[0]["perplexity"]
    # ptb.test.txt is evaluated after training; its unseen words count as <unk>.
    assert len(test) == 1 and math.isfinite(test[0]["loss"]) and 100 < test[0]["perplexity"] < 2000

    code, out, err = run_cli(["eval", "--run-dir", run, "--split", "test"], capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["perplexity"] == pytest.approx(test[0]["perplexity"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["ptb_medium", "ptb_large"])
def test_ptb_medium_and_large_build_and_train_at_full_size(name, tmp_path, capsys):
    folder = ptb_folder(tmp_path, lines=60)
    run = tmp_path / "run"
    splits = train_and_read(f"{name}.yaml", [f"data.path={folder}",
                                             "train={max_epochs: null, max_steps: 3, log_every: 1, sample_length: 5}"],
                            run, capsys)
    log = (run / "train.log").read_text(encoding="utf-8")
    hidden = ZAREMBA[name]["hidden"]
    assert re.search(rf"2 x lstm {hidden}, embedding {hidden}", log), log[:2000]
    losses = [r["loss"] for r in splits["train"]]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    # The first loss of a uniform-initialized model is about ln(vocabulary size).
    vocab_size = len(set(" ".join((folder / "ptb.train.txt").read_text().split()).split())) + 1  # + <eos>
    assert losses[0] == pytest.approx(math.log(vocab_size), rel=0.05)


# ------------------------------------------------------------------ experiment 4: text8


def text8_stand_in(path: Path, chars: int) -> Path:
    """Tiny-shakespeare in text8's alphabet: lowercase a-z and single spaces, one line."""
    text = SHAKESPEARE.read_text(encoding="utf-8").lower()
    text = re.sub(r"[^a-z]+", " ", text).strip()
    path.write_text(text[:chars], encoding="utf-8")
    return path


def test_text8_config_is_the_udacity_setup():
    config = load_config([str(CONFIGS / "text8_udacity.yaml")])
    m, o, t = config.model, config.optimizer, config.train
    assert (config.data.corpus, config.data.level) == ("text8", "char")
    assert (m.cell, m.num_layers, m.hidden_size) == ("lstm", 1, 64)
    assert (t.batch_size, t.num_steps, t.max_steps) == (64, 10, 7001)
    assert (o.name, o.clip_norm) == ("sgd", 1.25)
    # tf.train.exponential_decay(10.0, step, 5000, 0.1, staircase=True)
    rates = {step: learning_rate_at(o, step, 1) for step in (0, 4999, 5000, 7000)}
    assert rates == pytest.approx({0: 10.0, 4999: 10.0, 5000: 1.0, 7000: 1.0})


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_text8_pipeline_end_to_end_on_a_stand_in(tmp_path, capsys):
    data = text8_stand_in(tmp_path / "text8", 400_000)
    run = tmp_path / "run"
    # Decay every 200 steps instead of 5000, so that the staircase shows within 500 steps.
    splits = train_and_read("text8_udacity.yaml", [f"data.path={data}", "data.split=[0.9, 0.1, 0.0]",
                                                   "optimizer.schedule.decay_steps=200",
                                                   "train={max_steps: 500, log_every: 50, eval_every: 250}",
                                                   "checkpoint.every_steps=0"], run, capsys)
    train, valid = splits["train"], splits["valid"]
    by_step = {r["step"]: r for r in train}
    # Logged after step s, the rate used by step s (0-based s - 1).
    assert by_step[200]["learning_rate"] == pytest.approx(10.0)
    assert by_step[250]["learning_rate"] == pytest.approx(1.0)
    assert by_step[500]["learning_rate"] == pytest.approx(0.1)
    # 26 letters and space (+ <unk>): uniform is ppl 28; the model gets far below it.
    assert valid[-1]["perplexity"] < 9.0, valid
