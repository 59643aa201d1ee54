#!/usr/bin/env bash
# Build and install Horovod (with TensorFlow + Gloo) into the *active* Python env.
#
# Usage:
#   tools/install_horovod.sh                 # uses `python` on PATH
#   PYTHON=/path/to/venv/bin/python tools/install_horovod.sh
#   tools/install_horovod.sh --patch-only DIR   # only patch an unpacked sdist
#
# Why: Horovod 0.28.1 (latest on PyPI) does not build or load against recent
# TensorFlow (2.21) as published: horovod/tensorflow/xla_mpi_ops.cc (the
# optional XLA ops) no longer compiles, and the NCCL (GPU) build of
# horovod/tensorflow/mpi_ops.cc calls stream_executor::gpu::AsGpuStreamValue,
# which TensorFlow 2.21 neither declares nor exports (the op library would fail
# to load with "undefined symbol"). This script downloads the sdist, drops
# xla_mpi_ops.cc from horovod/tensorflow/CMakeLists.txt, reads the CUDA stream
# through Stream::platform_specific_handle() instead, builds a wheel with
# `pip wheel --no-build-isolation --no-deps` against the env's TensorFlow,
# caches it, installs it and finishes with `horovodrun --check-build`.
#
# Flavour (auto-detected; part of the wheel cache key):
#   * Gloo controller: always.
#   * MPI: when `mpicc` or `mpirun` is on PATH, else HOROVOD_WITHOUT_MPI=1.
#   * NCCL GPU ops (HOROVOD_GPU_OPERATIONS=NCCL): when CUDA is present (nvcc on
#     PATH or CUDA_HOME set) *and* NCCL can be found (HOROVOD_NCCL_HOME /
#     HOROVOD_NCCL_INCLUDE+HOROVOD_NCCL_LIB, a system libnccl, or the pip package
#     nvidia-nccl-cu* in the env). In auto mode a missing NCCL, or an nvcc whose
#     CUDA major version differs from the one TensorFlow was built with, falls
#     back to a CPU-only build with a warning.
#
# Environment knobs:
#   PYTHON                    interpreter to install into (default: python on PATH)
#   DIST_RNN_CACHE            cache root (default: $HOME/.cache/dist-rnn); wheels
#                             are kept under $DIST_RNN_CACHE/wheels/<key>/
#   DIST_RNN_HOROVOD_GPU      auto (default) | 1 (require NCCL build) | 0 (CPU only)
#   DIST_RNN_HOROVOD_MPI      auto (default) | 1 (require MPI) | 0 (no MPI)
#   DIST_RNN_HOROVOD_REBUILD  1: ignore an existing install and the wheel cache
#   DIST_RNN_VERBOSE          1: stream the compiler output instead of logging it
#   MAKEFLAGS                 parallelism of the C++ build (default: -j2)
#   HOROVOD_BUILD_CUDA_CC_LIST  e.g. "80,90" to limit CUDA archs (faster GPU build)
#
# Exit status is non-zero if anything fails or if `horovodrun --check-build`
# does not report both TensorFlow and Gloo as available.

set -euo pipefail

HVD_VERSION="0.28.1"   # the patch below is specific to this release
CACHE_ROOT="${DIST_RNN_CACHE:-$HOME/.cache/dist-rnn}"
WHEEL_CACHE="$CACHE_ROOT/wheels"
GPU_MODE="${DIST_RNN_HOROVOD_GPU:-auto}"
MPI_MODE="${DIST_RNN_HOROVOD_MPI:-auto}"
REBUILD="${DIST_RNN_HOROVOD_REBUILD:-0}"
VERBOSE="${DIST_RNN_VERBOSE:-0}"
export MAKEFLAGS="${MAKEFLAGS:--j2}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"   # quiet TF imports

log()  { printf '[install_horovod] %s\n' "$*" >&2; }
warn() { printf '[install_horovod] WARNING: %s\n' "$*" >&2; }
die()  { printf '[install_horovod] ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- source patch
# patch_sources SRC: makes the unpacked Horovod $HVD_VERSION sdist in SRC build
# and load against TensorFlow 2.21; fails if a pattern no longer matches.
patch_sources() {
    local src="$1" cml="$1/horovod/tensorflow/CMakeLists.txt" ops="$1/horovod/tensorflow/mpi_ops.cc"
    [[ -f "$cml" && -f "$ops" ]] || die "$src is not an unpacked horovod-$HVD_VERSION sdist (no $cml or $ops)"

    log "patching $cml: dropping xla_mpi_ops.cc (does not compile against TensorFlow 2.21)"
    grep -q 'xla_mpi_ops\.cc' "$cml" || die "pattern 'xla_mpi_ops.cc' not found in $cml; the patch no longer applies"
    sed -i '/xla_mpi_ops\.cc/d' "$cml"
    if grep -q 'xla_mpi_ops' "$cml"; then die "failed to remove xla_mpi_ops.cc from $cml"; fi
    grep -q 'horovod/tensorflow/mpi_ops\.cc' "$cml" || die "patched $cml no longer lists mpi_ops.cc; aborting"

    # The GPU build declares stream_executor::gpu::AsGpuStreamValue itself and
    # calls it in every GPU op; TensorFlow 2.21 no longer has that function.
    # Every Stream exposes its CUDA/ROCm stream as platform_specific_handle().
    log "patching $ops: GPU stream through Stream::platform_specific_handle() (AsGpuStreamValue is gone)"
    "${PYTHON_FOR_PATCH:-python3}" - "$ops" <<'PATCH' || die "patching $ops failed; the patch no longer applies"
import re, sys
path = sys.argv[1]
text = open(path).read()
declaration = re.compile(r"// Forward declaration of AsGpuStreamValue\n"
                         r"namespace stream_executor \{\nnamespace gpu \{\n"
                         r"GpuStreamHandle AsGpuStreamValue\(Stream\* stream\);\n"
                         r"\} // namespace \w+\n\} // namespace \w+\n")
text, declared = declaration.subn("", text)
include_end = "#endif // TENSORFLOW_VERSION >= 2011000000\n#endif // HAVE_GPU\n"
helper = ("#endif // TENSORFLOW_VERSION >= 2011000000\n"
          "// dist-rnn patch: the CUDA/ROCm stream of a Stream (TensorFlow 2.21 dropped its gpu helper).\n"
          "static inline GpuStreamHandle HvdGpuStream(stream_executor::Stream* stream) {\n"
          "  return static_cast<GpuStreamHandle>(stream->platform_specific_handle().stream);\n"
          "}\n"
          "#endif // HAVE_GPU\n")
anchored = text.count(include_end)
text = text.replace(include_end, helper)
text, calls = re.subn(r"stream_executor::gpu::AsGpuStreamValue\(", "HvdGpuStream(", text)
if declared != 1 or anchored != 1 or calls < 1 or "AsGpuStreamValue" in text:
    sys.exit(f"{path}: expected 1 declaration, 1 include block and calls of AsGpuStreamValue; "
             f"found {declared}, {anchored}, {calls}")
open(path, "w").write(text)
PATCH
}

if [[ "${1:-}" == --patch-only ]]; then
    [[ -n "${2:-}" ]] || die "--patch-only needs the directory of an unpacked horovod-$HVD_VERSION sdist"
    PYTHON_FOR_PATCH="${PYTHON:-python3}" patch_sources "$2"
    exit 0
fi

case "$GPU_MODE" in auto|0|1) ;; *) die "DIST_RNN_HOROVOD_GPU must be auto, 0 or 1 (got '$GPU_MODE')";; esac
case "$MPI_MODE" in auto|0|1) ;; *) die "DIST_RNN_HOROVOD_MPI must be auto, 0 or 1 (got '$MPI_MODE')";; esac

# ---------------------------------------------------------------- python env
PY="${PYTHON:-python}"
PY="$(command -v "$PY" || true)"
[[ -n "$PY" ]] || die "no python found (set PYTHON or activate a virtualenv)"
"$PY" -m pip --version >/dev/null 2>&1 || die "'$PY -m pip' does not work"
pip_() { "$PY" -m pip --disable-pip-version-check "$@"; }

SCRIPTS_DIR="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
# Make the env's console scripts (horovodrun, pip-installed cmake) visible.
export PATH="$SCRIPTS_DIR:$PATH"

log "python: $PY"
py_info="$("$PY" - <<'EOF' 2>/dev/null || true
import sys
try:
    import tensorflow as tf
except Exception:
    print(f"cp{sys.version_info[0]}{sys.version_info[1]} - -")
    raise SystemExit(0)
cuda = tf.sysconfig.get_build_info().get("cuda_version") or "-"
print(f"cp{sys.version_info[0]}{sys.version_info[1]} {tf.__version__} {cuda}")
EOF
)"
read -r PY_TAG TF_VERSION TF_CUDA <<<"$py_info" || true
[[ -n "${TF_VERSION:-}" && "$TF_VERSION" != "-" ]] \
    || die "TensorFlow is not importable with $PY; install it first"
log "tensorflow: $TF_VERSION (built with CUDA ${TF_CUDA}), python tag: $PY_TAG"

# ------------------------------------------------------------ final check
check_build() {
    local hvdrun="$SCRIPTS_DIR/horovodrun" out
    [[ -x "$hvdrun" ]] || die "horovodrun not found at $hvdrun"
    log "running: horovodrun --check-build"
    out="$("$hvdrun" --check-build 2>&1)" || { printf '%s\n' "$out" >&2; die "horovodrun --check-build failed"; }
    # drop TF/absl start-up chatter from the helper processes; keep the report
    if grep -q '^Horovod v' <<<"$out"; then sed -n '/^Horovod v/,$p' <<<"$out"; else printf '%s\n' "$out"; fi
    grep -Eq '\[X\] TensorFlow' <<<"$out" || die "TensorFlow is NOT available in this Horovod build"
    grep -Eq '\[X\] Gloo' <<<"$out"       || die "Gloo is NOT available in this Horovod build"
    # (--check-build's PyTorch/MXNet rows can read [X] even without those
    #  extensions -- an upstream quirk; only TensorFlow and Gloo matter here)
    log "OK: Horovod $HVD_VERSION with TensorFlow + Gloo is installed in $(dirname "$PY")"
}

# ------------------------------------------------ already installed? (idempotent)
installed_ok() {
    "$PY" - "$HVD_VERSION" <<'EOF' >/dev/null 2>&1
import json, os, sys
import tensorflow as tf
import horovod
assert horovod.__version__ == sys.argv[1], horovod.__version__
import horovod.tensorflow as hvd          # loads the compiled TF ops
assert hvd.gloo_built()
meta = os.path.join(os.path.dirname(horovod.__file__), "metadata.json")
with open(meta) as f:
    assert json.load(f).get("tensorflow") == tf.__version__
EOF
}

if [[ "$REBUILD" != 1 ]] && installed_ok; then
    log "horovod $HVD_VERSION with TensorFlow $TF_VERSION support is already installed; skipping build"
    check_build
    exit 0
fi

# ------------------------------------------------------------ flavour detection
BUILD_ENV=(
    HOROVOD_WITH_TENSORFLOW=1
    HOROVOD_WITH_GLOO=1
    HOROVOD_WITHOUT_PYTORCH=1
    HOROVOD_WITHOUT_MXNET=1
)
BUILD_TMP=""
ensure_tmp() { [[ -n "$BUILD_TMP" ]] || BUILD_TMP="$(mktemp -d "${TMPDIR:-/tmp}/horovod-build.XXXXXX")"; }

# -- MPI
MPI_FLAVOUR="nompi"
have_mpi=0
if command -v mpicc >/dev/null 2>&1 || command -v mpirun >/dev/null 2>&1; then have_mpi=1; fi
if [[ "$MPI_MODE" == 1 && $have_mpi == 0 ]]; then die "DIST_RNN_HOROVOD_MPI=1 but neither mpicc nor mpirun is on PATH"; fi
if [[ "$MPI_MODE" != 0 && $have_mpi == 1 ]]; then
    MPI_FLAVOUR="mpi"
    BUILD_ENV+=(HOROVOD_WITH_MPI=1)
    log "MPI found ($(command -v mpicc || command -v mpirun)): building with MPI"
else
    BUILD_ENV+=(HOROVOD_WITHOUT_MPI=1)
    log "building without MPI (Gloo only)"
fi

# -- CUDA / NCCL
GPU_FLAVOUR="cpu"
NVCC=""
if [[ -n "${CUDA_HOME:-}" && -x "${CUDA_HOME}/bin/nvcc" ]]; then
    NVCC="${CUDA_HOME}/bin/nvcc"
elif command -v nvcc >/dev/null 2>&1; then
    NVCC="$(command -v nvcc)"
fi
if [[ -n "${CUDA_HOME:-}" && -z "$NVCC" ]]; then
    warn "CUDA_HOME=$CUDA_HOME is set but has no bin/nvcc"
fi
CUDA_ROOT=""
if [[ -n "$NVCC" ]]; then
    if [[ -n "${CUDA_HOME:-}" && -x "${CUDA_HOME}/bin/nvcc" ]]; then
        CUDA_ROOT="$CUDA_HOME"
    else
        # nvcc may be a wrapper script: ask nvcc itself where it lives
        CUDA_ROOT="$("$NVCC" -dryrun -E -x cu /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -1)"
        CUDA_ROOT="${CUDA_ROOT:+$(dirname "$CUDA_ROOT")}"
        [[ -n "$CUDA_ROOT" ]] || CUDA_ROOT="$(cd "$(dirname "$(readlink -f "$NVCC")")/.." && pwd)"
    fi
fi

NCCL_ENV=()
NCCL_DESC=""
find_nccl() {   # sets NCCL_ENV / NCCL_DESC; returns 1 if NCCL is not found
    if [[ -n "${HOROVOD_NCCL_HOME:-}${HOROVOD_NCCL_INCLUDE:-}${HOROVOD_NCCL_LIB:-}" ]]; then
        NCCL_DESC="from HOROVOD_NCCL_* (${HOROVOD_NCCL_HOME:-${HOROVOD_NCCL_LIB:-}})"
        return 0
    fi
    local d
    for d in "$CUDA_ROOT" /usr /usr/local /usr/local/nccl /opt/nccl; do
        [[ -n "$d" && -f "$d/include/nccl.h" ]] || continue
        if compgen -G "$d/lib*/libnccl.so" >/dev/null || compgen -G "$d/lib*/libnccl_static.a" >/dev/null \
           || compgen -G "$d/lib/x86_64-linux-gnu/libnccl.so" >/dev/null \
           || compgen -G "$d/lib/aarch64-linux-gnu/libnccl.so" >/dev/null; then
            NCCL_ENV=(HOROVOD_NCCL_HOME="$d")
            # link shared unless only the static lib exists
            if compgen -G "$d/lib*/libnccl.so" >/dev/null || compgen -G "$d/lib/*-linux-gnu/libnccl.so" >/dev/null; then
                NCCL_ENV+=(HOROVOD_NCCL_LINK=SHARED)
            fi
            NCCL_DESC="system NCCL in $d"
            return 0
        fi
    done
    # pip package nvidia-nccl-cu* (ships include/nccl.h and lib/libnccl.so.2 only)
    local pipdir
    pipdir="$("$PY" -c 'import nvidia.nccl as m; print(list(m.__path__)[0])' 2>/dev/null || true)"
    if [[ -n "$pipdir" && -f "$pipdir/include/nccl.h" && -f "$pipdir/lib/libnccl.so.2" ]]; then
        ensure_tmp
        mkdir -p "$BUILD_TMP/nccl/lib"
        ln -sfn "$pipdir/include" "$BUILD_TMP/nccl/include"
        ln -sfn "$pipdir/lib/libnccl.so.2" "$BUILD_TMP/nccl/lib/libnccl.so"
        NCCL_ENV=(HOROVOD_NCCL_INCLUDE="$BUILD_TMP/nccl/include" HOROVOD_NCCL_LIB="$BUILD_TMP/nccl/lib"
                  HOROVOD_NCCL_LINK=SHARED LDFLAGS="${LDFLAGS:-} -Wl,-rpath,$pipdir/lib")
        NCCL_DESC="pip nvidia-nccl in $pipdir"
        PIP_NCCL_DIR="$pipdir"
        return 0
    fi
    return 1
}

PIP_NCCL_DIR=""
if [[ "$GPU_MODE" != 0 && -n "$NVCC" ]]; then
    nvcc_ver="$("$NVCC" --version | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -1)"
    log "CUDA found: $NVCC (CUDA ${nvcc_ver:-?}, toolkit root $CUDA_ROOT)"
    use_gpu=1
    if ! find_nccl; then
        msg="CUDA is present but NCCL was not found (install libnccl-dev or nvidia-nccl-cuXX, or set HOROVOD_NCCL_HOME)"
        [[ "$GPU_MODE" == 1 ]] && die "$msg"
        warn "$msg; building CPU-only Horovod (set DIST_RNN_HOROVOD_GPU=1 to make this an error)"
        use_gpu=0
    elif [[ "$TF_CUDA" != "-" && -n "$nvcc_ver" && "${TF_CUDA%%.*}" != "${nvcc_ver%%.*}" ]]; then
        msg="nvcc is CUDA $nvcc_ver but TensorFlow was built with CUDA $TF_CUDA"
        if [[ "$GPU_MODE" == 1 ]]; then
            warn "$msg; building with NCCL anyway (DIST_RNN_HOROVOD_GPU=1)"
        else
            warn "$msg; building CPU-only Horovod (set DIST_RNN_HOROVOD_GPU=1 to force NCCL)"
            use_gpu=0
        fi
    elif [[ "$TF_CUDA" == "-" ]]; then
        msg="TensorFlow is not a CUDA build"
        [[ "$GPU_MODE" == 1 ]] && die "$msg"
        warn "$msg; building CPU-only Horovod"
        use_gpu=0
    fi
    if [[ $use_gpu == 1 ]]; then
        GPU_FLAVOUR="nccl-cuda${nvcc_ver:-unknown}"
        if [[ -n "$PIP_NCCL_DIR" ]]; then
            # the rpath points into this env: do not share such a wheel across envs
            GPU_FLAVOUR+="-pipnccl$(printf '%s' "$PIP_NCCL_DIR" | md5sum | cut -c1-8)"
        fi
        BUILD_ENV+=(HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_CUDA_HOME="$CUDA_ROOT")
        BUILD_ENV+=("${NCCL_ENV[@]}")
        log "building with NCCL GPU operations ($NCCL_DESC)"
    fi
elif [[ "$GPU_MODE" == 1 ]]; then
    die "DIST_RNN_HOROVOD_GPU=1 but no CUDA found (nvcc not on PATH, CUDA_HOME unset)"
else
    log "building CPU-only (no CUDA found or DIST_RNN_HOROVOD_GPU=0)"
fi

CACHE_KEY="horovod-${HVD_VERSION}_tf${TF_VERSION}_${PY_TAG}_$(uname -m)_${GPU_FLAVOUR}-${MPI_FLAVOUR}-gloo"
CACHE_DIR="$WHEEL_CACHE/$CACHE_KEY"
log "wheel cache key: $CACHE_KEY"

# ------------------------------------------------------------ python deps
# setup.py needs setuptools/wheel/packaging and lists cloudpickle, psutil, pyyaml
# as setup_requires (must be present with --no-build-isolation); they are also
# Horovod's runtime requirements.
missing="$("$PY" - <<'EOF'
import importlib.util
mods = {"setuptools": "setuptools", "wheel": "wheel", "packaging": "packaging",
        "cloudpickle": "cloudpickle", "psutil": "psutil", "yaml": "pyyaml"}
print(" ".join(p for m, p in mods.items() if importlib.util.find_spec(m) is None))
EOF
)"
if [[ -n "$missing" ]]; then
    log "installing missing python packages: $missing"
    # shellcheck disable=SC2086
    pip_ install $missing
fi

install_wheel() {
    log "installing $(basename "$1")"
    pip_ install --no-deps --force-reinstall "$1"
}

# ------------------------------------------------------------ cached wheel?
cached_whl=""
if [[ "$REBUILD" != 1 && -d "$CACHE_DIR" ]]; then
    cached_whl="$(compgen -G "$CACHE_DIR/horovod-*.whl" | head -1 || true)"
fi
if [[ -n "$cached_whl" ]]; then
    log "using cached wheel $cached_whl"
    install_wheel "$cached_whl"
    check_build
    exit 0
fi

# ------------------------------------------------------------ build toolchain
if ! command -v gcc >/dev/null 2>&1 || ! command -v g++ >/dev/null 2>&1; then
    die "gcc/g++ not found (e.g. apt-get install build-essential)"
fi
cmake_ok() {  # $1 = cmake binary; need 3.13 <= version < 4 (bundled gloo needs old policies)
    local v
    v="$("$1" --version 2>/dev/null | sed -n 's/^cmake version \([0-9.]*\).*/\1/p' | head -1)"
    [[ -n "$v" ]] || return 1
    "$PY" -c "import sys; v=tuple(int(x) for x in '$v'.split('.')[:2]); sys.exit(0 if (3,13)<=v<(4,0) else 1)"
}
CMAKE_BIN="$(command -v cmake || true)"
if [[ -z "$CMAKE_BIN" ]] || ! cmake_ok "$CMAKE_BIN"; then
    log "no cmake in [3.13, 4) on PATH; installing cmake<4 from PyPI into the env"
    pip_ install 'cmake>=3.13,<4'
    CMAKE_BIN="$SCRIPTS_DIR/cmake"
    cmake_ok "$CMAKE_BIN" || die "pip-installed cmake at $CMAKE_BIN is not usable"
fi
log "cmake: $CMAKE_BIN ($("$CMAKE_BIN" --version | head -1))"
BUILD_ENV+=(HOROVOD_CMAKE="$CMAKE_BIN")

# ------------------------------------------------------------ download + patch
ensure_tmp
cleanup() {
    local rc=$?
    if [[ $rc -eq 0 ]]; then rm -rf "$BUILD_TMP"; else log "build directory kept for inspection: $BUILD_TMP"; fi
}
trap cleanup EXIT

log "downloading horovod==$HVD_VERSION sdist"
pip_ download --quiet --no-deps --no-binary :all: --no-build-isolation \
    -d "$BUILD_TMP/sdist" "horovod==$HVD_VERSION"
sdist="$(compgen -G "$BUILD_TMP/sdist/horovod-$HVD_VERSION.tar.gz" | head -1 || true)"
[[ -n "$sdist" ]] || die "sdist horovod-$HVD_VERSION.tar.gz not downloaded"
tar -xzf "$sdist" -C "$BUILD_TMP"
SRC="$BUILD_TMP/horovod-$HVD_VERSION"
PYTHON_FOR_PATCH="$PY" patch_sources "$SRC"

# ------------------------------------------------------------ build wheel
log "building wheel (MAKEFLAGS=$MAKEFLAGS; takes a few minutes)"
log "build env: ${BUILD_ENV[*]}"
BUILD_LOG="$BUILD_TMP/build.log"
start=$SECONDS
build_cmd=(env "${BUILD_ENV[@]}" "$PY" -m pip --disable-pip-version-check wheel -v
           --no-build-isolation --no-deps -w "$BUILD_TMP/dist" "$SRC")
if [[ "$VERBOSE" == 1 ]]; then
    "${build_cmd[@]}" 2>&1 | tee "$BUILD_LOG"
else
    log "compiler output -> $BUILD_LOG (DIST_RNN_VERBOSE=1 to stream it)"
    if ! "${build_cmd[@]}" >"$BUILD_LOG" 2>&1; then
        { grep -nE -A4 'CMake Error|: error:|Error [0-9]+$' "$BUILD_LOG" | head -n 40 || tail -n 60 "$BUILD_LOG"; } >&2
        die "wheel build failed (full log: $BUILD_LOG)"
    fi
fi
built_whl="$(compgen -G "$BUILD_TMP/dist/horovod-*.whl" | head -1 || true)"
[[ -n "$built_whl" ]] || die "no wheel produced (log: $BUILD_LOG)"
log "built $(basename "$built_whl") in $((SECONDS - start))s"

# atomic publish into the cache (safe against concurrent runs)
mkdir -p "$WHEEL_CACHE"
stage="$(mktemp -d "$WHEEL_CACHE/.stage.XXXXXX")"
chmod 755 "$stage"
cp "$built_whl" "$stage/"
if [[ -d "$CACHE_DIR" ]]; then   # stale entry (e.g. DIST_RNN_HOROVOD_REBUILD=1)
    rm -rf "$CACHE_DIR.old"; mv "$CACHE_DIR" "$CACHE_DIR.old" 2>/dev/null || true
fi
if mv -T "$stage" "$CACHE_DIR" 2>/dev/null; then
    rm -rf "$CACHE_DIR.old"
    log "cached wheel in $CACHE_DIR"
else
    rm -rf "$stage"
    warn "could not write wheel cache $CACHE_DIR"
fi

install_wheel "$built_whl"
check_build
