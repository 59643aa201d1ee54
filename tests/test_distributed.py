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

import pytest

from conftest import REPO
from equivalence import ARGS, TOLERANCE, assert_same_run, data_args, metrics, run_errors, train


@pytest.fixture(scope="module")
def single_device_run(shakespeare_slice, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single") / "run"
    train(run_dir, shakespeare_slice)
    return run_dir


@pytest.mark.slow
def test_mirrored_two_logical_cpus_matches_single_device(single_device_run, shakespeare_slice, tmp_path):
    run_dir = tmp_path / "mirrored"
    proc = train(run_dir, shakespeare_slice, "--set", "distribute={backend: mirrored, cpu_devices: 2}")
    assert "mirrored: 2 replica(s)" in proc.stdout
    assert "4 rows per replica" in proc.stdout
    assert_same_run(single_device_run, run_dir)


@pytest.mark.slow
def test_mirrored_under_another_instruction_set_matches_single_device(single_device_run, shakespeare_slice,
                                                                    tmp_path):
    # oneDNN limited to AVX2 picks other kernels (other summation orders): the
    # arithmetic of another CPU, crossed with the replicas' reduction order.
    # Guards the tolerances against being tuned to one machine's instruction set.
    run_dir = tmp_path / "mirrored_avx2"
    train(run_dir, shakespeare_slice, "--set", "distribute={backend: mirrored, cpu_devices: 2}",
          env={"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert_same_run(single_device_run, run_dir)


# Run as `python -c PLANT_PER_REPLICA_CLIP train ...`: dist-rnn with one planted
# distributed error, each replica's gradient clipped before the all-reduce (what
# a Keras optimizer's clipnorm would do under a strategy).
PLANT_PER_REPLICA_CLIP = """
import sys
from dist_rnn import distribution
from dist_rnn.training import gradients
reduce = distribution.MirroredBackend.all_reduce_sum
def clip_then_reduce(self, grads):
    return reduce(self, gradients.clip_by_global_norm(grads, 0.1, gradients.global_norm(grads)))
distribution.MirroredBackend.all_reduce_sum = clip_then_reduce
from dist_rnn.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_planted_per_replica_clipping_fails_the_equivalence(single_device_run, shakespeare_slice, tmp_path):
    run_dir = tmp_path / "planted"
    cmd = [sys.executable, "-c", PLANT_PER_REPLICA_CLIP, "train", "--run-dir", str(run_dir),
           *data_args(shakespeare_slice), *ARGS, "--set", "distribute={backend: mirrored, cpu_devices: 2}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = run_errors(single_device_run, run_dir)
    # Orders of magnitude outside the tolerance, so the equivalence tests catch it.
    assert errors["weights"] > 100 * TOLERANCE["weights"], errors
    with pytest.raises(AssertionError):
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


def signal_one_of_two_workers(run_dir, data, args: list[str], sig: int) -> tuple[int, float, str]:
    """Starts 2 local workers and sends ``sig`` to worker 1 once the chief logged step 3.

    Returns:
        The chief's exit code, the seconds from the signal to its exit, and its stderr.
    """
    ports = free_ports(2)
    base = [sys.executable, "-u", "-m", "dist_rnn", "train", "--run-dir", str(run_dir),
            "--set", f"data={{corpus: file, path: {data}}}", *args,
            "--set", "train.max_steps=100000", "--set", "train.log_every=1"]
    chief = subprocess.Popen(base, cwd=REPO, env=worker_env(ports, 0), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    other = subprocess.Popen(base, cwd=REPO, env=worker_env(ports, 1), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        for line in chief.stdout:  # wait until training is under way
            if line.startswith("step       3"):
                break
        other.send_signal(sig)
        signalled_at = time.monotonic()
        chief.stdout.close()
        returncode = chief.wait(timeout=180)
        elapsed = time.monotonic() - signalled_at
        stderr = chief.stderr.read()
    finally:
        for p in (chief, other):
            if p.poll() is None:
                p.kill()
                p.wait()
    return returncode, elapsed, stderr


@pytest.mark.slow
def test_multiworker_survivor_fails_fast_when_a_worker_is_killed(shakespeare_slice, tmp_path):
    returncode, elapsed, stderr = signal_one_of_two_workers(
        tmp_path / "run", shakespeare_slice, [*ARGS, "--set", "distribute={backend: multiworker, timeout_seconds: 15}"],
        signal.SIGKILL)
    assert returncode != 0
    assert elapsed < 60, elapsed  # bounded by distribute.timeout_seconds (15 s), not a hang
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: a collective operation failed")
