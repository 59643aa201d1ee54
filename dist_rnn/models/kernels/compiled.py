"""The recurrences as compiled TensorFlow ops (C++ in ``csrc/``), built on first use.

The graph kernels of :mod:`.plain` run a ``tf.while_loop`` of small ops per
step; the ops here run the whole recurrence, forward and backward, as one C++
kernel each, with the same inputs, outputs, layouts and semantics (so weights
and checkpoints are unaffected). So far :func:`lstm`, :func:`gru`, :func:`ln_lstm` and
:func:`ln_gru`.

The shared library is compiled against the installed TensorFlow
(``tf.sysconfig`` compile and link flags) the first time it is needed, into
a cache folder keyed by the TensorFlow version, the sources, the compiler
and its flags; a build writes a temporary file and renames it, so concurrent
processes never load a half-written library. When the compiler is missing or
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

from dist_rnn.models.kernels.common import cast, with_custom_gradient

SWITCH_ENV = "DIST_RNN_COMPILED_KERNELS"
COMPILER_ENV = "DIST_RNN_CXX"
CACHE_ENV = "DIST_RNN_KERNEL_CACHE"
GEMM_ENV = "DIST_RNN_COMPILED_GEMM"
SOURCE_DIR = Path(__file__).parent / "csrc"
LIBRARY_NAME = "dist_rnn_ops.so"
#: Cells with a compiled op.
COMPILED_CELLS = ("lstm", "gru", "ln_lstm", "ln_gru")
_BUILD_TIMEOUT_SECONDS = 1800

_lock = threading.Lock()
_state: dict = {}  # "library" (module or None), "reason" (str), "warned" (bool)


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


def gemm_backend() -> str:
    """Which GEMM the float32 ops run by default: ``onednn``, ``eigen``, or ``""`` without a library."""
    lib = library()
    return "" if lib is None else lib.dist_rnn_gemm_backend().numpy().decode()


def uses_compiled(cell: str) -> bool:
    """Whether layers of ``cell`` run the compiled op: switched on, an op exists, and it built."""
    return enabled() and cell in COMPILED_CELLS and library() is not None


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
