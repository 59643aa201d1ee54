"""Corpora: read raw text for the train, valid and test splits.

Each corpus yields three strings. Word-level tokenization happens later (see
:mod:`dist_rnn.data.vocab`); a corpus only decides where the text comes from and
where the splits fall.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import sysconfig
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from dist_rnn.config import DataConfig
from dist_rnn.errors import UserError


@dataclass(frozen=True)
class RemoteFile:
    """A public file fetched once into the cache, checked by SHA-256.

    Attributes:
        name: File name inside the corpus' cache folder.
        url: Where it is downloaded from.
        sha256: Expected SHA-256 of the downloaded file, or of the member
            extracted from an archive.
        archive_member: For a member of a ``.tgz``/``.zip`` archive, its path.
    """

    name: str
    url: str
    sha256: str | None
    archive_member: str | None = None


# SHA-256 sums recorded from the canonical files. ptb.train.txt and text8 have
# no recorded sum here (the files were not available to compute one): they are
# checked against the hash saved at first download instead.
_TINYSHAKESPEARE = RemoteFile(
    "input.txt",
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed")
_PTB_URL = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
_PTB = {
    "train": RemoteFile("ptb.train.txt", _PTB_URL, None, "./simple-examples/data/ptb.train.txt"),
    "valid": RemoteFile("ptb.valid.txt", _PTB_URL,
                        "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
                        "./simple-examples/data/ptb.valid.txt"),
    "test": RemoteFile("ptb.test.txt", _PTB_URL,
                       "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
                       "./simple-examples/data/ptb.test.txt"),
}
_TEXT8 = RemoteFile("text8", "http://mattmahoney.net/dc/text8.zip", None, "text8")
# The one-file corpora that data.split cuts into parts.
SINGLE_FILE_CORPORA = {"tinyshakespeare": _TINYSHAKESPEARE, "text8": _TEXT8}


@dataclass
class Splits:
    """Raw text of the three splits (``test`` may be empty)."""

    train: str
    valid: str
    test: str

    def sha256(self) -> str:
        """SHA-256 of the three texts: the data's identity wherever its files are."""
        h = hashlib.sha256()
        for text in (self.train, self.valid, self.test):
            data = text.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))  # split boundaries count, not only the bytes
            h.update(data)
        return h.hexdigest()


def cache_dir(config: DataConfig) -> Path:
    """Returns the download cache folder for corpora."""
    if config.cache_dir:
        return Path(config.cache_dir).expanduser()
    return Path(os.environ.get("DIST_RNN_CACHE", "~/.cache/dist-rnn")).expanduser()


def load_splits(config: DataConfig) -> Splits:
    """Reads the train/valid/test text of the configured corpus.

    Args:
        config: The ``data`` section.

    Returns:
        The three splits as strings.

    Raises:
        UserError: If a file is missing, unreadable or fails its checksum, or a
            download is impossible (the message names the file and where to put
            it).
    """
    if config.train_on_whole_text:
        # split_text cuts contiguous parts: together they are the whole text.
        splits = load_splits(dataclasses.replace(config, train_on_whole_text=False))
        return Splits(splits.train + splits.valid + splits.test, splits.valid, splits.test)
    if config.train_file:
        return Splits(_read_text(config.train_file, "data.train_file"),
                      _read_text(config.valid_file, "data.valid_file") if config.valid_file else "",
                      _read_text(config.test_file, "data.test_file") if config.test_file else "")
    if config.corpus == "stdlib":
        return split_text(stdlib_text(config.max_chars), config.split)
    if config.corpus == "file":
        paths = [config.path] if isinstance(config.path, str) else list(config.path)
        text = "".join(_read_text(p, "data.path") for p in paths)
        return split_text(_cap(text, config.max_chars), config.split)
    if config.corpus == "tinyshakespeare":
        path = local_or_fetch(config, "tinyshakespeare", _TINYSHAKESPEARE)
        return split_text(_cap(_read_text(str(path), "data.path"), config.max_chars), config.split)
    if config.corpus == "text8":
        path = local_or_fetch(config, "text8", _TEXT8)
        return split_text(_cap(_read_text(str(path), "data.path"), config.max_chars), config.split)
    if config.corpus == "ptb":
        return _ptb_splits(config)
    raise UserError(f"config key 'data.corpus': unknown corpus {config.corpus!r}")


def stdlib_text(max_chars: int | None) -> str:
    """Returns the running Python's top-level standard-library sources, in sorted order.

    The embedded default corpus: no download, no bundled data. Files are the
    ``*.py`` directly in the stdlib folder, sorted by name, concatenated.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise UserError(f"data.corpus 'stdlib': no Python sources found in {root}")
    parts, total = [], 0
    for f in files:
        text = f.read_text(encoding="utf-8-sig", errors="replace")
        parts.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    return _cap("".join(parts), max_chars)


def split_text(text: str, fractions: list[float]) -> Splits:
    """Cuts one text into contiguous train/valid/test parts by fractions."""
    a, b = split_points(len(text), fractions)
    return Splits(text[:a], text[a:b], text[b:])


def split_points(n: int, fractions: list[float]) -> tuple[int, int]:
    """Where a stream of ``n`` units (characters) is cut: the ends of the train and valid parts."""
    a = int(round(n * fractions[0]))
    b = a + int(round(n * fractions[1]))
    return a, b


def _cap(text: str, max_chars: int | None) -> str:
    return text if max_chars is None else text[:max_chars]


def _read_text(path: str, key: str) -> str:
    """Reads a UTF-8 file; a leading byte-order mark is dropped (it is no text)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{key}: file not found: {path}")
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{key}: {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{key}: cannot read {path}: {e.strerror}") from None


def _ptb_splits(config: DataConfig) -> Splits:
    files = ptb_files(config)
    return Splits(*(_read_text(str(files[s]), "data.path") for s in ("train", "valid", "test")))


def ptb_files(config: DataConfig) -> dict[str, Path]:
    """The ptb corpus' three files: in ``data.path``, or fetched into the cache."""
    if config.path:
        folder = Path(config.path if isinstance(config.path, str) else config.path[0]).expanduser()
        if not folder.is_dir():
            raise UserError(f"data.path: ptb needs a folder with ptb.train.txt/ptb.valid.txt/ptb.test.txt, got {folder}")
        files = {}
        for split, remote in _PTB.items():
            f = folder / remote.name
            if not f.is_file():
                raise UserError(f"data.path: {f} not found (ptb needs ptb.train.txt, ptb.valid.txt, ptb.test.txt)")
            files[split] = f
    else:
        files = {split: fetch(remote, cache_dir(config) / "ptb") for split, remote in _PTB.items()}
    return files


def local_or_fetch(config: DataConfig, corpus: str, remote: RemoteFile) -> Path:
    """The corpus file at ``data.path`` (checked against its SHA-256), or fetched into the cache."""
    if config.path:
        path = Path(config.path if isinstance(config.path, str) else config.path[0]).expanduser()
        if not path.is_file():
            raise UserError(f"data.path: file not found: {path}")
        if remote.sha256 and sha256_of(path) != remote.sha256:
            raise UserError(f"data.path: {path} is not the {corpus} corpus (SHA-256 mismatch; expected {remote.sha256[:12]}...)")
        return path
    return fetch(remote, cache_dir(config) / corpus)


def sha256_of(path: Path) -> str:
    """Returns the hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(remote: RemoteFile, folder: Path, opener=urllib.request.urlopen) -> Path:
    """Returns the cached file, downloading (and extracting) it first if needed.

    The download goes to a temporary file and is moved into place only after
    its checksum passes, so an interrupted download never leaves a bad file.
    For files without a recorded SHA-256 the hash seen at first download is
    saved beside the file (``NAME.sha256``) and checked from then on.

    Args:
        remote: What to fetch.
        folder: The corpus' cache folder.
        opener: ``urlopen``-like callable (tests pass a local one).

    Returns:
        Path of the verified file.

    Raises:
        UserError: If offline, or on a checksum mismatch. The message names
            the file and where to put it by hand.
    """
    target = folder / remote.name
    recorded = folder / (remote.name + ".sha256")
    expected = remote.sha256 or (recorded.read_text().strip() if recorded.is_file() else None)
    if target.is_file():
        actual = sha256_of(target)
        if expected and actual != expected:
            raise UserError(f"{target}: SHA-256 mismatch ({actual[:12]}... != {expected[:12]}...); delete it to download again")
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        download = Path(tmp) / "download"
        try:
            with opener(remote.url, timeout=60) as response, open(download, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as e:
            reason = getattr(e, "reason", None) or e
            raise UserError(f"cannot download {remote.url} ({reason}); put {remote.name} at {target} "
                            f"(or point data.path at a local copy)") from None
        extracted = _extract(download, remote, Path(tmp))
        actual = sha256_of(extracted)
        if expected and actual != expected:
            raise UserError(f"{remote.url}: {remote.name} SHA-256 mismatch ({actual[:12]}... != {expected[:12]}...)")
        os.replace(extracted, target)
        if not remote.sha256:
            recorded.write_text(actual + "\n")
    return target


def _extract(download: Path, remote: RemoteFile, tmp: Path) -> Path:
    if remote.archive_member is None:
        return download
    out = tmp / "member"
    try:
        if remote.url.endswith((".tgz", ".tar.gz")):
            with tarfile.open(download) as tar:
                member = tar.extractfile(remote.archive_member)
                if member is None:
                    raise KeyError(remote.archive_member)
                with open(out, "wb") as f:
                    shutil.copyfileobj(member, f)
        else:
            with zipfile.ZipFile(download) as z, z.open(remote.archive_member) as member, open(out, "wb") as f:
                shutil.copyfileobj(member, f)
    except (KeyError, tarfile.TarError, zipfile.BadZipFile) as e:
        raise UserError(f"{remote.url}: cannot extract {remote.archive_member} ({e})") from None
    return out
