"""What a checkpoint holds, and saving and restoring it.

A checkpoint holds the model and optimizer variables, the loss scale, the
step, the epoch, the position in the epoch and the carried recurrent state of
every row of the global batch (gathered from the replicas in row order).
"""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf

from dist_rnn.errors import UserError


class TrainingState(tf.Module):
    """Counters and carried state saved beside the model.

    Args:
        state_shapes: Shapes of the global carried-state tensors.
    """

    def __init__(self, state_shapes: list[tuple[int, int]]):
        super().__init__(name="training_state")
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.epoch = tf.Variable(1, dtype=tf.int64, trainable=False, name="epoch")
        self.batch_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="batch_in_epoch")
        self.carried = [tf.Variable(tf.zeros(shape, tf.float32), trainable=False, name=f"carried_{i}")
                        for i, shape in enumerate(state_shapes)]


class Checkpointer:
    """Rolling checkpoints in ``RUN_DIR/checkpoints`` via tf.train.CheckpointManager.

    Args:
        directory: Checkpoint folder.
        keep: Number of rolling checkpoints kept.
        **objects: Trackables to save (model, optimizer, state, ...).
    """

    def __init__(self, directory: Path, keep: int, **objects):
        self.directory = Path(directory)
        self.checkpoint = tf.train.Checkpoint(**objects)
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(self.directory), max_to_keep=keep)

    @property
    def latest(self) -> str | None:
        """Path prefix of the newest checkpoint, or None."""
        return self.manager.latest_checkpoint

    def save(self, step: int) -> str:
        """Saves a checkpoint numbered ``step`` and returns its path prefix."""
        return self.manager.save(checkpoint_number=step)

    def restore_latest(self) -> str | None:
        """Restores the newest checkpoint if there is one.

        Returns:
            The restored path prefix, or None for a fresh start.

        Raises:
            UserError: If the checkpoint is unreadable or does not match the
                model (the message names the file).
        """
        path = self.latest
        if path is None:
            return None
        try:
            self.checkpoint.restore(path).assert_existing_objects_matched()
        except (tf.errors.OpError, ValueError, AssertionError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise UserError(f"checkpoint {path} cannot be restored: {first[:300]}") from None
        return path
