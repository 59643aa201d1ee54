"""The compiled recurrence ops (dist_rnn.models.kernels.compiled) against the graph kernels.

The library is built at most once per test session, into pytest's cache
folder (``.pytest_cache/d/dist_rnn_kernels``; the library's name there is keyed
by the sources, so a changed op is rebuilt): about 1.8 minutes of CPU time for
lstm_ops.cc, 1.3 for gru_ops.cc, 1.4 for ln_lstm_ops.cc, 1.7 for ln_gru_ops.cc and 1.3 for lstmp_ops.cc, compiled side by side
(docs/benchmarks.md, #22).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from dist_rnn.config import ModelConfig
from dist_rnn.models.kernels import compiled, layer_norm, plain, projected
from dist_rnn.models.keras_rnn import GRU, LSTM
from dist_rnn.models.layer_norm import LN_EPSILON, LayerNormGRU, LayerNormLSTM
from dist_rnn.models.model import kernel_report
from dist_rnn.models.projected_lstm import ProjectedLSTM

# (steps, batch, units): odd batches, units not a multiple of 8, a length-1 sequence.
SIZES = [(1, 3, 5), (6, 5, 13), (4, 1, 9), (3, 7, 17)]


@pytest.fixture
def compiled_on(compiled_cache, monkeypatch):
    """The compiled ops switched on, from the session cache (no rebuild)."""
    monkeypatch.setenv(compiled.CACHE_ENV, str(compiled_cache))
    monkeypatch.setenv(compiled.SWITCH_ENV, "on")
    monkeypatch.delenv(compiled.COMPILER_ENV, raising=False)
    compiled.reset()
    yield
    compiled.reset()


def _relative_close(actual, expected, name, rtol=1e-5):
    """Max |actual - expected| within rtol of max |expected| (elementwise rtol fails near zero)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, name
    scale = max(float(np.max(np.abs(expected))), 1e-30) if expected.size else 1.0
    err = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol} x {scale:.3g}"


def _lstm_inputs(steps, batch, units, seed, dropout):
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: tf.constant(rng.normal(size=shape).astype(np.float32))  # noqa: E731
    proj, h0, c0 = f32(steps, batch, 4 * units), f32(batch, units), f32(batch, units)
    rkernel = tf.constant((rng.normal(size=(units, 4 * units)) / np.sqrt(units)).astype(np.float32))
    mask = None
    if dropout:
        keep = rng.uniform(size=(batch, units)) >= 0.3
        mask = tf.constant(np.where(keep, 1 / 0.7, 0.0).astype(np.float32))
    upstream = [f32(steps, batch, units), f32(batch, units), f32(batch, units)]
    return [proj, h0, c0, rkernel], mask, upstream


def _gru_inputs(steps, batch, units, seed, dropout):
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: tf.constant(rng.normal(size=shape).astype(np.float32))  # noqa: E731
    proj, h0, rbias = f32(steps, batch, 3 * units), f32(batch, units), f32(3 * units)
    rkernel = tf.constant((rng.normal(size=(units, 3 * units)) / np.sqrt(units)).astype(np.float32))
    mask = None
    if dropout:
        keep = rng.uniform(size=(batch, units)) >= 0.3
        mask = tf.constant(np.where(keep, 1 / 0.7, 0.0).astype(np.float32))
    upstream = [f32(steps, batch, units), f32(batch, units)]
    return [proj, h0, rkernel, rbias], mask, upstream


def _ln_lstm_inputs(steps, batch, units, seed, dropout):
    # Gains/shifts away from 1/0, so that a gradient that ignores them is seen.
    (proj, h0, c0, rkernel), mask, upstream = _lstm_inputs(steps, batch, units, seed, dropout)
    rng = np.random.default_rng(seed + 1000)
    vec = lambda n, center: tf.constant((center + 0.5 * rng.normal(size=n)).astype(np.float32))  # noqa: E731
    gain, bias, cell_gamma, cell_beta = vec(4 * units, 1.0), vec(4 * units, 0.0), vec(units, 1.0), vec(units, 0.0)
    return [proj, h0, c0, rkernel, gain, bias, cell_gamma, cell_beta], mask, upstream


def _ln_gru_inputs(steps, batch, units, seed, dropout):
    # The GRU inputs without rbias (no biases: the layer-norm shifts play their role), gains/shifts
    # away from 1/0.
    (proj, h0, rkernel, _), mask, upstream = _gru_inputs(steps, batch, units, seed, dropout)
    rng = np.random.default_rng(seed + 1000)
    vec = lambda n, center: tf.constant((center + 0.5 * rng.normal(size=n)).astype(np.float32))  # noqa: E731
    gate_gamma, gate_beta = vec(2 * units, 1.0), vec(2 * units, 0.0)
    cand_gamma, cand_beta = vec(units, 1.0), vec(units, 0.0)
    return [proj, h0, rkernel, gate_gamma, gate_beta, cand_gamma, cand_beta], mask, upstream


def _projection_size(units):
    # P > U for small units, P < U otherwise; never equal to U, never a multiple of 8 at the SIZES.
    return units + 2 if units < 8 else (2 * units) // 3 + 1


def _lstmp_inputs(steps, batch, units, seed, dropout):
    rng = np.random.default_rng(seed)
    size = _projection_size(units)
    f32 = lambda *shape: tf.constant(rng.normal(size=shape).astype(np.float32))  # noqa: E731
    proj, h0, c0 = f32(steps, batch, 4 * units), f32(batch, size), f32(batch, units)
    rkernel = tf.constant((rng.normal(size=(size, 4 * units)) / np.sqrt(size)).astype(np.float32))
    pkernel = tf.constant((rng.normal(size=(units, size)) / np.sqrt(units)).astype(np.float32))
    mask = None
    if dropout:
        keep = rng.uniform(size=(batch, size)) >= 0.3
        mask = tf.constant(np.where(keep, 1 / 0.7, 0.0).astype(np.float32))
    upstream = [f32(steps, batch, size), f32(batch, size), f32(batch, units)]
    return [proj, h0, c0, rkernel, pkernel], mask, upstream


def _with_projection_size(recurrence):
    """``recurrence`` (an lstmp) called as the other cells' are, ``projection_size`` read off ``pkernel``."""
    def call(proj, h0, c0, rkernel, pkernel, mask, units):
        return recurrence(proj, h0, c0, rkernel, pkernel, mask, units, pkernel.shape[-1])
    return call


# cell -> (graph kernel, compiled op, inputs, output names, gradient names)
CELLS = {
    "lstm": (plain.lstm, compiled.lstm, _lstm_inputs, ["h_seq", "h_T", "c_T"], ["d_proj", "d_h0", "d_c0", "d_rkernel"]),
    "gru": (plain.gru, compiled.gru, _gru_inputs, ["h_seq", "h_T"], ["d_proj", "d_h0", "d_rkernel", "d_rbias"]),
    "ln_lstm": (functools.partial(layer_norm.ln_lstm, eps=LN_EPSILON),
                functools.partial(compiled.ln_lstm, eps=LN_EPSILON), _ln_lstm_inputs, ["h_seq", "h_T", "c_T"],
                ["d_proj", "d_h0", "d_c0", "d_rkernel", "d_gain", "d_bias", "d_cell_gamma", "d_cell_beta"]),
    "ln_gru": (functools.partial(layer_norm.ln_gru, eps=LN_EPSILON),
               functools.partial(compiled.ln_gru, eps=LN_EPSILON), _ln_gru_inputs, ["h_seq", "h_T"],
               ["d_proj", "d_h0", "d_rkernel", "d_gate_gamma", "d_gate_beta", "d_cand_gamma", "d_cand_beta"]),
    "lstmp": (_with_projection_size(projected.lstmp), _with_projection_size(compiled.lstmp), _lstmp_inputs,
              ["h_seq", "h_T", "c_T"], ["d_proj", "d_h0", "d_c0", "d_rkernel", "d_pkernel"]),
}


def _run(recurrence, tensors, mask, upstream, units):
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        outputs = recurrence(*tensors, mask, units=units)
        loss = sum(tf.reduce_sum(o * u) for o, u in zip(outputs, upstream))
    return [o.numpy() for o in outputs], [g.numpy() for g in tape.gradient(loss, tensors)]


@pytest.mark.parametrize("dropout", [False, True], ids=["no_mask", "dropout_mask"])
@pytest.mark.parametrize("size", SIZES + [(3, 40, 300)], ids=lambda s: "T{}_B{}_U{}".format(*s))
# The LSTM op multiplies with oneDNN's sgemm where TensorFlow exports it ("auto"; the 40 x 300 size is
# large enough for its multi-threaded path) or with Eigen's product ("eigen", the fallback); the GRU
# op has the Eigen product only; the ln_lstm, ln_gru and lstmp (projected LSTM) ops multiply like the LSTM op.
@pytest.mark.parametrize("cell,gemm", [("lstm", "auto"), ("lstm", "eigen"), ("gru", "auto"), ("ln_lstm", "auto"),
                                       ("ln_lstm", "eigen"), ("ln_gru", "auto"), ("ln_gru", "eigen"),
                                       ("lstmp", "auto"), ("lstmp", "eigen")])
def test_forward_and_gradients_equal_graph_kernel(compiled_on, monkeypatch, cell, gemm, size, dropout):
    graph_op, compiled_op, make_inputs, output_names, grad_names = CELLS[cell]
    monkeypatch.setenv(compiled.GEMM_ENV, gemm)
    steps, batch, units = size
    tensors, mask, upstream = make_inputs(steps, batch, units, seed=sum(size) + dropout, dropout=dropout)
    want_out, want_grads = _run(graph_op, tensors, mask, upstream, units)
    got_out, got_grads = _run(compiled_op, tensors, mask, upstream, units)
    for name, got, want in zip(output_names, got_out, want_out):
        _relative_close(got, want, name)
    for name, got, want in zip(grad_names, got_grads, want_grads):
        _relative_close(got, want, name)
    # The mask matters: without it the compiled result differs (the test can see a dropped mask).
    if dropout:
        unmasked, unmasked_grads = _run(compiled_op, tensors, None, upstream, units)
        assert np.max(np.abs(unmasked[0] - got_out[0])) > 1e-3
        assert np.max(np.abs(unmasked_grads[0] - got_grads[0])) > 1e-3


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN's sgemm entry point is x86 only")
def test_float32_ops_multiply_with_onednn_on_x86_unless_eigen_is_asked(compiled_on, monkeypatch):
    # The speed of the op rests on oneDNN's GEMM (docs/benchmarks.md, #22): a TensorFlow that stops
    # exporting the entry point must show up here, not only as a slower benchmark.
    assert compiled.gemm_backend() == "onednn" and compiled.gemm_backend("ln_lstm") == "onednn"
    assert compiled.gemm_backend("gru") == "eigen"
    tensors, mask, upstream = _lstm_inputs(4, 6, 10, seed=5, dropout=True)
    onednn_out, onednn_grads = _run(compiled.lstm, tensors, mask, upstream, 10)
    monkeypatch.setenv(compiled.GEMM_ENV, "eigen")
    eigen_out, eigen_grads = _run(compiled.lstm, tensors, mask, upstream, 10)
    for got, want in zip(onednn_out + onednn_grads, eigen_out + eigen_grads):
        _relative_close(got, want, "oneDNN against Eigen")


@pytest.mark.parametrize("cell", CELLS)
def test_compiled_op_inside_tf_function_and_float64(compiled_on, cell):
    graph_op, compiled_op, make_inputs, _, _ = CELLS[cell]
    tensors, mask, upstream = make_inputs(5, 3, 7, seed=1, dropout=True)
    as64 = [tf.cast(t, tf.float64) for t in tensors]
    mask64 = tf.cast(mask, tf.float64)
    up64 = [tf.cast(u, tf.float64) for u in upstream]
    want_out, want_grads = _run(graph_op, as64, mask64, up64, 7)
    got_out, got_grads = tf.function(lambda: _run_tensors(compiled_op, as64, mask64, up64, 7))()
    assert got_out[0].dtype == tf.float64
    for got, want in zip(list(got_out) + list(got_grads), want_out + want_grads):
        _relative_close(got.numpy(), want, "float64", rtol=1e-12)


def _run_tensors(recurrence, tensors, mask, upstream, units):
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        outputs = recurrence(*tensors, mask, units=units)
        loss = sum(tf.reduce_sum(o * u) for o, u in zip(outputs, upstream))
    return outputs, tape.gradient(loss, tensors)


def _layer_step(layer, x, seed):
    """Outputs and weight gradients of ``layer`` on ``x`` with recurrent dropout active."""
    with tf.GradientTape() as tape:
        out, *states = layer(x, training=True, seed=seed)
        # LSTM: h * c; GRU: h * h; projected LSTM: h * (c's first projection_size units).
        h, c = states[0], states[-1][:, :states[0].shape[-1]]
        loss = tf.reduce_sum(out * tf.range(1.0, 1.0 + out.shape[-1])) + tf.reduce_sum(h * c)
    return [out.numpy()] + [s.numpy() for s in states] + [
        g.numpy() for g in tape.gradient(loss, layer.trainable_variables)]


PROJECTION_SIZE = 7  # of the projected LSTM layers below (units 9 or 11)
LAYERS = {"lstm": LSTM, "gru": GRU, "ln_lstm": LayerNormLSTM, "ln_gru": LayerNormGRU,
          "lstmp": functools.partial(ProjectedLSTM, projection_size=PROJECTION_SIZE)}
# Why each cell's layer runs no cuDNN kernel here (the reason the kernel report gives).
NO_CUDNN = {"lstm": "no GPU visible", "gru": "no GPU visible", "ln_lstm": LayerNormLSTM.fused_kernel_reason,
            "ln_gru": LayerNormGRU.fused_kernel_reason, "lstmp": ProjectedLSTM.fused_kernel_reason}


def _model_config(cell, **kwargs):
    """The ``model`` section whose layers run ``cell``'s recurrence (``lstmp``: an lstm with a projection)."""
    if cell == "lstmp":
        return ModelConfig(cell="lstm", projection_size=PROJECTION_SIZE, **kwargs)
    return ModelConfig(cell=cell, **kwargs)


def _report_cell(cell):
    """How the kernel report names ``cell``'s layers (``model.cell``)."""
    return "lstm" if cell == "lstmp" else cell


@pytest.mark.parametrize("cell", CELLS)
def test_layer_runs_compiled_op_with_same_results_and_kernel_report_says_so(compiled_on, monkeypatch, cell):
    layer = LAYERS[cell](11, recurrent_dropout=0.25, return_sequences=True, return_state=True)
    x = tf.random.stateless_normal([5, 4, 6], seed=[3, 4])
    seed = tf.constant([7, 8], tf.int64)
    layer(x)  # build
    calls = []
    real_op = getattr(compiled, cell)
    monkeypatch.setattr(compiled, cell, lambda *a, **k: calls.append(1) or real_op(*a, **k))
    got = _layer_step(layer, x, seed)
    assert calls, "the layer did not run the compiled op"
    monkeypatch.setenv(compiled.SWITCH_ENV, "off")
    want = _layer_step(layer, x, seed)
    assert len(calls) == 1
    for i, (g, w) in enumerate(zip(got, want)):
        _relative_close(g, w, f"layer result {i}")
    monkeypatch.setenv(compiled.SWITCH_ENV, "on")
    lines = [k.line() for k in kernel_report(_model_config(cell, num_layers=2, hidden_size=11), False)]
    assert lines == [f"layer {i}  {_report_cell(cell)}  11 units  kernel: dist-rnn compiled recurrence "
                     f"({NO_CUDNN[cell]})" for i in range(2)]
    rnn_report = kernel_report(ModelConfig(cell="rnn", num_layers=1, hidden_size=11), False)[0]
    assert not rnn_report.compiled and "kernel: dist-rnn fused recurrence (" in rnn_report.line()  # no rnn op



@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("broken", ["missing", "failing"])
def test_compiler_missing_or_failing_falls_back_to_graph_with_one_warning_and_a_report_line(
        broken, cell, tmp_path, monkeypatch):
    # "failing": a compiler that exits 1 (/bin/false): both flag sets fail, no library is left behind.
    cxx = str(tmp_path / "no-such-g++") if broken == "missing" else "/bin/false"
    reason = f"no C++ compiler ({cxx} not found)" if broken == "missing" else "build failed: /bin/false failed: "
    monkeypatch.setenv(compiled.SWITCH_ENV, "on")
    monkeypatch.setenv(compiled.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(compiled.COMPILER_ENV, cxx)
    compiled.reset()
    try:
        layer = LAYERS[cell](9, recurrent_dropout=0.25, return_sequences=True, return_state=True)
        x = tf.random.stateless_normal([3, 4, 5], seed=[1, 2])
        seed = tf.constant([5, 6], tf.int64)
        with pytest.warns(RuntimeWarning, match="compiled recurrence unavailable"):
            got = _layer_step(layer, x, seed)
        assert compiled.unavailable_reason() == reason
        report = kernel_report(_model_config(cell, num_layers=1, hidden_size=9), False)[0]
        assert not report.compiled
        assert report.line() == (f"layer 0  {_report_cell(cell)}  9 units  kernel: dist-rnn fused recurrence "
                                 f"({NO_CUDNN[cell]}; compiled op unavailable: {reason})")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once: no second warning
            assert not compiled.uses_compiled(cell)
        monkeypatch.setenv(compiled.SWITCH_ENV, "off")
        want = _layer_step(layer, x, seed)
        for i, (g, w) in enumerate(zip(got, want)):
            np.testing.assert_array_equal(g, w, err_msg=f"result {i}")  # the very same graph path
        leftovers = list((tmp_path / "cache").rglob("*")) if (tmp_path / "cache").exists() else []
        assert not [p for p in leftovers if p.is_file() and p.name != ".build.lock"]
    finally:
        compiled.reset()


@pytest.mark.parametrize("cell", CELLS)
def test_compiled_op_under_bfloat16_computes_in_float32(compiled_on, cell):
    # mixed_bfloat16: bfloat16 in and out (gradients too), float32 math inside; so its result is the
    # float32 result of the bfloat16-rounded inputs, rounded once to bfloat16.
    graph_op, compiled_op, make_inputs, _, _ = CELLS[cell]
    tensors, mask, upstream = make_inputs(4, 3, 6, seed=2, dropout=True)
    bf16 = [tf.cast(t, tf.bfloat16) for t in tensors]
    mask16 = tf.cast(mask, tf.bfloat16)
    outputs, grads = _run_tensors(compiled_op, bf16, mask16, [tf.cast(u, tf.bfloat16) for u in upstream], 6)
    assert all(o.dtype == tf.bfloat16 for o in outputs) and all(g.dtype == tf.bfloat16 for g in grads)
    rounded = [tf.cast(t, tf.float32) for t in bf16]
    want_out, _ = _run(graph_op, rounded, tf.cast(mask16, tf.float32), upstream, 6)
    for got, want in zip(outputs, want_out):
        # One rounding to bfloat16 (8 significant bits): at most 2^-9 relative; bfloat16 math would be far off.
        np.testing.assert_allclose(tf.cast(got, tf.float32).numpy(), want, rtol=2.0**-8, atol=1e-6)


@pytest.mark.parametrize("cell,gates", [("lstm", 4), ("gru", 3), ("ln_lstm", 4), ("ln_gru", 3)])
def test_layer_benchmark_op_gflops_counts_the_ops_gemms_and_times_both_variants(compiled_on, cell, gates):
    spec = importlib.util.spec_from_file_location("dist_rnn_layer_benchmark",
                                                  Path(__file__).parents[1] / "tools" / "layer_benchmark.py")
    layer_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layer_bench)
    rates = layer_bench.op_rates(cell, units=8, batch=2, bptt=3, repeats=2)
    gemm = 2 * 3 * 2 * 8 * (gates * 8)  # 2 x bptt x batch x units x (gates x units)
    assert [r["gflop"] for r in rates] == [3 * gemm / 1e9, gemm / 1e9]
    backend = "eigen" if cell == "gru" else "onednn"  # the GRU op has Eigen's product only
    assert rates[0]["what"] == f"compiled {cell} op, forward + backward (gemm: {backend})"
    assert rates[1]["what"].startswith(f"one MatMul [6, 8] x [8, {gates * 8}]")
    assert all(len(r["seconds"]) == 2 and all(0 < s < 30 for s in r["seconds"]) for r in rates)
    row = layer_bench.rates_table(rates).splitlines()[2].split("|")
    assert float(row[4]) == pytest.approx(rates[0]["gflop"] / np.median(rates[0]["seconds"]), rel=0.01)


@pytest.mark.parametrize("cell", CELLS)
def test_xla_traces_keep_the_graph_recurrence_and_the_report_says_why(compiled_on, cell):
    # train.jit_compile with the switch on: XLA has no kernel for the op, so a layer traced for XLA must
    # run the graph recurrence (before, tracing raised "No registered 'DistRnn...' OpKernel for XLA_CPU_JIT").
    layer = LAYERS[cell](7, return_sequences=True, return_state=True)
    x = tf.random.stateless_normal([3, 4, 5], seed=[1, 2])
    layer(x)  # build
    got = tf.function(lambda v: layer(v), jit_compile=True)(x)
    want = layer(x)  # eager: the compiled op
    for i, (g, w) in enumerate(zip(got, want)):
        _relative_close(g.numpy(), w.numpy(), f"XLA result {i}")
    assert compiled.uses_compiled(cell)
    line = kernel_report(_model_config(cell, num_layers=1, hidden_size=7), False, jit_compile=True)[0].line()
    no_cudnn = "train.jit_compile: XLA cannot compile cuDNN" if cell in ("lstm", "gru") else NO_CUDNN[cell]
    assert line == (f"layer 0  {_report_cell(cell)}  7 units  kernel: dist-rnn fused recurrence ({no_cudnn}; "
                    "compiled op unavailable: train.jit_compile (XLA has no kernel for it))")


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")  # Keras' model.save
def test_export_with_the_switch_on_traces_no_compiled_op(compiled_on, tmp_path, capsys):
    # The SavedModel must load where dist-rnn's op library was never built: no DistRnn* op may be in it.
    from conftest import shakespeare_prefix

    from dist_rnn.cli import main

    data = shakespeare_prefix(tmp_path, 5_000)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"data:\n  corpus: file\n  path: {data}\n", encoding="utf-8")
    settings = ["model.cell=lstm", "model.num_layers=1", "model.hidden_size=8", "model.embedding_size=4",
                "train.batch_size=2", "train.num_steps=8", "train.max_steps=2", "train.max_epochs=null",
                "train.sample_length=0", "checkpoint.every_steps=0", "logging.tensorboard=false",
                'logging.progress="off"']
    run, out = tmp_path / "run", tmp_path / "export"
    assert main(["train", str(cfg), "--run-dir", str(run), *sum((["--set", s] for s in settings), [])]) == 0
    assert main(["export", "--run-dir", str(run), "--out", str(out)]) == 0
    capsys.readouterr()
    saved = b"".join(p.read_bytes() for p in (out / "saved_model").rglob("*.pb"))
    assert b"ReadVariableOp" in saved  # the graphs are in these bytes
    assert b"DistRnn" not in saved
    kernels = json.loads((out / "export.json").read_text())["kernels"]
    assert kernels == ["layer 0  lstm  8 units  kernel: dist-rnn fused recurrence (export: portable to CPU and GPU; "
                       "compiled op unavailable: export (the op library may be missing where it loads))"]


# Two processes that need the library at the same time (the workers of one job): a stand-in build
# that takes 2 s and logs its start, and a stand-in loader, so no compiler runs.
_CONCURRENT_LOADER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import tensorflow as tf
    from dist_rnn.models.kernels import compiled

    log, ready = Path(sys.argv[1]), Path(sys.argv[2])

    def build(target, opt_flags):
        with open(log, "a") as f:
            f.write(f"build {os.getpid()}\\n")
        time.sleep(2)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("library")

    compiled._build = build
    tf.load_op_library = lambda path: Path(path).read_text()
    (ready / str(os.getpid())).touch()
    deadline = time.time() + 120
    while len(list(ready.iterdir())) < 2 and time.time() < deadline:
        time.sleep(0.05)
    print(compiled._load())
""")


def test_processes_starting_together_build_the_library_once(tmp_path):
    log, ready = tmp_path / "builds.log", tmp_path / "ready"
    ready.mkdir()
    env = {**os.environ, compiled.CACHE_ENV: str(tmp_path / "cache"), compiled.COMPILER_ENV: shutil.which("true"),
           "PYTHONPATH": str(Path(__file__).parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_LOADER, str(log), str(ready)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0].strip().splitlines()[-1] for p in procs]
    assert outputs == ["('library', '')"] * 2  # both loaded the one library
    assert len(log.read_text().splitlines()) == 1  # without the lock each process compiled its own


@pytest.mark.parametrize("cell", ["ln_lstm", "lstmp"])  # layers that run off cuDNN on a GPU machine too
def test_with_a_gpu_visible_layers_keep_the_graph_recurrence_and_the_report_says_why(compiled_on, monkeypatch, cell):
    # The ops have CPU kernels only: on a GPU machine they would pull the recurrence onto the CPU.
    layer = LAYERS[cell](7, return_sequences=True, return_state=True)
    x = tf.random.stateless_normal([3, 4, 5], seed=[1, 2])
    layer(x)  # build
    calls = []
    real_op = getattr(compiled, cell)
    monkeypatch.setattr(compiled, cell, lambda *a, **k: calls.append(1) or real_op(*a, **k))
    real_list = tf.config.list_logical_devices
    fake_gpu = [tf.config.LogicalDevice(name="/device:GPU:0", device_type="GPU")]
    monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind=None: fake_gpu if kind == "GPU" else real_list(kind))
    assert not compiled.uses_compiled(cell)
    layer(x)
    assert calls == []
    report = kernel_report(_model_config(cell, num_layers=1, hidden_size=7), True)[0]
    assert not report.compiled
    assert report.line().endswith("; compiled op unavailable: a GPU is visible (the op has CPU kernels only))")
    monkeypatch.setattr(tf.config, "list_logical_devices", real_list)
    layer(x)
    assert calls == [1]  # the same layer runs the op with no GPU
