"""Drops run output written after the checkpoint a run resumes from.

A job that loses a worker, crashes or is killed has logged steps beyond its
newest complete checkpoint. The resumed run trains those steps again, so their
old records would appear twice: in ``metrics.jsonl`` and on TensorBoard's step
axis. Before the chief writes anything, the records of steps after the resumed
step are removed: ``metrics.jsonl`` and each TensorBoard event file are
rewritten to a temporary file and renamed over the original (a crash during the
rewind leaves either the old or the new file, never a half-written one).

Rewriting the event files, rather than relying on TensorBoard's purge of
orphaned data on a restart event, keeps every reader (TensorBoard's loaders,
``summary_iterator``, ``dist-rnn report``) consistent.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from dist_rnn.run_dir import RunDirectory

log = logging.getLogger("dist_rnn")

# Folders of the TensorBoard event files (RUN_DIR itself holds the HParams record).
EVENT_FOLDERS = (".", "train", "valid", "test")


def rewind_run_output(run_path: Path, step: int) -> dict[str, int]:
    """Removes metrics and TensorBoard records of steps after ``step``.

    Args:
        run_path: The run directory.
        step: The step of the checkpoint being resumed (0 for a fresh start).

    Returns:
        ``{"metrics": n, "events": m}``: records dropped from ``metrics.jsonl``
        and from the event files.
    """
    dropped = {"metrics": _rewind_metrics(RunDirectory(run_path).metrics_file, step), "events": 0}
    for folder in EVENT_FOLDERS:
        directory = Path(run_path) / folder
        for path in sorted(directory.glob("events.out.tfevents.*")) if directory.is_dir() else []:
            dropped["events"] += _rewind_event_file(path, step)
    if dropped["metrics"] or dropped["events"]:
        log.info(f"resuming at step {step}: dropped {dropped['metrics']} metrics.jsonl record(s) and "
                 f"{dropped['events']} TensorBoard record(s) of later steps, written before the restart")
    return dropped


def _rewind_metrics(path: Path, step: int) -> int:
    """Rewrites ``metrics.jsonl`` without records of steps after ``step``; returns how many were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            later = int(json.loads(line).get("step", 0)) > step
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
            later = not line.endswith("\n")  # a line cut by the crash is dropped; others are kept as they are
        if later:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        _replace(path, "".join(kept).encode("utf-8"))
    return dropped


def _rewind_event_file(path: Path, step: int) -> int:
    """Rewrites one event file without events of steps after ``step``; returns how many were dropped.

    A record cut short by the crash ends the file (it is dropped too).
    """
    import tensorflow as tf

    kept, dropped = [], 0
    try:
        for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
            event = tf.compat.v1.Event.FromString(record)
            if event.step > step:
                dropped += 1
            else:
                kept.append(record)
    except tf.errors.DataLossError:
        dropped += 1
    if not dropped:
        return 0
    tmp = path.with_name(path.name + ".rewind")
    with tf.io.TFRecordWriter(str(tmp)) as writer:
        for record in kept:
            writer.write(record)
    os.replace(tmp, path)
    return dropped


def _replace(path: Path, data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path``, then renames it over ``path``."""
    tmp = path.with_name(path.name + ".rewind")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
