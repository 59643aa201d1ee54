"""Tokenizers: text to token ids and back, fitted on a stream of training text.

Four kinds, chosen by ``data.level``:

- ``char``: every Unicode character is a token; the vocabulary is the
  training split's characters (``<unk>`` first, then by descending count,
  ties by the character), exactly :class:`~dist_rnn.data.vocab.Vocabulary`.
- ``byte``: every UTF-8 byte is a token, 256 fixed ids (id = byte value).
- ``word``: whitespace-separated words, each newline an ``<eos>`` token; the
  same vocabulary rule as ``char`` plus ``data.min_count``.
- ``subword``: SentencePiece (``data.subword_model`` unigram or BPE,
  ``data.vocab_size`` pieces), trained on the first
  ``data.subword_sample_chars`` characters of the training split. Byte
  fallback makes every text encodable and ``decode(encode(text)) == text``.

Every tokenizer encodes a split as a stream of text pieces
(:meth:`Tokenizer.encode_stream`) with the same ids as encoding the split's
whole text at once, whatever the piece boundaries: pieces are only ever
encoded up to a boundary where the tokenization cannot straddle (whitespace
for words, a newline or a space for subwords).

The folder format: ``tokenizer.json`` (``kind``, and for char/word the token
list in the layout of ``vocab.json``, so :meth:`Vocabulary.load` reads it)
plus ``spm.model`` for subwords.
"""

from __future__ import annotations

import collections
import io
import itertools
import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from dist_rnn.data.vocab import EOS, UNK, Vocabulary
from dist_rnn.errors import UserError

TOKENIZER_FILE = "tokenizer.json"
SPM_FILE = "spm.model"
LEVELS = ("char", "byte", "word", "subword")

_MAX_CODE_POINT = 0x110000
# SentencePiece's trainer skips longer sentences; longer sample lines are cut at spaces.
_SPM_MAX_SENTENCE = 8192


class Tokenizer:
    """Base of all tokenizers.

    Attributes:
        kind: ``char``, ``byte``, ``word`` or ``subword``.
    """

    kind = ""

    @property
    def size(self) -> int:
        """Number of ids (the model's vocabulary size)."""
        raise NotImplementedError

    def encode(self, text: str) -> np.ndarray:
        """Returns the int32 ids of ``text``."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """Returns the text of ``ids``."""
        raise NotImplementedError

    def token_of(self, token_id: int) -> str:
        """Returns the token (character, word, piece or byte) of one id, for display."""
        raise NotImplementedError

    def encode_stream(self, pieces: Iterable[str]) -> Iterator[np.ndarray]:
        """Encodes the text of consecutive pieces; the ids equal ``encode("".join(pieces))``.

        The arrays may be of a narrower unsigned type than ``encode``'s int32
        (char and byte ids as uint8), to be written without a widening copy.
        """
        for piece in pieces:
            if piece:
                yield self.encode(piece)

    def save(self, folder: Path) -> list[str]:
        """Writes the tokenizer into ``folder``; returns the file names written."""
        raise NotImplementedError

    def _write_json(self, folder: Path, record: dict) -> None:
        text = json.dumps({"kind": self.kind, "level": self.kind, **record}, ensure_ascii=False)
        (Path(folder) / TOKENIZER_FILE).write_text(text, encoding="utf-8")


class VocabularyTokenizer(Tokenizer):
    """Char or word tokens mapped by a :class:`~dist_rnn.data.vocab.Vocabulary`.

    Args:
        vocab: The vocabulary (its ``level`` is the kind).
    """

    def __init__(self, vocab: Vocabulary):
        if vocab.level not in ("char", "word"):
            raise ValueError(f"not a char or word vocabulary: {vocab.level}")
        self.vocab = vocab
        self.kind = vocab.level
        self._ids = vocab._ids  # token -> id, built once by the Vocabulary
        self._table: np.ndarray | None = None

    @property
    def size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> np.ndarray:
        if self.kind == "char":
            return self._encode_chars(text).astype(np.int32)
        tokens = word_tokens(text)
        return np.fromiter(map(self._ids.get, tokens, itertools.repeat(self.vocab.unk_id)),
                           dtype=np.int32, count=len(tokens))

    def encode_stream(self, pieces: Iterable[str]) -> Iterator[np.ndarray]:
        if self.kind == "word":
            return super().encode_stream(cut_after_whitespace(pieces))
        return (self._encode_chars(piece) for piece in pieces if piece)

    def _encode_chars(self, text: str) -> np.ndarray:
        """Character ids, uint8 when they fit (the common case runs as one ``bytes.translate``)."""
        if len(self.vocab) <= 256:
            try:
                data = text.encode("latin-1")
            except UnicodeEncodeError:
                pass
            else:
                return np.frombuffer(data.translate(self._byte_table()), dtype=np.uint8)
        return self._char_table()[code_points(text)]

    def _byte_table(self) -> bytes:
        """Code points below 256 -> id as a ``bytes.translate`` table (vocabularies of up to 256 ids)."""
        self._char_table()
        return self._bytes

    def decode(self, ids: Iterable[int]) -> str:
        return self.vocab.decode(ids)

    def token_of(self, token_id: int) -> str:
        return self.vocab.tokens[int(token_id)]

    def save(self, folder: Path) -> list[str]:
        self._write_json(folder, {"tokens": self.vocab.tokens})
        return [TOKENIZER_FILE]

    def _char_table(self) -> np.ndarray:
        """Code point -> id over all of Unicode (4.4 MB), unknown characters -> ``<unk>``."""
        if self._table is None:
            table = np.full(_MAX_CODE_POINT, self.vocab.unk_id, dtype=np.int32)
            for i, token in enumerate(self.vocab.tokens):
                if token != UNK:
                    table[ord(token)] = i
            self._table = table
            self._bytes = table[:256].astype(np.uint8).tobytes() if len(self.vocab) <= 256 else None
        return self._table


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: 256 ids, id = byte value; decoding replaces invalid UTF-8 by U+FFFD."""

    kind = "byte"

    @property
    def size(self) -> int:
        return 256

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text if isinstance(text, (bytes, bytearray)) else text.encode("utf-8", "surrogatepass")
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def encode_stream(self, pieces: Iterable[str | bytes]) -> Iterator[np.ndarray]:
        for piece in pieces:
            if piece:  # bytes stay uint8: no widening copy on the way to a uint8 file
                yield np.frombuffer(piece, dtype=np.uint8) if isinstance(piece, bytes) else self.encode(piece)

    def decode(self, ids: Iterable[int]) -> str:
        return np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids,
                          dtype=np.uint8).tobytes().decode("utf-8", "replace")

    def token_of(self, token_id: int) -> str:
        b = int(token_id)
        return chr(b) if 32 <= b < 127 else f"<0x{b:02X}>"

    def save(self, folder: Path) -> list[str]:
        self._write_json(folder, {})
        return [TOKENIZER_FILE]


class SubwordTokenizer(Tokenizer):
    """SentencePiece pieces; a newline is its own piece, every line is encoded on its own.

    Args:
        model_proto: The serialized SentencePiece model.
        model_type: ``unigram`` or ``bpe`` (recorded for display).
    """

    kind = "subword"

    def __init__(self, model_proto: bytes, model_type: str):
        import sentencepiece

        self.model_proto = model_proto
        self.model_type = model_type
        self._sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        self._newline = self._sp.piece_to_id("\n")

    @property
    def size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> np.ndarray:
        lines = text.split("\n")
        encoded = self._sp.encode(lines, num_threads=2)
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32, count=int(lengths.sum()))
        # One newline id after every line but the last ("a\nb" -> a, NL, b).
        return np.insert(flat, np.cumsum(lengths)[:-1], self._newline).astype(np.int32)

    def encode_stream(self, pieces: Iterable[str]) -> Iterator[np.ndarray]:
        return super().encode_stream(cut_before_space(pieces))

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_of(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def save(self, folder: Path) -> list[str]:
        (Path(folder) / SPM_FILE).write_bytes(self.model_proto)
        self._write_json(folder, {"model": SPM_FILE, "subword_model": self.model_type})
        return [TOKENIZER_FILE, SPM_FILE]


def word_tokens(text: str) -> list[str]:
    """Whitespace-separated words, each newline an ``<eos>``: :func:`~dist_rnn.data.vocab.tokenize` at
    word level, in two C-level string operations."""
    # A literal "<eos>" in the text was already the <eos> token in tokenize(): the sentinel changes nothing.
    return text.replace("\n", f" {EOS} ").split()


def code_points(text: str) -> np.ndarray:
    """Returns the Unicode code points of ``text`` as a uint8 or uint32 array (vectorized, no Python loop)."""
    try:  # all below 256 (ASCII, Latin-1): one byte per character, a quarter of the memory traffic
        return np.frombuffer(text.encode("latin-1"), dtype=np.uint8)
    except UnicodeEncodeError:
        return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


def cut_after_whitespace(pieces: Iterable[str]) -> Iterator[str]:
    """Re-cuts consecutive text pieces so each ends just after a whitespace character (the last may not)."""
    carry = ""
    for piece in pieces:
        # Only the new piece is scanned (the carry holds no whitespace), back over its last word.
        i = len(piece) - 1
        while i >= 0 and not piece[i].isspace():
            i -= 1
        if i < 0:
            carry += piece
            continue
        yield carry + piece[: i + 1]
        carry = piece[i + 1:]
    if carry:
        yield carry


def cut_before_space(pieces: Iterable[str], max_carry: int = 1 << 20) -> Iterator[str]:
    """Re-cuts pieces just after a newline, or for a line longer than ``max_carry`` just before a space.

    SentencePiece never joins pieces across a newline (lines are encoded apart)
    nor across the start of a space (each space begins a new piece), so either
    cut leaves the ids unchanged.
    """
    carry = ""
    for piece in pieces:
        text = carry + piece
        cut = text.rfind("\n") + 1
        if cut == 0 and len(text) > max_carry:
            cut = max(text.rfind(" "), 0)
        carry = text[cut:]
        if cut:
            yield text[:cut]
    if carry:
        yield carry


# --------------------------------------------------------------------------
# Fitting on a stream of training text


def fit_tokenizer(data, train_pieces: Iterable[str]) -> Tokenizer:
    """Builds the tokenizer of ``data.level`` from the training split's text.

    Args:
        data: The ``data`` config section (``level``, ``max_vocab``,
            ``min_count``, ``vocab_size``, ``subword_model``,
            ``subword_sample_chars``).
        train_pieces: The training split's text as consecutive pieces (read
            once; for ``subword`` only up to the sample size; not at all for ``byte``).

    Returns:
        The tokenizer.

    Raises:
        UserError: If the training split is empty, or SentencePiece cannot
            train on the sample (the message names the key to change).
    """
    if data.level == "byte":
        return ByteTokenizer()
    if data.level == "subword":
        return _fit_subword(data, train_pieces)
    tokens, counts = count_chars(train_pieces) if data.level == "char" else count_words(train_pieces)
    order = vocabulary_order(tokens, counts, data)
    return VocabularyTokenizer(Vocabulary([UNK] + [tokens[i] for i in order], data.level))


def vocabulary_order(tokens: list[str], counts: np.ndarray, data) -> np.ndarray:
    """The vocabulary rule, as :meth:`Vocabulary.build`: which tokens get ids 1, 2, ... after ``<unk>``.

    Tokens seen ``data.min_count`` times or more, most frequent first, ties by
    the token, at most ``data.max_vocab - 1`` of them; a literal ``<unk>`` is
    not repeated.

    Args:
        tokens: Distinct tokens.
        counts: Training-split count of each token (may be shorter than
            ``tokens``: the rest count 0).
        data: The ``data`` section (``max_vocab``, ``min_count``).

    Returns:
        Indices into ``tokens``, in id order.

    Raises:
        UserError: If no token was seen (an empty training split).
    """
    seen = np.flatnonzero(counts)
    if UNK in tokens[: len(counts)]:
        seen = seen[seen != tokens.index(UNK)]
    if not len(seen):
        raise UserError("data: the training split is empty")
    keep = seen[counts[seen] >= (getattr(data, "min_count", 1) or 1)]
    names = [tokens[i] for i in keep]
    alphabetical = keep[sorted(range(len(keep)), key=names.__getitem__)]
    order = alphabetical[np.argsort(-counts[alphabetical], kind="stable")]
    return order if data.max_vocab is None else order[: data.max_vocab - 1]


class WordIndexer:
    """Word-level encoding in one pass: ids in first-seen order, renumbered once the training split is counted.

    The final word ids depend on the training split's counts, known only at
    its end; counting first and encoding after would tokenize and hash every
    word twice. Instead each word gets a provisional id when first seen, the
    training split's provisional ids are counted with a bincount, and
    :meth:`vocabulary` returns the remap from provisional to final ids.
    """

    def __init__(self):
        self._ids: dict[str, int] = collections.defaultdict(itertools.count().__next__)

    def encode(self, text: str) -> np.ndarray:
        """Provisional ids of the text's words (new words get the next id)."""
        tokens = word_tokens(text)
        return np.fromiter(map(self._ids.__getitem__, tokens), dtype=np.int32, count=len(tokens))

    def encode_stream(self, pieces: Iterable[str]) -> Iterator[np.ndarray]:
        """Provisional ids of consecutive pieces (cut after whitespace, as in :class:`VocabularyTokenizer`)."""
        for chunk in cut_after_whitespace(pieces):
            yield self.encode(chunk)

    def vocabulary(self, train_counts: np.ndarray, data) -> tuple[VocabularyTokenizer, np.ndarray]:
        """The word tokenizer and the provisional -> final id map (unknown words -> ``<unk>``).

        Args:
            train_counts: Count of each provisional id in the training split
                (shorter than the number of ids when later splits brought new words).
            data: The ``data`` section (``max_vocab``, ``min_count``).
        """
        words = list(self._ids)  # insertion order: the provisional ids
        order = vocabulary_order(words, train_counts, data)
        vocab = Vocabulary([UNK] + [words[i] for i in order], "word")
        remap = np.full(len(words), vocab.unk_id, dtype=np.int32)
        remap[order] = np.arange(1, len(order) + 1, dtype=np.int32)
        return VocabularyTokenizer(vocab), remap


def count_chars(pieces: Iterable[str]) -> tuple[list[str], np.ndarray]:
    """Counts the characters of a text stream (a bincount over code points per piece): (characters, counts)."""
    total = np.zeros(_MAX_CODE_POINT, dtype=np.int64)
    for piece in pieces:
        if piece:
            seen = bincount(code_points(piece))
            total[: len(seen)] += seen
    present = np.flatnonzero(total)
    return [chr(int(c)) for c in present], total[present]


def bincount(values: np.ndarray, block: int = 1 << 16) -> np.ndarray:
    """``np.bincount`` in cache-sized blocks: its cast of the input to int64 stays in cache (3x faster here)."""
    total = np.zeros(int(values.max()) + 1 if len(values) else 0, dtype=np.int64)
    for start in range(0, len(values), block):
        part = values[start:start + block]
        total += np.bincount(part, minlength=len(total))
    return total


def count_words(pieces: Iterable[str]) -> tuple[list[str], np.ndarray]:
    """Counts the word tokens (``<eos>`` per newline) of a text stream: (words, counts)."""
    counts: collections.Counter = collections.Counter()
    for chunk in cut_after_whitespace(pieces):
        counts.update(word_tokens(chunk))
    return list(counts), np.fromiter(counts.values(), dtype=np.int64, count=len(counts))


def _subword_sample(pieces: Iterable[str], max_chars: int) -> list[str]:
    """The first ``max_chars`` characters of the stream as training sentences (lines, long ones cut at spaces)."""
    text_parts, total = [], 0
    for piece in pieces:
        text_parts.append(piece[: max_chars - total])
        total += len(text_parts[-1])
        if total >= max_chars:
            break
    sentences = []
    for line in "".join(text_parts).split("\n"):
        while len(line) > _SPM_MAX_SENTENCE // 4:  # at most 4 UTF-8 bytes per character
            cut = line.rfind(" ", 1, _SPM_MAX_SENTENCE // 4)
            cut = cut if cut > 0 else _SPM_MAX_SENTENCE // 4
            sentences.append(line[:cut])
            line = line[cut:]
        if line:
            sentences.append(line)
    return sentences


def _fit_subword(data, train_pieces: Iterable[str]) -> SubwordTokenizer:
    import sentencepiece

    sentences = _subword_sample(train_pieces, data.subword_sample_chars)
    if not sentences:
        raise UserError("data: the training split is empty")
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, vocab_size=data.vocab_size,
            model_type=data.subword_model, normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, byte_fallback=True, user_defined_symbols=["\n"],
            unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, max_sentence_length=_SPM_MAX_SENTENCE,
            num_threads=1, minloglevel=2)
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or ["failed"])[-1].split("] ")[-1].strip()
        raise UserError(f"config key 'data.vocab_size': SentencePiece cannot train {data.vocab_size} "
                        f"{data.subword_model} pieces on the first {data.subword_sample_chars} characters "
                        f"of the training split ({first[:200]}); lower data.vocab_size or raise "
                        f"data.subword_sample_chars") from None
    return SubwordTokenizer(model.getvalue(), data.subword_model)


# --------------------------------------------------------------------------
# Loading


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Reads a tokenizer saved by :meth:`Tokenizer.save`.

    Args:
        folder: A folder holding ``tokenizer.json`` (and ``spm.model``), or a
            tokenizer/vocabulary JSON file itself (a run's ``vocab.json``).

    Raises:
        UserError: If the files are missing or not a dist-rnn tokenizer.
    """
    path = Path(folder)
    record_file = path if path.is_file() else path / TOKENIZER_FILE
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
        kind = record.get("kind", record.get("level"))
        if kind in ("char", "word"):
            return VocabularyTokenizer(Vocabulary(record["tokens"], kind))
        if kind == "byte":
            return ByteTokenizer()
        if kind == "subword":
            proto = (record_file.parent / record["model"]).read_bytes()
            return SubwordTokenizer(proto, record.get("subword_model", "unigram"))
        raise ValueError(f"unknown kind {kind!r}")
    except FileNotFoundError as e:
        raise UserError(f"tokenizer not found: {e.filename}") from None
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise UserError(f"{record_file}: not a dist-rnn tokenizer ({e.__class__.__name__})") from None


def tokenizer_from_vocabulary(vocab: Vocabulary) -> Tokenizer:
    """Wraps a run's saved :class:`Vocabulary` (char or word) as a tokenizer with the same ids."""
    return VocabularyTokenizer(vocab)
