"""TensorFlow's start-up notices stay off the CLI's stderr; every other line passes through."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO, assert_one_line_error
from dist_rnn.runtime import filtered_stderr, is_startup_noise

# Lines TensorFlow 2.21 printed on this 2-core CPU machine (no GPU) at import and device probe.
OBSERVED_NOISE = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1795973134.486687    8675 port.cc:153] oneDNN custom operations are on. You may see slightly "
    "different numerical results due to floating-point round-off errors from different computation orders. "
    "To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.",
    "I0000 00:00:1795973134.487201    8675 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
    "GPU will not be used.",
    "E0000 00:00:1795973175.777132    8675 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
    "Failed call to cuInit: UNKNOWN ERROR (303)",
    "I0000 00:00:1795973135.128868    8675 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use "
    "available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the "
    "appropriate compiler flags.",
]


def test_known_startup_lines_are_noise_and_others_are_not():
    assert all(is_startup_noise(line) for line in OBSERVED_NOISE)
    for line in ["error: config key 'model.hidden_size': must be positive, got 0",
                 "E0000 00:00:1795973175.777132    8675 collective_ops.cc:12] Collective op failed",
                 "W0000 00:00:1.0    1 port.cc:153] something else about oneDNN",
                 "Traceback (most recent call last):",
                 "warning: train.precision mixed_float16 on a CPU works but is slow"]:
        assert not is_startup_noise(line), line


def test_filtered_stderr_drops_noise_written_to_the_descriptor_and_keeps_the_rest_in_order(capfd):
    with filtered_stderr(is_startup_noise):
        os.write(2, (OBSERVED_NOISE[0] + "\n").encode())
        os.write(2, b"first real line\n")
        os.write(2, (OBSERVED_NOISE[3] + "\n" + OBSERVED_NOISE[2] + "\n").encode())
        os.write(2, b"second real line\n")
        os.write(2, b"third, no newline")
    os.write(2, b"\nafter the block\n")
    err = capfd.readouterr().err
    assert err == "first real line\nsecond real line\nthird, no newline\nafter the block\n"


def cli(*argv) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-m", "dist_rnn", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)


def test_cli_stderr_has_only_the_error_line_and_verbose_shows_the_notices(tmp_path):
    # generate imports TensorFlow (and probes devices) before it opens the export.
    missing = tmp_path / "no_such_export"
    quiet = cli("generate", "--model", missing)
    line = assert_one_line_error(quiet.returncode, quiet.stdout, quiet.stderr)
    assert "exported model not found" in line
    verbose = cli("generate", "--model", missing, "--verbose")
    assert verbose.returncode == 2
    lines = verbose.stderr.strip().splitlines()
    assert lines[-1] == line
    assert any(is_startup_noise(x) for x in lines[:-1]), verbose.stderr
