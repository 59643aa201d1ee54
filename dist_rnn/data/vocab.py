"""Vocabulary: tokenize text and map tokens to ids and back."""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Iterable

import numpy as np

from dist_rnn.errors import UserError

UNK = "<unk>"
EOS = "<eos>"


def tokenize(text: str, level: str) -> list[str]:
    """Splits text into tokens.

    Args:
        text: Raw text.
        level: ``char`` (every character is a token) or ``word`` (whitespace
            separated words, each newline becomes ``<eos>``, as in the PTB
            reader).

    Returns:
        The token list.
    """
    if level == "char":
        return list(text)
    tokens: list[str] = []
    for line in text.splitlines(keepends=True):
        tokens.extend(line.split())
        if line.endswith("\n"):
            tokens.append(EOS)
    return tokens


class Vocabulary:
    """Token <-> id mapping with ``<unk>`` for tokens outside it.

    Ids are assigned ``<unk>`` first, then by descending training frequency,
    ties broken by the token itself, so a corpus always gives the same ids.

    Attributes:
        tokens: Token of each id.
        level: ``char`` or ``word``.
        unk_id: Id of ``<unk>``.
    """

    def __init__(self, tokens: list[str], level: str):
        if UNK not in tokens:
            raise ValueError("a vocabulary must contain <unk>")
        self.tokens = list(tokens)
        self.level = level
        self._ids = {t: i for i, t in enumerate(self.tokens)}
        self.unk_id = self._ids[UNK]

    @classmethod
    def build(cls, tokens: Iterable[str], level: str, max_size: int | None = None) -> "Vocabulary":
        """Builds a vocabulary from training tokens.

        Args:
            tokens: Training tokens.
            level: ``char`` or ``word``.
            max_size: Keep at most this many entries, ``<unk>`` included.
        """
        counts = collections.Counter(tokens)
        counts.pop(UNK, None)
        ordered = sorted(counts, key=lambda t: (-counts[t], t))
        if max_size is not None:
            ordered = ordered[: max_size - 1]
        return cls([UNK] + ordered, level)

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.tokens == other.tokens and self.level == other.level

    def encode(self, tokens: list[str]) -> np.ndarray:
        """Maps tokens to an int32 id array (unknown tokens to ``<unk>``)."""
        ids, unk = self._ids, self.unk_id
        return np.fromiter((ids.get(t, unk) for t in tokens), dtype=np.int32, count=len(tokens))

    def encode_text(self, text: str) -> np.ndarray:
        """Tokenizes and encodes raw text."""
        return self.encode(tokenize(text, self.level))

    def unknown(self, tokens: list[str]) -> list[str]:
        """Returns the distinct tokens that are not in the vocabulary, in order."""
        return list(dict.fromkeys(t for t in tokens if t not in self._ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Maps ids back to text: characters joined (``<unk>`` as U+FFFD), or words joined by spaces with
        ``<eos>`` as newline."""
        tokens = [self.tokens[int(i)] for i in ids]
        if self.level == "char":
            return "".join("\ufffd" if t == UNK else t for t in tokens)
        return self.join_words(tokens)

    @staticmethod
    def join_words(tokens: list[str]) -> str:
        """Joins word tokens with spaces, ``<eos>`` becoming a newline."""
        out = []
        for t in tokens:
            if t == EOS:
                out.append("\n")
            else:
                if out and not out[-1].endswith("\n"):
                    out.append(" ")
                out.append(t)
        return "".join(out)

    def save(self, path: Path) -> None:
        """Writes the vocabulary as JSON."""
        path.write_text(json.dumps({"level": self.level, "tokens": self.tokens}, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "Vocabulary":
        """Reads a vocabulary written by :meth:`save`."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(data["tokens"], data["level"])
        except FileNotFoundError:
            raise UserError(f"vocabulary not found: {path}") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}: not a dist-rnn vocabulary ({e.__class__.__name__})") from None
