"""TensorFlow set-up, memory and profiling shared by the TensorFlow rows' workers."""

from __future__ import annotations

import json
from pathlib import Path

from bench.protocol import peak_rss_mib


def tf_setup(spec: dict):
    """Imports TensorFlow and applies thread settings; returns the module."""
    import tensorflow as tf

    if spec.get("intra_threads"):
        tf.config.threading.set_intra_op_parallelism_threads(spec["intra_threads"])
    if spec.get("inter_threads"):
        tf.config.threading.set_inter_op_parallelism_threads(spec["inter_threads"])
    return tf


def tf_memory(base_rss: float) -> dict:
    """Peak RSS (and peak GPU memory when GPUs are visible), with ``base_rss`` as the pre-import RSS."""
    import tensorflow as tf

    out = {"peak_rss_mib": peak_rss_mib(), "import_rss_mib": base_rss}
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        try:
            out["peak_device_mib"] = sum(tf.config.experimental.get_memory_info(f"GPU:{i}")["peak"]
                                         for i in range(len(gpus))) / 2**20
        except (ValueError, tf.errors.OpError):
            pass
    return out


def tf_profile(run, steps: int, workdir: Path) -> list[dict]:
    """TensorFlow profiler trace of ``steps`` steps, summed by op type (ms per step, ops per step)."""
    import glob

    import tensorflow as tf
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin

    logdir = workdir / "profile"
    tf.profiler.experimental.start(str(logdir))
    run(steps)
    tf.profiler.experimental.stop()
    path = sorted(glob.glob(str(logdir / "**" / "*.xplane.pb"), recursive=True))[-1]
    data, ok = _pywrap_profiler_plugin.xspace_to_tools_data([path], "framework_op_stats", {})
    if not ok:
        return []
    table = json.loads(data)[0]
    cols = [c["id"] for c in table["cols"]]
    totals, counts = {}, {}
    for r in table["rows"]:
        row = dict(zip(cols, [c.get("v") for c in r["c"]]))
        if row["type"] == "IDLE":
            continue
        totals[row["type"]] = totals.get(row["type"], 0.0) + row["total_self_time"]
        counts[row["type"]] = counts.get(row["type"], 0) + row["occurrences"]
    top = sorted(totals, key=lambda k: -totals[k])[:10]
    return [{"op": k, "ms_per_step": round(totals[k] / steps / 1000, 2), "ops_per_step": round(counts[k] / steps)}
            for k in top]
