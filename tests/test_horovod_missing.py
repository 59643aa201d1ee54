"""The horovod backend and launcher where Horovod is missing or broken.

These run without Horovod (a fake ``horovod`` package on PYTHONPATH), which
is exactly where they matter; test_horovod.py needs the real one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from test_distributed import ARGS

LAUNCH = REPO / "launch" / "horovod.sh"


def launch_env(**extra) -> dict:
    """Environment for launch/horovod.sh: this interpreter, its horovodrun, quiet TensorFlow."""
    env = {**os.environ, "PYTHON": sys.executable, "TF_CPP_MIN_LOG_LEVEL": "3", **extra}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def data_args(data) -> list[str]:
    return ["--set", f"data={{corpus: file, path: {data}, split: [0.8, 0.2, 0.0]}}"]


@pytest.mark.parametrize("failure", [
    "raise ImportError('No module named horovod.tensorflow')",
    # built, but its op library does not load (what horovod.tensorflow raises then)
    "import tensorflow as tf\nraise tf.errors.NotFoundError(None, None, 'libnccl.so.2: cannot open shared object file')",
], ids=["not-installed", "ops-do-not-load"])
def test_horovod_backend_without_horovod_is_one_line_error(shakespeare_slice, tmp_path, failure):
    fake = tmp_path / "fake"
    (fake / "horovod" / "tensorflow").mkdir(parents=True)
    (fake / "horovod" / "__init__.py").write_text("")
    (fake / "horovod" / "tensorflow" / "__init__.py").write_text(failure + "\n")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "dist_rnn", "train", "--run-dir", str(run_dir), *data_args(shakespeare_slice),
           *ARGS, "--set", "distribute.backend=horovod"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    assert "tools/install_horovod.sh" in errors[0]
    assert not run_dir.exists()


def test_launcher_rejects_bad_arguments_and_missing_horovod(tmp_path):
    def run(*args, **env):
        proc = subprocess.run([str(LAUNCH), *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                              env={**launch_env(), **env})
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: launch/horovod.sh: "), proc.stderr
        return lines[0]

    assert "-n must be a positive number" in run("-n", "0", "--", "--run-dir", str(tmp_path / "r"))
    assert "unknown argument '--bogus'" in run("--bogus")
    assert "-H must be host[:slots]" in run("-n", "2", "-H", "a b", "--")
    assert "HOROVOD_GLOO_TIMEOUT_SECONDS" in run("-n", "2", "--", HOROVOD_GLOO_TIMEOUT_SECONDS="soon")
    fake = tmp_path / "fake" / "horovod"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no horovod here')\n")
    assert "tools/install_horovod.sh" in run("-n", "2", "--", "--run-dir", str(tmp_path / "r"),
                                             PYTHONPATH=str(fake.parent))
    assert not (tmp_path / "r").exists()
