"""Reading a run directory's records without TensorFlow: ``metrics.jsonl``, ``config.yaml``, ``restarts.jsonl``.

A resumed run appends to ``metrics.jsonl`` and its ``time`` field restarts
from zero. A record whose ``time`` or ``step`` goes backwards starts a new
session: records of earlier sessions at or after its first step are dropped
(they were replayed from the checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from dist_rnn.errors import UserError

SPLITS = ("train", "valid", "test")


def is_number(value: Any) -> bool:
    """Whether ``value`` is an int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_restarts(path: str | Path) -> list[dict]:
    """Reads ``restarts.jsonl`` (written by the launcher's supervisor); [] when the run never restarted.

    Raises:
        UserError: If a line is not a JSON object (the message names file and line).
    """
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {number}: not JSON ({e.msg})") from None
        if record is not None and not isinstance(record, dict):
            raise UserError(f"{path} line {number}: not a JSON object")
        if record is not None:
            records.append(record)
    return records


def load_metrics(path: str | Path) -> list[dict]:
    """Reads ``metrics.jsonl``: one JSON object per line, blank lines skipped.

    Args:
        path: The file.

    Returns:
        The records in file order.

    Raises:
        UserError: If the file is missing or unreadable, or a line is not a JSON
            object with ``split`` and ``step`` (the message names file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"metrics file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: malformed JSON line: {e.msg} (column {e.colno})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        split, step = record.get("split"), record.get("step")
        if not isinstance(split, str) or not isinstance(step, int) or isinstance(step, bool):
            raise UserError(f"{path}:{number}: a metrics record needs a string 'split' and an integer 'step'")
        records.append(record)
    return records


def load_config_dict(path: str | Path) -> dict:
    """Reads a run's ``config.yaml`` as a plain mapping (not validated, so older runs still report).

    Raises:
        UserError: If the file is missing or is not a YAML mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path.parent} is not a dist-rnn run directory (no config.yaml)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        raise UserError(f"{path}: invalid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def sessions(metrics: list[dict]) -> list[list[dict]]:
    """Splits records into training sessions (a resume restarts ``time`` and may rewind ``step``)."""
    out: list[list[dict]] = []
    prev_time, prev_step = None, None
    for record in metrics:
        t, step = record.get("time"), record["step"]
        restarted = (prev_step is not None and step < prev_step) or (
            is_number(t) and is_number(prev_time) and t < prev_time)
        if not out or restarted:
            out.append([])
        out[-1].append(record)
        prev_time = t if is_number(t) else prev_time
        prev_step = step
    return out


def effective_records(metrics: list[dict]) -> list[dict]:
    """The records that describe the run as it stands, in step order.

    Records that a later session replayed (same or later step than that
    session's first record) are dropped; of several records of one split at
    one step, the last one wins.
    """
    kept: list[dict] = []
    for session in sessions(metrics):
        first = session[0]["step"]
        kept = [r for r in kept if r["step"] < first] + session
    by_key: dict[tuple[str, int], dict] = {}
    for record in kept:
        by_key[(record["split"], record["step"])] = record
    order = {split: i for i, split in enumerate(SPLITS)}
    return sorted(by_key.values(), key=lambda r: (r["step"], order.get(r["split"], len(SPLITS))))
