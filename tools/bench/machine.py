"""The machine the benchmark runs on: CPU, memory, library versions, GPU visibility."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _proc_field(path: str, prefix: str) -> str | None:
    """The text after the first line of ``path`` starting with ``prefix``, or None."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_description() -> dict:
    """CPU count and model, memory (GiB), platform and the versions of Python, TF, Keras, torch, NumPy."""
    cpu = _proc_field("/proc/cpuinfo", "model name")
    mem_total = _proc_field("/proc/meminfo", "MemTotal")
    memory = round(int(mem_total.split()[0]) / 2**20, 1) if mem_total else None
    return {"cpus": os.cpu_count(), "cpu_model": cpu or platform.processor(), "memory_gib": memory,
            "python": platform.python_version(), "platform": platform.platform(),
            "tensorflow": _version("tensorflow"), "keras": _version("keras"), "torch": _version("torch"),
            "numpy": _version("numpy")}


def gpu_visible() -> bool:
    """Whether TensorFlow sees a GPU (asked in a subprocess: this process stays TF-free)."""
    code = "import tensorflow as tf; print(len(tf.config.list_physical_devices('GPU')))"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        return int(out.stdout.strip().splitlines()[-1]) > 0
    except (ValueError, IndexError, subprocess.TimeoutExpired):
        return False
