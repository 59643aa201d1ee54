#!/usr/bin/env python
"""Training-step benchmark: dist-rnn against a minimal Keras loop, ``model.fit`` and PyTorch.

One command times, on the same model sizes and in the same run::

    dist-rnn loop            Trainer.train: tf.data windows, learning-rate assign,
                             state carrying, loss/grad-norm sync, metrics.jsonl and
                             TensorBoard logging, every log_every steps
    dist-rnn step            StepFunctions.train_step alone (fixed windows, state carried)
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

Usage::

    python tools/benchmark.py --out bench                  # the full comparison
    python tools/benchmark.py --quick --out /tmp/bench     # seconds: smoke configuration
    python tools/benchmark.py --cells lstm --hidden 512 --batch 64 --jit on --systems loop,step,torch
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dist_rnn.config import CELLS, TWO_STATE_CELLS

PROTOCOL = "@@BENCH "
SYSTEMS = ("loop", "step", "floor", "keras", "fit", "torch")
SYSTEM_LABELS = {
    "loop": "dist-rnn loop",
    "step": "dist-rnn step",
    "floor": "minimal loop (dist-rnn model)",
    "keras": "minimal loop (Keras layers)",
    "fit": "Keras model.fit",
    "torch": "PyTorch",
}
QUICK = dict(cells="lstm", hidden=16, layers=1, embedding=8, vocab=20, batch=4, bptt=8, steps=2, repeats=2,
             warmup=1, backend="none", jit="off")


# ======================================================================
# Worker side: one row, one process
# ======================================================================


def _emit(kind: str, **payload) -> None:
    sys.stdout.write(PROTOCOL + json.dumps({"kind": kind, **payload}) + "\n")
    sys.stdout.flush()


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _synthetic_text(spec: dict) -> str:
    """Random characters from ``vocab - 1`` symbols (the vocabulary adds ``<unk>``), long enough
    that the timed steps never cross an epoch boundary."""
    import numpy as np

    symbols = [chr(c) for c in range(33, 127)][: spec["vocab"] - 1]
    if len(symbols) < spec["vocab"] - 1:
        symbols += [chr(0x100 + i) for i in range(spec["vocab"] - 1 - len(symbols))]
    steps = (spec["warmup"] + spec["repeats"] + 3) * spec["steps"]
    n = spec["batch"] * (steps * spec["bptt"] + 2)
    ids = np.random.default_rng(0).integers(0, len(symbols), size=n)
    text = "".join(np.asarray(symbols)[ids])
    return "".join(symbols) + text  # every symbol occurs


def _windows(spec: dict, count: int = 4):
    """``count`` (inputs, targets) int32 numpy windows of ``[batch, bptt]``."""
    import numpy as np

    rng = np.random.default_rng(1)
    data = rng.integers(0, spec["vocab"], size=(spec["batch"], count * spec["bptt"] + 1)).astype(np.int32)
    t = spec["bptt"]
    return [(data[:, i * t:(i + 1) * t], data[:, i * t + 1:(i + 1) * t + 1]) for i in range(count)]


def _dist_rnn_config(spec: dict, data_path: Path, max_steps: int):
    from dist_rnn.config import config_from_dict

    gpu = spec.get("gpu", False)
    mirrored = spec["backend"] == "mirrored"
    return config_from_dict({
        "data": {"corpus": "file", "path": str(data_path), "split": [1.0, 0.0, 0.0], "level": "char"},
        "model": {"cell": spec["cell"], "num_layers": spec["layers"], "hidden_size": spec["hidden"],
                  "embedding_size": spec["embedding"], "dropout": 0.0},
        "optimizer": {"name": "adam", "learning_rate": 0.002, "clip_norm": spec["clip"]},
        "train": {"batch_size": spec["batch"], "num_steps": spec["bptt"], "max_steps": max_steps,
                  "max_epochs": None, "log_every": spec["steps"], "eval_every": 0, "sample_length": 0,
                  "precision": spec["precision"], "jit_compile": spec["jit"], "seed": 0},
        "checkpoint": {"every_steps": 0, "keep": 1},
        "distribute": {"backend": spec["backend"], "cpu_devices": spec["replicas"] if mirrored and not gpu else 0},
        "logging": {"progress": "off"},
    })


class _Quit(Exception):
    pass


class _Commands:
    """Reads the parent's commands from stdin; answers ``memory`` itself."""

    def __init__(self, memory_fn):
        self.memory_fn = memory_fn

    def next(self) -> str:
        while True:
            line = sys.stdin.readline()
            if not line or line.strip() == "quit":
                raise _Quit()
            command = line.strip()
            if command == "memory":
                _emit("memory", **self.memory_fn())
                continue
            return command


def _tf_memory(base_rss: float) -> dict:
    import tensorflow as tf

    out = {"peak_rss_mib": _peak_rss_mib(), "import_rss_mib": base_rss}
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        try:
            out["peak_device_mib"] = sum(tf.config.experimental.get_memory_info(f"GPU:{i}")["peak"]
                                         for i in range(len(gpus))) / 2**20
        except (ValueError, tf.errors.OpError):
            pass
    return out


def _tf_setup(spec: dict):
    """Imports TensorFlow and applies thread settings; returns the module."""
    import tensorflow as tf

    if spec.get("intra_threads"):
        tf.config.threading.set_intra_op_parallelism_threads(spec["intra_threads"])
    if spec.get("inter_threads"):
        tf.config.threading.set_inter_op_parallelism_threads(spec["inter_threads"])
    return tf


def _tf_profile(run, steps: int, workdir: Path) -> list[dict]:
    """TensorFlow profiler trace of ``steps`` steps, summed by op type (ms per step, ops per step)."""
    import glob

    import tensorflow as tf
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin

    logdir = workdir / "profile"
    tf.profiler.experimental.start(str(logdir))
    run(steps)
    tf.profiler.experimental.stop()
    path = sorted(glob.glob(str(logdir / "**" / "*.xplane.pb"), recursive=True))[-1]
    data, ok = _pywrap_profiler_plugin.xspace_to_tools_data([path], "framework_op_stats", {})
    if not ok:
        return []
    table = json.loads(data)[0]
    cols = [c["id"] for c in table["cols"]]
    totals, counts = {}, {}
    for r in table["rows"]:
        row = dict(zip(cols, [c.get("v") for c in r["c"]]))
        if row["type"] == "IDLE":
            continue
        totals[row["type"]] = totals.get(row["type"], 0.0) + row["total_self_time"]
        counts[row["type"]] = counts.get(row["type"], 0) + row["occurrences"]
    top = sorted(totals, key=lambda k: -totals[k])[:10]
    return [{"op": k, "ms_per_step": round(totals[k] / steps / 1000, 2), "ops_per_step": round(counts[k] / steps)}
            for k in top]


def _torch_profile(run, steps: int) -> list[dict]:
    """torch.profiler over ``steps`` steps, by op (self CPU ms per step, calls per step)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(steps)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
    return [{"op": e.key, "ms_per_step": round(e.self_cpu_time_total / steps / 1000, 2),
             "ops_per_step": round(e.count / steps)} for e in events]


def _build_trainer(spec: dict, workdir: Path, max_steps: int):
    import keras

    from dist_rnn.config import check_divisible
    from dist_rnn.data.encoding import encode_corpus
    from dist_rnn.distribution import create_backend
    from dist_rnn.run_dir import RunDirectory
    from dist_rnn.runtime import set_precision
    from dist_rnn.training.trainer import Trainer

    data_path = workdir / "synthetic.txt"
    data_path.write_text(_synthetic_text(spec), encoding="utf-8")
    config = _dist_rnn_config(spec, data_path, max_steps)
    _tf_setup(spec)
    backend = create_backend(config.distribute)  # creates logical CPU devices before TF initializes (mirrored)
    check_divisible(config, backend.num_replicas)
    keras.utils.set_random_seed(config.train.seed)
    set_precision(config.train.precision)
    corpus = encode_corpus(config.data)
    run_dir = RunDirectory(workdir / "run")
    run_dir.ensure()
    trainer = Trainer(config, run_dir, backend, corpus)
    trainer.restore()
    info = {"vocab": len(corpus.vocab), "replicas": backend.num_replicas, "devices": backend.devices,
            "parameters": trainer.parameter_count, "kernels": [k.line() for k in trainer.kernels]}
    return config, trainer, info


def work_loop(spec: dict, workdir: Path) -> None:
    """The real training loop, timed between log points (every ``steps`` steps).

    ``Trainer.train`` runs with ``log_every = steps``; a MetricsLogger subclass
    notes the time at the end of each log point (so each interval holds
    ``steps`` full loop iterations and one log point's writing) and, at each
    log point, waits for the parent's next command before the loop goes on.
    Nothing in the trainer is changed or hooked.
    """
    from dist_rnn.summaries import MetricsLogger

    base_rss = _peak_rss_mib()
    max_steps = (spec["warmup"] + spec["repeats"] + 2) * spec["steps"]
    config, trainer, info = _build_trainer(spec, workdir, max_steps)
    commands = _Commands(lambda: _tf_memory(base_rss))
    t_build = time.perf_counter()

    class TimedMetrics(MetricsLogger):
        started = None
        log_points = 0

        def train(self, step, values):
            super().train(step, values)
            now = time.perf_counter()
            self.log_points += 1
            if self.started is not None:
                _emit("result", seconds=now - self.started, steps=spec["steps"],
                      trainer_tokens_per_sec=values.get("tokens_per_sec"), loss=values.get("loss"))
            elif self.log_points < spec["warmup"]:
                return
            else:
                _emit("ready", warmup_s=now - t_build, info=info)
            commands.next()
            self.started = time.perf_counter()

    metrics = TimedMetrics(trainer.run_dir.path, True, tensorboard=config.logging.tensorboard, progress="off",
                           level="char")
    try:
        trainer.train(metrics)
    except _Quit:
        return
    finally:
        metrics.close()
    raise RuntimeError("the training loop ended before the parent was done timing")


def work_step(spec: dict, workdir: Path) -> None:
    """``StepFunctions.train_step`` of the same Trainer, driven directly on fixed windows."""
    base_rss = _peak_rss_mib()
    _, trainer, info = _build_trainer(spec, workdir, 10)
    import tensorflow as tf

    backend = trainer.backend
    windows = [backend.shard((tf.constant(x), tf.constant(y))) for x, y in _windows(spec)]
    states = backend.shard(trainer.model.initial_state(spec["batch"]))
    seed = tf.constant([0, 0], tf.int64)
    trainer.optimizer.learning_rate.assign(0.002)
    run = _window_timer(windows, states, lambda x, y, s: trainer.steps.train_step(x, y, s, seed)[:2])

    _serve(spec, run, lambda: _tf_memory(base_rss), info, lambda run, n: _tf_profile(run, n, workdir))


def _window_timer(windows: list, states, step):
    """A ``run(n)`` that times ``n`` calls of ``step(x, y, states) -> (loss, states)``.

    Cycles through ``windows``, carries the state from call to call (and from one
    ``run`` to the next) and waits for the last loss before stopping the clock.
    """
    state = {"states": states, "i": 0}

    def run(n: int) -> float:
        start = time.perf_counter()
        loss = None
        for _ in range(n):
            x, y = windows[state["i"] % len(windows)]
            state["i"] += 1
            loss, state["states"] = step(x, y, state["states"])
        float(loss)
        return time.perf_counter() - start

    return run


def _keras_layers(spec: dict, keras, return_state: bool = True):
    from dist_rnn.models.layers import RECURRENT_LAYERS

    layers = []
    for _ in range(spec["layers"]):
        kwargs = dict(return_sequences=True, return_state=return_state)
        if spec["cell"] == "lstm":
            layers.append(keras.layers.LSTM(spec["hidden"], **kwargs))
        elif spec["cell"] == "gru":
            layers.append(keras.layers.GRU(spec["hidden"], reset_after=True, **kwargs))
        else:  # no stock Keras layer: the dist-rnn layer
            layers.append(RECURRENT_LAYERS[spec["cell"]](spec["hidden"], **kwargs))
    return layers


def work_minimal(spec: dict, workdir: Path) -> None:
    """A minimal hand-written Keras 3 training loop with carried state.

    ``floor``: around the dist-rnn LanguageModel (identical math to the
    dist-rnn rows). ``keras``: around stock Keras layers.
    """
    base_rss = _peak_rss_mib()
    tf = _tf_setup(spec)
    import keras

    keras.mixed_precision.set_global_policy(spec["precision"])
    keras.utils.set_random_seed(0)
    n_states = 2 if spec["cell"] in TWO_STATE_CELLS else 1
    if spec["system"] == "floor":
        from dist_rnn.config import ModelConfig
        from dist_rnn.models.model import build_model, cudnn_excluded_by

        model = build_model(ModelConfig(cell=spec["cell"], num_layers=spec["layers"], hidden_size=spec["hidden"],
                                        embedding_size=spec["embedding"]), spec["vocab"], 0,
                            allow_cudnn=not cudnn_excluded_by(spec["jit"], spec["precision"]))

        def forward(x, states):
            return model(x, states, training=True)

        variables = model.trainable_variables
        kernel = "dist-rnn model"
    else:
        embedding = keras.layers.Embedding(spec["vocab"], spec["embedding"])
        rnns = _keras_layers(spec, keras)
        dense = keras.layers.Dense(spec["vocab"], dtype="float32")

        def forward(x, states):
            h = embedding(x)
            new_states = []
            for i, layer in enumerate(rnns):
                h, *s = layer(h, initial_state=list(states[i * n_states:(i + 1) * n_states]), training=True)
                new_states += s
            return dense(h), tuple(tf.cast(s, tf.float32) for s in new_states)

        forward(tf.zeros([spec["batch"], spec["bptt"]], tf.int32),
                tuple(tf.zeros([spec["batch"], spec["hidden"]]) for _ in range(n_states * spec["layers"])))
        variables = embedding.trainable_variables + [v for r in rnns for v in r.trainable_variables] + \
            dense.trainable_variables
        kernel = type(rnns[0]).__module__ + "." + type(rnns[0]).__name__
    optimizer = keras.optimizers.Adam(0.002)
    scaled = spec["precision"] == "mixed_float16"
    if scaled:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(variables)

    @tf.function
    def train_step(x, y, states):
        with tf.GradientTape() as tape:
            logits, new_states = forward(x, states)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
            objective = optimizer.scale_loss(loss) if scaled else loss
        grads = tape.gradient(objective, variables)
        if spec["clip"]:
            grads, _ = tf.clip_by_global_norm(grads, spec["clip"])
        optimizer.apply(grads, variables)
        return loss, new_states

    windows = [(tf.constant(x), tf.constant(y)) for x, y in _windows(spec)]
    zero = tuple(tf.zeros([spec["batch"], spec["hidden"]]) for _ in range(n_states * spec["layers"]))
    run = _window_timer(windows, zero, train_step)

    info = {"vocab": spec["vocab"], "layer": kernel, "parameters": int(sum(int(tf.size(v)) for v in variables))}
    _serve(spec, run, lambda: _tf_memory(base_rss), info)


def work_fit(spec: dict, workdir: Path) -> None:
    """Keras ``model.fit`` on stock layers (stateless: zero state every batch), default compile settings."""
    base_rss = _peak_rss_mib()
    tf = _tf_setup(spec)
    import keras

    keras.mixed_precision.set_global_policy(spec["precision"])
    keras.utils.set_random_seed(0)
    layers = [keras.Input((spec["bptt"],), batch_size=spec["batch"], dtype="int32"),
              keras.layers.Embedding(spec["vocab"], spec["embedding"])]
    layers += _keras_layers(spec, keras, return_state=False)
    layers.append(keras.layers.Dense(spec["vocab"], dtype="float32"))
    model = keras.Sequential(layers)
    optimizer = keras.optimizers.Adam(0.002, global_clipnorm=spec["clip"] or None)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    xs, ys = zip(*_windows(spec))
    dataset = tf.data.Dataset.from_tensor_slices((list(xs), list(ys))).repeat().prefetch(2)

    class Timer(keras.callbacks.Callback):
        def __init__(self, n):
            super().__init__()
            self.n, self.times = n, {}

        def on_train_batch_end(self, batch, logs=None):
            if batch in (0, self.n):
                self.times[batch] = time.perf_counter()

    def run(n: int) -> float:
        timer = Timer(n)
        model.fit(dataset, epochs=1, steps_per_epoch=n + 1, verbose=0, callbacks=[timer])
        return timer.times[n] - timer.times[0]

    info = {"vocab": spec["vocab"], "jit_compile": bool(getattr(model, "jit_compile", False)),
            "parameters": int(model.count_params())}
    _serve(spec, run, lambda: _tf_memory(base_rss), info)


def work_torch(spec: dict, workdir: Path) -> None:
    """PyTorch: the same architecture, Adam, global-norm clipping, state carried (detached)."""
    base_rss = _peak_rss_mib()
    import torch

    device = torch.device("cuda" if spec.get("gpu") and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(spec.get("torch_threads") or os.cpu_count())
    torch.manual_seed(0)
    rnn_cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[spec["cell"]]

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(spec["vocab"], spec["embedding"])
            self.rnn = rnn_cls(spec["embedding"], spec["hidden"], num_layers=spec["layers"], batch_first=True)
            self.projection = torch.nn.Linear(spec["hidden"], spec["vocab"])

        def forward(self, x, state):
            out, state = self.rnn(self.embedding(x), state)
            return self.projection(out), state

    model = Model().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.002)
    dtype = {"float32": None, "mixed_float16": torch.float16, "mixed_bfloat16": torch.bfloat16}[spec["precision"]]
    windows = [(torch.from_numpy(x).long().to(device), torch.from_numpy(y).long().to(device))
               for x, y in _windows(spec)]
    state = {"h": None, "i": 0}

    def detach(s):
        return tuple(t.detach() for t in s) if isinstance(s, tuple) else s.detach()

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits, new_state = model(x, state["h"])
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, spec["vocab"]), y.reshape(-1))
        loss.backward()
        if spec["clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec["clip"])
        optimizer.step()
        state["h"] = detach(new_state)
        return loss

    def run(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = None
        for _ in range(n):
            x, y = windows[state["i"] % len(windows)]
            state["i"] += 1
            loss = step(x, y)
        loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def memory():
        out = {"peak_rss_mib": _peak_rss_mib(), "import_rss_mib": base_rss}
        if device.type == "cuda":
            out["peak_device_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return out

    info = {"vocab": spec["vocab"], "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": str(device), "parameters": sum(p.numel() for p in model.parameters())}
    _serve(spec, run, memory, info, _torch_profile)


def _serve(spec: dict, run, memory, info: dict, profile=None) -> None:
    """Warms up (and profiles, if asked), says ready, then answers ``run`` commands with one timed repeat each."""
    start = time.perf_counter()
    for _ in range(spec["warmup"]):
        run(spec["steps"])
    if profile is not None and spec.get("profile"):
        info["profile"] = profile(run, 3)
    _emit("ready", warmup_s=time.perf_counter() - start, info=info)
    commands = _Commands(memory)
    try:
        while True:
            commands.next()
            _emit("result", seconds=run(spec["steps"]), steps=spec["steps"])
    except _Quit:
        return


WORKERS = {"loop": work_loop, "step": work_step, "floor": work_minimal, "keras": work_minimal,
           "fit": work_fit, "torch": work_torch}


def worker_main(spec: dict) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="dist-rnn-bench-"))
    try:
        WORKERS[spec["system"]](spec, workdir)
    except _Quit:
        pass
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ======================================================================
# Parent side: rows, interleaving, reports
# ======================================================================


class Worker:
    """A running row: a subprocess speaking the ``@@BENCH`` line protocol."""

    def __init__(self, spec: dict, timeout: float):
        self.spec = spec
        self.timeout = timeout
        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        if spec["system"] == "torch" and spec.get("omp_passive"):
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     bufsize=0, env=env)
        self.buffer = b""

    def read(self, kind: str) -> dict:
        """Waits for the next protocol message of ``kind`` (other output is ignored)."""
        deadline = time.time() + self.timeout
        while True:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                text = line.decode("utf-8", "replace")
                if text.startswith(PROTOCOL):
                    message = json.loads(text[len(PROTOCOL):])
                    if message["kind"] == kind:
                        return message
            if time.time() > deadline:
                raise RuntimeError(f"{label(self.spec)}: no '{kind}' within {self.timeout:.0f} s")
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16) if ready else None
            if chunk:
                self.buffer += chunk
            elif ready or self.proc.poll() is not None:
                self.proc.wait()
                raise RuntimeError(f"{label(self.spec)}: worker exited ({self.proc.returncode}):\n{self.error_tail()}")

    def send(self, command: str) -> None:
        self.proc.stdin.write((command + "\n").encode())
        self.proc.stdin.flush()

    def error_tail(self, chars: int = 3000) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode("utf-8", "replace")[-chars:]

    def close(self) -> None:
        try:
            self.send("quit")
            self.proc.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def label(spec: dict) -> str:
    name = SYSTEM_LABELS[spec["system"]]
    if spec["system"] == "torch":
        name = f"PyTorch nn.{spec['cell'].upper()}"
    if spec["system"] in ("loop", "step"):
        if spec["backend"] != "none":
            name += f" {spec['backend']} x{spec['replicas']}"
        if spec["jit"]:
            name += " XLA"
    return name


def _csv(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def build_rows(args, torch_ok: bool, gpu: bool) -> tuple[list[dict], list[str]]:
    """The rows to time (grouped by cell and precision later) and notes on skipped ones."""
    notes = []
    systems = _csv(args.systems)
    backends = _csv(args.backend)
    jits = {"off": [False], "on": [True], "both": [False, True]}[args.jit]
    rows = []
    for precision in _csv(args.precision):
        for cell in _csv(args.cells):
            base = dict(cell=cell, hidden=args.hidden, layers=args.layers, embedding=args.embedding or args.hidden,
                        vocab=args.vocab, batch=args.batch, bptt=args.bptt, precision=precision, backend="none",
                        replicas=1, jit=False, steps=args.steps, warmup=args.warmup, repeats=args.repeats,
                        clip=args.clip, gpu=gpu, intra_threads=args.intra_threads, inter_threads=args.inter_threads,
                        torch_threads=args.torch_threads, omp_passive=args.omp_passive, profile=args.profile)
            for system in systems:
                if system in ("loop", "step"):
                    for backend in backends:
                        for jit in (jits if backend == "none" else [False]):
                            if system == "step" and backend != "none":
                                continue
                            rows.append({**base, "system": system, "backend": backend, "jit": jit,
                                         "replicas": args.replicas if backend == "mirrored" else 1})
                elif system == "torch":
                    if not torch_ok:
                        continue
                    if cell not in ("lstm", "gru"):
                        notes.append(f"{cell}: PyTorch has no built-in {cell} layer; no PyTorch row.")
                        continue
                    rows.append({**base, "system": system})
                else:
                    rows.append({**base, "system": system})
    if "torch" in systems and not torch_ok:
        notes.append("PyTorch is not importable in this environment: the PyTorch rows were skipped "
                     "(pip install torch to add them).")
    return rows, notes


def group_rows(rows: list[dict], interleave: str) -> dict[str, list[dict]]:
    """Rows whose timed repeats are interleaved with each other, by group name.

    ``cell``: one group per cell and precision. ``all``: one group per
    precision, so that rows of different cells share the load of the machine.
    """
    groups: dict[str, list[dict]] = {}
    for spec in rows:
        name = spec["precision"] if interleave == "all" else f"{spec['cell']} {spec['precision']}"
        groups.setdefault(name, []).append(spec)
    return groups


def run_group(rows: list[dict], args, log, notes: list[str]) -> list[dict]:
    """Starts the rows' workers one by one, then interleaves their timed repeats."""
    workers, results = [], []
    try:
        for spec in rows:
            log(f"  starting {label(spec)} ...")
            worker = Worker(spec, args.timeout)
            try:
                ready = worker.read("ready")
            except RuntimeError as e:
                log(f"  {label(spec)} failed to start:\n{e}")
                notes.append(f"{spec['cell']} {spec['precision']}: {label(spec)} failed: {str(e).splitlines()[0]}")
                worker.close()
                continue
            workers.append(worker)
            results.append({"spec": spec, "info": ready.get("info", {}), "warmup_s": ready.get("warmup_s"),
                            "seconds": [], "load": [], "extra": []})
        for r in range(args.repeats):
            order = list(range(len(workers)))
            order = order[r % len(order):] + order[:r % len(order)]
            for i in order:
                load_before = os.getloadavg()[0]
                workers[i].send("run")
                message = workers[i].read("result")
                results[i]["seconds"].append(message["seconds"])
                results[i]["load"].append(round(load_before, 2))
                results[i]["extra"].append({k: v for k, v in message.items()
                                            if k not in ("kind", "seconds", "steps")})
            log(f"  round {r + 1}/{args.repeats}: " + ", ".join(
                f"{label(res['spec'])} {res['seconds'][-1] / res['spec']['steps'] * 1000:.0f} ms" for res in results))
        for worker, result in zip(workers, results):
            worker.send("memory")
            result["memory"] = worker.read("memory")
    finally:
        for worker in workers:
            worker.close()
    return [summarize(res) for res in results]


def summarize(res: dict) -> dict:
    spec = res["spec"]
    step_times = [s / spec["steps"] for s in res["seconds"]]
    tokens = spec["batch"] * spec["bptt"]
    median = statistics.median(step_times)
    memory = {k: round(v, 1) for k, v in res.get("memory", {}).items() if k != "kind"}
    row = {"label": label(spec), **{k: spec[k] for k in ("system", "cell", "hidden", "layers", "embedding", "batch",
                                                        "bptt", "precision", "backend", "replicas", "jit", "steps")},
           "vocab": res["info"].get("vocab", spec["vocab"]),
           "repeats": len(step_times), "step_times_s": [round(t, 7) for t in step_times],
           "median_step_s": round(median, 7), "tokens_per_s": round(tokens / median, 1),
           "best_tokens_per_s": round(tokens / min(step_times), 1),
           "worst_tokens_per_s": round(tokens / max(step_times), 1),
           "load_avg_1min": res["load"], "warmup_s": round(res["warmup_s"] or 0.0, 2), "info": res["info"], **memory}
    trainer_rates = [e.get("trainer_tokens_per_sec") for e in res["extra"] if e.get("trainer_tokens_per_sec")]
    if trainer_rates:
        row["trainer_reported_tokens_per_s"] = round(statistics.median(trainer_rates), 1)
    return row


def machine_description() -> dict:
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": cpu or platform.processor(), "memory_gib": memory,
            "python": platform.python_version(), "platform": platform.platform(),
            "tensorflow": version("tensorflow"), "keras": version("keras"), "torch": version("torch"),
            "numpy": version("numpy")}


def _gpu_visible() -> bool:
    """Whether TensorFlow sees a GPU (asked in a subprocess: this process stays TF-free)."""
    code = "import tensorflow as tf; print(len(tf.config.list_physical_devices('GPU')))"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        return int(out.stdout.strip().splitlines()[-1]) > 0
    except (ValueError, IndexError, subprocess.TimeoutExpired):
        return False


# ---------------------------------------------------------------- reports


def _find(rows, **match):
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def ratios_and_targets(rows: list[dict]) -> tuple[list[str], list[dict]]:
    """Lines of 'dist-rnn ÷ comparator' ratios and the issue's targets with their status."""
    lines, targets = [], []
    keys = sorted({(r["cell"], r["precision"]) for r in rows}, key=lambda k: (CELLS.index(k[0]) if k[0] in CELLS else 9, k[1]))
    for cell, precision in keys:
        loop = _find(rows, system="loop", cell=cell, precision=precision, backend="none", jit=False)
        if loop is None:
            continue
        for row in rows:
            if row is loop or row["cell"] != cell or row["precision"] != precision:
                continue
            lines.append(f"{cell} {precision}: dist-rnn loop / {row['label']} = "
                         f"{loop['tokens_per_s'] / row['tokens_per_s']:.2f}")
        floor = _find(rows, system="floor", cell=cell, precision=precision)
        if floor:
            ratio = loop["tokens_per_s"] / floor["tokens_per_s"]
            targets.append({"target": f"{cell}: dist-rnn loop >= 0.97 x minimal loop (same model)",
                            "ratio": ratio, "goal": 0.97, "met": ratio >= 0.97})
        keras_row = _find(rows, system="keras", cell=cell, precision=precision)
        if keras_row:
            ratio = loop["tokens_per_s"] / keras_row["tokens_per_s"]
            targets.append({"target": f"{cell}: dist-rnn loop >= 0.97 x minimal loop (Keras layers)",
                            "ratio": ratio, "goal": 0.97, "met": ratio >= 0.97})
        torch_row = _find(rows, system="torch", cell=cell, precision=precision)
        if torch_row:
            ratio = loop["tokens_per_s"] / torch_row["tokens_per_s"]
            targets.append({"target": f"{cell}: dist-rnn loop >= 1.0 x PyTorch nn.{cell.upper()}",
                            "ratio": ratio, "goal": 1.0, "met": ratio >= 1.0})
            xla = _find(rows, system="loop", cell=cell, precision=precision, backend="none", jit=True)
            if xla:
                ratio = xla["tokens_per_s"] / torch_row["tokens_per_s"]
                targets.append({"target": f"{cell}: dist-rnn loop XLA >= 1.0 x PyTorch nn.{cell.upper()}",
                                "ratio": ratio, "goal": 1.0, "met": ratio >= 1.0})
        mirrored = _find(rows, system="loop", cell=cell, precision=precision, backend="mirrored")
        if mirrored:
            ratio = mirrored["tokens_per_s"] / loop["tokens_per_s"]
            targets.append({"target": f"{cell}: mirrored x{mirrored['replicas']} / one device, same global batch "
                                      f"(overhead {100 * (1 - ratio):.0f}%)", "ratio": ratio, "goal": None,
                            "met": None})
    for precision in sorted({r["precision"] for r in rows}):
        for ln, plain in (("ln_lstm", "lstm"), ("ln_gru", "gru")):
            a = _find(rows, system="loop", cell=ln, precision=precision, backend="none", jit=False)
            b = _find(rows, system="loop", cell=plain, precision=precision, backend="none", jit=False)
            if a and b:
                ratio = a["tokens_per_s"] / b["tokens_per_s"]
                goal = 0.9 if ln == "ln_lstm" else None
                targets.append({"target": f"{ln} >= 0.9 x {plain} (dist-rnn loop)" if goal else
                                f"{ln} / {plain} (dist-rnn loop)", "ratio": ratio, "goal": goal,
                                "met": None if goal is None else ratio >= goal})
    return lines, targets


def markdown(rows: list[dict], notes: list[str], machine: dict, command: str, args) -> str:
    lines, targets = ratios_and_targets(rows)
    gpu = any("GPU" in " ".join(map(str, r["info"].get("devices", []))) for r in rows)
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
    out += [""]
    out.append("| cell | precision | row | tokens/s (median) | [best, worst] | step ms | peak RSS MiB |"
               + (" peak GPU MiB |" if gpu else ""))
    out.append("|---|---|---|---:|---|---:|---:|" + ("---:|" if gpu else ""))
    for r in rows:
        line = (f"| {r['cell']} | {r['precision']} | {r['label']} | {r['tokens_per_s']:,.0f} | "
                f"[{r['best_tokens_per_s']:,.0f}, {r['worst_tokens_per_s']:,.0f}] | {1000 * r['median_step_s']:.1f} | "
                f"{r.get('peak_rss_mib', float('nan')):,.0f} |")
        if gpu:
            line += f" {r.get('peak_device_mib', float('nan')):,.0f} |"
        out.append(line)
    if lines:
        out += ["", "Ratios (dist-rnn loop tokens/s ÷ row tokens/s):", ""] + [f"- {line}" for line in lines]
    if targets:
        out += ["", "| target | measured | status |", "|---|---:|---|"]
        for t in targets:
            status = "reported" if t["met"] is None else ("met" if t["met"] else f"not met (gap {100 * (t['goal'] - t['ratio']) / t['goal']:.0f}%)")
            out.append(f"| {t['target']} | {t['ratio']:.2f} | {status} |")
    profiled = [r for r in rows if r["info"].get("profile")]
    for r in profiled:
        out += ["", f"Profile of {r['cell']} {r['precision']} {r['label']} (3 steps, self time by op, "
                    "per step; parallel ops overlap, so the sum can exceed the step time):", "",
                "| op | ms/step | ops/step |", "|---|---:|---:|"]
        out += [f"| {p['op']} | {p['ms_per_step']:.1f} | {p['ops_per_step']} |" for p in r["info"]["profile"]]
    if notes:
        out += ["", "Notes:", ""] + [f"- {n}" for n in dict.fromkeys(notes)]
    return "\n".join(out) + "\n"


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["cell"], r["precision"]) for r in rows))
    labels = list(dict.fromkeys(r["label"].replace(f"nn.{r['cell'].upper()}", "nn.<cell>") for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * max(1, len(labels)) / 3), 4.8))
    width = 0.8 / max(1, len(labels))
    cmap = plt.get_cmap("tab10")
    for j, name in enumerate(labels):
        xs, ys, lo, hi = [], [], [], []
        for i, (cell, precision) in enumerate(groups):
            for r in rows:
                if (r["cell"], r["precision"]) == (cell, precision) and \
                        r["label"].replace(f"nn.{r['cell'].upper()}", "nn.<cell>") == name:
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


# ---------------------------------------------------------------- main


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
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma list of " + ", ".join(SYSTEMS))
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
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])
                 if a.startswith("--")}
        for key, value in QUICK.items():
            if key not in given:
                setattr(args, key, value)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python tools/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def log(message):
        print(message, flush=True)

    for cell in _csv(args.cells):
        if cell not in CELLS:
            raise SystemExit(f"unknown cell {cell!r}; choose from {', '.join(CELLS)}")
    for system in _csv(args.systems):
        if system not in SYSTEMS:
            raise SystemExit(f"unknown system {system!r}; choose from {', '.join(SYSTEMS)}")
    torch_ok = importlib.util.find_spec("torch") is not None
    if "torch" in _csv(args.systems) and not torch_ok:
        log("PyTorch is not importable: the PyTorch rows are skipped.")
    gpu = _gpu_visible()
    if "mirrored" in _csv(args.backend) and not gpu and args.batch % args.replicas:
        raise SystemExit(f"--batch {args.batch} does not divide by --replicas {args.replicas}")
    machine = machine_description()
    machine["gpu_visible"] = gpu
    log(f"machine: {machine['cpus']} CPUs {machine['cpu_model']}, {machine['memory_gib']} GiB, "
        f"{'GPU' if gpu else 'no GPU'}; TF {machine['tensorflow']}, Keras {machine['keras']}, torch {machine['torch']}")
    rows, notes = build_rows(args, torch_ok, gpu)
    results = []
    jsonl = out / "results.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for name, specs in group_rows(rows, args.interleave).items():
            log(f"{name}: {len(specs)} rows")
            for row in run_group(specs, args, log, notes):
                row["machine"] = machine
                row["command"] = command
                results.append(row)
                f.write(json.dumps(row) + "\n")
                f.flush()
    text = markdown(results, notes, machine, command, args)
    (out / "results.md").write_text(text, encoding="utf-8")
    chart(results, out / "results.png")
    print()
    print(text)
    log(f"wrote {jsonl}, {out / 'results.md'}, {out / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
