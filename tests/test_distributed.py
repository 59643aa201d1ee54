"""Distributed training equals single-device training on the same global batch.

Each run is a fresh ``dist-rnn train`` process: logical CPU devices must be
created before TensorFlow initializes. Runs use dropout 0, active clipping and
a decaying learning rate, so the gradient order (all-reduce, then clip) and the
schedule are both exercised.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO

ARGS = [
    "--set", "model={cell: lstm, num_layers: 2, hidden_size: 32, embedding_size: 16, dropout: 0.0}",
    "--set", "optimizer={name: adam, learning_rate: 0.01, clip_norm: 0.1, schedule: "
             "{name: exponential, decay_rate: 0.5, decay_steps: 5, staircase: false}}",
    "--set", "train={batch_size: 8, num_steps: 20, max_steps: 24, max_epochs: null, log_every: 4, sample_length: 0}",
    "--set", "checkpoint.every_steps=0", "--set", "logging.progress=off",
]


def train(run_dir, data, *extra):
    cmd = [sys.executable, "-m", "dist_rnn", "train", "--run-dir", str(run_dir),
           "--set", f"data={{corpus: file, path: {data}, split: [0.8, 0.2, 0.0]}}", *ARGS, *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def variables(run_dir) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(str(run_dir / "checkpoints"))
    return {name: np.asarray(reader.get_tensor(name))
            for name, _ in tf.train.list_variables(str(run_dir / "checkpoints"))
            if name.endswith("VARIABLE_VALUE")}


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_device_run(shakespeare_slice, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single") / "run"
    train(run_dir, shakespeare_slice)
    return run_dir


def assert_same_run(reference, other):
    ref_vars, other_vars = variables(reference), variables(other)
    assert ref_vars.keys() == other_vars.keys()
    compared = 0
    for name, ref in ref_vars.items():
        if ref.dtype.kind != "f":
            np.testing.assert_array_equal(ref, other_vars[name], err_msg=name)
            continue
        # float32 sums in a different order (per-replica partial sums, then the
        # all-reduce) differ by ~1e-7 relative per step; Adam's normalization
        # amplifies that to ~3e-6 relative after 24 steps (measured), so 1e-5
        # relative leaves margin while any real error (a gradient summed twice,
        # clipped per replica, a row on the wrong replica) is off by >1e-2.
        np.testing.assert_allclose(other_vars[name], ref, rtol=1e-5, atol=1e-6, err_msg=name)
        compared += 1
    assert compared > 20
    ref_m, other_m = metrics(reference), metrics(other)
    ref_valid = [m for m in ref_m if m["split"] == "valid"][-1]
    other_valid = [m for m in other_m if m["split"] == "valid"][-1]
    assert other_valid["perplexity"] == pytest.approx(ref_valid["perplexity"], rel=1e-5)
    ref_train = [m["grad_norm"] for m in ref_m if m["split"] == "train"]
    other_train = [m["grad_norm"] for m in other_m if m["split"] == "train"]
    assert min(ref_train) > 0.1  # clipping was active at every logged step
    np.testing.assert_allclose(other_train, ref_train, rtol=1e-4)


@pytest.mark.slow
def test_mirrored_two_logical_cpus_matches_single_device(single_device_run, shakespeare_slice, tmp_path):
    run_dir = tmp_path / "mirrored"
    proc = train(run_dir, shakespeare_slice, "--set", "distribute={backend: mirrored, cpu_devices: 2}")
    assert "mirrored: 2 replica(s)" in proc.stdout
    assert "4 rows per replica" in proc.stdout
    assert_same_run(single_device_run, run_dir)


def test_mirrored_rejects_batch_not_divisible_by_replicas(shakespeare_slice, tmp_path):
    run_dir = tmp_path / "bad"
    cmd = [sys.executable, "-m", "dist_rnn", "train", "--run-dir", str(run_dir),
           "--set", f"data={{corpus: file, path: {shakespeare_slice}}}", *ARGS,
           "--set", "distribute={backend: mirrored, cpu_devices: 3}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: config key 'train.batch_size'")
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()


def worker_env(ports: str, index: int) -> dict:
    env = dict(os.environ)
    env["TF_CONFIG"] = json.dumps({"cluster": {"worker": ports.split(",")}, "task": {"type": "worker", "index": index}})
    return env


def free_ports(n: int) -> str:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = ",".join(f"127.0.0.1:{s.getsockname()[1]}" for s in socks)
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
def test_multiworker_two_local_processes_match_single_device(single_device_run, shakespeare_slice, tmp_path):
    run_dir = tmp_path / "multiworker"
    cmd = [str(REPO / "launch" / "multiworker.sh"), "-n", "2", "--", "--run-dir", str(run_dir),
           "--set", f"data={{corpus: file, path: {shakespeare_slice}, split: [0.8, 0.2, 0.0]}}", *ARGS]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[w0] backend         multiworker: 2 replica(s), 2 worker(s)" in proc.stdout
    assert not [line for line in proc.stdout.splitlines() if line.startswith("[w1]")]  # non-chief: warnings only
    assert_same_run(single_device_run, run_dir)
    # Only the chief wrote: one event file per TensorBoard folder, one metrics stream.
    assert len(list((run_dir / "train").glob("events.*"))) == 1
    assert len(list((run_dir / "valid").glob("events.*"))) == 1
    assert len(metrics(run_dir)) == len(metrics(single_device_run))


@pytest.mark.slow
def test_multiworker_survivor_fails_fast_when_a_worker_is_killed(shakespeare_slice, tmp_path):
    ports = free_ports(2)
    base = [sys.executable, "-u", "-m", "dist_rnn", "train", "--run-dir", str(tmp_path / "run"),
            "--set", f"data={{corpus: file, path: {shakespeare_slice}}}", *ARGS,
            "--set", "train.max_steps=100000", "--set", "train.log_every=1",
            "--set", "distribute={backend: multiworker, timeout_seconds: 15}"]
    chief = subprocess.Popen(base, cwd=REPO, env=worker_env(ports, 0), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    other = subprocess.Popen(base, cwd=REPO, env=worker_env(ports, 1), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        for line in chief.stdout:  # wait until training is under way
            if line.startswith("step       3"):
                break
        other.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        chief.stdout.close()
        returncode = chief.wait(timeout=120)
        elapsed = time.monotonic() - killed_at
        stderr = chief.stderr.read()
    finally:
        for p in (chief, other):
            if p.poll() is None:
                p.kill()
    assert returncode != 0
    assert elapsed < 60, elapsed  # bounded by distribute.timeout_seconds (15 s), not a hang
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: a collective operation failed")
