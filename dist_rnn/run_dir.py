"""The run directory: where a run's config, vocabulary, checkpoints and logs live."""

from __future__ import annotations

from pathlib import Path

from dist_rnn.config import Config, config_from_dict, yaml_load
from dist_rnn.errors import UserError
from dist_rnn.data.vocab import Vocabulary

import yaml


class RunDirectory:
    """Paths inside a run directory.

    Layout: ``config.yaml`` (resolved config), ``vocab.json``, ``data.json``
    (SHA-256 of the training data's text), ``kernels.txt``, ``metrics.jsonl``,
    ``train.log``, ``report.png`` (``dist-rnn report``), ``checkpoints/``
    (rolling checkpoints), ``best/`` (the best checkpoint by validation loss),
    and TensorBoard event folders ``train/``, ``valid/``, ``test/`` (the
    profiler trace goes to ``train/``). Only this class spells these names.

    Args:
        path: The folder (created only when a run starts writing).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    config_file = property(lambda self: self.path / "config.yaml")
    vocab_file = property(lambda self: self.path / "vocab.json")
    data_file = property(lambda self: self.path / "data.json")
    kernels_file = property(lambda self: self.path / "kernels.txt")
    metrics_file = property(lambda self: self.path / "metrics.jsonl")
    log_file = property(lambda self: self.path / "train.log")
    report_file = property(lambda self: self.path / "report.png")
    restarts_file = property(lambda self: self.path / "restarts.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    best = property(lambda self: self.path / "best")

    def events(self, split: str) -> Path:
        """The TensorBoard event folder of ``split`` (``train``, ``valid``, ``test``; ``"."``: the run folder)."""
        return self.path if split == "." else self.path / split

    def has_config(self) -> bool:
        """Whether a run was started here."""
        return self.config_file.is_file()

    def load_config(self) -> Config:
        """Reads the saved config.

        Raises:
            UserError: If the folder is not a run directory or the file is bad.
        """
        if not self.path.is_dir():
            raise UserError(f"run directory not found: {self.path}")
        if not self.has_config():
            raise UserError(f"{self.path} is not a dist-rnn run directory (no config.yaml)")
        try:
            data = yaml_load(self.config_file.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            raise UserError(f"{self.config_file}: invalid YAML") from None
        return config_from_dict(data)

    def load_vocab(self) -> Vocabulary | None:
        """Reads the saved vocabulary, or None if there is none yet."""
        return Vocabulary.load(self.vocab_file) if self.vocab_file.is_file() else None

    def ensure(self) -> None:
        """Creates the folder."""
        self.path.mkdir(parents=True, exist_ok=True)
