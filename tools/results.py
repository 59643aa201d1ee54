#!/usr/bin/env python
"""Rebuilds the tables and curves of ``docs/results.md`` from the runs' own files.

    python tools/results.py docs/results/runs                    # print the tables
    python tools/results.py docs/results/runs --plots docs/results   # and draw the PNGs

The input folder holds one folder per experiment, named after its config
(``shakespeare_compare``: experiment 1, the cell comparison;
``shakespeare_compare_faithful``: experiment 1 with the tutorial's initialization
and whole-file training, whose validation text was also trained on;
``shakespeare_char``: experiment 2, the strong config; ``ptb_adaptive_check``: section 5, ``softmax``
against ``adaptive`` on the PTB stand-ins, ``softmax/`` and ``adaptive/`` and, with dropout 0.5,
``softmax_dropout/`` and ``adaptive_dropout/``, and more dropout-0.5 runs named
``softmax_dropout*``/``adaptive_dropout*`` for other cutoffs and seeds), and in it one folder per run with that run's
``config.yaml`` and ``metrics.jsonl`` exactly as ``dist-rnn train`` wrote them.
Nothing else is read: every number of the tables is computed here, so the
tables in ``docs/results.md`` can be checked against the committed runs
(``tests/test_results.py`` does).

Definitions:
    final-epoch train loss  the mean training loss over all steps of the last
                            epoch (nats/char), as the reference tutorial reports
                            it: a step-weighted mean of the logged windows.
    valid loss              the validation loss after the last step; "best" is
                            the lowest over all evaluations.
    wall time               the run's wall-clock time (training, evaluations,
                            checkpoints) from ``metrics.jsonl``'s ``time`` field,
                            summed over sessions if the run was resumed; a
                            record's ``elapsed`` is its time since the run began.
    training time           the time spent in training steps: the logged windows'
                            step_time x steps, summed (tf.function tracing included;
                            evaluation, sampling and checkpoints excluded).
    tokens/s                the median of the logged training throughputs.
    spread                  min-max over seeds, shown as ``mean (min-max)``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dist_rnn.errors import UserError  # noqa: E402
from dist_rnn.report import effective_records, load_config_dict, load_metrics, sessions  # noqa: E402

COMPARE = "shakespeare_compare"
FAITHFUL = "shakespeare_compare_faithful"
STRONG = "shakespeare_char"
ADAPTIVE_CHECK = "ptb_adaptive_check"
AWD_RECIPE = "shakespeare_awd_3000"
# Section 5's second pair of runs: the same check with model.dropout 0.5 (softmax, adaptive).
ADAPTIVE_CHECK_DROPOUT = ("softmax_dropout", "adaptive_dropout")
CELL_ORDER = ("gru", "lstm", "ln_lstm", "ln_gru", "rnn")
# Experiment 1's reference: final-epoch training loss (nats/char) of the classic
# TensorFlow char-rnn tutorial, 3 x 100 cells, 20 epochs of tiny-shakespeare.
REFERENCE_TRAIN_LOSS = {"gru": 1.75, "lstm": 2.03, "ln_lstm": 1.72}
# Experiment 2's target and the char-level transformer baseline it is compared to.
TARGET_VALID_LOSS = 1.50
REFERENCE_VALID_LOSS = 1.47


@dataclass
class Run:
    """The numbers of one run, computed from its ``config.yaml`` and ``metrics.jsonl``.

    Attributes:
        name: The run's folder name.
        config: ``config.yaml`` as a plain mapping.
        train: Effective training records, in step order.
        valid: Effective validation records, in step order.
        wall_time: Wall-clock seconds, summed over sessions.
    """

    name: str
    config: dict
    train: list[dict]
    valid: list[dict]
    wall_time: float

    @property
    def cell(self) -> str:
        return self.config.get("model", {}).get("cell", "?")

    @property
    def seed(self) -> int:
        return int(self.config.get("train", {}).get("seed", 0))

    def epoch_train_losses(self) -> dict[int, float]:
        """Mean training loss of each epoch, weighting each logged window by its steps."""
        sums: dict[int, float] = defaultdict(float)
        steps: dict[int, int] = defaultdict(int)
        previous = 0
        for record in self.train:
            weight = record["step"] - previous
            previous = record["step"]
            sums[record["epoch"]] += record["loss"] * weight
            steps[record["epoch"]] += weight
        return {epoch: sums[epoch] / steps[epoch] for epoch in sorted(sums)}

    def final_epoch_train_loss(self) -> float:
        losses = self.epoch_train_losses()
        return losses[max(losses)]

    def steps_per_epoch(self) -> int:
        """Steps of the first epoch (the last step logged in it)."""
        return max(r["step"] for r in self.train if r["epoch"] == 1)

    def final_valid_loss(self) -> float:
        return self.valid[-1]["loss"]

    def best_valid(self) -> dict:
        return min(self.valid, key=lambda r: (r["loss"], r["step"]))

    def first_valid_at_or_below(self, loss: float) -> dict | None:
        return next((r for r in self.valid if r["loss"] <= loss), None)

    def training_time(self) -> float:
        """Seconds spent in training steps (see the module docstring)."""
        total, previous = 0.0, 0
        for record in self.train:
            total += record["step_time"] * (record["step"] - previous)
            previous = record["step"]
        return total

    def median_tokens_per_sec(self) -> float:
        return statistics.median(r["tokens_per_sec"] for r in self.train)

    def tokens_trained(self) -> int:
        t = self.config.get("train", {})
        return self.train[-1]["step"] * int(t.get("batch_size", 0)) * int(t.get("num_steps", 0))


def load_run(folder: Path) -> Run:
    """Reads one run folder.

    Raises:
        UserError: If the folder lacks ``config.yaml``/``metrics.jsonl`` or has no
            training or validation records.
    """
    config = load_config_dict(folder / "config.yaml")
    metrics = load_metrics(folder / "metrics.jsonl")
    # A resumed run's ``time`` restarts at 0: "elapsed" adds the earlier sessions' durations.
    offset = 0.0
    for session in sessions(metrics):
        times = [r["time"] for r in session if isinstance(r.get("time"), (int, float))]
        for record in session:
            record["elapsed"] = offset + record.get("time", 0.0)
        offset += max(times, default=0.0)
    records = effective_records(metrics)
    train = [r for r in records if r["split"] == "train"]
    valid = [r for r in records if r["split"] == "valid"]
    if not train or not valid:
        raise UserError(f"{folder}: metrics.jsonl needs training and validation records")
    return Run(folder.name, config, train, valid, offset)


def load_experiment(folder: Path) -> list[Run]:
    """All runs of one experiment folder, ordered by cell then seed."""
    runs = [load_run(p) for p in sorted(folder.iterdir()) if p.is_dir()]
    rank = {cell: i for i, cell in enumerate(CELL_ORDER)}
    return sorted(runs, key=lambda r: (rank.get(r.cell, len(rank)), r.seed, r.name))


# --------------------------------------------------------------------------
# Formatting


def spread(values: list[float], digits: int) -> str:
    """``mean (min-max)`` of several values, or the value alone for one."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def bpc(loss: float) -> float:
    return loss / math.log(2.0)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def compare_table(runs: list[Run], valid_label: str = "valid") -> str:
    """Experiment 1: one row per cell, mean and min-max over its seeds.

    Args:
        runs: The experiment's runs.
        valid_label: Names the validation columns (``valid (seen)`` for the
            faithful runs, whose validation text is part of their training text).
    """
    by_cell: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_cell[run.cell].append(run)
    lstm_time = statistics.fmean(r.training_time() for r in by_cell["lstm"]) if by_cell.get("lstm") else None
    lines = [
        _row(["cell", "seeds", "train loss, final epoch", "reference", f"{valid_label} loss", f"{valid_label} bpc",
              "wall time", "training time", "tokens/s", "training time vs lstm"]),
        _row(["---"] * 10),
    ]
    for cell, cell_runs in by_cell.items():
        reference = REFERENCE_TRAIN_LOSS.get(cell)
        wall = [r.wall_time for r in cell_runs]
        training = [r.training_time() for r in cell_runs]
        lines.append(_row([
            cell,
            ", ".join(str(r.seed) for r in cell_runs),
            spread([r.final_epoch_train_loss() for r in cell_runs], 3),
            f"{reference:.2f}" if reference is not None else "-",
            spread([r.final_valid_loss() for r in cell_runs], 3),
            spread([bpc(r.final_valid_loss()) for r in cell_runs], 3),
            spread([w / 60 for w in wall], 1) + " min",
            spread([w / 60 for w in training], 1) + " min",
            spread([r.median_tokens_per_sec() for r in cell_runs], 0),
            f"{statistics.fmean(training) / lstm_time:.2f}x" if lstm_time else "-",
        ]))
    return "\n".join(lines)


def compare_epochs_table(runs: list[Run]) -> str:
    """Experiment 1, per epoch: mean training loss of each cell over its seeds."""
    by_cell: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_cell[run.cell].append(run)
    epochs = sorted(set.intersection(*(set(r.epoch_train_losses()) for r in runs)))
    shown = [e for e in epochs if e in (1, 2, 5, 10, 15) or e == epochs[-1]]
    lines = [_row(["cell"] + [f"epoch {e}" for e in shown]), _row(["---"] * (len(shown) + 1))]
    for cell, cell_runs in by_cell.items():
        lines.append(_row([cell] + [
            f"{statistics.fmean(r.epoch_train_losses()[e] for r in cell_runs):.3f}" for e in shown]))
    return "\n".join(lines)


def strong_table(runs: list[Run]) -> str:
    """Experiment 2: one row per run, with the time to first reach the target."""
    lines = [
        _row(["run", "model", "best valid loss", "valid bpc", f"first <= {TARGET_VALID_LOSS:.2f}",
              "wall time to it", "total wall time", "tokens/s", "reference"]),
        _row(["---"] * 9),
    ]
    for run in runs:
        m = run.config.get("model", {})
        model = (f"{m.get('num_layers')} x {m.get('cell')} {m.get('hidden_size')}, "
                 f"dropout {m.get('dropout')}")
        best = run.best_valid()
        hit = run.first_valid_at_or_below(TARGET_VALID_LOSS)
        epoch = hit["step"] / run.steps_per_epoch() if hit else None
        lines.append(_row([
            run.name,
            model,
            f"{best['loss']:.3f} (step {best['step']})",
            f"{bpc(best['loss']):.3f}",
            f"step {hit['step']} (epoch {epoch:.1f})" if hit else "not reached",
            minutes(hit["elapsed"]) if hit else "-",
            minutes(run.wall_time),
            f"{run.median_tokens_per_sec():.0f}",
            f"{REFERENCE_VALID_LOSS:.2f} (char transformer, GPU)",
        ]))
    return "\n".join(lines)


def adaptive_check_tables(folder: Path, names: tuple[str, str] = ("softmax", "adaptive"),
                          marker: str = "ptb adaptive check") -> str:
    """Section 5: validation perplexity of ``adaptive`` against ``softmax`` at each evaluated step.

    Args:
        folder: Holds the runs.
        names: The softmax run's and the adaptive run's folder names in ``folder``.
        marker: Name of the tables' marker lines (the summary's gets ", summary").

    Returns:
        Two tables under their markers: perplexity per evaluated step with the
        ratio adaptive / softmax, then best, final, seconds per training step
        (median of the logged windows) and wall time.

    Raises:
        UserError: If either run is missing.
    """
    for name in names:
        if not (folder / name).is_dir():
            raise UserError(f"{folder / name}: run folder not found (the check needs {names[0]}/ and {names[1]}/)")
    softmax, adaptive = load_run(folder / names[0]), load_run(folder / names[1])
    ppl_a = {r["step"]: math.exp(r["loss"]) for r in adaptive.valid}
    lines = [_row(["step", "softmax valid ppl", "adaptive valid ppl", "adaptive / softmax"]), _row(["---"] * 4)]
    for record in softmax.valid:
        if record["step"] in ppl_a:
            s, a = math.exp(record["loss"]), ppl_a[record["step"]]
            lines.append(_row([str(record["step"]), f"{s:.1f}", f"{a:.1f}", f"{a / s:.3f}"]))
    best_s, best_a = softmax.best_valid(), adaptive.best_valid()
    step_s = statistics.median(r["step_time"] for r in softmax.train)
    step_a = statistics.median(r["step_time"] for r in adaptive.train)
    final_s, final_a = math.exp(softmax.final_valid_loss()), math.exp(adaptive.final_valid_loss())
    final_steps = " / ".join(dict.fromkeys(str(run.valid[-1]["step"]) for run in (softmax, adaptive)))
    summary = [
        _row(["", "softmax", "adaptive", "adaptive / softmax"]), _row(["---"] * 4),
        _row(["best valid ppl (step)", f"{math.exp(best_s['loss']):.1f} ({best_s['step']})",
              f"{math.exp(best_a['loss']):.1f} ({best_a['step']})",
              f"{math.exp(best_a['loss'] - best_s['loss']):.3f}"]),
        _row([f"final valid ppl (step {final_steps})",
              f"{final_s:.1f}", f"{final_a:.1f}", f"{final_a / final_s:.3f}"]),
        _row(["seconds per training step (median)", f"{step_s:.3f}", f"{step_a:.3f}", f"{step_a / step_s:.2f}"]),
        _row(["wall time", minutes(softmax.wall_time), minutes(adaptive.wall_time),
              f"{adaptive.wall_time / softmax.wall_time:.2f}"]),
    ]
    return "\n".join([f"<!-- table: {marker} -->", *lines, "",
                      f"<!-- table: {marker}, summary -->", *summary, ""])


def adaptive_variants_table(folder: Path, marker: str = "ptb adaptive check, dropout 0.5, cutoffs and seeds") -> str:
    """Section 5: every dropout-0.5 ``adaptive`` run against the ``softmax`` run of its seed.

    Args:
        folder: Holds runs named ``softmax_dropout*`` and ``adaptive_dropout*``.
        marker: Name of the table's marker line.

    Returns:
        One table under its marker: cutoffs, seed, both runs' final validation
        perplexity (at the same step) and the ratio, sorted by cutoffs then seed.

    Raises:
        UserError: If an adaptive run has no softmax run of its seed, or the two
            end at different steps.
    """
    softmax = {run.seed: run for run in (load_run(p) for p in sorted(folder.glob("softmax_dropout*")) if p.is_dir())}
    rows = []
    for path in sorted(folder.glob("adaptive_dropout*")):
        adaptive = load_run(path)
        partner = softmax.get(adaptive.seed)
        if partner is None or partner.valid[-1]["step"] != adaptive.valid[-1]["step"]:
            raise UserError(f"{path}: no softmax_dropout* run of seed {adaptive.seed} ending at the same step")
        cutoffs = adaptive.config.get("model", {}).get("cutoffs")
        ratio = math.exp(adaptive.final_valid_loss() - partner.final_valid_loss())
        rows.append((list(cutoffs), adaptive.seed, adaptive.valid[-1]["step"],
                     math.exp(partner.final_valid_loss()), math.exp(adaptive.final_valid_loss()), ratio))
    lines = [_row(["adaptive cutoffs", "seed", "step", "softmax valid ppl", "adaptive valid ppl",
                   "adaptive / softmax"]), _row(["---"] * 6)]
    for cutoffs, seed, step, s, a, ratio in sorted(rows, key=lambda r: (len(r[0]), r[0], r[1]), reverse=False):
        lines.append(_row([str(cutoffs), str(seed), str(step), f"{s:.1f}", f"{a:.1f}", f"{ratio:.3f}"]))
    return "\n".join([f"<!-- table: {marker} -->", *lines, ""])


def recipe_ablation_table(folder: Path, every: int = 300) -> str:
    """Section 2b: the AWD recipe against its ablation (no regularizers) at equal steps.

    Args:
        folder: Holds the two runs, ``recipe/`` and ``ablation/``.
        every: Rows at the evaluated steps that are multiples of this, plus
            each run's last evaluation and best point.

    Returns:
        The table under its marker: validation loss (nats/char, the weights
        evaluated, averaged when the run averages) and the training loss
        logged at that step, for both runs.

    Raises:
        UserError: If either run is missing.
    """
    for name in ("recipe", "ablation"):
        if not (folder / name).is_dir():
            raise UserError(f"{folder / name}: run folder not found (the comparison needs recipe/ and ablation/)")
    recipe, ablation = load_run(folder / "recipe"), load_run(folder / "ablation")
    valid = [{r["step"]: r["loss"] for r in run.valid} for run in (recipe, ablation)]
    train = [{r["step"]: r["loss"] for r in run.train} for run in (recipe, ablation)]
    last = {run.valid[-1]["step"] for run in (recipe, ablation)}
    steps = sorted(step for step in set(valid[0]) | set(valid[1]) if step % every == 0 or step in last)

    def cell(values: dict, step: int) -> str:
        return f"{values[step]:.4f}" if step in values else "-"

    lines = [_row(["step", "recipe valid", "ablation valid", "recipe train", "ablation train"]), _row(["---"] * 5)]
    for step in steps:
        lines.append(_row([str(step), cell(valid[0], step), cell(valid[1], step),
                           cell(train[0], step), cell(train[1], step)]))
    best = [run.best_valid() for run in (recipe, ablation)]
    lines.append(_row(["best (step)", *(f"{b['loss']:.4f} ({b['step']})" for b in best), "", ""]))
    return "\n".join(["<!-- table: awd recipe and ablation -->", *lines, ""])


def tables(root: Path) -> str:
    """Every table, in the order of ``docs/results.md``, each under a marker line."""
    parts = []
    if (root / COMPARE).is_dir():
        runs = load_experiment(root / COMPARE)
        parts += ["<!-- table: experiment 1 -->", compare_table(runs), "",
                  "<!-- table: experiment 1, per epoch -->", compare_epochs_table(runs), ""]
    if (root / FAITHFUL).is_dir():
        runs = load_experiment(root / FAITHFUL)
        parts += ["<!-- table: experiment 1, faithful -->", compare_table(runs, "valid (seen)"), "",
                  "<!-- table: experiment 1, faithful, per epoch -->", compare_epochs_table(runs), ""]
    if (root / STRONG).is_dir():
        parts += ["<!-- table: experiment 2 -->", strong_table(load_experiment(root / STRONG)), ""]
    if (root / AWD_RECIPE).is_dir():
        parts.append(recipe_ablation_table(root / AWD_RECIPE))
    if (root / ADAPTIVE_CHECK).is_dir():
        parts.append(adaptive_check_tables(root / ADAPTIVE_CHECK))
        if any((root / ADAPTIVE_CHECK / name).is_dir() for name in ADAPTIVE_CHECK_DROPOUT):
            parts.append(adaptive_check_tables(root / ADAPTIVE_CHECK, ADAPTIVE_CHECK_DROPOUT,
                                               "ptb adaptive check, dropout 0.5"))
        if len(list((root / ADAPTIVE_CHECK).glob("adaptive_dropout?*"))):
            parts.append(adaptive_variants_table(root / ADAPTIVE_CHECK))
    if not parts:
        raise UserError(f"{root}: no {COMPARE}/, {FAITHFUL}/, {STRONG}/ or {ADAPTIVE_CHECK}/ experiment folder")
    return "\n".join(parts)


# --------------------------------------------------------------------------
# Curves


def plot_compare(runs: list[Run], out_path: Path, title: str = "Experiment 1") -> Path:
    """Training (per-epoch mean) and validation loss per epoch, one line per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax_train, ax_valid = fig.subplots(1, 2, sharey=True)
    colors = {"gru": "tab:blue", "lstm": "tab:orange", "ln_lstm": "tab:green", "ln_gru": "tab:red", "rnn": "tab:gray"}
    for run in runs:
        label = f"{run.cell} seed {run.seed}"
        style = "-" if run.seed == min(r.seed for r in runs if r.cell == run.cell) else "--"
        losses = run.epoch_train_losses()
        ax_train.plot(list(losses), list(losses.values()), style, color=colors.get(run.cell), label=label)
        per_epoch = run.steps_per_epoch()
        ax_valid.plot([r["step"] / per_epoch for r in run.valid], [r["loss"] for r in run.valid], style,
                      color=colors.get(run.cell), label=label)
    for cell, loss in REFERENCE_TRAIN_LOSS.items():
        ax_train.axhline(loss, color=colors[cell], linewidth=0.6, linestyle=":")
    ax_train.set_title("training loss, epoch mean (dotted: reference at epoch 20)")
    ax_valid.set_title("validation loss")
    for ax in (ax_train, ax_valid):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    ax_train.set_ylabel("nats/char")
    ax_valid.legend(fontsize=8)
    fig.suptitle(f"{title}: tiny-shakespeare, 3 x 100 cells, batch 32, BPTT 80, Adam 1e-4")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    return out_path


def plot_strong(runs: list[Run], out_path: Path) -> Path:
    """Training and validation loss against wall-clock minutes, with the target line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for run in runs:
        ax.plot([r["elapsed"] / 60 for r in run.train], [r["loss"] for r in run.train], linewidth=0.8,
                label=f"{run.name} train")
        ax.plot([r["elapsed"] / 60 for r in run.valid], [r["loss"] for r in run.valid], "o-", markersize=3,
                label=f"{run.name} valid")
    ax.axhline(TARGET_VALID_LOSS, color="black", linestyle=":", linewidth=0.8, label="target 1.50")
    ax.set_ylim(0.9, 3.0)
    ax.set_xlabel("wall time (minutes)")
    ax.set_ylabel("nats/char")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Experiment 2: configs/shakespeare_char.yaml")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    return out_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path,
                        help="folder with shakespeare_compare/, shakespeare_compare_faithful/ and/or shakespeare_char/")
    parser.add_argument("--plots", type=Path, help="also write the curve PNGs into this folder")
    args = parser.parse_args(argv)
    try:
        if not args.runs.is_dir():
            raise UserError(f"runs folder not found: {args.runs}")
        print(tables(args.runs), end="")
        if args.plots:
            args.plots.mkdir(parents=True, exist_ok=True)
            if (args.runs / COMPARE).is_dir():
                print(plot_compare(load_experiment(args.runs / COMPARE), args.plots / "experiment1.png"), file=sys.stderr)
            if (args.runs / FAITHFUL).is_dir():
                print(plot_compare(load_experiment(args.runs / FAITHFUL), args.plots / "experiment1_faithful.png",
                                   "Experiment 1, tutorial's init, whole file (validation text seen)"),
                      file=sys.stderr)
            if (args.runs / STRONG).is_dir():
                print(plot_strong(load_experiment(args.runs / STRONG), args.plots / "experiment2.png"), file=sys.stderr)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
