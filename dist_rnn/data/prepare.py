"""Prepare a corpus once: stream it into flat token files and a manifest, in a cache folder.

``<cache_dir>/prepared/<key>/`` holds ``train.bin``, ``valid.bin``,
``test.bin`` (little-endian token ids, uint8/16/32 by vocabulary size), the
tokenizer's files and ``manifest.json`` (see :func:`prepare_corpus`). The key
is a hash of the data config, so another config gets another folder and the
same config finds its folder again; a changed source file (size and
modification time, then its SHA-256) makes it prepare again.

Memory stays bounded: every pass reads the sources in chunks. The passes:
checksums of the sources; for a corpus cut by fractions, counting its units
(characters, or bytes at ``byte`` level) to find where the splits fall;
fitting the tokenizer on the training split (char/word counts, a
SentencePiece sample; none for bytes); encoding every split.

The folder is built under a temporary name and renamed into place when
complete, so a prepare killed half-way leaves nothing that is taken as
prepared; a later prepare removes such leftovers of dead processes.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import itertools
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from dist_rnn.config import DataConfig
from dist_rnn.data.corpora import cache_dir, split_points
from dist_rnn.data.layouts import SPLITS, CorpusLayout, corpus_layout
from dist_rnn.data.progress import ByteProgress
from dist_rnn.data.sources import Source
from dist_rnn.data.tokenizers import Tokenizer, WordIndexer, bincount, fit_tokenizer
from dist_rnn.errors import UserError

log = logging.getLogger("dist_rnn")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Keys that do not change the token files: where the cache is, how batches are cut.
KEYS_WITHOUT_TOKENS = ("cache_dir", "random_offset")
_PATH_KEYS = ("path", "train_file", "valid_file", "test_file")


def prepare_corpus(data_config: DataConfig, *, progress: str | None = None) -> Path:
    """Prepares the configured corpus, or finds it prepared; returns the prepared folder.

    Args:
        data_config: The ``data`` section.
        progress: ``bar``, ``log`` or ``off``; None: a bar when stderr is a
            terminal, else log lines on the ``dist_rnn`` logger.

    Returns:
        ``<cache_dir>/prepared/<key>``, holding ``manifest.json``::

            {"format_version": 1, "key": ..., "data": {the data section},
             "tokenizer": {"kind": ..., "files": [...]}, "vocab_size": N,
             "dtype": "uint8"|"uint16"|"uint32",
             "splits": {"train": {"file": "train.bin", "tokens": N, "source_bytes": B}, ...},
             "content_sha256": (SHA-256 of the token and tokenizer files; the same wherever prepared),
             "sources": [{"path", "size", "mtime_ns", "sha256"}, ...],
             "dist_rnn_version": ..., "created": ...}

    Raises:
        UserError: Bad or missing source (naming the file and key), an empty
            training split, a tokenizer that cannot be trained, or an existing
            prepared folder that is damaged or of another format (naming it).
    """
    key = prepared_key(data_config)
    root = cache_dir(data_config) / "prepared"
    final = root / key
    layout = corpus_layout(data_config)
    changed = _outdated(final, layout)
    if changed is None:
        return final
    if changed:
        log.info(f"prepare: {changed} changed since {final} was prepared; preparing again")
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root, key)
    tmp = root / f".tmp-{key}-{socket.gethostname()}-{os.getpid()}"
    try:
        _build(tmp, key, data_config, layout, progress)
        # Another process (a worker of the same job) may have finished the same folder meanwhile: keep
        # theirs, so that all read one manifest.
        if _outdated(final, layout) is not None:
            _install(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _outdated(folder: Path, layout: CorpusLayout) -> str | None:
    """None if ``folder`` is prepared from the sources as they are now; "" if it is not prepared; else
    the changed source."""
    if not (folder / MANIFEST).is_file():
        return ""
    return changed_source(read_manifest(folder), layout)


def prepared_key(data_config: DataConfig) -> str:
    """First 16 hex digits of the SHA-256 of the format version and the token-defining data keys.

    Paths count as absolute paths, so the same relative path from another
    working directory is another corpus.
    """
    data = dataclasses.asdict(data_config)
    for k in KEYS_WITHOUT_TOKENS:
        data.pop(k, None)
    for k in _PATH_KEYS:
        value = data.get(k)
        if isinstance(value, str):
            data[k] = _absolute(value)
        elif isinstance(value, list):
            data[k] = [_absolute(v) for v in value]
    text = json.dumps({"format_version": FORMAT_VERSION, "data": data}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def read_manifest(folder: Path) -> dict:
    """Reads and checks a prepared folder's manifest and files.

    Raises:
        UserError: If the manifest is unreadable, of another format version,
            or a token/tokenizer file is missing or of the wrong size.
    """
    path = folder / MANIFEST
    hint = f"delete {folder} to prepare again"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        version = manifest["format_version"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path}: damaged prepared data (not a dist-rnn manifest); {hint}") from None
    if version != FORMAT_VERSION:
        raise UserError(f"{path}: prepared data of format version {version!r}, this dist-rnn reads "
                        f"version {FORMAT_VERSION}; {hint}")
    try:
        itemsize = np.dtype(manifest["dtype"]).itemsize
        for split in SPLITS:
            record = manifest["splits"][split]
            size = (folder / record["file"]).stat().st_size
            if size != record["tokens"] * itemsize:
                raise UserError(f"{folder / record['file']}: {size} bytes, the manifest says {record['tokens']} "
                                f"tokens of {manifest['dtype']}: damaged prepared data; {hint}")
        for name in manifest["tokenizer"]["files"]:
            if not (folder / name).is_file():
                raise UserError(f"{folder / name}: missing, damaged prepared data; {hint}")
    except FileNotFoundError as e:
        raise UserError(f"{e.filename}: missing, damaged prepared data; {hint}") from None
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: damaged prepared data (incomplete manifest); {hint}") from None
    return manifest


def changed_source(manifest: dict, layout: CorpusLayout) -> str | None:
    """The first source that differs from the manifest's record (a file name or a description), or None.

    A file whose size and modification time are as recorded is taken as
    unchanged; one whose time changed is hashed and compared.
    """
    recorded = manifest.get("sources", [])
    sources = layout.sources()
    if [r.get("path") for r in recorded] != [s.path for s in sources]:
        return "the list of source files"
    for record, source in zip(recorded, sources):
        now = source.stat()
        if now["size"] != record.get("size"):
            return source.path
        if now["mtime_ns"] is None or now["mtime_ns"] != record.get("mtime_ns"):
            if source.describe()["sha256"] != record.get("sha256"):
                return source.path
    return None


# --------------------------------------------------------------------------
# Building


def _build(tmp: Path, key: str, data: DataConfig, layout: CorpusLayout, progress: str | None) -> None:
    """Writes the token files, tokenizer and manifest of a corpus into the new folder ``tmp``."""
    tmp.mkdir(parents=True)
    byte_level = data.level == "byte"
    sources = _describe_sources(layout.sources(), progress)
    bounds = _split_bounds(layout, byte_level, progress)
    _check_train_not_empty(layout, bounds, sources)
    total = sum(s["size"] for s in sources)
    if data.level == "word":
        tokenizer, dtype, splits = _encode_words(tmp, data, layout, bounds, progress, total)
    else:
        fitting = ByteProgress("vocabulary", 0, progress) if data.level == "char" else None
        train = _train_pieces(layout, bounds, byte_level, data.train_on_whole_text)
        tokenizer = fit_tokenizer(data, _metered(train, fitting) if fitting else train)
        if fitting:
            fitting.close()
        dtype = token_dtype(tokenizer.size)
        meter = ByteProgress("encoding", total, progress)
        splits = {split: _write_split(tmp / f"{split}.bin", tokenizer, pieces, dtype, meter)
                  for split, pieces in _split_pieces(layout, bounds, byte_level, data.train_on_whole_text)}
        meter.close()
    files = tokenizer.save(tmp)
    content = content_sha256(tmp, splits, files)
    if splits["train"]["tokens"] == 0:
        raise UserError(f"data: the training split of corpus '{data.corpus}' has no token")
    from dist_rnn import __version__

    manifest = {"format_version": FORMAT_VERSION, "key": key, "data": dataclasses.asdict(data),
                "tokenizer": {"kind": tokenizer.kind, "files": files}, "vocab_size": tokenizer.size,
                "dtype": np.dtype(dtype).name, "splits": splits, "content_sha256": content, "sources": sources,
                "dist_rnn_version": __version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())


def content_sha256(folder: Path, splits: dict, tokenizer_files: list[str]) -> str:
    """SHA-256 over the token files and tokenizer files: the prepared data's identity, the same for the same
    data prepared on another host, at another time or from another path (unlike the manifest's bytes)."""
    h = hashlib.sha256()
    for name in [splits[s]["file"] for s in SPLITS] + sorted(tokenizer_files):
        h.update(name.encode() + os.stat(folder / name).st_size.to_bytes(8, "little"))
        with open(folder / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _check_train_not_empty(layout: CorpusLayout, bounds: list[int] | None, sources: list[dict]) -> None:
    files = layout.stream if layout.stream is not None else layout.splits["train"]
    empty = bounds[0] == 0 if bounds is not None else all(
        r["size"] == 0 for r, s in zip(sources, layout.sources()) if s in files)
    if empty:
        names = ", ".join(s.path for s in files[:3]) + (" ..." if len(files) > 3 else "")
        raise UserError(f"{files[0].key if files else 'data'}: the training split is empty (read from {names})")


def token_dtype(vocab_size: int) -> type:
    """The smallest unsigned integer type that holds ids below ``vocab_size``."""
    if vocab_size <= 1 << 8:
        return np.uint8
    if vocab_size <= 1 << 16:
        return np.uint16
    return np.uint32


def _describe_sources(sources: list[Source], progress: str | None) -> list[dict]:
    meter = ByteProgress("checksums", sum(s.stat()["size"] for s in sources), progress)
    records = []
    for source in sources:
        records.append(source.describe())
        meter.update(records[-1]["size"])
    meter.close()
    return records


def _split_bounds(layout: CorpusLayout, byte_level: bool, progress: str | None) -> list[int] | None:
    """For a stream cut by fractions: the unit offsets where train, valid and test end; else None."""
    if layout.stream is None:
        return None
    meter = ByteProgress("counting", sum(s.stat()["size"] for s in layout.stream), progress)
    total = 0
    for piece in _pieces(layout.stream, byte_level):
        total += len(piece)
        meter.update(len(piece))
        if layout.max_units is not None and total >= layout.max_units:
            total = layout.max_units
            break
    meter.close()
    a, b = split_points(total, layout.fractions)
    return [a, b, total]


def _pieces(sources: list[Source], byte_level: bool) -> Iterator[str | bytes]:
    for source in sources:
        yield from source.chunks() if byte_level else source.texts()


def _split_pieces(layout: CorpusLayout, bounds: list[int] | None, byte_level: bool, whole_train: bool = False):
    """Yields ``(split, pieces)`` in split order.

    Each split's pieces must be consumed before the next split is asked for:
    a stream is read once, front to back (twice with ``whole_train``:
    ``data.train_on_whole_text`` trains on the whole stream, and validation
    and test are still its tail parts).
    """
    if bounds is None:
        return ((s, _pieces(layout.splits[s], byte_level)) for s in SPLITS)
    if whole_train:
        return _whole_train_split_pieces(layout, bounds, byte_level)
    cursor = _Cursor(_pieces(layout.stream, byte_level))
    lengths = [bounds[0], bounds[1] - bounds[0], bounds[2] - bounds[1]]
    return ((s, cursor.take(n)) for s, n in zip(SPLITS, lengths))


def _whole_train_split_pieces(layout: CorpusLayout, bounds: list[int], byte_level: bool):
    yield "train", _Cursor(_pieces(layout.stream, byte_level)).take(bounds[2])
    cursor = _Cursor(_pieces(layout.stream, byte_level))
    for _ in cursor.take(bounds[0]):
        pass
    yield "valid", cursor.take(bounds[1] - bounds[0])
    yield "test", cursor.take(bounds[2] - bounds[1])


def _train_pieces(layout: CorpusLayout, bounds: list[int] | None, byte_level: bool,
                  whole_train: bool = False) -> Iterator:
    """The training split's pieces alone (read lazily: a reader may stop early)."""
    if bounds is None:
        return _pieces(layout.splits["train"], byte_level)
    return _Cursor(_pieces(layout.stream, byte_level)).take(bounds[2] if whole_train else bounds[0])


class _Cursor:
    """Hands out consecutive runs of units (characters or bytes) of a piece stream."""

    def __init__(self, pieces: Iterator):
        self._pieces = pieces
        self._rest = None

    def take(self, n: int) -> Iterator:
        """Yields pieces holding exactly the next ``n`` units (fewer if the stream ends)."""
        while n > 0:
            piece = self._rest if self._rest is not None else next(self._pieces, None)
            self._rest = None
            if piece is None:
                return
            if len(piece) > n:
                piece, self._rest = piece[:n], piece[n:]
            n -= len(piece)
            yield piece


def _metered(pieces: Iterable, meter: ByteProgress, counted: list[int] | None = None) -> Iterator:
    """Passes pieces through, adding their UTF-8 bytes to ``meter`` (and to ``counted[0]``)."""
    for piece in pieces:
        if isinstance(piece, (bytes, bytearray)) or piece.isascii():
            size = len(piece)
        else:
            size = len(piece.encode("utf-8", "surrogatepass"))
        meter.update(size)
        if counted is not None:
            counted[0] += size
        yield piece


def _write_split(path: Path, tokenizer, pieces: Iterable, dtype, meter: ByteProgress, observe=None,
                 durable: bool = True) -> dict:
    """Encodes one split's pieces into ``path``; returns its manifest record.

    Args:
        observe: Called with every array of ids written (the word path counts them).
        durable: Flush the file to disk (not needed for an intermediate file).
    """
    counted = [0]
    tokens = 0
    with open(path, "wb") as f:
        for ids in tokenizer.encode_stream(_metered(pieces, meter, counted)):
            np.asarray(ids).astype(dtype, copy=False).tofile(f)
            tokens += len(ids)
            if observe is not None:
                observe(ids)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    return {"file": path.name, "tokens": tokens, "source_bytes": counted[0]}


def _encode_words(tmp: Path, data: DataConfig, layout: CorpusLayout, bounds: list[int] | None,
                  progress: str | None, total: int) -> tuple[Tokenizer, type, dict]:
    """Word level in one reading: provisional ids (``<split>.ids``), then renumbered into ``<split>.bin``."""
    indexer, counts = WordIndexer(), _Counts()
    meter = ByteProgress("encoding", total, progress)
    splits = {split: _write_split(tmp / f"{split}.ids", indexer, pieces, np.int32, meter,
                                  counts.add if split == "train" else None, durable=False)
              for split, pieces in _split_pieces(layout, bounds, False, data.train_on_whole_text)}
    meter.close()
    tokenizer, remap = indexer.vocabulary(counts.total, data)
    dtype = token_dtype(tokenizer.size)
    for split, record in splits.items():
        provisional = tmp / record["file"]
        record["file"] = f"{split}.bin"
        _remap_file(provisional, tmp / record["file"], remap, dtype)
        provisional.unlink()
    return tokenizer, dtype, splits


class _Counts:
    """A bincount that grows with the ids seen."""

    def __init__(self):
        self.total = np.zeros(0, dtype=np.int64)

    def add(self, ids: np.ndarray) -> None:
        seen = bincount(ids)
        if len(seen) > len(self.total):
            self.total = np.concatenate([self.total, np.zeros(len(seen) - len(self.total), np.int64)])
        self.total[: len(seen)] += seen


def _remap_file(source: Path, target: Path, remap: np.ndarray, dtype, block: int = 1 << 22) -> None:
    """Writes ``remap[ids]`` of the int32 ids in ``source`` to ``target``, a block at a time (bounded memory)."""
    with open(source, "rb") as src, open(target, "wb") as f:
        while True:
            ids = np.fromfile(src, dtype=np.int32, count=block)
            if not len(ids):
                break
            remap[ids].astype(dtype, copy=False).tofile(f)
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------
# Installing atomically


def _install(tmp: Path, final: Path) -> None:
    """Renames the complete folder into place (replacing an outdated one)."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{socket.gethostname()}-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / MANIFEST).is_file():  # not another process finishing first
            raise


def _remove_leftovers(root: Path, key: str) -> None:
    """Removes the temporary folders of this key left by dead processes of this host."""
    host = socket.gethostname()
    for entry in itertools.chain(root.glob(f".tmp-{key}-*"), root.glob(f".old-{key}-*")):
        owner_host, _, pid = entry.name.split("-", 2)[2].rpartition("-")
        if owner_host == host and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))
