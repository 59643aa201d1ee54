"""Horovod training (launch/horovod.sh) equals single-device training.

The same 24-step run as tests/test_distributed.py (dropout 0, clipping active at
every step, decaying learning rate, global batch 8), started by horovodrun with
two Gloo ranks on CPU. Skipped only where ``horovod.tensorflow`` cannot be
imported (CI installs it with tools/install_horovod.sh before pytest). What
happens without Horovod is tested in test_horovod_missing.py, which always runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO
from equivalence import ARGS, assert_same_run, data_args, metrics
from test_distributed import single_device_run  # noqa: F401 (a fixture)

try:
    import horovod.tensorflow  # noqa: F401
except ImportError as e:
    pytest.skip(f"horovod.tensorflow is not importable ({e}); install it with tools/install_horovod.sh",
                allow_module_level=True)

pytestmark = pytest.mark.slow  # horovodrun jobs

LAUNCH = REPO / "launch" / "horovod.sh"


def launch_env(**extra) -> dict:
    """Environment for launch/horovod.sh: this interpreter, its horovodrun, quiet TensorFlow."""
    env = {**os.environ, "PYTHON": sys.executable, "TF_CPP_MIN_LOG_LEVEL": "3", **extra}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_horovod_two_ranks_match_single_device(single_device_run, shakespeare_slice, tmp_path):
    run_dir = tmp_path / "horovod"
    cmd = [str(LAUNCH), "-n", "2", "--", "--run-dir", str(run_dir), *data_args(shakespeare_slice), *ARGS]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=launch_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    assert "[0]<stdout>:backend         horovod: 2 replica(s), 2 worker(s), devices /device:CPU:0" in out
    assert any(line.startswith("[0]<stdout>:batch ") and "4 rows per replica" in line for line in out)
    assert not [line for line in out if line.startswith("[1]<stdout>:")]  # rank 1: warnings only, on stderr
    assert_same_run(single_device_run, run_dir)
    # Only rank 0 wrote: one event file per TensorBoard folder, one metrics stream.
    assert len(list((run_dir / "train").glob("events.*"))) == 1
    assert len(list((run_dir / "valid").glob("events.*"))) == 1
    assert len(metrics(run_dir)) == len(metrics(single_device_run))


def test_horovod_scales_learning_rate_with_ranks(shakespeare_slice, tmp_path):
    """optimizer.scale_lr_with_replicas multiplies by hvd.size(), ramped up over the warmup."""
    from dist_rnn.run_dir import RunDirectory
    from dist_rnn.training.schedules import learning_rate_at

    optimizer = {"name": "adam", "learning_rate": 0.01, "clip_norm": 0.1, "scale_lr_with_replicas": True,
                 "schedule": {"name": "cosine", "warmup_steps": 4, "total_steps": 12}}
    run_dir = tmp_path / "scaled"
    cmd = [str(LAUNCH), "-n", "2", "--", "--run-dir", str(run_dir), *data_args(shakespeare_slice), *ARGS,
           "--set", f"optimizer={json.dumps(optimizer)}", "--set", "train.max_steps=6", "--set", "train.log_every=1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=launch_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    config = RunDirectory(run_dir).load_config().optimizer
    assert config.scale_lr_with_replicas and config.schedule.warmup_steps == 4
    logged = {m["step"]: m["learning_rate"] for m in metrics(run_dir) if m["split"] == "train"}
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    for step, lr in logged.items():  # the value logged at step s drove optimizer step s-1
        unscaled = learning_rate_at(config, step - 1, 1, 6, num_replicas=1)
        ramp = min(1.0, step / 4)  # linear scaling rule: 1 -> 2 replicas over the 4 warmup steps
        assert lr == pytest.approx(unscaled * (1 + ramp), rel=1e-12), (step, lr, unscaled)


def rank_pids(marker: str, rank: int) -> list[int]:
    """PIDs of dist_rnn processes with ``marker`` in their arguments and HOROVOD_RANK=``rank`` in their environment."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours
            continue
        if b"dist_rnn" in cmdline and any(marker.encode() in arg for arg in cmdline) \
                and f"HOROVOD_RANK={rank}".encode() in environ:
            pids.append(int(proc.name))
    return pids


def test_horovod_job_fails_fast_when_a_rank_is_killed(shakespeare_slice, tmp_path):
    run_dir = tmp_path / f"killed-{os.getpid()}-{time.monotonic_ns()}"  # unique: marks this job's processes
    cmd = [str(LAUNCH), "-n", "2", "--", "--run-dir", str(run_dir), *data_args(shakespeare_slice), *ARGS,
           "--set", "train.max_steps=100000", "--set", "train.log_every=1"]
    job = subprocess.Popen(cmd, cwd=REPO, env=launch_env(HOROVOD_GLOO_TIMEOUT_SECONDS="30"),
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    # However the job misbehaves, the test ends: its process group is killed after 5 minutes.
    watchdog = threading.Timer(300, lambda: os.killpg(job.pid, signal.SIGKILL))
    watchdog.start()
    elapsed = returncode = None
    started = False
    try:
        for line in job.stdout:  # wait until training is under way
            if line.startswith("[0]<stdout>:step       3"):
                started = True
                break
        assert started, "training did not reach step 3"
        victims = rank_pids(str(run_dir), 1)
        assert len(victims) == 1, victims
        os.kill(victims[0], signal.SIGKILL)
        killed_at = time.monotonic()
        job.stdout.close()
        returncode = job.wait(timeout=120)
        elapsed = time.monotonic() - killed_at
    finally:
        watchdog.cancel()
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert returncode != 0
    assert elapsed < 90, elapsed  # horovodrun stops the job (Gloo's timeout bounds a survivor): no hang
    assert not rank_pids(str(run_dir), 0)  # no orphaned rank 0
