"""A prepared corpus on disk, read through ``numpy.memmap``.

The folder (written by :func:`dist_rnn.data.prepare.prepare_corpus`) holds one
flat little-endian token file per split, the tokenizer files and
``manifest.json``, written last. Opening it reads only the manifest: the token
files are mapped, and a batch reads only the pages of its own windows, so the
memory of a process does not grow with the corpus.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from dist_rnn.data.prepare import MANIFEST, SPLITS, prepare_corpus, read_manifest
from dist_rnn.data.tokenizers import load_tokenizer
from dist_rnn.errors import UserError


class PreparedCorpus:
    """The splits of a prepared folder as read-only memmaps, with its tokenizer and identity.

    Built by :meth:`open`. The trainer consumes it like an
    :class:`~dist_rnn.data.encoding.EncodedCorpus`: ``train``/``valid``/``test``,
    ``split(name)``, ``vocab`` and ``data_sha256``.

    Attributes:
        folder: The prepared folder.
        manifest: Its parsed ``manifest.json``.
        data_sha256: The identity of the prepared tokens (see :func:`prepared_identity`):
            what the workers of a job compare, and what ``RUN_DIR/data.json`` records.
    """

    def __init__(self, folder: Path, manifest: dict):
        self.folder = folder
        self.manifest = manifest
        self.data_sha256 = prepared_identity(folder, manifest)
        self._maps: dict[str, np.ndarray] = {}
        self._tokenizer = None

    @classmethod
    def open(cls, folder: str | Path) -> "PreparedCorpus":
        """Opens a complete prepared folder (reads and checks its manifest; maps nothing yet).

        Raises:
            UserError: If the folder has no manifest (not prepared, or a
                prepare was interrupted), or :func:`~dist_rnn.data.prepare.read_manifest`
                finds it damaged or of another format version.
        """
        folder = Path(folder).expanduser()
        if not (folder / MANIFEST).is_file():
            raise UserError(f"{folder}: not a prepared corpus (no {MANIFEST}; an interrupted prepare leaves "
                            f"none): run dist-rnn prepare")
        return cls(folder, read_manifest(folder))

    # ---------------------------------------------------------------- splits

    def split(self, name: str) -> np.ndarray:
        """The token ids of ``train``, ``valid`` or ``test`` as a read-only memmap (an empty array for 0 tokens)."""
        if name not in self._maps:
            tokens = self.tokens(name)
            dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
            if tokens == 0:  # mmap cannot map an empty file
                self._maps[name] = np.zeros(0, dtype)
            else:
                self._maps[name] = np.memmap(self._file(name), dtype=dtype, mode="r", shape=(tokens,))
        return self._maps[name]

    @property
    def train(self) -> np.ndarray:
        """Training split ids (memmap)."""
        return self.split("train")

    @property
    def valid(self) -> np.ndarray:
        """Validation split ids (memmap; may be empty)."""
        return self.split("valid")

    @property
    def test(self) -> np.ndarray:
        """Test split ids (memmap; may be empty)."""
        return self.split("test")

    def tokens(self, split: str) -> int:
        """Number of tokens of a split."""
        return int(self.manifest["splits"][split]["tokens"])

    def source_bytes(self, split: str) -> int:
        """UTF-8 bytes of the split's text (the denominator of bits per byte)."""
        return int(self.manifest["splits"][split]["source_bytes"])

    def bits_per_byte(self, split: str, nats_per_token: float) -> float | None:
        """Bits per source byte of a split from the mean loss per token; None for a split of 0 bytes."""
        return bits_per_byte(nats_per_token, self.tokens(split), self.source_bytes(split))

    # ------------------------------------------------------------- tokenizer

    @property
    def level(self) -> str:
        """The tokenizer kind: ``char``, ``byte``, ``word`` or ``subword``."""
        return self.manifest["tokenizer"]["kind"]

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        return int(self.manifest["vocab_size"])

    @property
    def tokenizer(self):
        """The tokenizer saved in the folder (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.folder)
        return self._tokenizer

    @property
    def vocab(self):
        """What the trainer, sampler and ``RUN_DIR/vocab.json`` use: the
        :class:`~dist_rnn.data.vocab.Vocabulary` of a char or word tokenizer, else the tokenizer itself."""
        return getattr(self.tokenizer, "vocab", self.tokenizer)

    def _file(self, split: str) -> Path:
        return self.folder / self.manifest["splits"][split]["file"]


def prepared_identity(folder: Path, manifest: dict) -> str:
    """SHA-256 naming the prepared tokens, equal for equal tokens wherever and whenever they were prepared.

    It covers the manifest's format version, tokenizer kind and files (their
    bytes), vocabulary size, dtype, per-split token and byte counts and the
    sources' sizes and checksums; not the creation time, the data section or
    the source paths, so a folder prepared per host, or data that moved, gives
    the same identity. Only the small tokenizer files are read.
    """
    h = hashlib.sha256()
    kept = {key: manifest.get(key) for key in ("format_version", "vocab_size", "dtype")}
    kept["kind"] = manifest["tokenizer"]["kind"]
    kept["splits"] = {name: [manifest["splits"][name]["tokens"], manifest["splits"][name]["source_bytes"]]
                      for name in SPLITS}
    kept["sources"] = sorted([s.get("size"), s.get("sha256")] for s in manifest.get("sources", []))
    h.update(json.dumps(kept, sort_keys=True).encode("utf-8"))
    for name in manifest["tokenizer"].get("files", []):
        path = folder / name
        h.update(name.encode("utf-8") + b"\0")
        h.update(path.read_bytes() if path.is_file() else b"<missing>")
    return h.hexdigest()


def bits_per_byte(nats_per_token: float, tokens: int, source_bytes: int) -> float | None:
    """Bits per source byte: ``nats_per_token * tokens / source_bytes / ln 2`` (None for 0 bytes).

    Comparable across tokenizers: it charges the whole split's text, however
    it was cut into tokens.
    """
    if source_bytes <= 0:
        return None
    return nats_per_token * tokens / source_bytes / math.log(2)


def load_corpus(data_config) -> PreparedCorpus:
    """The ONE entry point to a run's data: prepares the corpus if needed, then opens it.

    Args:
        data_config: The ``data`` section.

    Returns:
        The prepared corpus (a complete folder with unchanged sources is
        reused, see :func:`dist_rnn.data.prepare.prepare_corpus`).

    Raises:
        UserError: On bad data (see ``prepare_corpus`` and :meth:`PreparedCorpus.open`).
    """
    return PreparedCorpus.open(prepare_corpus(data_config))
