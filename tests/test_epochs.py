"""Training across epoch boundaries: state reset, random offsets, evaluation, resume at the boundary.

A 1,000-character corpus gives 4 batches per epoch (8 rows of 100 tokens,
windows of 20, a seeded offset in [0, 20) per epoch), so three whole epochs
take 12 steps; evaluation uses 2 rows, so the validation split has 4 windows
to carry the state across. The training step is wrapped to record what the
loop feeds it.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from dist_rnn.distribution import Backend
from dist_rnn.summaries import MetricsLogger
from dist_rnn.runtime import set_precision
from dist_rnn.training.factory import build_trainer
from dist_rnn.training.trainer import Trainer

EPOCHS = 3


@pytest.fixture(scope="module")
def tiny_corpus(shakespeare_slice, tmp_path_factory):
    path = tmp_path_factory.mktemp("epochs") / "shakespeare_1k.txt"
    path.write_text(shakespeare_slice.read_text(encoding="utf-8")[:1000], encoding="utf-8")
    return path


def epoch_config(data, dropout=0.3, **train):
    return tiny_config(data, model={"dropout": dropout},
                       data={"random_offset": True}, checkpoint={"every_steps": 2, "keep": 2},
                       train={"max_steps": None, "max_epochs": EPOCHS, "log_every": 1, "eval_batch_size": 2, **train})


def run(config, run_dir, record=None, interrupt_at=None) -> Trainer:
    """Trains (resuming from run_dir's checkpoint if any).

    ``record`` collects each step's inputs and states; ``interrupt_at``
    sends this process SIGINT during that (1-based) step of this session.
    """
    tf.keras.utils.set_random_seed(config.train.seed)
    set_precision("float32")
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLogger(run_dir, True, tensorboard=False, progress="off")
    trainer = build_trainer(config, run_dir, backend=Backend(), metrics=metrics)
    trainer.restore()
    record = [] if record is None else record
    step = trainer.steps.train_step

    def recording(inputs, targets, states, seed, length=None):
        out = step(inputs, targets, states, seed, length)
        if len(record) + 1 == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        record.append({"loss": float(out[0]), "inputs": np.asarray(inputs), "targets": np.asarray(targets),
                       "states": [np.asarray(s) for s in states], "new_states": [np.asarray(s) for s in out[1]]})
        return out

    trainer.steps.train_step = recording
    try:
        trainer.result = trainer.train()
    finally:
        metrics.close()
    return trainer


@pytest.fixture(scope="module")
def uninterrupted(tiny_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("epochs") / "full"
    calls: list[dict] = []
    trainer = run(epoch_config(tiny_corpus), run_dir, calls)
    return trainer, calls, run_dir


def test_state_is_zero_at_each_epoch_start_and_carried_within(uninterrupted):
    trainer, calls, _ = uninterrupted
    batcher = trainer.train_batches
    per_epoch = [batcher.batches_in_epoch(e) for e in range(1, EPOCHS + 1)]
    assert per_epoch == [4, 4, 4]
    offsets = [batcher.offset(e) for e in range(1, EPOCHS + 1)]
    assert len(set(offsets)) > 1  # the random offset really moves the windows
    assert len(calls) == sum(per_epoch) == int(trainer.state.step)
    k = 0
    for epoch, n in enumerate(per_epoch, start=1):
        for index in range(n):
            call = calls[k]
            start = offsets[epoch - 1] + index * batcher.num_steps
            np.testing.assert_array_equal(call["inputs"], batcher.rows[:, start:start + batcher.num_steps])
            np.testing.assert_array_equal(call["targets"], batcher.rows[:, start + 1:start + 1 + batcher.num_steps])
            if index == 0:
                assert all(not s.any() for s in call["states"]), f"epoch {epoch} starts from a non-zero state"
            else:
                for given, previous in zip(call["states"], calls[k - 1]["new_states"]):
                    np.testing.assert_array_equal(given, previous)
                assert all(np.abs(s).max() > 1e-3 for s in call["states"])
            k += 1
    # The run ends after the last epoch with the position of the next one.
    assert (int(trainer.state.epoch), int(trainer.state.batch_in_epoch)) == (EPOCHS + 1, 0)


def test_evaluation_carries_state_and_counts_the_scored_tokens(uninterrupted):
    trainer = uninterrupted[0]
    batches = trainer.eval_batches["valid"]
    carried = reset = 0.0
    tokens = 0
    states = trainer.model.initial_state(batches.batch_size)
    for inputs, targets, weights in batches.dataset():
        loss, states = trainer.steps.eval_step(inputs, targets, weights, states)
        carried += float(loss)
        zero = trainer.model.initial_state(batches.batch_size)
        reset += float(trainer.steps.eval_step(inputs, targets, weights, zero)[0])
        tokens += int(np.sum(weights))
    result = trainer.evaluate("valid")
    assert result.tokens == tokens
    assert result.loss == pytest.approx(carried / tokens, rel=1e-6)
    assert tokens == len(trainer.corpus.valid) - 1  # every token but the first
    assert abs(carried - reset) / carried > 1e-4  # the carried state changes the numbers


def test_checkpoint_keep_holds_the_newest_checkpoints(uninterrupted):
    folder = uninterrupted[2] / "checkpoints"
    assert sorted(p.name for p in folder.glob("ckpt-*.index")) == ["ckpt-10.index", "ckpt-12.index"]


@pytest.mark.parametrize("stop_at", [4, 11], ids=["at-epoch-boundary", "sigint-before-last-batch"])
def test_resume_across_epochs_is_bitwise_identical(uninterrupted, tiny_corpus, tmp_path, stop_at):
    run_dir = tmp_path / "resumed"
    if stop_at == 4:  # the end of epoch 1 by max_steps
        stopped = run(epoch_config(tiny_corpus, max_steps=stop_at), run_dir)
    else:  # SIGINT during step 11: the step finishes, is saved, training stops
        stopped = run(epoch_config(tiny_corpus), run_dir, interrupt_at=stop_at)
        assert stopped.result["stopped_by"] == "SIGINT"
    assert int(stopped.state.step) == stop_at
    expected_position = (2, 0) if stop_at == 4 else (3, 3)  # step 4 ends epoch 1: saved as the start of epoch 2
    assert (int(stopped.state.epoch), int(stopped.state.batch_in_epoch)) == expected_position
    calls: list[dict] = []
    run(epoch_config(tiny_corpus), run_dir, calls)
    assert len(calls) == 12 - stop_at
    reference, resumed = saved(uninterrupted[2]), saved(run_dir)
    assert reference.keys() == resumed.keys()
    for name in reference:
        assert np.array_equal(reference[name], resumed[name]), name


def test_jit_compile_in_the_loop_matches_the_plain_step(tiny_corpus, tmp_path):
    # Dropout off: XLA draws other dropout masks from the same stateless seed
    # (measured: loss 616.08 vs 616.02 at the first step with dropout 0.3).
    runs = {}
    for jit in (False, True):
        calls: list[dict] = []
        trainer = run(epoch_config(tiny_corpus, dropout=0.0, max_steps=6, jit_compile=jit), tmp_path / str(jit), calls)
        assert trainer.steps._forward_backward._jit_compile is jit  # the step really is (not) XLA-compiled
        assert len(calls) == 6  # across the first epoch boundary
        runs[jit] = calls
    # XLA fuses and reorders float32 arithmetic: ~1e-7 relative per step (measured 2e-7 on the states).
    for xla, plain in zip(runs[True], runs[False]):
        assert xla["loss"] == pytest.approx(plain["loss"], rel=1e-5)
        for a, b in zip(xla["new_states"], plain["new_states"]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def saved(run_dir) -> dict[str, np.ndarray]:
    prefix = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    reader = tf.train.load_checkpoint(prefix)
    return {n: reader.get_tensor(n) for n, _ in tf.train.list_variables(prefix)
            if n.endswith("VARIABLE_VALUE") and not n.startswith("save_counter")}
