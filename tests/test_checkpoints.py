"""Checkpoints: bitwise resume, resume across replica counts, signals, corruption, NaN stop.

Every run is a real ``dist-rnn train`` process.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from equivalence import assert_close_variables

pytestmark = pytest.mark.slow  # subprocess trainings

MODEL = "model={cell: lstm, num_layers: 2, hidden_size: 32, embedding_size: 16, dropout: 0.3}"
OPTIMIZER = ("optimizer={name: adam, learning_rate: 0.01, clip_norm: 1.0, schedule: "
             "{name: exponential, decay_rate: 0.5, decay_steps: 10, staircase: false}}")


def command(run_dir, data, *extra):
    return [sys.executable, "-u", "-m", "dist_rnn", "train", "--run-dir", str(run_dir),
            "--set", f"data={{corpus: file, path: {data}, split: [0.8, 0.2, 0.0], random_offset: true}}",
            "--set", MODEL, "--set", OPTIMIZER,
            "--set", "train={batch_size: 8, num_steps: 20, max_steps: 24, max_epochs: null, log_every: 4, "
                     "sample_length: 0, deterministic: true}",
            "--set", "checkpoint.every_steps=0", "--set", "logging.progress=off", *extra]


def train(run_dir, data, *extra, expect=0):
    proc = subprocess.run(command(run_dir, data, *extra), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


def saved(run_dir, folder="checkpoints") -> dict[str, np.ndarray]:
    prefix = tf.train.latest_checkpoint(str(run_dir / folder))
    reader = tf.train.load_checkpoint(prefix)
    return {n: reader.get_tensor(n) for n, _ in tf.train.list_variables(prefix)
            if n.endswith("VARIABLE_VALUE") and not n.startswith("save_counter")}


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def uninterrupted(shakespeare_slice, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ckpt") / "full"
    train(run_dir, shakespeare_slice)
    return run_dir


def test_identical_runs_give_bitwise_identical_checkpoints(uninterrupted, shakespeare_slice, tmp_path):
    train(tmp_path / "again", shakespeare_slice)
    assert_bitwise_equal(saved(uninterrupted), saved(tmp_path / "again"))


def test_stop_and_resume_is_bitwise_identical_to_uninterrupted(uninterrupted, shakespeare_slice, tmp_path):
    run_dir = tmp_path / "resumed"
    train(run_dir, shakespeare_slice, "--set", "train.max_steps=11")  # stops mid-epoch, dropout on
    assert int(saved(run_dir)["training_state/step/.ATTRIBUTES/VARIABLE_VALUE"]) == 11
    proc = subprocess.run([sys.executable, "-m", "dist_rnn", "train", "--run-dir", str(run_dir),
                           "--set", "train.max_steps=24"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout and "config change on resume: train.max_steps: 11 -> 24" in proc.stdout
    assert_bitwise_equal(saved(uninterrupted), saved(run_dir))


@pytest.mark.parametrize("first,second", [(2, 1), (1, 4)])
def test_resume_on_another_replica_count_continues_every_row(uninterrupted, shakespeare_slice, tmp_path,
                                                             first, second):
    def backend(n):
        return "distribute={backend: none, cpu_devices: 0}" if n == 1 else f"distribute={{backend: mirrored, cpu_devices: {n}}}"

    run_dir = tmp_path / f"{first}to{second}"
    train(run_dir, shakespeare_slice, "--set", "train.max_steps=11", "--set", backend(first))
    train(run_dir, shakespeare_slice, "--set", backend(second))
    # Exact: step, data position and fingerprint; weights, optimizer slots and
    # every row's carried state (re-sharded) differ from one device only by
    # float32 reduction order, within the tolerances measured in equivalence.py.
    assert_close_variables(saved(uninterrupted), saved(run_dir))


def test_sigterm_finishes_step_saves_and_resumes(shakespeare_slice, tmp_path):
    run_dir = tmp_path / "term"
    proc = subprocess.Popen(command(run_dir, shakespeare_slice, "--set", "train.max_steps=100000",
                                    "--set", "train.log_every=1", "--set", "train.sample_length=50"),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step       5"):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM after step" in out
    assert "sample:" not in out  # the grace period is for the checkpoint, not for sampling
    stopped_at = int(saved(run_dir)["training_state/step/.ATTRIBUTES/VARIABLE_VALUE"])
    assert stopped_at >= 5
    proc = subprocess.run([sys.executable, "-m", "dist_rnn", "train", "--run-dir", str(run_dir),
                           "--set", f"train.max_steps={stopped_at + 3}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = [m["step"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if m["split"] == "train"]
    assert steps[-3:] == [stopped_at + 1, stopped_at + 2, stopped_at + 3]


def test_sigkill_during_saves_leaves_a_loadable_checkpoint(shakespeare_slice, tmp_path):
    run_dir = tmp_path / "kill"
    # A wide model saved every step: most of the wall time is spent saving.
    proc = subprocess.Popen(command(run_dir, shakespeare_slice, "--set", "train.max_steps=100000",
                                    "--set", "checkpoint={every_steps: 1, keep: 2}",
                                    "--set", "model={hidden_size: 512, embedding_size: 512}"),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if "saved checkpoint" in line and "ckpt-4" in line:
            break
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    latest = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    step = int(latest.rsplit("-", 1)[1])
    assert step >= 4
    resumed = subprocess.run([sys.executable, "-m", "dist_rnn", "train", "--run-dir", str(run_dir),
                              "--set", f"train.max_steps={step + 1}", "--set", "checkpoint.every_steps=0"],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {latest} (step {step})" in resumed.stdout


def test_corrupt_checkpoint_is_named_and_fallback_resumes_from_previous(shakespeare_slice, tmp_path):
    run_dir = tmp_path / "corrupt"
    train(run_dir, shakespeare_slice, "--set", "train.max_steps=8", "--set", "checkpoint={every_steps: 4, keep: 3}")
    data_file = run_dir / "checkpoints" / "ckpt-8.data-00000-of-00001"
    data_file.write_bytes(data_file.read_bytes()[:100])
    before = sorted(p.name for p in run_dir.rglob("*"))
    refused = subprocess.run([sys.executable, "-m", "dist_rnn", "train", "--run-dir", str(run_dir),
                              "--set", "train.max_steps=12"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint ") and "ckpt-8.data-00000-of-00001" in last
    assert "checkpoint.fallback=true" in last and "Traceback" not in refused.stderr
    assert sorted(p.name for p in run_dir.rglob("*")) == before  # nothing written
    resumed = subprocess.run([sys.executable, "-m", "dist_rnn", "train", "--run-dir", str(run_dir),
                              "--set", "train.max_steps=12", "--set", "checkpoint.fallback=true"],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "falling back to" in resumed.stderr + resumed.stdout
    assert "(step 4)" in resumed.stdout
    assert int(saved(run_dir)["training_state/step/.ATTRIBUTES/VARIABLE_VALUE"]) == 12


def test_nan_loss_in_float32_stops_and_keeps_last_good_checkpoint(shakespeare_slice, tmp_path):
    run_dir = tmp_path / "nan"
    train(run_dir, shakespeare_slice, "--set", "train.max_steps=3")
    good = saved(run_dir)
    # Resume with a learning rate that overflows float32 weights: a real NaN.
    proc = subprocess.run([sys.executable, "-m", "dist_rnn", "train", "--run-dir", str(run_dir),
                           "--set", "optimizer={learning_rate: 1.0e+38, clip_norm: 0.0}",
                           "--set", "train={max_steps: 50, log_every: 1}", "--set", "checkpoint.every_steps=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training loss became nan") or last.startswith("error: training loss became inf")
    assert "the last good checkpoint is" in last and "Traceback" not in proc.stderr
    kept = saved(run_dir)
    assert all(np.isfinite(v).all() for v in kept.values() if not isinstance(v, bytes) and v.dtype.kind == "f")
    assert int(kept["training_state/step/.ATTRIBUTES/VARIABLE_VALUE"]) >= 3
    assert set(kept) == set(good)
