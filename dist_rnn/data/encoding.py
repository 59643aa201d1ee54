"""The encoded corpus: vocabulary plus the three splits as token ids."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dist_rnn.config import DataConfig
from dist_rnn.data.corpora import load_splits
from dist_rnn.errors import UserError
from dist_rnn.data.vocab import Vocabulary, tokenize


@dataclass
class EncodedCorpus:
    """A corpus ready for batching.

    Attributes:
        vocab: The vocabulary (built from the training split, or reused).
        train: Training split ids.
        valid: Validation split ids (may be empty).
        test: Test split ids (may be empty).
        data_sha256: SHA-256 of the three splits' text (see
            :meth:`~dist_rnn.data.corpora.Splits.sha256`), to recognize the same
            data at another path.
    """

    vocab: Vocabulary
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    data_sha256: str = ""

    def split(self, name: str) -> np.ndarray:
        """Returns the ids of ``train``, ``valid`` or ``test``."""
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]

    def bits_per_byte(self, split: str, nats_per_token: float) -> None:
        """None: this in-memory corpus does not keep its text's byte counts (a prepared corpus does)."""
        return None


def encode_corpus(config: DataConfig, vocab: Vocabulary | None = None) -> EncodedCorpus:
    """Reads the configured corpus and encodes it.

    Args:
        config: The ``data`` section.
        vocab: A saved vocabulary to reuse (resume, eval, generate); if None a
            new one is built from the training split.

    Returns:
        The encoded corpus.

    Raises:
        UserError: If the data cannot be read or the training split is empty.
    """
    if config.level not in ("char", "word"):  # tokenize() would silently split bytes/subwords as words
        raise UserError(f"config key 'data.level': {config.level!r} tokens are read from prepared data "
                        "(dist_rnn.data.prepare), not by encode_corpus")
    splits = load_splits(config)
    train_tokens = tokenize(splits.train, config.level)
    if not train_tokens:
        raise UserError(f"data: the training split of corpus '{config.corpus}' is empty")
    if vocab is None:
        vocab = Vocabulary.build(train_tokens, config.level, config.max_vocab)
    return EncodedCorpus(vocab, vocab.encode(train_tokens),
                         vocab.encode(tokenize(splits.valid, config.level)),
                         vocab.encode(tokenize(splits.test, config.level)), splits.sha256())
