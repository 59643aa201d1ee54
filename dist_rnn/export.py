"""Exporting a trained run for serving, and sampling from an export without the training code.

``dist-rnn export --run-dir RUN --out DIR`` writes::

    DIR/saved_model/   TensorFlow SavedModel with two signatures and the tokenizer as assets
                       (saved_model/assets/vocab.json, and spm.model for subwords)
    DIR/model.keras    the Keras model (loading it needs dist_rnn installed: custom classes)
    DIR/vocab.json     the tokenizer, as the run's vocab.json (same file as the asset)
    DIR/spm.model      a subword run's SentencePiece model (same file as the asset)
    DIR/export.json    what was exported: level, sizes, source checkpoint, versions

Signatures of the SavedModel (all token ids int32, all other tensors float32):

* ``serve(tokens [B, T]) -> {"logits": [B, V]}``: next-token logits after
  the whole sequence, starting from the zero state.
* ``step(tokens [B, T], state_0 .. state_{N-1} [B, H]) -> {"logits": [B, V],
  "state_0": .., ...}``: runs ``T`` (typically 1) tokens from the given state
  and returns the next-token logits and the new state, for streaming
  generation. ``N`` is ``num_state_tensors`` of ``export.json`` (two per LSTM
  layer, one per GRU or RNN layer), ``H`` its ``hidden_size`` (a projected
  LSTM's ``h`` states have ``model.projection_size``: ``state_sizes`` of
  ``export.json``); the zero state starts a sequence. For ``model.output:
  adaptive`` the logits are exact log-probabilities.

The signatures are traced with ``lstm``/``gru`` off cuDNN (dist-rnn's fused
recurrence, same weights), even when exporting on a GPU machine: a traced
``CudnnRNNV3`` op has no CPU kernel, so such a SavedModel would serve on GPUs
only. One export serves on CPU and GPU. Likewise the compiled CPU ops
(``DIST_RNN_COMPILED_KERNELS=on``) are not traced: the export loads without
dist-rnn's op library.

:class:`ExportedModel` loads an export with ``tf.saved_model.load`` only (it
never imports :mod:`dist_rnn.models.model`), reads the tokenizer from the
export's files and turns text into text (:meth:`ExportedModel.generate`);
the signatures take token ids (the tokenizers run in Python: SentencePiece
has no TensorFlow op without ``tensorflow_text``).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import tensorflow as tf

from dist_rnn import __version__
from dist_rnn.errors import UserError, first_line
from dist_rnn.data.tokenizers import SPM_FILE, Tokenizer, load_tokenizer

EXPORT_FORMAT = "dist-rnn-export"
EXPORT_FORMAT_VERSION = 1
SAVED_MODEL_DIR = "saved_model"
KERAS_FILE = "model.keras"
VOCAB_FILE = "vocab.json"
INFO_FILE = "export.json"
# What an export consists of: the only entries replaced when re-exporting into a previous export.
EXPORT_ENTRIES = (SAVED_MODEL_DIR, KERAS_FILE, VOCAB_FILE, SPM_FILE, INFO_FILE)


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by :func:`export_run` (it has a valid ``export.json``)."""
    info = Path(path) / INFO_FILE
    try:
        return json.loads(info.read_text(encoding="utf-8")).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_out_dir(out: Path) -> None:
    """Refuses an ``--out`` that is a file, or a non-empty folder that is not a previous export."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise UserError(f"--out {out} is not empty and is not a previous dist-rnn export; "
                        "refusing to overwrite it (give a new or empty folder)")


class _ServingModule(tf.Module):
    """The tf.Module saved as the SavedModel: the model, the tokenizer's files as assets and the signatures."""

    def __init__(self, model, tokenizer_files: list[Path]):
        super().__init__(name="dist_rnn_export")
        self.model = model
        self.vocabulary = tf.saved_model.Asset(str(tokenizer_files[0]))  # vocab.json
        self.tokenizer_files = [tf.saved_model.Asset(str(path)) for path in tokenizer_files[1:]]  # spm.model
        tokens = tf.TensorSpec([None, None], tf.int32, name="tokens")
        states = [tf.TensorSpec([None, size], tf.float32, name=f"state_{i}")
                  for i, size in enumerate(model.state_sizes)]
        self.serve = tf.function(self._serve, input_signature=[tokens])
        self.step = tf.function(self._step, input_signature=[tokens, states])

    def _serve(self, tokens):
        logits, _ = self.model(tokens, None, training=False, last_only=True)
        return {"logits": logits[:, -1, :]}

    def _step(self, tokens, states):
        logits, new_states = self.model(tokens, tuple(states), training=False, last_only=True)
        out = {"logits": logits[:, -1, :]}
        out.update({f"state_{i}": s for i, s in enumerate(new_states)})
        return out


def _checkpoint_step(path: str) -> int | None:
    match = re.search(r"-(\d+)$", path)
    return int(match.group(1)) if match else None


def export_run(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "latest") -> dict:
    """Exports a checkpoint of a run (float32) as a SavedModel and a ``.keras`` file.

    Everything is written to a staging folder beside ``out_dir`` first and
    moved in at the end, so a failed export leaves ``out_dir`` as it was.

    Args:
        run_dir: The training run.
        out_dir: Destination folder: new, empty or a previous export (whose
            export entries are replaced; other files in it are kept).
        checkpoint: ``latest`` (default), ``best`` or a checkpoint path (see
            :func:`dist_rnn.training.checkpoints.find_checkpoint`).

    Returns:
        The contents of ``export.json`` plus ``"path"``.

    Raises:
        UserError: Bad ``out_dir``, run directory or checkpoint.
    """
    from dist_rnn.inference import load_model_for_inference
    from dist_rnn.models.kernels import compiled

    out = Path(out_dir)
    _check_out_dir(out)
    model, tokenizer, config, checkpoint = load_model_for_inference(str(run_dir), checkpoint, command="export",
                                                                    allow_cudnn=False)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    except OSError as e:
        raise UserError(f"cannot write the export to {out}: {e.strerror or e}") from None
    try:
        files = tokenizer.save(staging, record_name=VOCAB_FILE)
        module = _ServingModule(model, [staging / name for name in files])
        with compiled.graph_recurrence_only():  # the export must load without dist-rnn's op library
            tf.saved_model.save(module, str(staging / SAVED_MODEL_DIR),
                                signatures={"serve": module.serve, "step": module.step.get_concrete_function()})
        model.save(str(staging / KERAS_FILE))
        info = _export_info(model, tokenizer, config, run_dir, checkpoint)
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        _move_into(staging, out)
    except OSError as e:
        raise UserError(f"cannot write the export to {out}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {**info, "path": str(out)}


def _export_info(model, tokenizer: Tokenizer, config, run_dir: str | Path, checkpoint: str) -> dict:
    """The contents of ``export.json``: what was exported, from where, with which versions."""
    from dataclasses import asdict

    import keras

    from dist_rnn.models.model import kernel_report

    kernels = kernel_report(config.model, bool(tf.config.list_logical_devices("GPU")), export=True)
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "level": tokenizer.kind,
        "vocab_size": tokenizer.size,
        "num_state_tensors": model.num_state_tensors,
        "hidden_size": config.model.hidden_size,
        "state_sizes": list(model.state_sizes),
        "model": asdict(config.model),
        "precision": "float32",
        "kernels": [k.line() for k in kernels],
        "source_run": str(Path(run_dir).resolve()),
        "source_checkpoint": str(Path(checkpoint).resolve()),
        "step": _checkpoint_step(checkpoint),
        "signatures": {
            "serve": "tokens int32 [B, T] -> logits float32 [B, V] (after the last token, zero start state)",
            "step": "tokens int32 [B, T], state_i float32 [B, H] -> logits [B, V], state_i [B, H]",
        },
        "dist_rnn_version": __version__,
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
    }


def _move_into(staging: Path, out: Path) -> None:
    """Replaces the export entries of ``out`` with those of ``staging`` (other files in ``out`` stay).

    An entry the new export lacks (``spm.model`` of a previous subword export) is removed.
    """
    out.mkdir(parents=True, exist_ok=True)
    for name in EXPORT_ENTRIES:  # export.json last: a folder without it is no export
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        if (staging / name).exists():
            (staging / name).rename(target)


class ExportedModel:
    """An export loaded with ``tf.saved_model.load``: no training code, no dist_rnn model classes.

    Args:
        path: A folder written by :func:`export_run`.

    Attributes:
        path: The export folder.
        info: Contents of ``export.json``.
        tokenizer: The run's tokenizer (read from the export's files).
        num_state_tensors: Length of the flat state.
        hidden_size: Width of the first state tensor.
        state_sizes: Width of each state tensor.

    Raises:
        UserError: If ``path`` is not a readable export.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"exported model not found: {self.path}")
        if not is_export(self.path):
            hint = " (it is a training run: use --run-dir)" if (self.path / "config.yaml").is_file() else ""
            raise UserError(f"{self.path} is not a dist-rnn export (no valid {INFO_FILE}){hint}")
        self.info = json.loads((self.path / INFO_FILE).read_text(encoding="utf-8"))
        vocab_file = self.path / VOCAB_FILE
        if not vocab_file.is_file():  # fall back to the copy inside the SavedModel
            vocab_file = self.path / SAVED_MODEL_DIR / "assets" / VOCAB_FILE
        self.tokenizer = load_tokenizer(vocab_file)
        try:
            self._loaded = tf.saved_model.load(str(self.path / SAVED_MODEL_DIR))
        except (OSError, ValueError, tf.errors.OpError) as e:
            raise UserError(f"{self.path / SAVED_MODEL_DIR}: cannot load the SavedModel: {first_line(e)}") from None
        signatures = self._loaded.signatures
        missing = [name for name in ("serve", "step") if name not in signatures]
        if missing:
            raise UserError(f"{self.path / SAVED_MODEL_DIR} lacks the signature(s) {', '.join(missing)}")
        self._serve, self._step = signatures["serve"], signatures["step"]
        inputs = self._step.structured_input_signature[1]
        self.num_state_tensors = sum(1 for name in inputs if name.startswith("state_"))
        self.hidden_size = int(inputs["state_0"].shape[-1]) if self.num_state_tensors else 0
        self._state_names = [f"state_{i}" for i in range(self.num_state_tensors)]
        # A projected LSTM's h is narrower than its c: each state has its own width.
        self.state_sizes = [int(inputs[name].shape[-1]) for name in self._state_names]
        vocab_size = self._serve.structured_outputs["logits"].shape[-1]
        if vocab_size is not None and vocab_size != self.tokenizer.size:
            raise UserError(f"{self.path}: the model has {vocab_size} outputs but the vocabulary "
                            f"{self.tokenizer.size} tokens")

    @property
    def level(self) -> str:
        """The tokenizer kind: ``char``, ``byte``, ``word`` or ``subword``."""
        return self.tokenizer.kind

    def initial_state(self, batch_size: int) -> tuple:
        """Zero state: a tuple of float32 ``[batch_size, size]`` tensors, one per state input of ``step``."""
        return tuple(tf.zeros([batch_size, size], tf.float32) for size in self.state_sizes)

    def logits(self, tokens) -> np.ndarray:
        """Next-token logits ``[B, V]`` after int ``[B, T]`` tokens, from the zero state (``serve``)."""
        return self._serve(tokens=tf.cast(tokens, tf.int32))["logits"].numpy()

    def step(self, tokens, states=None) -> tuple:
        """Runs int ``[B, T]`` tokens from ``states`` (None: zeros) with the ``step`` signature.

        Returns:
            ``(logits, states)``: float32 ``[B, V]`` next-token logits and the new state tuple.
        """
        tokens = tf.cast(tokens, tf.int32)
        if states is None:
            states = self.initial_state(tf.shape(tokens)[0])
        if len(states) != self.num_state_tensors:
            raise ValueError(f"expected {self.num_state_tensors} state tensors, got {len(states)}")
        out = self._step(tokens=tokens, **dict(zip(self._state_names, states)))
        return out["logits"], tuple(out[name] for name in self._state_names)

    def step_fn(self, tokens, states):
        """:class:`~dist_rnn.generation.Sampler` step function: logits get a time axis of 1, ``[B, 1, V]``."""
        logits, states = self.step(tokens, states)
        return logits[:, None, :], states

    def sampler(self):
        """A :class:`~dist_rnn.generation.Sampler` on this export."""
        from dist_rnn.generation import Sampler

        return Sampler(self.step_fn, self.tokenizer)

    def generate(self, prime: str = "", length: int = 200, **sampling) -> list[str]:
        """Text in, text out: continuations of ``prime`` (the prime excluded).

        Args:
            prime: The text to continue.
            length: Tokens to generate.
            **sampling: ``temperature``, ``top_k``, ``top_p``, ``seed``,
                ``num_samples`` of :meth:`~dist_rnn.generation.Sampler.generate`.

        Returns:
            One text per sample.
        """
        ids = self.sampler().generate(prime, length, **sampling)
        return [self.tokenizer.decode(row) for row in ids]
