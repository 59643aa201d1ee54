"""Training speed and peak memory of the output layers (``model.output``) at large vocabularies.

A 2 x 512 LSTM (embedding 512) trains on synthetic Zipfian token ids (rank
``k`` drawn with probability proportional to ``1 / (k + 1)``, the shape of
word frequencies) in 20 x 35 batches, with ``softmax``, ``sampled`` (8192
samples) and ``adaptive`` output layers, at vocabularies 10k, 100k and 267k::

    python tools/bench_outputs.py                                   # 10k and 100k, every output
    python tools/bench_outputs.py --vocab 267735 --outputs softmax,adaptive --steps 3
    python tools/benchmark.py --output-layers 10000,100000 --out bench-outputs   # the same, with a report

Each (vocabulary, output) runs in a fresh Python process, so that its peak
memory is its own: after building the model and one warm-up step (tracing), the
timed steps are whole training steps (forward, the output layer's training
loss, backward, Adam update) in one ``tf.function``. Reported per run: training
tokens/s (median step), the process's peak resident memory (``ru_maxrss``) and
that peak minus the resident memory before the first step (the training
working set: activations, logits, gradients, optimizer slots). Adaptive
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


def run_one(vocab: int, output: str, steps: int, sizes: dict | None = None) -> dict:
    """Times ``steps`` training steps of one (vocabulary, output) in this process.

    Args:
        vocab: Vocabulary size.
        output: ``model.output``.
        steps: Timed steps (after one warm-up step).
        sizes: ``batch``, ``bptt``, ``layers``, ``hidden``, ``num_sampled``
            (default: the module's constants).
    """
    sizes = {"batch": BATCH, "bptt": STEPS, "layers": LAYERS, "hidden": UNITS, "num_sampled": NUM_SAMPLED,
             **(sizes or {})}
    batch, bptt = sizes["batch"], sizes["bptt"]
    import numpy as np
    import tensorflow as tf

    from dist_rnn.config import ModelConfig
    from dist_rnn.models.model import build_model

    extra = {"sampled": {"num_sampled": sizes["num_sampled"]},
             "adaptive": {"cutoffs": cutoffs_for(vocab)}}.get(output, {})
    config = ModelConfig(cell="lstm", num_layers=sizes["layers"], hidden_size=sizes["hidden"],
                         embedding_size=sizes["hidden"], output=output, **extra)
    model = build_model(config, vocab, seed=0)
    optimizer = tf.keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, vocab + 1)
    ids = rng.choice(vocab, size=(steps + 1, batch, bptt + 1), p=p / p.sum()).astype(np.int32)
    states = model.initial_state(batch)

    @tf.function
    def train_step(tokens, step):
        with tf.GradientTape() as tape:
            losses, _ = model(tokens[:, :-1], states, training=True, seed=tf.stack([step, 0]), targets=tokens[:, 1:])
            loss = tf.reduce_mean(losses)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply([tf.convert_to_tensor(g) for g in grads], model.trainable_variables)
        return loss

    before = rss_mb()
    float(train_step(tf.constant(ids[0]), tf.constant(0)))  # warm-up: tracing
    times = []
    for i in range(1, steps + 1):
        start = time.perf_counter()
        float(train_step(tf.constant(ids[i]), tf.constant(i)))
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step_time = statistics.median(times)
    return {"vocab": vocab, "output": output, "cutoffs": extra.get("cutoffs"),
            "num_sampled": extra.get("num_sampled"), "steps": steps, **{k: sizes[k] for k in sizes if k != "num_sampled"},
            "step_seconds": round(step_time, 6), "tokens_per_second": round(batch * bptt / step_time, 1),
            "peak_rss_mb": round(peak, 1), "rss_before_first_step_mb": round(before, 1),
            "working_set_mb": round(peak - before, 1),
            "parameters": int(sum(np.prod(v.shape) for v in model.trainable_variables))}


def markdown(results: list[dict], machine: dict, command: str) -> str:
    """``results.md``: machine, command, one table row per run, and each output against ``softmax``."""
    first = results[0] if results else {}
    lines = ["# Output layers: training speed and peak memory", "",
             f"Machine: {machine.get('cpus')} CPUs {machine.get('cpu_model')}, {machine.get('memory_gib')} GiB; "
             f"TF {machine.get('tensorflow')}, Keras {machine.get('keras')}.", "",
             f"Command: `{command}`", "",
             f"Model: {first.get('layers')} x {first.get('hidden')} LSTM (embedding {first.get('hidden')}), batch "
             f"{first.get('batch')} x {first.get('bptt')}, Adam, synthetic Zipfian ids; median of "
             f"{first.get('steps')} timed steps after one warm-up step, each run in its own process.", "",
             "| vocab | output | tokens/s | x softmax | peak RSS (MB) | training working set (MB) | "
             "working set / softmax | parameters |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    softmax = {r["vocab"]: r for r in results if r["output"] == "softmax"}
    for r in results:
        base = softmax.get(r["vocab"])
        speed = f"{r['tokens_per_second'] / base['tokens_per_second']:.2f}" if base else "-"
        memory = f"{r['working_set_mb'] / base['working_set_mb']:.2f}" if base and base["working_set_mb"] > 0 else "-"
        name = r["output"] + (f" ({r['num_sampled']})" if r.get("num_sampled") else "") + \
            (f" {r['cutoffs']}" if r.get("cutoffs") else "")
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
    parser.add_argument("--out", help="folder for results.jsonl and results.md (with the machine and command)")
    parser.add_argument("--one", nargs=2, metavar=("VOCAB", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = {"batch": args.batch, "bptt": args.bptt, "layers": args.layers, "hidden": args.hidden,
             "num_sampled": args.num_sampled}
    if args.one:
        print(json.dumps(run_one(int(args.one[0]), args.one[1], args.steps, sizes)))
        return 0
    size_args = [a for k, v in sizes.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    results = []
    for vocab in [int(v) for v in args.vocab.split(",")]:
        for output in args.outputs.split(","):
            proc = subprocess.run([sys.executable, __file__, "--one", str(vocab), output, "--steps", str(args.steps),
                                   *size_args],
                                  capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
            if proc.returncode != 0:
                print(f"error: vocab {vocab} {output}: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                return 1
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(result)
            print(f"vocab {vocab:>7}  {output:<9} {result['tokens_per_second']:>9.1f} tokens/s  "
                  f"peak {result['peak_rss_mb']:>8.1f} MB  (training working set {result['working_set_mb']:>8.1f} MB)",
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
