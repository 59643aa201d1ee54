"""Shared test fixtures: real data from ../shared and small configs."""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The suite assumes a CPU (replica counts, "no GPU visible" in kernel reports,
# exports compared on CPU): hide GPUs before anything imports TensorFlow, for
# this process and the subprocesses tests start. DIST_RNN_TEST_GPU=1 keeps them
# visible and runs the tests marked ``gpu`` (run those with ``-m gpu``).
GPU_OPT_IN = "DIST_RNN_TEST_GPU"
if os.environ.get(GPU_OPT_IN) != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory) -> Iterator[Path]:
    """$DIST_RNN_CACHE for the whole session (and the subprocesses tests start): a temporary folder.

    Runs without ``data.cache_dir`` (every ``dist-rnn train`` of the tests)
    write their prepared token files under the cache; they must not fill or
    reuse the user's ``~/.cache/dist-rnn``.
    """
    folder = tmp_path_factory.mktemp("dist-rnn-cache")
    previous = os.environ.get("DIST_RNN_CACHE")
    os.environ["DIST_RNN_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("DIST_RNN_CACHE", None)
    else:
        os.environ["DIST_RNN_CACHE"] = previous


def pytest_configure(config):
    config.addinivalue_line("markers", f"gpu: needs a real GPU; skipped unless {GPU_OPT_IN}=1")


def pytest_collection_modifyitems(config, items):
    reduced_precision_broken = reduced_precision_crash()
    if reduced_precision_broken:
        skip_reduced = pytest.mark.skip(reason=reduced_precision_broken)
        for item in items:
            if uses_reduced_precision(item):
                item.add_marker(skip_reduced)
    if os.environ.get(GPU_OPT_IN) == "1":
        return
    skip = pytest.mark.skip(reason=f"GPU-only test: GPUs are hidden from the suite unless {GPU_OPT_IN}=1")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def reduced_precision_crash() -> str | None:
    """Why float16/bfloat16 tests cannot run in this process, or None when they can.

    With oneDNN limited to an older instruction set than the CPU has
    (``ONEDNN_MAX_CPU_ISA=AVX2`` on the AVX-512-BF16 development machine, the
    way the suite checks its tolerances against other CPUs' arithmetic),
    TensorFlow 2.21 dies with a segmentation fault on its first bfloat16 or
    float16 matmul, which would end the whole pytest process. Probed in a
    subprocess, only when such a limit is set.
    """
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    if not isa:
        return None
    probe = ("import tensorflow as tf\n"
             "for dtype in (tf.bfloat16, tf.float16):\n"
             "    tf.matmul(tf.ones([4, 4], dtype), tf.ones([4, 4], dtype))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=600)
    if result.returncode == 0:
        return None
    return (f"TensorFlow crashes (exit code {result.returncode}) on a float16/bfloat16 matmul with "
            f"ONEDNN_MAX_CPU_ISA={isa} on this CPU")


def uses_reduced_precision(item) -> bool:
    """Whether a test runs float16 or bfloat16 in this process (its id or its code names them)."""
    if "float16" in item.nodeid:
        return True
    function = getattr(item, "function", None)
    try:
        return function is not None and "float16" in inspect.getsource(function)
    except (OSError, TypeError):
        return False

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"
PTB = SHARED_DATA / "ptb"


def shakespeare_prefix(directory: Path, chars: int) -> Path:
    """Writes the first ``chars`` characters of tiny-shakespeare into ``directory``; skips the test without it."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"needs {SHAKESPEARE} (CI always has ../shared)")
    path = directory / f"shakespeare_{chars}.txt"
    path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:chars], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def shakespeare_slice(tmp_path_factory) -> Path:
    """The first 120k characters of tiny-shakespeare as a local file."""
    return shakespeare_prefix(tmp_path_factory.mktemp("data"), 120_000)


@pytest.fixture(scope="session")
def compiled_cache(pytestconfig):
    """Builds the compiled recurrence ops (unless cached) into pytest's cache; yields the cache folder.

    Once per session, for test_compiled_kernel.py and test_compiled_runs.py (whose
    subprocesses load the library from this folder instead of building it).
    """
    from dist_rnn.models.kernels import compiled

    cache = pytestconfig.cache.mkdir("dist_rnn_kernels")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(compiled.CACHE_ENV, str(cache))
        mp.delenv(compiled.COMPILER_ENV, raising=False)
        compiled.reset()
        if shutil.which("c++") is None and shutil.which("g++") is None:
            pytest.skip("no C++ compiler on this machine: the op cannot be built (the fallback tests still run)")
        if compiled.library() is None:
            pytest.fail(f"the compiled ops did not build: {compiled.unavailable_reason()}")
        yield cache
    compiled.reset()


def tiny_config(data_path: Path, **sections):
    """A validated small config on a local file; ``sections`` override keys per section."""
    from dist_rnn.config import config_from_dict

    base = {
        "data": {"corpus": "file", "path": str(data_path), "split": [0.8, 0.2, 0.0]},
        "model": {"cell": "lstm", "num_layers": 2, "hidden_size": 32, "embedding_size": 16},
        "optimizer": {"name": "adam", "learning_rate": 0.01, "clip_norm": 5.0},
        "train": {"batch_size": 8, "num_steps": 20, "max_steps": 20, "max_epochs": None, "log_every": 10,
                  "sample_length": 0},
        "checkpoint": {"every_steps": 0},
        "logging": {"progress": "off"},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return config_from_dict(base)


def run_cli(argv: list, capsys) -> tuple[int, str, str]:
    """Runs ``dist-rnn ARGV`` in-process; returns (exit code, stdout, stderr)."""
    from dist_rnn.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors exit from inside parse_args
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str) -> str:
    """Checks exit code 2, exactly one ``error:`` line on stderr and no traceback; returns the line."""
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    assert "Traceback" not in out + err
    return lines[0]


def small_sgd_run_args(data, max_steps: int, *sets: str, checkpoint: str = "checkpoint.every_steps=0") -> list[str]:
    """``--set`` arguments of a tiny SGD run on ``data`` (evaluated every 2 steps), plus ``sets``."""
    return ["--set", f"data={{corpus: file, path: {data}, split: [0.8, 0.2, 0.0]}}",
            "--set", "model={num_layers: 1, hidden_size: 16, embedding_size: 8}",
            "--set", "optimizer={name: sgd, learning_rate: 1.0, clip_norm: 1.0}",
            "--set", f"train={{batch_size: 4, num_steps: 8, max_steps: {max_steps}, max_epochs: null, "
                     f"eval_every: 2, log_every: 1, sample_length: 0, deterministic: true}}",
            "--set", checkpoint, "--set", "logging={tensorboard: false, progress: 'off'}",
            *[arg for s in sets for arg in ("--set", s)]]


def train_ok(capsys, run_dir, *args) -> str:
    """Runs ``dist-rnn train --run-dir run_dir *args`` in-process, asserts exit 0, returns its stderr."""
    code, _, err = run_cli(["train", "--run-dir", run_dir, *args], capsys)
    assert code == 0, err
    return err
