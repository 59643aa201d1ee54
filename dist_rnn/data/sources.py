"""Source files of a corpus: which files a path names, and reading them as a stream.

A source path may be a file, a glob pattern (``shards/*.txt.gz``) or a folder
(its visible files, sorted by name); a list concatenates several. Files ending
in ``.gz`` are decompressed while read. Files are read in bounded chunks, so
memory does not grow with the corpus; a UTF-8 byte-order mark at the start of
a file is no text and is dropped, as :func:`~dist_rnn.data.corpora.load_splits`
does.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import io
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from dist_rnn.errors import UserError

CHUNK_BYTES = 4 << 20
_BOM = codecs.BOM_UTF8
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Source:
    """One source file (or an in-memory text standing in for one).

    Attributes:
        path: The file; for an in-memory source a label such as ``<stdlib>``.
        key: The config key that named it, for error messages.
        data: The bytes of an in-memory source, else None.
    """

    path: str
    key: str
    data: bytes | None = None

    def chunks(self, chunk_bytes: int | None = None) -> Iterator[bytes]:
        """Yields the file's bytes in chunks, decompressed, without a leading byte-order mark.

        Raises:
            UserError: If the file is missing, unreadable or a corrupt gzip file.
        """
        chunk_bytes = chunk_bytes or CHUNK_BYTES
        first = True
        try:
            with self._open() as f:
                while True:
                    chunk = f.read(chunk_bytes)
                    if first and chunk.startswith(_BOM):
                        chunk = chunk[len(_BOM):]
                    first = False
                    if not chunk:
                        return
                    yield chunk
        except FileNotFoundError:
            raise UserError(f"{self.key}: file not found: {self.path}") from None
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise UserError(f"{self.key}: {self.path} is not a readable gzip file ({e})") from None
        except OSError as e:
            raise UserError(f"{self.key}: cannot read {self.path}: {e.strerror or e}") from None

    def texts(self, chunk_bytes: int | None = None) -> Iterator[str]:
        """Yields the file's text in chunks (strict UTF-8).

        Raises:
            UserError: If the file is not UTF-8 text (naming the byte offset).
        """
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        offset = len(_BOM) if self._has_bom() else 0
        for chunk in self.chunks(chunk_bytes):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise UserError(f"{self.key}: {self.path} is not UTF-8 text (byte {offset + e.start})") from None
            offset += len(chunk)
            if text:
                yield text
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UserError(f"{self.key}: {self.path} is not UTF-8 text (it ends inside a character)") from None

    def stat(self) -> dict:
        """Size and modification time: what reuse compares before hashing."""
        if self.data is not None:
            return {"path": self.path, "size": len(self.data), "mtime_ns": None}
        try:
            st = os.stat(self.path)
        except OSError:
            raise UserError(f"{self.key}: file not found: {self.path}") from None
        return {"path": self.path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def describe(self) -> dict:
        """``{"path", "size", "mtime_ns", "sha256"}`` of the file as stored (compressed for ``.gz``)."""
        record = self.stat()
        h = hashlib.sha256()
        if self.data is not None:
            h.update(self.data)
        else:
            try:
                with open(self.path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
            except OSError as e:
                raise UserError(f"{self.key}: cannot read {self.path}: {e.strerror or e}") from None
        record["sha256"] = h.hexdigest()
        return record

    def _open(self):
        if self.data is not None:
            return io.BytesIO(self.data)
        if self.path.endswith(".gz"):
            return gzip.open(self.path, "rb")
        return open(self.path, "rb")

    def _has_bom(self) -> bool:
        try:
            with self._open() as f:
                return f.read(len(_BOM)) == _BOM
        except (OSError, EOFError, zlib.error):
            return False


def expand(spec: str | list[str], key: str) -> list[Source]:
    """Resolves a path, glob, folder or list of them into source files, in order.

    Args:
        spec: One path or a list; each a file, a glob pattern or a folder.
        key: The config key, for error messages.

    Returns:
        The files (absolute paths): a glob's matches and a folder's visible
        files sorted by name.

    Raises:
        UserError: If a path does not exist or a pattern or folder matches no file.
    """
    sources = []
    for item in [spec] if isinstance(spec, str) else list(spec):
        path = Path(item).expanduser()
        if _GLOB_CHARS & set(str(item)):
            matches = sorted(p for p in glob.glob(str(path)) if os.path.isfile(p))
            if not matches:
                raise UserError(f"{key}: no file matches {item}")
            sources.extend(Source(os.path.abspath(p), key) for p in matches)
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            if not files:
                raise UserError(f"{key}: folder {item} holds no file")
            sources.extend(Source(str(p.resolve()), key) for p in files)
        elif path.is_file():
            sources.append(Source(str(path.resolve()), key))
        else:
            raise UserError(f"{key}: file not found: {item}")
    return sources
