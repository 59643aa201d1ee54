"""Process setup shared by the commands: TensorFlow's first import without its start-up noise.

On a machine without a GPU, importing TensorFlow and probing its devices prints
lines such as the oneDNN notice, "Could not find cuda drivers" and an
``E0000 ... failed call to cuInit: ... UNKNOWN ERROR (303)`` line, twice (two
shared libraries log before absl is initialized, so ``TF_CPP_MIN_LOG_LEVEL``
cannot silence them). They read like failures to a new user. The commands
therefore import TensorFlow through :func:`import_tensorflow`, which sends the
process's standard error (file descriptor 2, where the C++ code writes) to a
temporary file for the import and the device probe, then writes back every
line that is not one of these known notices, in order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile

# Lines TensorFlow 2.21 prints while importing and probing devices that carry
# no information for a user of the CLI. Anything else passes through.
STARTUP_NOISE = tuple(re.compile(p) for p in (
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$",
    r"^[IW]\d{4} [\d:. ]+\d+ port\.cc:\d+\] oneDNN custom operations are on\.",
    r"^[IWE]\d{4} [\d:. ]+\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine",
    r"^[IWE]\d{4} [\d:. ]+\d+ cuda_platform\.cc:\d+\] failed call to cuInit:",
    r"^[IWE]\d{4} [\d:. ]+\d+ cuda_(?:dnn|fft|blas)\.cc:\d+\] Unable to register cu\w+ factory",
    r"^[IW]\d{4} [\d:. ]+\d+ cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized",
    r"^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.$",
))

_show_startup_logs = False


def show_startup_logs(show: bool) -> None:
    """Sets whether :func:`import_tensorflow` lets TensorFlow's start-up notices through (``--verbose``)."""
    global _show_startup_logs
    _show_startup_logs = show


def is_startup_noise(line: str) -> bool:
    """Whether ``line`` (without its newline) is one of TensorFlow's known start-up notices."""
    return any(pattern.search(line) for pattern in STARTUP_NOISE)


def import_tensorflow():
    """Imports TensorFlow and probes its devices, keeping the known start-up notices off stderr.

    Call it before the first import of TensorFlow in a command. Later calls
    only return the module. Logical devices can still be configured afterwards
    (the probe lists physical devices only).

    Returns:
        The ``tensorflow`` module.
    """
    already = "tensorflow" in sys.modules
    if already or _show_startup_logs:
        import tensorflow as tf

        if not already:
            tf.config.list_physical_devices("GPU")
        return tf
    with filtered_stderr(is_startup_noise):
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")
    return tf


@contextlib.contextmanager
def filtered_stderr(drop):
    """Holds back what is written to file descriptor 2 in the block, then writes back the lines ``drop`` rejects.

    Works at the file-descriptor level, so lines written by C++ code are seen
    too. The block must not run for long: its output appears only at its end.

    Args:
        drop: Called with each line (newline stripped); True removes the line.
    """
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no usable stderr (closed): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().splitlines(keepends=True)
                    if not drop(line.rstrip(b"\r\n").decode("utf-8", "replace"))]
            if kept:
                os.write(2, b"".join(kept))


def set_precision(precision: str) -> None:
    """Sets the Keras global dtype policy; warns that float16 is slow on a CPU.

    Args:
        precision: ``float32``, ``mixed_float16`` or ``mixed_bfloat16``.
    """
    import keras
    import tensorflow as tf

    keras.mixed_precision.set_global_policy(precision)
    if precision == "mixed_float16" and not tf.config.list_logical_devices("GPU"):
        logging.getLogger("dist_rnn").warning("warning: train.precision mixed_float16 on a CPU works but is slow; "
                                              "use mixed_bfloat16 or float32 on CPU")


def setup_tensorflow(config, precision: str | None = None) -> None:
    """Seeds Keras, sets op determinism (``train.deterministic``) and the precision policy.

    Args:
        config: The run's :class:`~dist_rnn.config.Config`.
        precision: Overrides ``train.precision`` (``float32`` for evaluation and inference).
    """
    import keras
    import tensorflow as tf

    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.train.seed)
    set_precision(precision or config.train.precision)
