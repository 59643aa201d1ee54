#!/usr/bin/env python
"""Training-step benchmark: dist-rnn against a minimal Keras loop, ``model.fit`` and PyTorch.

One command times, on the same model sizes and in the same run::

    dist-rnn loop            Trainer.train: tf.data windows, learning-rate assign,
                             state carrying, loss/grad-norm sync, metrics.jsonl and
                             TensorBoard logging, every log_every steps
    dist-rnn step            StepFunctions.train_step alone (fixed windows, state carried)
    dist-rnn step compiled   the same with DIST_RNN_COMPILED_KERNELS=on (#22); only when named,
                             e.g. --systems step,step-compiled (its first use builds the op)
    minimal loop (model)     a hand-written tf.function step (tape, clip, optimizer.apply,
                             state carried) around the *same* dist-rnn model: the floor
                             of framework overhead for identical math
    minimal loop (Keras)     the same hand-written loop around stock Keras layers
                             (Embedding, LSTM/GRU x L, Dense)
    Keras model.fit          stateless, stock Keras layers
    PyTorch                  nn.Embedding + nn.LSTM/nn.GRU + nn.Linear, Adam, clipping,
                             state carried (only when torch is importable)

with XLA (``train.jit_compile``) variants of the dist-rnn rows and the mirrored
backend (logical CPU devices, or the GPUs) at the same global batch.

Every row runs in its own worker process (logical devices must be configured
before TensorFlow initializes, and each row's peak memory is its own). Workers
build and warm up one at a time, then the timed repeats are interleaved across
the rows of a cell (round-robin, rotated each round; ``--interleave all``:
across the rows of every cell) so that a load change on a shared machine hits
every row alike. A repeat times ``--steps`` training
steps; the table shows the median step time over ``--repeats`` repeats,
tokens/s = batch x bptt / step time, and the worker's peak memory.

Outputs in ``--out``: ``results.jsonl`` (one line per row, every repeat),
``results.md`` (machine, command, table, ratios, targets) and ``results.png``.

Two corpus measurements of issue #17 run instead with ``--prepare`` or
``--corpus-memory``; every option after either goes to that measurement
(``--prepare --help``)::

    --prepare        prepare throughput (MB/s) per tokenizer on synthetic Zipfian text,
                     against the targets (bench/prepare_throughput.py)
    --corpus-memory  peak RSS and time to the first step of ``dist-rnn train`` on
                     prepared corpora of growing size, against the list-based reading of
                     earlier versions (bench/corpus_memory.py)

Usage::

    python tools/benchmark.py --out bench                  # the full comparison
    python tools/benchmark.py --prepare --mb 20            # prepare MB/s per tokenizer
    python tools/benchmark.py --corpus-memory --sizes-mb 10,100
    python tools/benchmark.py --quick --out /tmp/bench     # seconds: smoke configuration
    python tools/benchmark.py --cells lstm --hidden 512 --batch 64 --jit on --systems loop,step,torch
    python tools/benchmark.py --output-layers 10000,100000 --steps 5 --out bench-outputs   # model.output
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

# The harness lives in the ``bench`` package beside this script (its docstring maps the modules and says how to
# add a measurement); the path is added also when this file is loaded by path (tests/test_benchmark.py).
TOOLS = str(Path(__file__).resolve().parent)
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)

from dist_rnn.config import CELLS  # noqa: E402

from bench.machine import gpu_visible, machine_description  # noqa: E402
from bench.report import chart, markdown, ratios_and_targets  # noqa: E402
from bench.rows import build_rows, csv, group_rows  # noqa: E402
from bench.runner import run_group  # noqa: E402
from bench.systems import SYSTEMS, label  # noqa: E402

# tests/test_benchmark.py reads the rows, labels and targets from here.
__all__ = ["build_rows", "group_rows", "label", "main", "parse_args", "ratios_and_targets"]

QUICK = dict(cells="lstm", hidden=16, layers=1, embedding=8, vocab=20, batch=4, bptt=8, steps=2, repeats=2,
             warmup=1, backend="none", jit="off")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--cells", default="lstm,gru,ln_lstm,ln_gru", help="comma list of lstm, gru, ln_lstm, ln_gru, rnn")
    p.add_argument("--hidden", type=int, default=256, help="units per recurrent layer")
    p.add_argument("--layers", type=int, default=2, help="recurrent layers")
    p.add_argument("--embedding", type=int, default=None, help="embedding width (default: --hidden)")
    p.add_argument("--vocab", type=int, default=65, help="vocabulary size (synthetic char-level text)")
    p.add_argument("--batch", type=int, default=32, help="global batch (rows)")
    p.add_argument("--bptt", type=int, default=100, help="truncated-BPTT length (tokens per row per step)")
    p.add_argument("--precision", default="float32", help="comma list of float32, mixed_float16, mixed_bfloat16")
    p.add_argument("--backend", default="none,mirrored", help="comma list of none, mirrored")
    p.add_argument("--replicas", type=int, default=2,
                   help="mirrored replicas: logical CPU devices without a GPU (with GPUs: all visible GPUs)")
    p.add_argument("--jit", choices=["off", "on", "both"], default="both",
                   help="XLA (train.jit_compile) for the one-device dist-rnn rows")
    p.add_argument("--systems", default=",".join(k for k, s in SYSTEMS.items() if s.default),
                   help="comma list of " + ", ".join(SYSTEMS))
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per row (median reported)")
    p.add_argument("--steps", type=int, default=10, help="training steps per repeat")
    p.add_argument("--warmup", type=int, default=1, help="untimed repeats first (tracing, XLA compiles)")
    p.add_argument("--clip", type=float, default=5.0, help="global-norm clip in every system (0: off)")
    p.add_argument("--intra-threads", type=int, default=0, help="TensorFlow intra-op threads (0: TF default)")
    p.add_argument("--inter-threads", type=int, default=0, help="TensorFlow inter-op threads (0: TF default)")
    p.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: CPU count)")
    p.add_argument("--omp-passive", action="store_true", help="OMP_WAIT_POLICY=PASSIVE for the PyTorch worker")
    p.add_argument("--profile", action="store_true",
                   help="also profile 3 steps of the dist-rnn step and PyTorch rows (op-type table in results.md)")
    p.add_argument("--interleave", choices=["cell", "all"], default="cell",
                   help="interleave the timed repeats within each cell (default) or across all rows of a "
                        "precision (for ratios between cells, e.g. ln_lstm / lstm, under the same load)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds a worker may take to answer")
    p.add_argument("--out", default="benchmark-results", help="output folder")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke configuration (1 x 16-unit lstm, batch 4, bptt 8, 2 x 2 steps, one device)")
    p.add_argument("--prepare", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="measure prepare throughput per tokenizer instead (ARGS: see --prepare --help)")
    p.add_argument("--corpus-memory", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="measure train's peak RSS and time to step 1 by corpus size instead "
                        "(ARGS: see --corpus-memory --help)")
    p.add_argument("--output-layers", metavar="VOCABS",
                   help="instead: time the output layers (model.output softmax, sampled with 8192 samples, adaptive) "
                        "of a 2 x 512 LSTM, batch 20 x 35, on synthetic Zipfian ids at these comma-separated "
                        "vocabulary sizes (tools/bench_outputs.py; --steps timed steps; --quick: 1 x 16 units)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])
                 if a.startswith("--")}
        for key, value in QUICK.items():
            if key not in given:
                setattr(args, key, value)
    return args


def _check_selection(args) -> None:
    """Exits with a message for an unknown cell or system."""
    for cell in csv(args.cells):
        if cell not in CELLS:
            raise SystemExit(f"unknown cell {cell!r}; choose from {', '.join(CELLS)}")
    for system in csv(args.systems):
        if system not in SYSTEMS:
            raise SystemExit(f"unknown system {system!r}; choose from {', '.join(SYSTEMS)}")


def _time_all_groups(rows: list[dict], args, machine: dict, command: str, jsonl: Path, log,
                     notes: list[str]) -> list[dict]:
    """Times every group of rows; writes each summarized row to ``jsonl`` as it is done and returns them."""
    results = []
    with open(jsonl, "w", encoding="utf-8") as f:
        for name, specs in group_rows(rows, args.interleave).items():
            log(f"{name}: {len(specs)} rows")
            for row in run_group(specs, args, log, notes):
                row["machine"] = machine
                row["command"] = command
                results.append(row)
                f.write(json.dumps(row) + "\n")
                f.flush()
    return results


def _output_layers(args, command: str) -> int:
    """``--output-layers``: the output-layer comparison of ``bench_outputs`` (results.jsonl and results.md in ``--out``)."""
    import bench_outputs

    sizes = ["--batch", "4", "--bptt", "8", "--layers", "1", "--hidden", "16", "--num-sampled", "16"] if args.quick else []
    return bench_outputs.main(["--vocab", args.output_layers, "--steps", str(args.steps), "--out", args.out, *sizes],
                              command=command)


def main(argv=None) -> int:
    """Runs the benchmark (or, with the internal ``--worker SPEC``, one row's worker process)."""
    args = parse_args(argv)
    if args.prepare is not None:
        from bench.prepare_throughput import main as prepare_main

        return 0 if prepare_main(args.prepare) else 1
    if args.corpus_memory is not None:
        from bench.corpus_memory import main as corpus_memory_main

        return 0 if corpus_memory_main(args.corpus_memory) else 1
    if args.worker:
        from bench.worker import worker_main

        worker_main(json.loads(args.worker))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python tools/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.output_layers:
        return _output_layers(args, command)

    def log(message):
        print(message, flush=True)

    _check_selection(args)
    torch_ok = importlib.util.find_spec("torch") is not None
    if "torch" in csv(args.systems) and not torch_ok:
        log("PyTorch is not importable: the PyTorch rows are skipped.")
    gpu = gpu_visible()
    if "mirrored" in csv(args.backend) and not gpu and args.batch % args.replicas:
        raise SystemExit(f"--batch {args.batch} does not divide by --replicas {args.replicas}")
    machine = machine_description()
    machine["gpu_visible"] = gpu
    log(f"machine: {machine['cpus']} CPUs {machine['cpu_model']}, {machine['memory_gib']} GiB, "
        f"{'GPU' if gpu else 'no GPU'}; TF {machine['tensorflow']}, Keras {machine['keras']}, torch {machine['torch']}")
    rows, notes = build_rows(args, torch_ok, gpu)
    jsonl = out / "results.jsonl"
    results = _time_all_groups(rows, args, machine, command, jsonl, log, notes)
    text = markdown(results, notes, machine, command, args)
    (out / "results.md").write_text(text, encoding="utf-8")
    if results:
        chart(results, out / "results.png")
    print()
    print(text)
    if not results:
        log(f"no row could be timed (see the notes); wrote {jsonl}, {out / 'results.md'}")
        return 1
    log(f"wrote {jsonl}, {out / 'results.md'}, {out / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
