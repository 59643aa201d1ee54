"""Loading a finished or running run for evaluation, generation and export.

A run is read, never written: its saved config (with ``--set`` overrides of
where its data lives, :data:`~dist_rnn.config.DATA_LOCATION_KEYS`), its
vocabulary and one checkpoint, restored through
:meth:`dist_rnn.training.checkpoints.Checkpointer.restore`, the code that
resumes training, with the same fingerprint check and one-line errors.
"""

from __future__ import annotations

from dist_rnn.config import DATA_LOCATION_KEYS, Config, changed_keys, load_config
from dist_rnn.errors import UserError
from dist_rnn.run_dir import RunDirectory
from dist_rnn.runtime import import_tensorflow, setup_tensorflow


def inference_config(rd: RunDirectory, overrides: list[str], command: str) -> Config:
    """The saved config of a run with ``--set`` overrides of where its data is read from.

    Args:
        rd: The run directory.
        overrides: ``KEY=VALUE`` strings.
        command: The command, for messages.

    Raises:
        UserError: If an override changes a key outside
            :data:`~dist_rnn.config.DATA_LOCATION_KEYS`, or is invalid.
    """
    saved = rd.load_config()
    if not overrides:
        return saved
    config = load_config([], overrides, base=saved.to_dict())
    others = [c for c in changed_keys(saved, config) if c.split(":", 1)[0] not in DATA_LOCATION_KEYS]
    if others:
        raise UserError(f"{command} --set may change only where the data is read from "
                        f"({', '.join(DATA_LOCATION_KEYS)}), not " + "; ".join(others))
    return config


def load_model_for_inference(run_dir: str, checkpoint: str = "latest", overrides: list[str] = (),
                             command: str = "generate", allow_cudnn: bool = True):
    """Builds the model of a run and restores a checkpoint's weights (float32, one device).

    Args:
        run_dir: The training run.
        checkpoint: ``latest``, ``best`` or a checkpoint path (see
            :func:`~dist_rnn.training.checkpoints.find_checkpoint`).
        overrides: ``--set`` of :data:`~dist_rnn.config.DATA_LOCATION_KEYS`.
        command: The command, for messages.
        allow_cudnn: False keeps ``lstm``/``gru`` off cuDNN even on a GPU (for a portable export).

    Returns:
        ``(model, vocab, config, checkpoint_path)``.

    Raises:
        UserError: No such checkpoint, one of another run, or unreadable.
    """
    rd = RunDirectory(run_dir)
    config = inference_config(rd, overrides, command)
    vocab = rd.load_vocab()
    if vocab is None:
        raise UserError(f"{rd.path} has no vocab.json")
    import_tensorflow()

    from dist_rnn.models.model import build_model
    from dist_rnn.training.checkpoints import Checkpointer, accepted_fingerprints, find_checkpoint

    path = find_checkpoint(rd.path, checkpoint)
    setup_tensorflow(config, precision="float32")
    if config.model.cudnn == "require":
        # Same weights; sampling and export must also work where cuDNN cannot run.
        config.model.cudnn = "auto"
    model = build_model(config.model, len(vocab), config.train.seed, allow_cudnn=allow_cudnn)
    # Only the model: the checkpoint's optimizer and training state are left unread.
    checkpointer = Checkpointer(rd.checkpoints, config.checkpoint.keep, model=model)
    checkpointer.restore(path, accepted_fingerprints(config, vocab.tokens))
    return model, vocab, config, path
