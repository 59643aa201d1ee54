"""``dist-rnn report``: a run's summary and training curves from its run directory.

Reads ``RUN_DIR/config.yaml``, ``RUN_DIR/metrics.jsonl`` and, if the launcher
restarted the job, ``RUN_DIR/restarts.jsonl`` only (no
TensorFlow, no checkpoint), so it works on a finished run, a run in progress
and a run whose checkpoints are gone. The plot is drawn with matplotlib's Agg
canvas: no display needed.

A resumed run appends to ``metrics.jsonl`` and its ``time`` field restarts
from zero. A record whose ``time`` or ``step`` goes backwards starts a new
session: records of earlier sessions at or after its first step are dropped
(they were replayed from the checkpoint), and the wall time is the sum of the
sessions' last ``time`` values.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from dist_rnn.curves import plot
from dist_rnn.errors import UserError
from dist_rnn.run_dir import RunDirectory
from dist_rnn.run_records import SPLITS, effective_records, load_config_dict, load_metrics, load_restarts, sessions
from dist_rnn.run_records import is_number as _is_number

__all__ = ["SPLITS", "effective_records", "format_summary", "load_config_dict", "load_metrics", "load_restarts",
           "plot", "report", "sessions", "summarize"]


# --------------------------------------------------------------------------
# Summary


def summarize(config, metrics: list[dict]) -> dict:
    """The numbers of the report.

    Args:
        config: A :class:`~dist_rnn.config.Config` or its plain mapping
            (``config.yaml`` as loaded).
        metrics: Records from :func:`load_metrics`, in file order.

    Returns:
        A dict with the run description (``corpus``, ``level``, ``cell``,
        ``num_layers``, ``hidden_size``, ``embedding_size``, ``optimizer``,
        ``learning_rate``, ``schedule``, ``clip_norm``, ``batch_size``,
        ``num_steps``, ``precision``, ``backend``, ``replicas``), the progress
        (``steps``, ``max_steps``, ``max_epochs``, ``epoch``, ``wall_time``
        in seconds, ``sessions``), ``best_valid``, ``last_valid``, ``last_test``
        and ``last_train`` (each ``{"step", "loss", "perplexity", "bpc"}`` or
        None; bpc is None at word level; evaluations that logged bits per
        source byte add ``bpb``), ``median_tokens_per_sec``,
        ``median_tokens_per_sec_per_replica`` and the point counts
        ``train_points``, ``valid_points``.
    """
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    train_cfg = _section(cfg, "train")
    records = effective_records(metrics)
    by_split = {split: [r for r in records if r["split"] == split] for split in SPLITS}
    train, valid = by_split["train"], by_split["valid"]

    finite_valid = [r for r in valid if _is_number(r.get("loss")) and math.isfinite(r["loss"])]
    best = min(finite_valid, key=lambda r: (r["loss"], r["step"])) if finite_valid else None
    rates = [r["tokens_per_sec"] for r in train if _is_number(r.get("tokens_per_sec"))]
    per_replica = [r["tokens_per_sec_per_replica"] for r in train
                   if _is_number(r.get("tokens_per_sec_per_replica"))]
    run_sessions = sessions(metrics)
    wall = sum(max((r["time"] for r in s if _is_number(r.get("time"))), default=0.0) for s in run_sessions)
    return {
        **_run_description(cfg, train),
        "steps": max((r["step"] for r in records), default=0),
        "max_steps": train_cfg.get("max_steps"),
        "max_epochs": train_cfg.get("max_epochs"),
        "epoch": train[-1].get("epoch") if train else None,
        "wall_time": wall,
        "sessions": len(run_sessions),
        "best_valid": _point(best),
        "last_valid": _point(valid[-1] if valid else None),
        "last_test": _point(by_split["test"][-1] if by_split["test"] else None),
        "last_train": _point(train[-1] if train else None),
        "median_tokens_per_sec": statistics.median(rates) if rates else None,
        "median_tokens_per_sec_per_replica": statistics.median(per_replica) if per_replica else None,
        "train_points": len(train),
        "valid_points": len(valid),
    }


def _run_description(cfg: dict, train: list[dict]) -> dict:
    """The run's corpus, model, optimizer, batch, precision and backend, from its config mapping."""
    data, model, opt = _section(cfg, "data"), _section(cfg, "model"), _section(cfg, "optimizer")
    train_cfg, dist = _section(cfg, "train"), _section(cfg, "distribute")
    schedule = opt.get("schedule") if isinstance(opt.get("schedule"), dict) else {}
    return {
        "corpus": data.get("corpus"),
        "level": data.get("level"),
        "cell": model.get("cell"),
        "num_layers": model.get("num_layers"),
        "hidden_size": model.get("hidden_size"),
        "embedding_size": model.get("embedding_size"),
        "optimizer": opt.get("name"),
        "learning_rate": opt.get("learning_rate"),
        "schedule": schedule.get("name"),
        "clip_norm": opt.get("clip_norm"),
        "batch_size": train_cfg.get("batch_size"),
        "num_steps": train_cfg.get("num_steps"),
        "precision": train_cfg.get("precision"),
        "backend": dist.get("backend"),
        "replicas": _replicas(dist, train),
    }


def format_summary(summary: dict, run_dir: str | Path | None = None, plot_path: str | Path | None = None) -> str:
    """The summary as aligned text lines (perplexities with 2 decimals, losses and bpc with 4)."""
    s = summary
    lines = []
    if run_dir is not None:
        lines.append(("run", str(run_dir)))
    lines.append(("data", f"{_v(s['corpus'])} ({_v(s['level'])} level)"))
    lines.append(("model", f"{_v(s['num_layers'])} x {_v(s['cell'])} {_v(s['hidden_size'])}, "
                           f"embedding {_v(s['embedding_size'])}"))
    opt = f"{_v(s['optimizer'])} lr {_g(s['learning_rate'])} ({_v(s['schedule'])})"
    if _is_number(s["clip_norm"]):
        opt += f", clip {_g(s['clip_norm'])}" if s["clip_norm"] else ", no clipping"
    lines.append(("optimizer", opt))
    batch = f"{_v(s['batch_size'])} x {_v(s['num_steps'])} tokens"
    if isinstance(s["batch_size"], int) and isinstance(s["num_steps"], int):
        batch += f" = {s['batch_size'] * s['num_steps']:,} tokens/step"
    lines.append(("batch", batch + f", {_v(s['precision'])}"))
    replicas = s["replicas"]
    lines.append(("backend", f"{_v(s['backend'])}, "
                             + (f"{replicas} replica{'s' if replicas != 1 else ''}" if replicas else "? replicas")))
    steps = f"{s['steps']:,}"
    if isinstance(s["max_steps"], int):
        steps += f" of {s['max_steps']:,}"
    if s["epoch"] is not None:
        steps += f" (epoch {s['epoch']}" + (f" of {s['max_epochs']})" if s["max_epochs"] else ")")
    lines.append(("steps", steps))
    wall = _duration(s["wall_time"])
    if s["sessions"] > 1:
        wall += f" over {s['sessions']} sessions"
    lines.append(("wall time", wall))
    for i, r in enumerate(s.get("restarts") or []):
        lines.append(("restarts" if i == 0 else "", f"{r.get('time', '?')} from step {r.get('from_step', '?')} on "
                                                    f"{r.get('workers_before', '?')} -> {r.get('workers_after', '?')} "
                                                    f"worker(s): {r.get('reason', '?')}"))
    lines.append(("valid best", _format_point(s["best_valid"])))
    lines.append(("valid last", _format_point(s["last_valid"])))
    if s["last_test"] is not None:
        lines.append(("test last", _format_point(s["last_test"])))
    lines.append(("train last", _format_point(s["last_train"])))
    rate = s["median_tokens_per_sec"]
    if rate is None:
        lines.append(("tokens/s", "-"))
    else:
        text = f"{rate:,.0f} median"
        per = s["median_tokens_per_sec_per_replica"]
        if per is not None and (s["replicas"] or 1) > 1:
            text += f" ({per:,.0f} per replica)"
        lines.append(("tokens/s", text))
    if plot_path is not None:
        lines.append(("plot", str(plot_path)))
    width = max(len(k) for k, _ in lines) + 2
    return "\n".join(f"{k:<{width}}{v}" for k, v in lines)


# --------------------------------------------------------------------------
# Command


def report(run_dir: str | Path, out: str | Path | None = None) -> dict:
    """``dist-rnn report``: prints the summary of a run and writes its curves.

    Args:
        run_dir: The run directory.
        out: The image file (default ``RUN_DIR/report.png``).

    Returns:
        The summary dict, with ``plot`` set to the written image path.

    Raises:
        UserError: On a missing run directory, config or metrics file, a
            malformed metrics line, a run with no metrics yet, or an
            unwritable image path.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    rd = RunDirectory(run_dir)
    config = load_config_dict(rd.config_file)
    metrics_file = rd.metrics_file
    metrics = load_metrics(metrics_file)
    if not metrics:
        raise UserError(f"{metrics_file} holds no metrics yet (nothing logged)")
    summary = summarize(config, metrics)
    summary["restarts"] = load_restarts(rd.restarts_file)
    out_path = Path(out) if out is not None else rd.report_file
    title = (f"{run_dir.name}: {_v(summary['num_layers'])} x {_v(summary['cell'])} {_v(summary['hidden_size'])}, "
             f"{_v(summary['corpus'])} ({_v(summary['level'])}), {_v(summary['optimizer'])}, "
             f"batch {_v(summary['batch_size'])} x {_v(summary['num_steps'])}, {summary['steps']:,} steps")
    plot(metrics, out_path, title)
    summary["plot"] = str(out_path)
    print(format_summary(summary, run_dir, out_path), flush=True)
    return summary


# --------------------------------------------------------------------------
# Helpers


def _section(cfg: dict, name: str) -> dict:
    value = cfg.get(name)
    return value if isinstance(value, dict) else {}


def _replicas(dist: dict, train: list[dict]) -> int | None:
    """Replica count: from the throughput ratio the trainer logged, else from the config."""
    for r in reversed(train):
        total, per = r.get("tokens_per_sec"), r.get("tokens_per_sec_per_replica")
        if _is_number(total) and _is_number(per) and per > 0 and math.isfinite(total / per):
            return max(1, round(total / per))
    if dist.get("backend") == "none":
        return 1
    if dist.get("backend") == "mirrored" and isinstance(dist.get("cpu_devices"), int) and dist["cpu_devices"] > 0:
        return dist["cpu_devices"]
    return None


def _point(record: dict | None) -> dict | None:
    if record is None:
        return None
    loss = record.get("loss")
    ppl = record.get("perplexity")
    if not _is_number(ppl) and _is_number(loss):
        ppl = math.exp(loss) if loss < 700 else float("inf")
    bpc = record.get("bpc")
    point = {"step": record["step"], "loss": loss, "perplexity": ppl, "bpc": bpc if _is_number(bpc) else None}
    if _is_number(record.get("bpb")):  # evaluations of a prepared corpus: bits per source byte
        point["bpb"] = record["bpb"]
    return point


def _format_point(point: dict | None) -> str:
    if point is None:
        return "-"
    text = f"loss {_f(point['loss'], 4)}  ppl {_f(point['perplexity'], 2)}"
    if point["bpc"] is not None:
        text += f"  bpc {_f(point['bpc'], 4)}"
    if point.get("bpb") is not None:
        text += f"  bpb {_f(point['bpb'], 4)}"
    return text + f"  at step {point['step']:,}"


def _f(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if _is_number(value) else "-"


def _g(value: Any) -> str:
    return f"{value:g}" if _is_number(value) else "?"


def _v(value: Any) -> str:
    return "?" if value is None else str(value)


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(round(seconds))
    h, rem = divmod(whole, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"
