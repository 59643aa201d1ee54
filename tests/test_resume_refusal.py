"""Resume refuses what would make the checkpoint mean something else; signals and checkpoint.keep.

Refusals happen before anything is built, so a run directory holding only
its ``config.yaml`` is enough for the config keys; the fingerprint check is
exercised on a real checkpoint of the training state.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import tensorflow as tf

from conftest import REPO, assert_one_line_error, run_cli, tiny_config
from dist_rnn.training.checkpoints import Checkpointer, TrainingState, fingerprint
from dist_rnn.config import save_config
from dist_rnn.errors import UserError


@pytest.fixture
def saved_run(shakespeare_slice, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(tiny_config(shakespeare_slice), run_dir / "config.yaml")
    return run_dir


@pytest.mark.parametrize("override,shown", [
    ("optimizer.name=sgd", "optimizer.name: 'adam' -> 'sgd'"),
    ("train.batch_size=16", "train.batch_size: 8 -> 16"),
    ("train.num_steps=40", "train.num_steps: 20 -> 40"),
    ("data.max_vocab=50", "data.max_vocab: None -> 50"),
    ("data.level=word", "data.level: 'char' -> 'word'"),
    ("model.embedding_size=8", "model.embedding_size: 16 -> 8"),
])
def test_resume_refuses_keys_that_change_the_checkpoint_meaning(saved_run, capsys, override, shown):
    before = sorted(p.name for p in saved_run.rglob("*"))
    config_before = (saved_run / "config.yaml").read_bytes()
    line = assert_one_line_error(*run_cli(["train", "--run-dir", saved_run, "--set", override], capsys))
    assert "cannot resume" in line and shown in line, line
    assert (saved_run / "config.yaml").read_bytes() == config_before
    assert sorted(p.name for p in saved_run.rglob("*")) == before


def test_resume_refuses_a_checkpoint_of_another_vocabulary(tmp_path):
    config = {"model.cell": "lstm", "model.hidden_size": 32}
    written = fingerprint(config, ["\n", " ", "a", "b"])
    other_vocab = fingerprint(config, ["\n", " ", "a", "c"])
    assert len({written, other_vocab, fingerprint({**config, "model.hidden_size": 64}, ["\n", " ", "a", "b"])}) == 3
    Checkpointer(tmp_path, 3, training_state=TrainingState([(2, 4)], written)).save(1)
    state = TrainingState([(2, 4)], other_vocab)
    with pytest.raises(UserError) as err:
        Checkpointer(tmp_path, 3, training_state=state).restore_latest(False, other_vocab, state)
    assert "written by another run" in str(err.value) and "ckpt-1" in str(err.value)
    same = TrainingState([(2, 4)], written)
    assert Checkpointer(tmp_path, 3, training_state=same).restore_latest(False, written, same).endswith("ckpt-1")


def test_checkpoint_keep_deletes_all_but_the_newest(tmp_path):
    state = TrainingState([(2, 3)])
    checkpointer = Checkpointer(tmp_path, 2, training_state=state)
    for step in (1, 2, 3, 4):
        state.step.assign(step)
        checkpointer.save(step)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.index")) == ["ckpt-3.index", "ckpt-4.index"]
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-4")


SIGNALS_SCRIPT = """
import os, signal, sys, time
from dist_rnn.training.preemption import StopRequest
with StopRequest() as stop:
    os.kill(os.getpid(), signal.SIG{first})
    time.sleep(0.2)
    print("requested", stop.requested, flush=True)
    os.kill(os.getpid(), signal.SIG{second})
    time.sleep(5)
    print("still running", flush=True)
"""


@pytest.mark.parametrize("first,second", [("INT", "INT"), ("TERM", "INT")])
def test_first_signal_requests_a_stop_and_the_second_exits_at_once(first, second):
    proc = subprocess.run([sys.executable, "-c", SIGNALS_SCRIPT.format(first=first, second=second)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.stdout == f"requested SIG{first}\n"
    assert proc.returncode == 128 + getattr(__import__("signal"), f"SIG{second}")
    assert f"SIG{first}: finishing this step, then saving" in proc.stderr
    assert f"second signal (SIG{second}): exiting now without saving" in proc.stderr
