"""Times one recurrent layer alone: its forward pass, and forward + backward.

``tools/benchmark.py`` times whole training steps (embedding, recurrent
layers, softmax, optimizer). This script isolates one dist-rnn recurrent
layer, as the model builds it off cuDNN, to show where a cell's cost sits::

    python tools/layer_benchmark.py                                   # lstm, gru, ln_lstm, ln_gru
    python tools/layer_benchmark.py --cells lstm,ln_lstm --repeats 14 --xla
    python tools/layer_benchmark.py --cells lstm --compiled          # + the compiled op (#22)
    python tools/layer_benchmark.py --cells lstm,gru --compiled --op-gflops   # + GFLOP/s vs one big MatMul
    python tools/layer_benchmark.py --cells lstm --projection 128 --compiled   # projected LSTM (lstmp op)

Each call runs the layer over a ``[batch, bptt, units]`` input from given
initial states, in a ``tf.function`` (``--xla``: compiled with XLA); the
backward variant also takes the gradient of a scalar of the outputs with
respect to the input, the initial states and the weights. After one warm-up
call per variant, the timed repeats (each ``--calls`` calls) are interleaved
across all variants, round-robin, so that a load change hits all alike. The
table gives the median and the best repeat, per call, and each cell's time
relative to its plain cell (``ln_lstm`` / ``lstm``, ``ln_gru`` / ``gru``).
``--compiled`` adds a ``<cell> (compiled)`` variant for each cell with a
compiled op (:mod:`dist_rnn.models.kernels.compiled`), traced with
``DIST_RNN_COMPILED_KERNELS=on``, and gives its time relative to the graph
recurrence of the same cell. ``--projection P`` makes every ``lstm`` layer a
projected LSTM (``model.projection_size: P``; ``h`` and its state are ``P`` wide).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from dist_rnn.config import CELLS, TWO_STATE_CELLS

PLAIN = {"ln_lstm": "lstm", "ln_gru": "gru"}


def _projection_size(cell: str, projection):
    return projection if cell == "lstm" else None


def build_layer(cell: str, units: int, xla: bool = False, projection=None):
    """One layer exactly as dist-rnn's model builds it for ``cell`` (defaults, no dropout; off cuDNN under XLA).

    ``projection``: ``model.projection_size`` for an ``lstm`` layer (a projected LSTM), else None.
    """
    from dist_rnn.config import ModelConfig
    from dist_rnn.models.model import cudnn_excluded_by, recurrent_layer

    return recurrent_layer(ModelConfig(cell=cell, num_layers=1, hidden_size=units, embedding_size=units,
                                       projection_size=_projection_size(cell, projection)), 0,
                           allow_cudnn=not cudnn_excluded_by(jit_compile=xla))


def make_calls(cell: str, units: int, batch: int, bptt: int, xla: bool, projection=None):
    """``(forward, forward_backward)``: zero-argument callables that run the layer once and block."""
    import tensorflow as tf

    layer = build_layer(cell, units, xla, projection)
    rng = tf.random.Generator.from_seed(0)
    x = rng.normal([batch, bptt, units])
    n_states = 2 if cell in TWO_STATE_CELLS else 1
    # A projected LSTM's h is projection wide, its c units wide.
    widths = [_projection_size(cell, projection) or units, units][:n_states]
    states = [0.1 * rng.normal([batch, width]) for width in widths]
    layer(x, initial_state=states)

    def loss_of(outputs):
        return tf.add_n([tf.reduce_sum(o * 0.01) for o in outputs])

    @tf.function(jit_compile=xla)
    def forward(x, states):
        return loss_of(layer(x, initial_state=states))

    @tf.function(jit_compile=xla)
    def forward_backward(x, states):
        with tf.GradientTape() as tape:
            tape.watch([x] + states)
            loss = loss_of(layer(x, initial_state=states))
        grads = tape.gradient(loss, [x] + states + layer.trainable_variables)
        return loss + tf.add_n([tf.reduce_sum(g) for g in grads]) * 0.0

    return (lambda: float(forward(x, states))), (lambda: float(forward_backward(x, states)))


def run(args) -> list[dict]:
    """Times every variant; returns one dict per (cell, pass) with per-call seconds."""
    from dist_rnn.models.kernels import compiled

    variants = []
    runs = [(cell, "off") for cell in args.cells]
    if args.compiled:
        runs += [(cell, "on") for cell in args.cells if cell in compiled.COMPILED_CELLS]
    switch = os.environ.get(compiled.SWITCH_ENV)
    for cell, mode in runs:
        os.environ[compiled.SWITCH_ENV] = mode  # read while the calls are traced (warm-up)
        label = f"{cell} (compiled)" if mode == "on" else cell
        if mode == "on" and not compiled.uses_compiled(
                compiled.recurrence_name(cell, _projection_size(cell, args.projection))):
            raise SystemExit(f"error: the compiled op is unavailable: {compiled.unavailable_reason()}")
        fwd, both = make_calls(cell, args.units, args.batch, args.bptt, args.xla, args.projection)
        for name, call in (("forward", fwd), ("forward + backward", both)):
            call()  # warm-up: tracing (and XLA compile)
            variants.append({"cell": label, "pass": name, "call": call, "seconds": []})
    if switch is None:
        os.environ.pop(compiled.SWITCH_ENV, None)
    else:
        os.environ[compiled.SWITCH_ENV] = switch
    for r in range(args.repeats):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            start = time.perf_counter()
            for _ in range(args.calls):
                v["call"]()
            v["seconds"].append((time.perf_counter() - start) / args.calls)
    return [{k: v for k, v in var.items() if k != "call"} for var in variants]


def table(results: list[dict]) -> str:
    """A markdown table: median and best ms per call, and the ratio to the plain cell's median."""
    median = {(r["cell"], r["pass"]): statistics.median(r["seconds"]) for r in results}
    lines = ["| cell | pass | ms per call (median) | best | time vs plain cell |", "|---|---|---:|---:|---:|"]
    for r in results:
        plain = PLAIN.get(r["cell"]) or (r["cell"].split(" ")[0] if r["cell"].endswith(" (compiled)") else None)
        ratio = ""
        if plain and (plain, r["pass"]) in median:
            ratio = f"{median[(r['cell'], r['pass'])] / median[(plain, r['pass'])]:.2f}x {plain}"
        lines.append(f"| {r['cell']} | {r['pass']} | {1000 * median[(r['cell'], r['pass'])]:.1f} | "
                     f"{1000 * min(r['seconds']):.1f} | {ratio} |")
    return "\n".join(lines)


def _op_arguments(cell: str, units: int, batch: int, bptt: int, rng):
    """Random inputs of ``cell``'s compiled op (no dropout mask) and the number of gates per unit."""
    gates = 3 if cell in ("gru", "ln_gru") else 4
    proj = rng.normal([bptt, batch, gates * units])
    h0 = 0.1 * rng.normal([batch, units])
    rkernel = rng.normal([units, gates * units]) / units ** 0.5
    ones, zeros = (lambda n: 1.0 + 0.1 * rng.normal([n])), (lambda n: 0.1 * rng.normal([n]))
    if cell == "lstm":
        tensors = [proj, h0, 0.1 * rng.normal([batch, units]), rkernel]
    elif cell == "gru":
        tensors = [proj, h0, rkernel, zeros(3 * units)]
    elif cell == "ln_lstm":
        tensors = [proj, h0, 0.1 * rng.normal([batch, units]), rkernel, ones(4 * units), zeros(4 * units),
                   ones(units), zeros(units)]
    elif cell == "ln_gru":
        tensors = [proj, h0, rkernel, ones(2 * units), zeros(2 * units), ones(units), zeros(units)]
    else:
        raise SystemExit(f"error: --op-gflops does not know the compiled op of {cell!r}")
    return tensors, gates


def op_rates(cell: str, units: int, batch: int, bptt: int, repeats: int) -> list[dict]:
    """GFLOP/s of ``cell``'s compiled op alone and of one big MatMul, timed interleaved.

    The op's count is its GEMMs, forward and backward: ``3 x bptt x 2 x batch x units x G units``
    with ``G`` gates (4 for the LSTMs, 3 for the GRUs; per step ``h @ U`` and ``dz @ U^T``, plus the
    recurrent-kernel gradient); its element-wise work (gates, layer norms) is not counted. The
    reference is ``tf.matmul`` of ``[bptt x batch, units] x [units, G units]`` (the shape of the input
    projection): this CPU's rate for one large GEMM through the same oneDNN.

    Returns:
        ``[{"what", "gflop", "seconds": [...]}]`` for the op and the MatMul.
    """
    import tensorflow as tf

    from dist_rnn.models.kernels import compiled
    from dist_rnn.models.layer_norm import LN_EPSILON

    if compiled.library() is None:
        raise SystemExit(f"error: the compiled op is unavailable: {compiled.unavailable_reason()}")
    if cell not in compiled.COMPILED_CELLS:
        raise SystemExit(f"error: {cell!r} has no compiled op")
    rng = tf.random.Generator.from_seed(1)
    tensors, gates = _op_arguments(cell, units, batch, bptt, rng)
    extra = {"eps": LN_EPSILON} if cell.startswith("ln_") else {}
    op = getattr(compiled, cell)
    up = rng.normal([bptt, batch, units])
    rows, weights = rng.normal([bptt * batch, units]), rng.normal([units, gates * units])

    @tf.function
    def op_call():
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            h_seq = op(*tensors, None, units, **extra)[0]
            loss = tf.reduce_sum(h_seq * up)
        return tf.add_n([tf.reduce_sum(g) for g in tape.gradient(loss, tensors)])

    @tf.function
    def matmul_call():
        return tf.reduce_sum(tf.matmul(rows, weights))

    gemm = 2.0 * bptt * batch * units * gates * units
    variants = [{"what": f"compiled {cell} op, forward + backward (gemm: {compiled.gemm_backend(cell)})",
                 "gflop": 3 * gemm / 1e9, "call": op_call},
                {"what": f"one MatMul [{bptt * batch}, {units}] x [{units}, {gates * units}]", "gflop": gemm / 1e9,
                 "call": matmul_call}]
    for v in variants:
        float(v["call"]())  # warm-up (tracing)
        v["seconds"] = []
    for _ in range(repeats):
        for v in variants:
            start = time.perf_counter()
            float(v["call"]())
            v["seconds"].append(time.perf_counter() - start)
    return [{k: v for k, v in var.items() if k != "call"} for var in variants]


def rates_table(rates: list[dict]) -> str:
    """A markdown table of :func:`op_rates`: ms and GFLOP/s, median and best."""
    lines = ["| what | GFLOP | ms (median) | GFLOP/s (median) | GFLOP/s (best) |", "|---|---:|---:|---:|---:|"]
    for r in rates:
        med, best = statistics.median(r["seconds"]), min(r["seconds"])
        lines.append(f"| {r['what']} | {r['gflop']:.2f} | {1000 * med:.1f} | {r['gflop'] / med:.3g} | "
                     f"{r['gflop'] / best:.3g} |")
    return "\n".join(lines)


def parse_args(argv=None):
    """Parses the command line (``--cells`` becomes a list); unknown cells exit with code 2."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--cells", default="lstm,gru,ln_lstm,ln_gru", help="comma list of " + ", ".join(CELLS))
    p.add_argument("--units", type=int, default=256, help="units (input width is the same)")
    p.add_argument("--batch", type=int, default=32, help="rows")
    p.add_argument("--bptt", type=int, default=100, help="time steps")
    p.add_argument("--repeats", type=int, default=8, help="timed repeats per variant (median reported)")
    p.add_argument("--calls", type=int, default=3, help="calls per repeat")
    p.add_argument("--xla", action="store_true", help="compile each call with XLA")
    p.add_argument("--projection", type=int, default=None,
                   help="lstm layers become projected LSTMs with this projection size")
    p.add_argument("--compiled", action="store_true", help="also time the compiled op of each cell that has one")
    p.add_argument("--op-gflops", action="store_true",
                   help="also time each cell's bare compiled op and one big MatMul of its shape, in GFLOP/s")
    args = p.parse_args(argv)
    args.cells = [c for c in args.cells.split(",") if c]
    unknown = [c for c in args.cells if c not in CELLS]
    if unknown:
        p.error(f"unknown cell {unknown[0]!r}; choose from {', '.join(CELLS)}")
    if args.projection is not None and args.projection < 1:
        p.error(f"--projection must be positive, got {args.projection}")
    return args


def main(argv=None) -> int:
    """Times the requested cells and prints the markdown table."""
    args = parse_args(argv)
    results = run(args)
    projection = f", lstm projection {args.projection}" if args.projection else ""
    print(f"one layer, {args.units} units{projection}, batch {args.batch}, {args.bptt} steps, "
          f"{'XLA' if args.xla else 'no XLA'}, {args.repeats} repeats of {args.calls} calls")
    print(table(results))
    if args.op_gflops:
        from dist_rnn.models.kernels import compiled

        for cell in [c for c in args.cells if c in compiled.COMPILED_CELLS]:
            print()
            print(rates_table(op_rates(cell, args.units, args.batch, args.bptt, args.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
