"""Distribution at scale and on GPU hosts, checked on CPU.

No GPU exists here: GPU hosts are faked (a fake ``nvidia-smi`` for the
launcher, patched ``tf.config`` device lists and a fake Horovod module in
process). What these tests cannot show is how NCCL behaves on real GPUs.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import tensorflow as tf

from conftest import REPO, tiny_config
from dist_rnn import distribution
from dist_rnn.config import DistributeConfig
from dist_rnn.distribution import Backend
from dist_rnn.errors import LOST_PEER_EXIT_CODE
from dist_rnn.errors import UserError
from dist_rnn.summaries import MetricsLogger
from dist_rnn.runtime import set_precision
from dist_rnn.training.factory import build_trainer
from test_distributed import free_ports, signal_one_of_two_workers, worker_env

TINY = [
    "--set", "model={cell: gru, num_layers: 1, hidden_size: 8, embedding_size: 8, dropout: 0.0}",
    "--set", "train={batch_size: 4, num_steps: 5, max_epochs: null, sample_length: 0, eval_every: 0}",
    "--set", "checkpoint.every_steps=0", "--set", "logging={progress: 'off', tensorboard: false}",
]


def thread_count(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no Threads line for {pid}")


@pytest.mark.slow
def test_multiworker_thread_count_stays_flat(shakespeare_slice, tmp_path):
    """A 2-worker run's threads do not grow with the number of steps (they grew by ~6 per step)."""
    ports = free_ports(2)
    cmd = [sys.executable, "-u", "-m", "dist_rnn", "train", "--run-dir", str(tmp_path / "run"),
           "--set", f"data={{corpus: file, path: {shakespeare_slice}, split: [0.9, 0.1, 0.0]}}", *TINY,
           "--set", "train.max_steps=200", "--set", "train.log_every=10",
           "--set", "distribute={backend: multiworker, timeout_seconds: 300}"]
    chief = subprocess.Popen(cmd, cwd=REPO, env=worker_env(ports, 0), stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    other = subprocess.Popen(cmd, cwd=REPO, env=worker_env(ports, 1), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    counts = {}
    try:
        for line in chief.stdout:
            for step in (20, 200):
                if line.startswith(f"step {step:>7} "):
                    counts[step] = (thread_count(chief.pid), thread_count(other.pid))
            if 200 in counts:
                break
        chief.communicate(timeout=300)  # drains stdout: evaluation and saving follow step 200
        assert chief.returncode == 0
        assert other.wait(timeout=60) == 0
    finally:
        for p in (chief, other):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert set(counts) == {20, 200}, counts
    for early, late in zip(counts[20], counts[200]):
        # 180 steps with a per-collective timeout added over 1,000 threads.
        assert late - early <= 10, counts


@pytest.mark.slow
def test_multiworker_survivor_fails_when_a_worker_hangs(shakespeare_slice, tmp_path):
    """A worker that stops (no exit, no closed connection) is found by the missing heartbeats."""
    returncode, elapsed, stderr = signal_one_of_two_workers(
        tmp_path / "run", shakespeare_slice, [*TINY, "--set", "distribute={backend: multiworker, timeout_seconds: 10}"],
        signal.SIGSTOP)
    assert returncode == LOST_PEER_EXIT_CODE, stderr[-2000:]  # 75: the failure a launcher restart can fix (#20)
    # The 10 s heartbeat timeout counts from the hung worker's last heartbeat,
    # which may precede the SIGSTOP by up to a heartbeat interval; then the abort.
    assert 5 <= elapsed < 90, elapsed
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: a collective operation failed") and "heartbeat" in last, last


# ------------------------------------------------------------- stop agreement


class CountingWorkers(Backend):
    """One process that reports two workers and counts stop agreements; the other worker stops at ``stop_on``."""

    def __init__(self, stop_on: int | None = None):
        super().__init__()
        self.num_workers = 2
        self.calls = 0
        self.stop_on = stop_on

    def any_worker(self, flag):
        self.calls += 1
        return flag or self.calls == self.stop_on


def train_with(backend, shakespeare_slice, tmp_path, **train):
    config = tiny_config(shakespeare_slice, train={"max_steps": 20, "log_every": 5, **train},
                         model={"hidden_size": 8, "embedding_size": 8, "num_layers": 1})
    tf.keras.utils.set_random_seed(config.train.seed)
    set_precision(config.train.precision)
    metrics = MetricsLogger(tmp_path, True, tensorboard=False, progress="off")
    trainer = build_trainer(config, tmp_path, backend=backend, metrics=metrics)
    try:
        return trainer.train()
    finally:
        metrics.close()


def test_multi_process_stop_agreement_runs_every_log_every_steps(shakespeare_slice, tmp_path):
    backend = CountingWorkers()
    result = train_with(backend, shakespeare_slice, tmp_path)
    assert result["step"] == 20 and "stopped_by" not in result
    assert backend.calls == 4  # steps 5, 10, 15, 20 (it was 20: one collective per step)


def test_stop_on_another_worker_ends_every_worker_after_the_agreed_step(shakespeare_slice, tmp_path):
    backend = CountingWorkers(stop_on=2)  # the other worker was signalled before the second check
    result = train_with(backend, shakespeare_slice, tmp_path)
    assert result["stopped_by"] == "a signal on another worker"
    assert result["step"] == 10  # the second check: step 10 on every worker


# ----------------------------------------------------------- GPU memory growth


def fake_gpus(monkeypatch, count: int) -> list:
    """Makes TensorFlow report ``count`` physical GPUs; returns the list of set_memory_growth calls."""
    gpus = [tf.config.PhysicalDevice(f"/physical_device:GPU:{i}", "GPU") for i in range(count)]
    real = tf.config.list_physical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: list(gpus) if kind == "GPU" else real(kind))
    calls = []
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth", lambda gpu, on: calls.append((gpu.name, on)))
    monkeypatch.setattr(tf.config, "set_visible_devices", lambda devices, kind=None: calls.append(("visible", devices.name)))
    return calls


@pytest.mark.parametrize("backend", ["none", "mirrored", "multiworker", "horovod"])
def test_every_backend_enables_memory_growth_on_every_gpu(monkeypatch, backend):
    calls = fake_gpus(monkeypatch, 2)

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):  # the backend itself is not built: no GPU exists here
        raise Stop

    for name in ("Backend", "MirroredBackend", "MultiWorkerBackend", "HorovodBackend"):
        monkeypatch.setattr(distribution, name, stop)
    with pytest.raises(Stop):
        distribution.create_backend(DistributeConfig(backend=backend))
    assert calls == [("/physical_device:GPU:0", True), ("/physical_device:GPU:1", True)]


# ---------------------------------------------------------------- Horovod GPUs


def fake_horovod(monkeypatch, local_rank: int, local_size: int, nccl: bool):
    hvd = types.SimpleNamespace(init=lambda: None, local_rank=lambda: local_rank, local_size=lambda: local_size,
                                rank=lambda: local_rank, size=lambda: local_size, nccl_built=lambda: nccl)
    package = types.ModuleType("horovod")
    package.tensorflow = hvd
    monkeypatch.setitem(sys.modules, "horovod", package)
    monkeypatch.setitem(sys.modules, "horovod.tensorflow", hvd)


def test_horovod_refuses_more_ranks_per_host_than_gpus(monkeypatch):
    calls = fake_gpus(monkeypatch, 2)
    fake_horovod(monkeypatch, local_rank=2, local_size=3, nccl=True)
    with pytest.raises(UserError, match=r"3 ranks on this host but only 2 visible GPU\(s\)") as e:
        distribution.HorovodBackend()
    assert "-H host:2" in str(e.value)
    assert calls == []  # rank 2 did not wrap onto GPU 0


@pytest.mark.parametrize("nccl", [True, False])
def test_horovod_pins_its_gpu_and_warns_without_nccl(monkeypatch, caplog, nccl):
    calls = fake_gpus(monkeypatch, 2)
    fake_horovod(monkeypatch, local_rank=1, local_size=2, nccl=nccl)
    with caplog.at_level(logging.WARNING, logger="dist_rnn"):
        backend = distribution.HorovodBackend()
    assert (backend.worker_index, backend.num_replicas) == (1, 2)
    assert calls == [("visible", "/physical_device:GPU:1"), ("/physical_device:GPU:1", True)]
    warnings = [r.getMessage() for r in caplog.records if "without NCCL" in r.getMessage()]
    assert len(warnings) == (0 if nccl else 1)
    if not nccl:
        assert "through host memory" in warnings[0]


# ------------------------------------------------------ launcher GPU sharing


def launch_workers(tmp_path, n: int, gpus: list[str] | None, **env) -> subprocess.CompletedProcess:
    """Runs launch/multiworker.sh -n N with a fake nvidia-smi and a fake trainer that prints its GPUs.

    ``gpus`` is what nvidia-smi lists; None makes nvidia-smi fail (no driver).
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + ("exit 9\n" if gpus is None else "".join(f"echo '{g}'\n" for g in gpus)))
    python = bin_dir / "python"  # the train command reports; helper calls go to the real interpreter
    python.write_text(f"""#!/bin/bash
if [ "$1" = -u ]; then echo "index=$(echo "$TF_CONFIG" | sed 's/.*"index": *//; s/}}.*//') gpus=${{CUDA_VISIBLE_DEVICES-unset}}"; exit 0; fi
exec {sys.executable} "$@"
""")
    for f in (smi, python):
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    base = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    return subprocess.run([str(REPO / "launch" / "multiworker.sh"), "-n", str(n), "--", "cfg.yaml"], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**base, "PATH": f"{bin_dir}{os.pathsep}{base['PATH']}", "PYTHON": str(python), **env})


def worker_gpus(proc) -> dict[str, str]:
    assert proc.returncode == 0, proc.stderr
    seen = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    return {worker: text for worker, text in sorted(seen.items())}


def test_launcher_gives_each_local_worker_its_share_of_the_gpus(tmp_path):
    proc = launch_workers(tmp_path, 2, ["0", "1", "2", "3"])
    assert worker_gpus(proc) == {"[w0]": "index=0 gpus=0,1", "[w1]": "index=1 gpus=2,3"}
    proc = launch_workers(tmp_path, 4, ["0", "1", "2", "3"])
    assert worker_gpus(proc) == {f"[w{i}]": f"index={i} gpus={i}" for i in range(4)}


def test_launcher_shares_out_cuda_visible_devices(tmp_path):
    proc = launch_workers(tmp_path, 2, ["0", "1", "2", "3"], CUDA_VISIBLE_DEVICES="5,7")
    assert worker_gpus(proc) == {"[w0]": "index=0 gpus=5", "[w1]": "index=1 gpus=7"}


def test_launcher_without_gpus_leaves_the_environment_alone(tmp_path):
    assert worker_gpus(launch_workers(tmp_path, 2, None)) == {"[w0]": "index=0 gpus=unset",
                                                             "[w1]": "index=1 gpus=unset"}
    assert worker_gpus(launch_workers(tmp_path, 2, ["0"], CUDA_VISIBLE_DEVICES="")) == {
        "[w0]": "index=0 gpus=", "[w1]": "index=1 gpus="}


@pytest.mark.parametrize("n, gpus", [(3, ["0", "1", "2", "3"]), (2, ["0"])])
def test_launcher_refuses_gpus_it_cannot_share_equally(tmp_path, n, gpus):
    proc = launch_workers(tmp_path, n, gpus)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: launch/multiworker.sh: -n {n} workers cannot share"), proc.stderr
    assert proc.stdout == ""  # no worker started


# ------------------------------------------------- Horovod NCCL source patch


@pytest.fixture(scope="module")
def horovod_sdist(tmp_path_factory) -> Path:
    """The Horovod 0.28.1 sdist: $DIST_RNN_HOROVOD_SDIST, else pip downloads it (from its cache when there)."""
    given = os.environ.get("DIST_RNN_HOROVOD_SDIST")
    if given:
        return Path(given)
    folder = tmp_path_factory.mktemp("sdist")
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                           "--no-build-isolation", "-d", str(folder), "horovod==0.28.1"],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"the horovod 0.28.1 sdist could not be downloaded: {proc.stderr.strip()[-300:]}")
    return folder / "horovod-0.28.1.tar.gz"


def test_install_horovod_patches_the_nccl_stream_call(horovod_sdist, tmp_path):
    import tarfile

    with tarfile.open(horovod_sdist) as sdist:
        sdist.extractall(tmp_path, filter="data")
    source = tmp_path / "horovod-0.28.1"
    ops = source / "horovod" / "tensorflow" / "mpi_ops.cc"
    before = ops.read_text()
    calls = before.count("stream_executor::gpu::AsGpuStreamValue(")
    assert calls >= 10  # the unpatched GPU ops would need a symbol TensorFlow 2.21 does not export
    # An interpreter without pip: a script that ignored --patch-only would stop at once instead of
    # building and installing Horovod into this environment.
    python = tmp_path / "python-without-pip"
    python.write_text(f'#!/bin/sh\n[ "$1" = -m ] && [ "$2" = pip ] && exit 1\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(python)}
    proc = subprocess.run([str(REPO / "tools" / "install_horovod.sh"), "--patch-only", str(source)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    after = ops.read_text()
    assert "AsGpuStreamValue" not in after
    assert after.count("HvdGpuStream(") == calls + 1  # every call, and the helper's definition
    assert "stream->platform_specific_handle().stream" in after
    helper = after.index("static inline GpuStreamHandle HvdGpuStream(")
    assert after.index('#include "tensorflow/compiler/xla/stream_executor/stream.h"') < helper < after.index(
        "#endif // HAVE_GPU")  # declared after Stream, only in GPU builds
    assert "xla_mpi_ops.cc" not in (source / "horovod" / "tensorflow" / "CMakeLists.txt").read_text()
    # A source the patch does not recognize stops the build instead of compiling it unpatched.
    proc = subprocess.run([str(REPO / "tools" / "install_horovod.sh"), "--patch-only", str(source)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0 and "the patch no longer applies" in proc.stderr
