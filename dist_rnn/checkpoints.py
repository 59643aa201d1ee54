"""What a checkpoint holds, and saving and restoring it safely.

A checkpoint holds the model and optimizer variables, the loss scale, the
step, the epoch, the position in the epoch, the carried recurrent state of
every row of the global batch (gathered from the replicas in row order, so a
run can resume on another replica count) and a fingerprint of the
model-defining config and the vocabulary. Dropout needs no random-generator
state: its masks are a pure function of (seed, step, replica).

Saving is atomic as TensorFlow does it: data and index files are written
first and the ``checkpoint`` state file, which names the newest complete
checkpoint, is replaced last, so a process killed mid-save leaves the previous
checkpoint as the newest.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import tensorflow as tf

from dist_rnn.errors import UserError

log = logging.getLogger("dist_rnn")


def fingerprint(model_defining: dict, vocab_tokens: list[str]) -> str:
    """SHA-256 of the model-defining config values and the vocabulary."""
    payload = json.dumps({"config": model_defining, "vocab": vocab_tokens}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class TrainingState(tf.Module):
    """Counters, carried state and fingerprint saved beside the model.

    Args:
        state_shapes: Shapes of the global carried-state tensors.
        fingerprint: Fingerprint of this run's model and vocabulary.
    """

    def __init__(self, state_shapes: list[tuple[int, int]], fingerprint: str = ""):
        super().__init__(name="training_state")
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.epoch = tf.Variable(1, dtype=tf.int64, trainable=False, name="epoch")
        self.batch_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="batch_in_epoch")
        self.fingerprint = tf.Variable(fingerprint, dtype=tf.string, trainable=False, name="fingerprint")
        self.carried = [tf.Variable(tf.zeros(shape, tf.float32), trainable=False, name=f"carried_{i}")
                        for i, shape in enumerate(state_shapes)]


class Checkpointer:
    """Rolling checkpoints in ``RUN_DIR/checkpoints`` and the best one in ``RUN_DIR/best``.

    Args:
        directory: Rolling checkpoint folder.
        keep: Number of rolling checkpoints kept.
        best_directory: Folder of the best checkpoint by validation loss.
        **objects: Trackables to save (model, optimizer, training_state, ...).
    """

    def __init__(self, directory: Path, keep: int, best_directory: Path | None = None, **objects):
        self.directory = Path(directory)
        self.best_directory = Path(best_directory) if best_directory else None
        self.checkpoint = tf.train.Checkpoint(**objects)
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(self.directory), max_to_keep=keep)
        self._best_manager = None

    @property
    def latest(self) -> str | None:
        """Path prefix of the newest complete checkpoint, or None."""
        return self.manager.latest_checkpoint

    def save(self, step: int) -> str:
        """Saves a rolling checkpoint numbered ``step`` and returns its path prefix."""
        return self.manager.save(checkpoint_number=step)

    def best_record(self) -> dict | None:
        """``{"step", "loss", "perplexity", "checkpoint"}`` of the best checkpoint, or None."""
        if self.best_directory is None or not (self.best_directory / "best.json").is_file():
            return None
        try:
            return json.loads((self.best_directory / "best.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def save_best(self, step: int, record: dict) -> str:
        """Replaces the best checkpoint with the current state and records its metrics."""
        if self._best_manager is None:
            self._best_manager = tf.train.CheckpointManager(self.checkpoint, str(self.best_directory), max_to_keep=1)
        path = self._best_manager.save(checkpoint_number=step)
        tmp = self.best_directory / "best.json.tmp"
        tmp.write_text(json.dumps({**record, "step": step, "checkpoint": Path(path).name}) + "\n")
        tmp.replace(self.best_directory / "best.json")
        return path

    def restore_latest(self, fallback: bool = False, expected_fingerprint: str | None = None,
                       state: TrainingState | None = None) -> str | None:
        """Restores the newest checkpoint that loads, if any.

        Args:
            fallback: If the newest checkpoint is corrupt, try older ones
                instead of failing.
            expected_fingerprint: Refuse a checkpoint of another model.
            state: The TrainingState whose fingerprint is checked.

        Returns:
            The restored path prefix, or None for a fresh start.

        Raises:
            UserError: If a checkpoint is unreadable (naming the file; with
                the hint to set ``checkpoint.fallback``) or was written by a
                different model or vocabulary.
        """
        candidates = list(reversed(self.manager.checkpoints))
        for i, path in enumerate(candidates):
            try:
                self.checkpoint.restore(path).assert_existing_objects_matched()
            except (tf.errors.OpError, ValueError, AssertionError, IndexError, KeyError) as e:
                # A truncated file surfaces as IndexError ("Read less bytes
                # than requested") from the checkpoint reader.
                reason = _first_line(e)
                older = candidates[i + 1:]
                if fallback and older:
                    log.warning(f"warning: checkpoint {_files_of(path)} is unreadable ({reason}); "
                                f"falling back to {older[0]}")
                    continue
                hint = " (set --set checkpoint.fallback=true to resume from the previous one)" if older else ""
                raise UserError(f"checkpoint {_files_of(path)} is unreadable: {reason}{hint}") from None
            if expected_fingerprint is not None and state is not None:
                found = state.fingerprint.numpy().decode()
                if found and found != expected_fingerprint:
                    raise UserError(f"checkpoint {path} was written by a different model or vocabulary "
                                    f"(fingerprint {found[:12]}... != {expected_fingerprint[:12]}...)")
            return path
        return None


def _files_of(prefix: str) -> str:
    files = sorted(str(p) for p in Path(prefix).parent.glob(Path(prefix).name + ".*"))
    return ", ".join(files) if files else prefix


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else error.__class__.__name__)[:300]
