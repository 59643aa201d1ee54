"""The report of a benchmark run: ratios, targets, ``results.md`` and ``results.png``."""

from __future__ import annotations

import statistics
from pathlib import Path

from dist_rnn.config import CELLS


def _find(rows, **match):
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def _target(text: str, ratio: float, goal: float | None) -> dict:
    """A target line; ``met`` is None when the ratio is only reported (no goal)."""
    return {"target": text, "ratio": ratio, "goal": goal, "met": None if goal is None else ratio >= goal}


def _comparator_targets(rows: list[dict], loop: dict, cell: str, precision: str) -> list[dict]:
    """The targets of one cell and precision: the loop against the minimal loops and PyTorch, and mirrored."""
    targets = []
    tokens = loop["tokens_per_s"]
    floor = _find(rows, system="floor", cell=cell, precision=precision)
    if floor:
        targets.append(_target(f"{cell}: dist-rnn loop >= 0.97 x minimal loop (same model)",
                               tokens / floor["tokens_per_s"], 0.97))
    keras_row = _find(rows, system="keras", cell=cell, precision=precision)
    if keras_row:
        targets.append(_target(f"{cell}: dist-rnn loop >= 0.97 x minimal loop (Keras layers)",
                               tokens / keras_row["tokens_per_s"], 0.97))
    torch_row = _find(rows, system="torch", cell=cell, precision=precision)
    if torch_row:
        targets.append(_target(f"{cell}: dist-rnn loop >= 1.0 x PyTorch nn.{cell.upper()}",
                               tokens / torch_row["tokens_per_s"], 1.0))
        xla = _find(rows, system="loop", cell=cell, precision=precision, backend="none", jit=True)
        if xla:
            targets.append(_target(f"{cell}: dist-rnn loop XLA >= 1.0 x PyTorch nn.{cell.upper()}",
                                   xla["tokens_per_s"] / torch_row["tokens_per_s"], 1.0))
    mirrored = _find(rows, system="loop", cell=cell, precision=precision, backend="mirrored")
    if mirrored:
        ratio = mirrored["tokens_per_s"] / tokens
        targets.append(_target(f"{cell}: mirrored x{mirrored['replicas']} / one device, same global batch "
                               f"(overhead {100 * (1 - ratio):.0f}%)", ratio, None))
    return targets


def _layer_norm_targets(rows: list[dict]) -> list[dict]:
    """Each layer-norm cell's loop against its plain cell's (a goal for ln_lstm, reported for ln_gru)."""
    targets = []
    for precision in sorted({r["precision"] for r in rows}):
        for ln, plain in (("ln_lstm", "lstm"), ("ln_gru", "gru")):
            a = _find(rows, system="loop", cell=ln, precision=precision, backend="none", jit=False)
            b = _find(rows, system="loop", cell=plain, precision=precision, backend="none", jit=False)
            if a and b:
                goal = 0.9 if ln == "ln_lstm" else None
                text = f"{ln} >= 0.9 x {plain} (dist-rnn loop)" if goal else f"{ln} / {plain} (dist-rnn loop)"
                targets.append(_target(text, a["tokens_per_s"] / b["tokens_per_s"], goal))
    return targets


def ratios_and_targets(rows: list[dict]) -> tuple[list[str], list[dict]]:
    """Lines of 'dist-rnn ÷ comparator' ratios and the issue's targets with their status."""
    lines, targets = [], []
    keys = sorted({(r["cell"], r["precision"]) for r in rows},
                  key=lambda k: (CELLS.index(k[0]) if k[0] in CELLS else 9, k[1]))
    for cell, precision in keys:
        loop = _find(rows, system="loop", cell=cell, precision=precision, backend="none", jit=False)
        if loop is None:
            continue
        for row in rows:
            if row is loop or row["cell"] != cell or row["precision"] != precision:
                continue
            lines.append(f"{cell} {precision}: dist-rnn loop / {row['label']} = "
                         f"{loop['tokens_per_s'] / row['tokens_per_s']:.2f}")
        targets += _comparator_targets(rows, loop, cell, precision)
    return lines, targets + _layer_norm_targets(rows)


def _header(rows: list[dict], machine: dict, command: str, args, gpu: bool) -> list[str]:
    """The title and the lines on machine, versions, command, method and load."""
    out = ["# dist-rnn training-step benchmark", ""]
    out.append(f"- machine: {machine['cpus']} CPUs ({machine['cpu_model']}), {machine['memory_gib']} GiB memory, "
               f"{'GPU visible' if gpu else 'no GPU'}; {machine['platform']}")
    out.append(f"- versions: Python {machine['python']}, TensorFlow {machine['tensorflow']}, Keras {machine['keras']}, "
               f"PyTorch {machine['torch'] or 'not installed'}, NumPy {machine['numpy']}")
    out.append(f"- command: `{command}`")
    across = "all cells" if args.interleave == "all" else "a cell"
    out.append(f"- each row: {args.warmup} warm-up repeat(s), then {args.repeats} timed repeats of {args.steps} steps, "
               f"interleaved across the rows of {across}; median step time, tokens/s = batch x bptt / median step "
               "time (best and worst repeat in brackets); peak memory = the row's worker process peak RSS")
    loads = [x for r in rows for x in r["load_avg_1min"]]
    if loads:
        out.append(f"- 1-minute load average when repeats started: min {min(loads):.2f}, median "
                   f"{statistics.median(loads):.2f}, max {max(loads):.2f} (on {machine['cpus']} CPUs)")
    return out + [""]


def _results_table(rows: list[dict], gpu: bool) -> list[str]:
    """One table line per row: tokens/s (median, best, worst), step ms, peak memory."""
    out = ["| cell | precision | row | tokens/s (median) | [best, worst] | step ms | peak RSS MiB |"
           + (" peak GPU MiB |" if gpu else ""),
           "|---|---|---|---:|---|---:|---:|" + ("---:|" if gpu else "")]
    for r in rows:
        line = (f"| {r['cell']} | {r['precision']} | {r['label']} | {r['tokens_per_s']:,.0f} | "
                f"[{r['best_tokens_per_s']:,.0f}, {r['worst_tokens_per_s']:,.0f}] | {1000 * r['median_step_s']:.1f} | "
                f"{r.get('peak_rss_mib', float('nan')):,.0f} |")
        if gpu:
            line += f" {r.get('peak_device_mib', float('nan')):,.0f} |"
        out.append(line)
    return out


def _targets_table(targets: list[dict]) -> list[str]:
    out = ["", "| target | measured | status |", "|---|---:|---|"]
    for t in targets:
        status = "reported" if t["met"] is None else (
            "met" if t["met"] else f"not met (gap {100 * (t['goal'] - t['ratio']) / t['goal']:.0f}%)")
        out.append(f"| {t['target']} | {t['ratio']:.2f} | {status} |")
    return out


def _profile_tables(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if not r["info"].get("profile"):
            continue
        out += ["", f"Profile of {r['cell']} {r['precision']} {r['label']} (3 steps, self time by op, "
                    "per step; parallel ops overlap, so the sum can exceed the step time):", "",
                "| op | ms/step | ops/step |", "|---|---:|---:|"]
        out += [f"| {p['op']} | {p['ms_per_step']:.1f} | {p['ops_per_step']} |" for p in r["info"]["profile"]]
    return out


def markdown(rows: list[dict], notes: list[str], machine: dict, command: str, args) -> str:
    """``results.md``: header, results table, ratios, targets, profiles and notes."""
    lines, targets = ratios_and_targets(rows)
    gpu = any("GPU" in " ".join(map(str, r["info"].get("devices", []))) for r in rows)
    out = _header(rows, machine, command, args, gpu) + _results_table(rows, gpu)
    if lines:
        out += ["", "Ratios (dist-rnn loop tokens/s ÷ row tokens/s):", ""] + [f"- {line}" for line in lines]
    if targets:
        out += _targets_table(targets)
    out += _profile_tables(rows)
    if notes:
        out += ["", "Notes:", ""] + [f"- {n}" for n in dict.fromkeys(notes)]
    return "\n".join(out) + "\n"


def _chart_label(row: dict) -> str:
    """The row's label with the cell name generic, so PyTorch rows of every cell share one bar colour."""
    return row["label"].replace(f"nn.{row['cell'].upper()}", "nn.<cell>")


def chart(rows: list[dict], path: Path) -> None:
    """``results.png``: median tokens/s per row, grouped by cell and precision, best-worst repeat as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["cell"], r["precision"]) for r in rows))
    labels = list(dict.fromkeys(_chart_label(r) for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * max(1, len(labels)) / 3), 4.8))
    width = 0.8 / max(1, len(labels))
    cmap = plt.get_cmap("tab10")
    for j, name in enumerate(labels):
        xs, ys, lo, hi = [], [], [], []
        for i, (cell, precision) in enumerate(groups):
            for r in rows:
                if (r["cell"], r["precision"]) == (cell, precision) and _chart_label(r) == name:
                    xs.append(i + (j - (len(labels) - 1) / 2) * width)
                    ys.append(r["tokens_per_s"])
                    lo.append(r["tokens_per_s"] - r["worst_tokens_per_s"])
                    hi.append(r["best_tokens_per_s"] - r["tokens_per_s"])
        if xs:
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=name, color=cmap(j % 10))
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{c}\n{p}" if len({g[1] for g in groups}) > 1 else c for c, p in groups])
    r0 = rows[0]
    ax.set_ylabel("tokens / s (median; bars: best-worst repeat)")
    ax.set_title(f"training throughput: {r0['layers']} x {r0['hidden']} units, batch {r0['batch']}, "
                 f"bptt {r0['bptt']}, vocab {r0['vocab']}", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
