"""A process killed inside a checkpoint save leaves the previous checkpoint as the newest.

Killing after a fixed delay does not show that a save was interrupted. Here a
hook blocks the third save after its data and index files are written and
before the ``checkpoint`` state file names it: the process is killed exactly
there, so the kill provably lands inside a save.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import tensorflow as tf

from conftest import REPO

pytestmark = pytest.mark.slow  # two training processes

BLOCKING_TRAIN = """
import sys, time
from tensorflow.python.checkpoint import checkpoint_management

record_state = checkpoint_management.CheckpointManager._record_state

def blocking_record_state(self):
    if str(self._latest_checkpoint).endswith("checkpoints/ckpt-3"):
        print("blocked inside the save of", self._latest_checkpoint, flush=True)
        time.sleep(600)
    record_state(self)

checkpoint_management.CheckpointManager._record_state = blocking_record_state
from dist_rnn.cli import main
sys.exit(main(sys.argv[1:]))
"""


def train_args(run_dir, data, max_steps):
    return ["train", "--run-dir", str(run_dir),
            "--set", f"data={{corpus: file, path: {data}, split: [0.8, 0.2, 0.0]}}",
            "--set", "model={cell: lstm, num_layers: 1, hidden_size: 32, embedding_size: 16}",
            "--set", f"train={{batch_size: 8, num_steps: 20, max_steps: {max_steps}, max_epochs: null, "
                     "log_every: 1, sample_length: 0}",
            "--set", "checkpoint={every_steps: 1, keep: 5}", "--set", "logging.progress=off"]


def test_kill_inside_a_save_keeps_the_previous_checkpoint(shakespeare_slice, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-u", "-c", BLOCKING_TRAIN, *train_args(run_dir, shakespeare_slice, 100)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        blocked = False
        for line in proc.stdout:
            if line.startswith("blocked inside the save of"):
                blocked = True
                break
        assert blocked, "the third save never started"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    folder = run_dir / "checkpoints"
    assert (folder / "ckpt-3.index").is_file()  # the interrupted save had written its files
    latest = tf.train.latest_checkpoint(str(folder))
    assert latest.endswith("ckpt-2")
    resumed = subprocess.run([sys.executable, "-m", "dist_rnn", *train_args(run_dir, shakespeare_slice, 4)],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {latest} (step 2)" in resumed.stdout
    assert tf.train.latest_checkpoint(str(folder)).endswith("ckpt-4")
