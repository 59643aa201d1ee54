"""The training curves of ``dist-rnn report``: loss, perplexity, learning rate and tokens/s against step.

Drawn with matplotlib's Agg canvas (no display needed) from the records of
``metrics.jsonl`` after resumed sessions are merged (:mod:`dist_rnn.report`).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from dist_rnn.errors import UserError, first_line
from dist_rnn.run_records import effective_records, is_number, sessions


def plot(metrics: list[dict], out_path: str | Path, title: str | None = None) -> Path:
    """Draws loss, perplexity (log scale), learning rate and tokens/s against step into a PNG.

    Args:
        metrics: Records from :func:`load_metrics`.
        out_path: The image file; the format follows its suffix (PNG without one).
        title: Figure title.

    Returns:
        The written path.

    Raises:
        UserError: If the file cannot be written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    out_path = Path(out_path)
    records = effective_records(metrics)
    by_split = {split: [r for r in records if r["split"] == split] for split in ("train", "valid", "test")}

    fig = Figure(figsize=(12, 8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title, fontsize=12)
    ax_loss, ax_ppl, ax_lr, ax_rate = fig.subplots(2, 2, sharex=True).flat

    have_loss = _draw_curves(ax_loss, by_split, "loss")
    ax_loss.set_title("Loss (cross-entropy, nats/token)")
    ax_loss.set_ylabel("loss")
    have_ppl = _draw_curves(ax_ppl, by_split, "perplexity")
    ax_ppl.set_title("Perplexity")
    ax_ppl.set_ylabel("perplexity (log scale)")
    if have_ppl:
        ax_ppl.set_yscale("log")
        # Plain numbers (6, 20, 300) instead of 6x10^0; minor ticks labelled only on a narrow range.
        ax_ppl.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax_ppl.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1.5, 0.6)))
    have_lr = _draw_learning_rate(ax_lr, by_split["train"])
    have_rate = _draw_throughput(ax_rate, by_split["train"])

    resumes = [session[0]["step"] for session in sessions(metrics)[1:]]
    for ax, has in ((ax_loss, have_loss), (ax_ppl, have_ppl), (ax_lr, have_lr), (ax_rate, have_rate)):
        ax.grid(True, which="major", alpha=0.3)
        for i, step in enumerate(resumes):
            ax.axvline(step, color="gray", linestyle=":", linewidth=1,
                       label="resumed" if (ax is ax_loss and i == 0) else None)
        if not has:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")
    if resumes and have_loss:
        ax_loss.legend(loc="best", fontsize=9)
    for ax in (ax_lr, ax_rate):
        ax.set_xlabel("step")
        ax.tick_params(labelbottom=True)
    return _save(fig, out_path)


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    """Steps and finite values of ``key`` in ``rows``."""
    pts = [(r["step"], r[key]) for r in rows if is_number(r.get(key)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _draw_curves(ax, by_split: dict[str, list[dict]], key: str) -> bool:
    """Draws ``key`` of train (line), valid (line, best starred) and test (squares); whether any was drawn."""
    drawn = False
    x, y = _series(by_split["train"], key)
    if x:
        ax.plot(x, y, color="tab:blue", linewidth=1.4, marker="." if len(x) < 40 else None, label="train")
        drawn = True
    x, y = _series(by_split["valid"], key)
    if x:
        ax.plot(x, y, color="tab:orange", linewidth=1.6, marker="o", markersize=4, label="valid")
        drawn = True
        best = min(range(len(y)), key=lambda i: y[i])
        ax.plot([x[best]], [y[best]], linestyle="none", marker="*", markersize=13, color="tab:red",
                label=f"best valid (step {x[best]:,})")
    x, y = _series(by_split["test"], key)
    if x:
        ax.plot(x, y, linestyle="none", marker="s", markersize=5, color="tab:green", label="test")
        drawn = True
    if drawn:
        ax.legend(loc="best", fontsize=9)
    return drawn


def _draw_learning_rate(ax, train: list[dict]) -> bool:
    """Draws the learning rate (log scale when it spans more than 20x); whether there was any."""
    from matplotlib.ticker import FuncFormatter

    x, y = _series(train, "learning_rate")
    if x:
        ax.plot(x, y, color="tab:purple", linewidth=1.4, marker="." if len(x) < 40 else None)
        if min(y) > 0 and max(y) / min(y) > 20:  # decays over decades: log scale
            ax.set_yscale("log")
            ax.set_ylabel("learning rate (log scale)")
        else:
            ax.set_ylim(bottom=0, top=max(y) * 1.1 if max(y) > 0 else None)
            ax.set_ylabel("learning rate")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.set_title("Learning rate")
    return bool(x)


def _draw_throughput(ax, train: list[dict]) -> bool:
    """Draws tokens/s with its median; whether there was any."""
    from matplotlib.ticker import FuncFormatter

    x, y = _series(train, "tokens_per_sec")
    if x:
        ax.plot(x, y, color="tab:green", linewidth=1.4, marker="." if len(x) < 40 else None)
        ax.axhline(statistics.median(y), color="gray", linestyle="--", linewidth=1,
                   label=f"median {statistics.median(y):,.0f}")
        ax.legend(loc="best", fontsize=9)
        ax.set_ylim(bottom=0)
    ax.set_title("Throughput")
    ax.set_ylabel("tokens/s (all replicas)")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    return bool(x)


def _save(fig, out_path: Path) -> Path:
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_path)
    except OSError as e:
        raise UserError(f"cannot write {out_path}: {e.strerror or e}") from None
    except ValueError as e:  # unsupported image format
        raise UserError(f"cannot write {out_path}: {first_line(e, limit=None)}") from None
    return out_path
