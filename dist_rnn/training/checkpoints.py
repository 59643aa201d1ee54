"""What a checkpoint holds, and saving and restoring it safely.

A checkpoint holds the model and optimizer variables, the loss scale, the
step, the epoch, the position in the epoch, the carried recurrent state of
every row of the global batch (gathered from the replicas in row order, so a
run can resume on another replica count) and a fingerprint of the
resume-invariant config keys and the vocabulary. Dropout needs no
random-generator state: its masks are a pure function of (seed, step, replica).
The loss scale exists only under ``mixed_float16``: a checkpoint saved in
another precision has none, and a run resumed in ``mixed_float16`` from it
starts a fresh loss scale.

The best checkpoint (``RUN_DIR/best``) holds the same, as of the evaluation
that made it the best.

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

from dist_rnn.config import RESUME_INVARIANT_KEYS, Config, flatten, resume_invariant_values
from dist_rnn.errors import UserError, first_line
from dist_rnn.run_dir import RunDirectory

log = logging.getLogger("dist_rnn")

# Checkpointed objects a checkpoint may lack: the loss scale exists only under
# mixed_float16, so a checkpoint saved in another precision has none.
OPTIONAL_OBJECTS = ("loss_scale",)
# The training recipe's objects (issue #19) exist only when their keys are on:
# a resume that turns one on starts it fresh.
OPTIONAL_OBJECTS += ("evaluation_history", "weight_average")
# Saved only with train.variable_length, which may be turned on only at an epoch's start (position 0).
OPTIONAL_OBJECTS += ("stream_position",)
BEST_RECORD = "best.json"  # beside the best checkpoint: its step, loss, perplexity and file name
# Top-level entries tf.train.Checkpoint writes itself, beside the saved objects.
_CHECKPOINT_BOOKKEEPING = ("save_counter", "_CHECKPOINTABLE_OBJECT_GRAPH")
_FINGERPRINT_KEY = "training_state/fingerprint/.ATTRIBUTES/VARIABLE_VALUE"


def fingerprint(resume_invariant: dict, vocab_tokens: list[str]) -> str:
    """SHA-256 of the resume-invariant config values and the vocabulary."""
    payload = json.dumps({"config": resume_invariant, "vocab": vocab_tokens}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def run_fingerprint(config: Config, vocab_tokens: list[str]) -> str:
    """The :func:`fingerprint` of a run: its :data:`~dist_rnn.config.RESUME_INVARIANT_KEYS` and vocabulary."""
    return fingerprint(resume_invariant_values(config), vocab_tokens)


def accepted_fingerprints(config: Config, vocab_tokens: list[str]) -> tuple[str, str]:
    """The run's fingerprint, and the one of checkpoints written before data moves were allowed.

    Those fingerprints also covered ``data.path`` and ``data.train_file``: a
    checkpoint carrying one is accepted while the data stays where it was,
    and carries the current fingerprint from its next save on.
    """
    flat = flatten(config.to_dict())
    legacy = {**resume_invariant_values(config), **{k: flat[k] for k in ("data.path", "data.train_file")}}
    return run_fingerprint(config, vocab_tokens), fingerprint(legacy, vocab_tokens)


def read_best_record(best_directory: Path) -> dict | None:
    """``{"step", "loss", "perplexity", "checkpoint"}`` from ``best_directory/best.json``, or None."""
    try:
        return json.loads((Path(best_directory) / BEST_RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def find_checkpoint(run_dir: RunDirectory | Path, choice: str) -> str:
    """Resolves ``--checkpoint best|latest|PATH`` of a run to a checkpoint path prefix.

    Args:
        run_dir: The run directory (or its path).
        choice: ``latest`` (newest rolling checkpoint in ``RUN_DIR/checkpoints``),
            ``best`` (``RUN_DIR/best``, the lowest validation loss so far) or a
            checkpoint path prefix (``.../ckpt-20``) or a folder of checkpoints
            (its newest).

    Returns:
        The path prefix of an existing checkpoint.

    Raises:
        UserError: If there is no such checkpoint.
    """
    rd = run_dir if isinstance(run_dir, RunDirectory) else RunDirectory(run_dir)
    if choice == "latest":
        path = tf.train.latest_checkpoint(str(rd.checkpoints))
        if path is None:
            raise UserError(f"{rd.checkpoints} holds no checkpoint")
        return path
    if choice == "best":
        record = read_best_record(rd.best)
        if record is None or "checkpoint" not in record:
            raise UserError(f"--checkpoint best: {rd.path} has no best checkpoint yet ({rd.best / BEST_RECORD} "
                            f"is written at the first evaluation on a non-empty validation split)")
        path = rd.best / record["checkpoint"]
        if not Path(f"{path}.index").is_file():
            raise UserError(f"--checkpoint best: {rd.best / BEST_RECORD} names {path}, which is missing")
        return str(path)
    given = Path(choice).expanduser()
    if Path(f"{given}.index").is_file():
        return str(given)
    if given.is_dir():
        path = tf.train.latest_checkpoint(str(given))
        if path is not None:
            return path
    raise UserError(f"--checkpoint {choice}: no checkpoint there (give best, latest, a checkpoint path such as "
                    f"{rd.checkpoints / 'ckpt-20'}, or a folder of checkpoints)")


def check_fingerprint(path: str, expected: str | tuple[str, ...]) -> None:
    """Refuses a checkpoint whose saved fingerprint is not ``expected`` (or one of them).

    Raises:
        UserError: If the checkpoint was written by a run with other
            resume-invariant keys or another vocabulary.
    """
    try:
        found = tf.train.load_checkpoint(path).get_tensor(_FINGERPRINT_KEY)
    except (tf.errors.OpError, ValueError, IndexError, KeyError):
        return  # no fingerprint saved (or unreadable, which restoring reports): nothing to compare
    _compare_fingerprints(path, found.decode() if isinstance(found, bytes) else str(found), expected)


def _compare_fingerprints(path: str, found: str, expected: str | tuple[str, ...]) -> None:
    accepted = (expected,) if isinstance(expected, str) else tuple(expected)
    expected = accepted[0]
    if found and found not in accepted:
        raise UserError(f"checkpoint {path} was written by another run: its model, vocabulary or resume-invariant "
                        f"keys ({', '.join(RESUME_INVARIANT_KEYS)}) differ "
                        f"(fingerprint {found[:12]}... != {expected[:12]}...)")


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


class StreamPosition(tf.Module):
    """Tokens of each row consumed in the current epoch, saved with ``train.variable_length``.

    With variable-length windows the batch count of an epoch does not say
    where its rows stand; this does, so a resume continues each row exactly
    where the last window ended.
    """

    def __init__(self):
        super().__init__(name="stream_position")
        self.tokens_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="tokens_in_epoch")


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
        self.objects = objects
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
        return None if self.best_directory is None else read_best_record(self.best_directory)

    def save_best(self, step: int, record: dict) -> str:
        """Replaces the best checkpoint with the current objects and records its metrics.

        The caller sets the training state (step, epoch, position, carried
        state) to the moment of the evaluation first, so the best checkpoint
        is whole.
        """
        if self._best_manager is None:
            self._best_manager = tf.train.CheckpointManager(self.checkpoint, str(self.best_directory), max_to_keep=1)
        path = self._best_manager.save(checkpoint_number=step)
        tmp = self.best_directory / f"{BEST_RECORD}.tmp"
        tmp.write_text(json.dumps({**record, "step": step, "checkpoint": Path(path).name}) + "\n")
        tmp.replace(self.best_directory / BEST_RECORD)
        return path

    def restore(self, path: str, expected_fingerprint: str | tuple[str, ...] | None = None,
                state: TrainingState | None = None) -> str:
        """Restores one checkpoint.

        Only the objects this Checkpointer holds are restored: a checkpoint's
        others (a loss scale saved in another precision; the optimizer and
        training state when only the model is loaded for inference) are left
        unread. A checkpoint without a loss scale (saved in another precision)
        leaves the loss scale as built: it starts fresh.

        Args:
            path: The checkpoint path prefix.
            expected_fingerprint: Refuse a checkpoint of another run: the
                run's fingerprint, or a tuple of accepted ones (the first is
                the current one, kept in ``state`` after the restore).
            state: The TrainingState whose fingerprint is checked; without
                one, the fingerprint saved in the checkpoint file is.

        Returns:
            ``path``.

        Raises:
            UserError: If the checkpoint is unreadable (naming its files) or
                was written by another run (its fingerprint differs).
        """
        if expected_fingerprint is not None and state is None:
            check_fingerprint(path, expected_fingerprint)
        try:
            saved = {name.split("/", 1)[0] for name, _ in tf.train.list_variables(path)}
            absent = [name for name in OPTIONAL_OBJECTS if name in self.objects and name not in saved]
            unused = [name for name in saved - set(self.objects) if name not in _CHECKPOINT_BOOKKEEPING]
            checkpoint = self.checkpoint
            if absent:
                checkpoint = tf.train.Checkpoint(**{k: v for k, v in self.objects.items() if k not in absent})
            status = checkpoint.restore(path)
            if unused:  # e.g. a mixed_float16 loss scale resumed in float32, or the optimizer at inference: no warning
                status.expect_partial()
            status.assert_existing_objects_matched()
        except (tf.errors.OpError, ValueError, AssertionError, IndexError, KeyError) as e:
            # A truncated file surfaces as IndexError ("Read less bytes
            # than requested") from the checkpoint reader.
            raise _Unreadable(path, first_line(e)) from None
        if "loss_scale" in absent:
            log.info(f"checkpoint {path} has no loss scale (saved in another train.precision): "
                     "the loss scale starts fresh at train.loss_scale.initial")
        if expected_fingerprint is not None and state is not None:
            _compare_fingerprints(path, state.fingerprint.numpy().decode(), expected_fingerprint)
            current = expected_fingerprint if isinstance(expected_fingerprint, str) else expected_fingerprint[0]
            state.fingerprint.assign(current)
        return path

    def restore_latest(self, fallback: bool = False, expected_fingerprint: str | tuple[str, ...] | None = None,
                       state: TrainingState | None = None) -> str | None:
        """Restores the newest checkpoint that loads, if any.

        Args:
            fallback: If the newest checkpoint is corrupt, try older ones
                instead of failing.
            expected_fingerprint: Refuse a checkpoint of another run.
            state: The TrainingState whose fingerprint is checked.

        Returns:
            The restored path prefix, or None for a fresh start.

        Raises:
            UserError: If a checkpoint is unreadable (naming the file; with
                the hint to set ``checkpoint.fallback``) or was written by
                another run.
        """
        candidates = list(reversed(self.manager.checkpoints))
        for i, path in enumerate(candidates):
            try:
                return self.restore(path, expected_fingerprint, state)
            except _Unreadable as e:
                older = candidates[i + 1:]
                if fallback and older:
                    log.warning(f"warning: checkpoint {_files_of(path)} is unreadable ({e.reason}); "
                                f"falling back to {older[0]}")
                    continue
                hint = " (set --set checkpoint.fallback=true to resume from the previous one)" if older else ""
                raise UserError(f"{e}{hint}") from None
        return None


class _Unreadable(UserError):
    """A checkpoint that cannot be read; ``reason`` is the first line of the cause."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"checkpoint {_files_of(path)} is unreadable: {reason}")
        self.reason = reason


def _files_of(prefix: str) -> str:
    files = sorted(str(p) for p in Path(prefix).parent.glob(Path(prefix).name + ".*"))
    return ", ".join(files) if files else prefix
