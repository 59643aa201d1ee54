"""The recurrences as compiled TensorFlow ops (C++ in ``csrc/``), built on first use.

The graph kernels of :mod:`.plain` run a ``tf.while_loop`` of small ops per
step; the ops here run the whole recurrence, forward and backward, as one C++
kernel each, with the same inputs, outputs, layouts and semantics (so weights
and checkpoints are unaffected). So far :func:`lstm`, :func:`gru`, :func:`ln_lstm`,
:func:`ln_gru` and :func:`lstmp` (the projected LSTM, ``model.cell: lstm`` with ``model.projection_size``).

The shared library is compiled against the installed TensorFlow
(``tf.sysconfig`` compile and link flags) the first time it is needed, into
a cache folder keyed by the TensorFlow version, the sources, the compiler
and its flags; a build writes a temporary file and renames it, so no process
ever loads a half-written library, and holds a lock on the folder, so the
workers of a job that start together compile it once. When the compiler is missing or
the build or load fails, :func:`unavailable_reason` says why, a one-time
warning is issued and the callers keep the graph recurrence.

Environment switches (read at the first use in a process):

- ``DIST_RNN_COMPILED_KERNELS``: ``on`` uses the compiled ops where they
  exist; ``off`` (the default for now) always runs the graph recurrence.
- ``DIST_RNN_CXX``: the C++ compiler (default ``c++`` on the ``PATH``).
- ``DIST_RNN_KERNEL_CACHE``: the cache folder (default
  ``$XDG_CACHE_HOME/dist_rnn/kernels``, else ``~/.cache/dist_rnn/kernels``).
- ``DIST_RNN_COMPILED_GEMM``: ``eigen`` makes the ops multiply with Eigen
  instead of oneDNN's sgemm (see :func:`gemm_choice`; read at trace time).

Numerics: the ops compute in float32 (float64 for float64 inputs); under a
mixed-precision policy the inputs are cast to float32 and the outputs back to
the compute dtype, so the math inside is float32 as the issue asks (the
graph kernels compute in the compute dtype instead).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import tensorflow as tf
from tensorflow.python.ops import control_flow_util

from dist_rnn.models.kernels.common import cast, with_custom_gradient

SWITCH_ENV = "DIST_RNN_COMPILED_KERNELS"
COMPILER_ENV = "DIST_RNN_CXX"
CACHE_ENV = "DIST_RNN_KERNEL_CACHE"
GEMM_ENV = "DIST_RNN_COMPILED_GEMM"
SOURCE_DIR = Path(__file__).parent / "csrc"
LIBRARY_NAME = "dist_rnn_ops.so"
#: Cells with a compiled op.
COMPILED_CELLS = ("lstm", "gru", "ln_lstm", "ln_gru")
#: Cells whose op always multiplies with Eigen (no ``gemm`` attribute).
EIGEN_ONLY_CELLS = ("gru",)
#: Every recurrence with a compiled op: the cells' and ``lstmp``, the projected LSTM (see :func:`recurrence_name`).
COMPILED_RECURRENCES = COMPILED_CELLS + ("lstmp",)
_BUILD_TIMEOUT_SECONDS = 1800

_lock = threading.Lock()
_state: dict = {}  # "library" (module or None), "reason" (str), "warned" (bool)
_graph_only_depth = 0  # > 0 inside graph_recurrence_only()


def enabled() -> bool:
    """Whether ``DIST_RNN_COMPILED_KERNELS`` asks for the compiled ops (``on``)."""
    return os.environ.get(SWITCH_ENV, "off").strip().lower() in ("on", "1", "true", "yes")


def compiler() -> str:
    """The C++ compiler the build uses (``DIST_RNN_CXX``, else ``c++`` on the ``PATH``)."""
    return os.environ.get(COMPILER_ENV) or shutil.which("c++") or shutil.which("g++") or "c++"


def cache_dir() -> Path:
    """The folder holding the built libraries (``DIST_RNN_KERNEL_CACHE`` or the user cache)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dist_rnn" / "kernels"


def _sources() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.cc"))


def _headers() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.h"))


def _flag_sets() -> list[list[str]]:
    """Optimization flags to try, fastest first (the portable set if the first fails to build)."""
    native = ["-O2", "-march=native"]
    if platform.machine() in ("x86_64", "AMD64"):
        # Eigen's AVX512-FP16 packets do not compile with g++ 12; the rest of -march=native does.
        native.append("-mno-avx512fp16")
    return [native, ["-O2"]]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def library_path(opt_flags: list[str]) -> Path:
    """Where the library built with ``opt_flags`` lives: keyed by TF version, sources, compiler, flags, CPU."""
    digest = hashlib.sha256()
    for src in _sources() + _headers():
        digest.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    for part in [compiler(), *opt_flags, *tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags(),
                 _cpu_model()]:
        digest.update(part.encode() + b"\0")
    return cache_dir() / f"tf{tf.__version__}-{digest.hexdigest()[:16]}" / LIBRARY_NAME


def _build(target: Path, opt_flags: list[str]) -> None:
    """Compiles the sources into ``target`` (temporary file, then rename). Raises RuntimeError/OSError.

    Each source compiles to an object file in its own compiler process, all at
    once (most of the time goes to parsing TensorFlow's headers, per source),
    then one link; with several cores the build takes about the longest
    source's time instead of their sum.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    os.close(fd)
    objects_dir = tempfile.mkdtemp(prefix=".build-objects-", dir=target.parent)
    compile_flags = ["-fPIC", "-w", *opt_flags, *tf.sysconfig.get_compile_flags()]
    try:
        jobs = []
        for index, source in enumerate(_sources()):
            obj = os.path.join(objects_dir, f"{index}-{source.stem}.o")
            cmd = [compiler(), *compile_flags, "-c", str(source), "-o", obj]
            jobs.append((cmd, obj, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
        try:
            for cmd, _, proc in jobs:
                _, stderr = proc.communicate(timeout=_BUILD_TIMEOUT_SECONDS)
                if proc.returncode != 0:
                    raise RuntimeError(f"{cmd[0]} failed: {_first_error(stderr)}")
        finally:
            for _, _, proc in jobs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        link = [compiler(), "-shared", *opt_flags, *(obj for _, obj, _ in jobs), "-o", tmp,
                *tf.sysconfig.get_link_flags()]
        result = subprocess.run(link, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_SECONDS)
        if result.returncode != 0:
            raise RuntimeError(f"{link[0]} failed: {_first_error(result.stderr)}")
        os.replace(tmp, target)
    finally:
        shutil.rmtree(objects_dir, ignore_errors=True)
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def _build_lock(folder: Path):
    """Holds an exclusive lock on ``folder`` across processes (the workers of one job start together).

    Only one process compiles; the others wait and then load its library. The lock
    is ``flock`` on a file in the folder, released by the kernel if the holder dies.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".build.lock", "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _first_error(stderr: str) -> str:
    """The compiler's first error line (else the end of its output), for a one-line reason."""
    return next((ln for ln in stderr.splitlines() if "error" in ln), stderr[-300:]).strip()


def _load():
    """Builds (if not cached) and loads the library; returns (module or None, reason)."""
    if shutil.which(compiler()) is None:
        return None, f"no C++ compiler ({compiler()} not found)"
    errors = []
    for opt_flags in _flag_sets():
        path = library_path(opt_flags)
        try:
            if not path.exists():
                with _build_lock(path.parent):
                    if not path.exists():  # another process may have built it while this one waited
                        _build(path, opt_flags)
            return tf.load_op_library(str(path)), ""
        except (OSError, RuntimeError, subprocess.SubprocessError, tf.errors.OpError) as e:
            errors.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
    return None, "build failed: " + errors[0]


def library():
    """The loaded op library, building it on first use; None when unavailable (see :func:`unavailable_reason`)."""
    with _lock:
        if "library" not in _state:
            _state["library"], _state["reason"] = _load()
        if _state["library"] is None and not _state.get("warned"):
            _state["warned"] = True
            warnings.warn(f"dist-rnn: compiled recurrence unavailable ({_state['reason']}); "
                          "using the graph recurrence", RuntimeWarning, stacklevel=3)
        return _state["library"]


def unavailable_reason() -> str:
    """Why the compiled ops cannot run ("" when they can; builds the library on first use)."""
    library()
    return _state["reason"]


def gemm_backend(cell: str = "lstm") -> str:
    """Which GEMM ``cell``'s float32 op runs by default: ``onednn``, ``eigen``, or ``""`` without a library.

    The ``gru`` op multiplies with Eigen's product only (its own sharding by units); the others
    use oneDNN's sgemm where TensorFlow exports it.
    """
    lib = library()
    if lib is None:
        return ""
    return "eigen" if cell in EIGEN_ONLY_CELLS else lib.dist_rnn_gemm_backend().numpy().decode()


def recurrence_name(cell: str, projection_size=None) -> str:
    """The recurrence a layer of ``cell`` runs: ``lstmp`` for an LSTM with ``model.projection_size``, else ``cell``."""
    return "lstmp" if projection_size and cell == "lstm" else cell


def uses_compiled(recurrence: str) -> bool:
    """Whether a layer running ``recurrence`` (a cell, or ``lstmp``; see :func:`recurrence_name`), traced here,
    runs the compiled op.

    True when the switch is on, the recurrence has an op and the library built, unless
    the trace is for XLA (``train.jit_compile``: XLA has no kernel for the op),
    inside :func:`graph_recurrence_only` (export), or a GPU is visible: the ops
    have CPU kernels only, and a layer off cuDNN on a GPU machine (layer norm,
    recurrent dropout, projection) would have its recurrence moved to the CPU,
    with copies both ways, instead of running the graph recurrence on the GPU.
    Layers call this at trace time.
    """
    if not enabled() or recurrence not in COMPILED_RECURRENCES or _graph_only_depth > 0 or _in_xla_trace():
        return False
    if tf.config.list_logical_devices("GPU"):
        return False
    return library() is not None


def _in_xla_trace() -> bool:
    # TensorFlow's own test for "this graph, or a function it is nested in, is compiled with XLA".
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


@contextlib.contextmanager
def graph_recurrence_only():
    """Layers traced inside this context run the graph recurrence even with the switch on.

    ``dist-rnn export`` traces its SavedModel inside it, so that the export
    loads where the op library is not built (any machine, any TensorFlow
    serving the same version).
    """
    global _graph_only_depth
    with _lock:
        _graph_only_depth += 1
    try:
        yield
    finally:
        with _lock:
            _graph_only_depth -= 1


def reset() -> None:
    """Forgets the loaded library and the warning (tests switch compilers within one process)."""
    with _lock:
        _state.clear()


def _mask_arg(mask, dtype):
    # The ops take an empty tensor for "no recurrent dropout".
    return tf.zeros([0, 0], dtype) if mask is None else mask


def gemm_choice() -> str:
    """The ops' ``gemm`` attribute: ``auto`` (oneDNN's sgemm when TensorFlow exports it) or ``eigen``.

    ``DIST_RNN_COMPILED_GEMM=eigen`` forces Eigen's matrix product (read when a layer is traced); the
    tests use it to check the fallback, which also runs wherever the oneDNN entry point is missing.
    """
    return "eigen" if os.environ.get(GEMM_ENV, "auto").strip().lower() == "eigen" else "auto"


def _lstm_forward(proj, h0, c0, rkernel, mask, units, gemm):
    del units
    return tuple(library().dist_rnn_lstm_forward(proj, h0, c0, rkernel, _mask_arg(mask, proj.dtype), gemm=gemm))


def _lstm_backward(d_outputs, inputs, mask, saved, units, gemm):
    del units
    d_h_seq, d_h_last, d_c_last = d_outputs
    proj, h0, c0, rkernel = inputs
    h_seq, _, _, c_seq, gates = saved
    return tuple(library().dist_rnn_lstm_backward(d_h_seq, d_h_last, d_c_last, h0, c0, rkernel,
                                                  _mask_arg(mask, proj.dtype), h_seq, c_seq, gates, gemm=gemm))


def lstm(proj, h0, c0, rkernel, mask, units):
    """:func:`~.plain.lstm` as the compiled op (same arguments, results and gradients).

    Call only when :func:`uses_compiled` is true for ``"lstm"``.

    Returns:
        ``h_seq, h_T, c_T`` in the dtype of ``proj``.
    """
    dtype = proj.dtype
    math = tf.float64 if dtype == tf.float64 else tf.float32
    tensors = [cast(t, math) for t in (proj, h0, c0, rkernel)]
    m = None if mask is None else cast(mask, math)
    outputs = with_custom_gradient(_lstm_forward, _lstm_backward, tensors, m, 3, units=units, gemm=gemm_choice())
    return tuple(cast(o, dtype) for o in outputs)


def _gru_forward(proj, h0, rkernel, rbias, mask, units):
    del units
    return tuple(library().dist_rnn_gru_forward(proj, h0, rkernel, rbias, _mask_arg(mask, proj.dtype)))


def _gru_backward(d_outputs, inputs, mask, saved, units):
    del units
    d_h_seq, d_h_last = d_outputs
    proj, h0, rkernel, _ = inputs
    h_seq, _, zr, hu_h, hh = saved
    return tuple(library().dist_rnn_gru_backward(d_h_seq, d_h_last, h0, rkernel, _mask_arg(mask, proj.dtype),
                                                 h_seq, zr, hu_h, hh))


def gru(proj, h0, rkernel, rbias, mask, units):
    """:func:`~.plain.gru` as the compiled op (same arguments, results and gradients).

    Call only when :func:`uses_compiled` is true for ``"gru"``.

    Returns:
        ``h_seq, h_T`` in the dtype of ``proj``.
    """
    dtype = proj.dtype
    math = tf.float64 if dtype == tf.float64 else tf.float32
    tensors = [cast(t, math) for t in (proj, h0, rkernel, rbias)]
    m = None if mask is None else cast(mask, math)
    outputs = with_custom_gradient(_gru_forward, _gru_backward, tensors, m, 2, units=units)
    return tuple(cast(o, dtype) for o in outputs)


def _ln_lstm_forward(proj, h0, c0, rkernel, gain, bias, cell_gamma, cell_beta, mask, units, eps, gemm):
    del units
    return tuple(library().dist_rnn_ln_lstm_forward(proj, h0, c0, rkernel, gain, bias, cell_gamma, cell_beta,
                                                    _mask_arg(mask, proj.dtype), tf.constant(eps, proj.dtype),
                                                    gemm=gemm))


def _ln_lstm_backward(d_outputs, inputs, mask, saved, units, eps, gemm):
    del units, eps
    d_h_seq, d_h_last, d_c_last = d_outputs
    proj, h0, c0, rkernel, gain, _, cell_gamma, cell_beta = inputs
    h_seq, _, _, c_seq, gates, zhat, rstd_z, chat, rstd_c = saved
    return tuple(library().dist_rnn_ln_lstm_backward(
        d_h_seq, d_h_last, d_c_last, h0, c0, rkernel, gain, cell_gamma, cell_beta, _mask_arg(mask, proj.dtype),
        h_seq, c_seq, gates, zhat, rstd_z, chat, rstd_c, gemm=gemm))


def ln_lstm(proj, h0, c0, rkernel, gain, bias, cell_gamma, cell_beta, mask, units, eps):
    """:func:`~.layer_norm.ln_lstm` as the compiled op (same arguments, results and gradients).

    Call only when :func:`uses_compiled` is true for ``"ln_lstm"``. The layer-norm
    statistics are in the op's math dtype (float32, float64 for float64 inputs), as
    the graph kernel's are in its statistics dtype.

    Returns:
        ``h_seq, h_T, c_T`` in the dtype of ``proj``.
    """
    dtype = proj.dtype
    math = tf.float64 if dtype == tf.float64 else tf.float32
    tensors = [cast(t, math) for t in (proj, h0, c0, rkernel, gain, bias, cell_gamma, cell_beta)]
    m = None if mask is None else cast(mask, math)
    outputs = with_custom_gradient(_ln_lstm_forward, _ln_lstm_backward, tensors, m, 3, units=units,
                                   eps=float(eps), gemm=gemm_choice())
    return tuple(cast(o, dtype) for o in outputs)


def _ln_gru_forward(proj, h0, rkernel, gate_gamma, gate_beta, cand_gamma, cand_beta, mask, units, eps, gemm):
    del units
    return tuple(library().dist_rnn_ln_gru_forward(proj, h0, rkernel, gate_gamma, gate_beta, cand_gamma, cand_beta,
                                                   _mask_arg(mask, proj.dtype), tf.constant(eps, proj.dtype),
                                                   gemm=gemm))


def _ln_gru_backward(d_outputs, inputs, mask, saved, units, eps, gemm):
    del units, eps
    d_h_seq, d_h_last = d_outputs
    proj, h0, rkernel, gate_gamma, _, cand_gamma, _ = inputs
    h_seq, _, zr, hu_n, n, ghat, rstd_g, qhat, rstd_q = saved
    return tuple(library().dist_rnn_ln_gru_backward(
        d_h_seq, d_h_last, h0, rkernel, gate_gamma, cand_gamma, _mask_arg(mask, proj.dtype),
        h_seq, zr, hu_n, n, ghat, rstd_g, qhat, rstd_q, gemm=gemm))


def ln_gru(proj, h0, rkernel, gate_gamma, gate_beta, cand_gamma, cand_beta, mask, units, eps):
    """:func:`~.layer_norm.ln_gru` as the compiled op (same arguments, results and gradients).

    Call only when :func:`uses_compiled` is true for ``"ln_gru"``. The layer-norm
    statistics are in the op's math dtype (float32, float64 for float64 inputs), as
    the graph kernel's are in its statistics dtype.

    Returns:
        ``h_seq, h_T`` in the dtype of ``proj``.
    """
    dtype = proj.dtype
    math = tf.float64 if dtype == tf.float64 else tf.float32
    tensors = [cast(t, math) for t in (proj, h0, rkernel, gate_gamma, gate_beta, cand_gamma, cand_beta)]
    m = None if mask is None else cast(mask, math)
    outputs = with_custom_gradient(_ln_gru_forward, _ln_gru_backward, tensors, m, 2, units=units,
                                   eps=float(eps), gemm=gemm_choice())
    return tuple(cast(o, dtype) for o in outputs)


def _lstmp_forward(proj, h0, c0, rkernel, pkernel, mask, units, projection_size, gemm):
    del units, projection_size
    return tuple(library().dist_rnn_lstmp_forward(proj, h0, c0, rkernel, pkernel, _mask_arg(mask, proj.dtype),
                                                  gemm=gemm))


def _lstmp_backward(d_outputs, inputs, mask, saved, units, projection_size, gemm):
    del units, projection_size
    d_h_seq, d_h_last, d_c_last = d_outputs
    proj, h0, c0, rkernel, pkernel = inputs
    h_seq, _, _, c_seq, gates, m_seq = saved
    return tuple(library().dist_rnn_lstmp_backward(d_h_seq, d_h_last, d_c_last, h0, c0, rkernel, pkernel,
                                                   _mask_arg(mask, proj.dtype), h_seq, c_seq, gates, m_seq,
                                                   gemm=gemm))


def lstmp(proj, h0, c0, rkernel, pkernel, mask, units, projection_size):
    """:func:`~.projected.lstmp` (the projected LSTM) as the compiled op (same arguments, results and gradients).

    Call only when :func:`uses_compiled` is true for ``"lstmp"``.

    Returns:
        ``h_seq, h_T, c_T`` in the dtype of ``proj``.
    """
    dtype = proj.dtype
    math = tf.float64 if dtype == tf.float64 else tf.float32
    tensors = [cast(t, math) for t in (proj, h0, c0, rkernel, pkernel)]
    m = None if mask is None else cast(mask, math)
    outputs = with_custom_gradient(_lstmp_forward, _lstmp_backward, tensors, m, 3, units=units,
                                   projection_size=projection_size, gemm=gemm_choice())
    return tuple(cast(o, dtype) for o in outputs)
