"""Training speed and peak memory of the output layers (``model.output``) at large vocabularies.

A 2 x 512 LSTM (embedding 512) trains on synthetic Zipfian token ids (rank
``k`` drawn with probability proportional to ``1 / (k + 1)``, the shape of
word frequencies) in 20 x 35 batches, with ``softmax``, ``sampled`` (8192
samples) and ``adaptive`` output layers, at vocabularies 10k, 100k and 267k::

    python tools/bench_outputs.py                                   # 10k and 100k, every output
    python tools/bench_outputs.py --vocab 267735 --outputs softmax,adaptive --steps 3
    python tools/benchmark.py --output-layers 10000,100000 --out bench-outputs   # the same, with a report
    python tools/bench_outputs.py --vocab 20000 --outputs sampled --optimizer adagrad --updates auto,dense

Each (vocabulary, output) runs in a fresh Python process, so that its peak
memory is its own: after building the model and one warm-up step (tracing), the
timed steps are dist-rnn's own training step (``StepFunctions.train_step`` on
one device: forward, the output layer's training loss, backward, the gradient
path with clip 5, the ``--optimizer`` update; the state is carried).
``--optimizer`` is ``adam`` by default (the rows in docs/benchmarks.md);
with ``sgd`` or ``adagrad`` the embedding's and sampled softmax's rows are
updated row-sparse (``--updates auto``) or, for comparison, dense
(``--updates dense``). Reported per run: training
tokens/s (median step), the process's peak resident memory (``ru_maxrss``) and
that peak minus the resident memory before the first step (the training
working set: activations, logits, gradients, optimizer slots, and the
memory of tracing the step and of the C allocator's fragmentation), and the
largest rise of TensorFlow's CPU allocator over a timed step
(``allocator_step_peak_mb``: the step's tensors alone, without tracing or
fragmentation). Adaptive
cutoffs per vocabulary are in :data:`CUTOFFS`. The last stdout line is the
JSON list of results; with ``--out`` also ``results.jsonl`` and ``results.md``
(machine, command, table, ratios to ``softmax``) in that folder.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

BATCH, STEPS, LAYERS, UNITS = 20, 35, 2, 512
NUM_SAMPLED = 8192
#: Adaptive-softmax cutoffs per vocabulary size (267,735: WikiText-103's vocabulary and its usual cutoffs).
CUTOFFS = {10_000: [2000, 6000], 100_000: [10000, 40000], 267_735: [20000, 40000, 200000]}


def cutoffs_for(vocab: int) -> list[int]:
    """The cutoffs of :data:`CUTOFFS`, or head 20k / 40k / half the vocabulary for another size."""
    return CUTOFFS.get(vocab) or [c for c in (min(20000, vocab // 5), min(40000, vocab // 2)) if c < vocab]


def rss_mb() -> float:
    """Current resident memory of this process (MB), from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def run_one(vocab: int, output: str, steps: int, sizes: dict | None = None, optimizer: str = "adam",
            updates: str = "auto") -> dict:
    """Times ``steps`` training steps of one (vocabulary, output) in this process.

    Args:
        vocab: Vocabulary size.
        output: ``model.output``.
        steps: Timed steps (after one warm-up step).
        sizes: ``batch``, ``bptt``, ``layers``, ``hidden``, ``num_sampled``
            (default: the module's constants).
        optimizer: ``optimizer.name``.
        updates: ``auto``: row-sparse where exact (sgd, adagrad); ``dense``: always dense.
    """
    sizes = {"batch": BATCH, "bptt": STEPS, "layers": LAYERS, "hidden": UNITS, "num_sampled": NUM_SAMPLED,
             **(sizes or {})}
    batch, bptt = sizes["batch"], sizes["bptt"]
    import numpy as np
    import tensorflow as tf

    from dist_rnn.config import ModelConfig, OptimizerConfig
    from dist_rnn.distribution import Backend
    from dist_rnn.models.model import build_model
    from dist_rnn.training.optimizers import build_optimizer
    from dist_rnn.training.steps import StepFunctions

    extra = {"sampled": {"num_sampled": sizes["num_sampled"]},
             "adaptive": {"cutoffs": cutoffs_for(vocab)}}.get(output, {})
    config = ModelConfig(cell="lstm", num_layers=sizes["layers"], hidden_size=sizes["hidden"],
                         embedding_size=sizes["hidden"], output=output, **extra)
    backend = Backend()
    model = build_model(config, vocab, seed=0)
    keras_optimizer = build_optimizer(OptimizerConfig(name=optimizer, learning_rate=1e-3 if optimizer == "adam" else 0.1))
    keras_optimizer.build(model.trainable_variables)
    step_functions = StepFunctions(model, keras_optimizer, backend, batch, bptt, clip_norm=5.0,
                                   sparse_updates=False if updates == "dense" else None)
    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, vocab + 1)
    ids = rng.choice(vocab, size=(steps + 1, batch, bptt + 1), p=p / p.sum()).astype(np.int32)
    states = model.initial_state(batch)

    def train_step(tokens, step):
        nonlocal states
        loss, states, _, _ = step_functions.train_step(tf.constant(tokens[:, :-1]), tf.constant(tokens[:, 1:]),
                                                       states, tf.constant([0, step], tf.int64))
        return float(loss)

    before = rss_mb()
    train_step(ids[0], 0)  # warm-up: tracing
    times, step_peaks = [], []
    for i in range(1, steps + 1):
        allocated = tf.config.experimental.get_memory_info("CPU:0")["current"]
        tf.config.experimental.reset_memory_stats("CPU:0")
        start = time.perf_counter()
        train_step(ids[i], i)
        times.append(time.perf_counter() - start)
        step_peaks.append(tf.config.experimental.get_memory_info("CPU:0")["peak"] - allocated)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step_time = statistics.median(times)
    rule = step_functions.sparse_rule
    return {"vocab": vocab, "output": output, "cutoffs": extra.get("cutoffs"), "optimizer": optimizer,
            "updates": f"row-sparse ({rule})" if rule else "dense",
            "row_sparse_variables": step_functions.sparse_variables,
            "num_sampled": extra.get("num_sampled"), "steps": steps, **{k: sizes[k] for k in sizes if k != "num_sampled"},
            "step_seconds": round(step_time, 6), "tokens_per_second": round(batch * bptt / step_time, 1),
            "peak_rss_mb": round(peak, 1), "rss_before_first_step_mb": round(before, 1),
            "working_set_mb": round(peak - before, 1),
            "allocator_step_peak_mb": round(max(step_peaks) / 2 ** 20, 3),
            "parameters": int(sum(np.prod(v.shape) for v in model.trainable_variables))}


def markdown(results: list[dict], machine: dict, command: str) -> str:
    """``results.md``: machine, command, one table row per run, and each output against ``softmax``."""
    first = results[0] if results else {}
    lines = ["# Output layers: training speed and peak memory", "",
             f"Machine: {machine.get('cpus')} CPUs {machine.get('cpu_model')}, {machine.get('memory_gib')} GiB; "
             f"TF {machine.get('tensorflow')}, Keras {machine.get('keras')}.", "",
             f"Command: `{command}`", "",
             f"Model: {first.get('layers')} x {first.get('hidden')} LSTM (embedding {first.get('hidden')}), batch "
             f"{first.get('batch')} x {first.get('bptt')}, optimizer {first.get('optimizer')}, clip 5, synthetic "
             f"Zipfian ids; dist-rnn's training step on one device, median of "
             f"{first.get('steps')} timed steps after one warm-up step, each run in its own process.", "",
             "| vocab | output | tokens/s | x softmax | peak RSS (MB) | training working set (MB) | "
             "working set / softmax | parameters |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    softmax = {(r["vocab"], r["updates"] != "dense"): r for r in results if r["output"] == "softmax"}
    show_updates = any(r["updates"] != "dense" for r in results)
    for r in results:
        base = softmax.get((r["vocab"], r["updates"] != "dense"))
        speed = f"{r['tokens_per_second'] / base['tokens_per_second']:.2f}" if base else "-"
        memory = f"{r['working_set_mb'] / base['working_set_mb']:.2f}" if base and base["working_set_mb"] > 0 else "-"
        name = r["output"] + (f" ({r['num_sampled']})" if r.get("num_sampled") else "") + \
            (f" {r['cutoffs']}" if r.get("cutoffs") else "") + (f", {r['updates']} updates" if show_updates else "")
        lines.append(f"| {r['vocab']:,} | {name} | {r['tokens_per_second']:,.0f} | {speed} | {r['peak_rss_mb']:,.0f} | "
                     f"{r['working_set_mb']:,.0f} | {memory} | {r['parameters']:,} |")
    return "\n".join(lines) + "\n"


def main(argv=None, command: str | None = None) -> int:
    """Runs every (vocabulary, output) in its own process (or, with the internal ``--one``, one of them).

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).
        command: The command to name in ``results.md`` (default: this script's).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", default="10000,100000", help="comma-separated vocabulary sizes")
    parser.add_argument("--outputs", default="softmax,sampled,adaptive")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per run (after one warm-up)")
    parser.add_argument("--batch", type=int, default=BATCH, help="rows per step")
    parser.add_argument("--bptt", type=int, default=STEPS, help="tokens per row per step")
    parser.add_argument("--layers", type=int, default=LAYERS, help="LSTM layers")
    parser.add_argument("--hidden", type=int, default=UNITS, help="units per layer and embedding width")
    parser.add_argument("--num-sampled", type=int, default=NUM_SAMPLED, help="candidates per step of 'sampled'")
    parser.add_argument("--optimizer", default="adam", choices=["adam", "adagrad", "sgd"],
                        help="optimizer of every run (adam: the rows in docs/benchmarks.md)")
    parser.add_argument("--updates", default="auto",
                        help="comma-separated: auto (row-sparse where exact: sgd, adagrad) and/or dense")
    parser.add_argument("--out", help="folder for results.jsonl and results.md (with the machine and command)")
    parser.add_argument("--one", nargs=2, metavar=("VOCAB", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = {"batch": args.batch, "bptt": args.bptt, "layers": args.layers, "hidden": args.hidden,
             "num_sampled": args.num_sampled}
    if args.one:
        print(json.dumps(run_one(int(args.one[0]), args.one[1], args.steps, sizes, args.optimizer, args.updates)))
        return 0
    size_args = [a for k, v in sizes.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    results = []
    print(f"optimizer {args.optimizer}", flush=True)
    runs = [(int(vocab), output, updates) for vocab in args.vocab.split(",") for updates in args.updates.split(",")
            for output in args.outputs.split(",")]
    for vocab, output, updates in runs:
        proc = subprocess.run([sys.executable, __file__, "--one", str(vocab), output, "--steps", str(args.steps),
                               "--optimizer", args.optimizer, "--updates", updates, *size_args],
                              capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        if proc.returncode != 0:
            print(f"error: vocab {vocab} {output}: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return 1
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(result)
        print(f"vocab {vocab:>7}  {output:<9} {result['updates']:<20} {result['tokens_per_second']:>9.1f} tokens/s  "
              f"peak {result['peak_rss_mb']:>8.1f} MB  (training working set {result['working_set_mb']:>8.1f} MB, "
              f"allocator step peak {result['allocator_step_peak_mb']:>8.1f} MB)",
              flush=True)
    if args.out:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench.machine import machine_description

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        command = command or "python tools/bench_outputs.py " + " ".join(sys.argv[1:] if argv is None else argv)
        (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results), encoding="utf-8")
        (out / "results.md").write_text(markdown(results, machine_description(), command), encoding="utf-8")
        print(f"wrote {out / 'results.jsonl'}, {out / 'results.md'}", file=sys.stderr)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
