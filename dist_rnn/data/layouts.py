"""Where each split of a configured corpus comes from, as source files.

A corpus is either one stream cut into train/valid/test parts by fractions
(``stdlib``, ``file``, ``tinyshakespeare``, ``text8``, ``enwik8``) or three
file lists, one per split (``ptb``, ``wikitext2``, ``wikitext103``, ``lm1b``,
``data.train_file``). The fractions cut the stream at character counts for
the text tokenizers and at byte counts for ``byte``, with the same rounding as
:func:`~dist_rnn.data.corpora.split_text`.

The archive corpora (WikiText, enwik8, One Billion Word) are downloaded once
into ``<cache_dir>/<corpus>/`` and their files extracted there, laid out as
in the archive; ``data.path`` may point at a local copy laid out the same way.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from dist_rnn.config import DataConfig
from dist_rnn.data.corpora import (SINGLE_FILE_CORPORA, cache_dir, local_or_fetch, ptb_files, sha256_of,
                                   stdlib_text)
from dist_rnn.data.sources import Source, expand
from dist_rnn.errors import UserError

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class RemoteArchive:
    """A public archive fetched once; the corpus' files are extracted from it.

    Attributes:
        name: The archive's file name.
        url: Where it is downloaded from.
        sha256: Its SHA-256, or None where no published sum could be checked
            (then the sum seen at first download is recorded and checked).
        members: Path inside the archive of each file the corpus reads, keyed
            by the path the file gets under the corpus folder.
    """

    name: str
    url: str
    sha256: str | None
    members: dict[str, str]


def _wikitext(size: str, sha256: str) -> RemoteArchive:
    folder = f"wikitext-{size}-raw"
    return RemoteArchive(f"wikitext-{size}-raw-v1.zip", f"https://wikitext.smerity.com/wikitext-{size}-raw-v1.zip",
                         sha256, {f"wiki.{s}.raw": f"{folder}/wiki.{s}.raw" for s in SPLITS})


_LM1B_ROOT = "1-billion-word-language-modeling-benchmark-r13output"
_LM1B_TRAIN = [f"training-monolingual.tokenized.shuffled/news.en-{i:05d}-of-00100" for i in range(1, 100)]
_LM1B_HELDOUT = "heldout-monolingual.tokenized.shuffled/news.en.heldout-{:05d}-of-00050"

# Archive SHA-256 sums as registered by the DataDeps recipes of the Julia
# package LanguageModelingDatasets.jl (enwik8.zip's also by an independent
# project's download script); they were NOT verified by a download here (no
# network where this was written).
ARCHIVES = {
    "wikitext2": _wikitext("2", "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11"),
    "wikitext103": _wikitext("103", "91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794"),
    "enwik8": RemoteArchive("enwik8.zip", "http://mattmahoney.net/dc/enwik8.zip",
                            "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc", {"enwik8": "enwik8"}),
    "lm1b": RemoteArchive(f"{_LM1B_ROOT}.tar.gz", f"http://www.statmt.org/lm-benchmark/{_LM1B_ROOT}.tar.gz",
                          "01ba60381110baf7f189dfd2b8374de371e8c9a340835793f190bdae9e90a34e",
                          {p: f"{_LM1B_ROOT}/{p}" for p in
                           _LM1B_TRAIN + [_LM1B_HELDOUT.format(0), _LM1B_HELDOUT.format(1)]}),
}

# enwik8: the first 10^8 bytes of the English Wikipedia dump, cut 90M/5M/5M.
ENWIK8_BYTES = 100_000_000
ENWIK8_SPLIT = [0.9, 0.05, 0.05]


@dataclass
class CorpusLayout:
    """The source files of each split.

    Either ``splits`` (one file list per split) or ``stream`` (one file list
    cut by ``fractions``) is set.

    Attributes:
        splits: Files of ``train``, ``valid``, ``test`` (a list may be empty).
        stream: Files of the one stream.
        fractions: Train/valid/test fractions of the stream's units.
        max_units: Read at most this many units of the stream (characters,
            bytes at ``byte`` level).
    """

    splits: dict[str, list[Source]] | None = None
    stream: list[Source] | None = None
    fractions: list[float] | None = None
    max_units: int | None = None

    def sources(self) -> list[Source]:
        """All source files, in reading order."""
        if self.stream is not None:
            return list(self.stream)
        return [s for split in SPLITS for s in self.splits[split]]


def corpus_layout(config: DataConfig) -> CorpusLayout:
    """Resolves the configured corpus to its source files, fetching a built-in corpus if needed.

    Raises:
        UserError: If a file is missing (naming where to put it), a download
            fails or a checksum does not match.
    """
    if config.train_file:
        return CorpusLayout(splits={
            "train": expand(config.train_file, "data.train_file"),
            "valid": expand(config.valid_file, "data.valid_file") if config.valid_file else [],
            "test": expand(config.test_file, "data.test_file") if config.test_file else []})
    corpus = config.corpus
    if corpus == "stdlib":
        text = stdlib_text(config.max_chars).encode("utf-8")
        return CorpusLayout(stream=[Source("<stdlib>", "data.corpus", text)], fractions=list(config.split))
    if corpus == "file":
        return CorpusLayout(stream=expand(config.path, "data.path"), fractions=list(config.split),
                            max_units=config.max_chars)
    if corpus in SINGLE_FILE_CORPORA:
        path = local_or_fetch(config, corpus, SINGLE_FILE_CORPORA[corpus])
        return CorpusLayout(stream=[Source(str(path), "data.path")], fractions=list(config.split),
                            max_units=config.max_chars)
    if corpus == "ptb":
        return CorpusLayout(splits={s: [Source(str(p), "data.path")] for s, p in ptb_files(config).items()})
    if corpus in ("wikitext2", "wikitext103"):
        folder = corpus_folder(config, corpus)
        return CorpusLayout(splits={s: [Source(str(folder / f"wiki.{s}.raw"), "data.path")] for s in SPLITS})
    if corpus == "enwik8":
        cap = min(config.max_chars or ENWIK8_BYTES, ENWIK8_BYTES)
        given = Path(config.path if isinstance(config.path, str) else config.path[0]).expanduser() \
            if config.path else None
        path = given.resolve() if given is not None and given.is_file() else corpus_folder(config, corpus) / "enwik8"
        return CorpusLayout(stream=[Source(str(path), "data.path")], fractions=ENWIK8_SPLIT, max_units=cap)
    if corpus == "lm1b":
        folder = corpus_folder(config, corpus)
        return CorpusLayout(splits={
            "train": [Source(str(folder / p), "data.path") for p in _LM1B_TRAIN],
            "valid": [Source(str(folder / _LM1B_HELDOUT.format(1)), "data.path")],
            "test": [Source(str(folder / _LM1B_HELDOUT.format(0)), "data.path")]})
    raise UserError(f"config key 'data.corpus': unknown corpus {corpus!r}")


def corpus_folder(config: DataConfig, corpus: str, opener=None) -> Path:
    """The folder holding an archive corpus' files: ``data.path`` if set, else the cache (fetched once).

    Raises:
        UserError: Naming the first missing file and where it belongs.
    """
    archive = ARCHIVES[corpus]
    if config.path:
        given = Path(config.path if isinstance(config.path, str) else config.path[0]).expanduser()
        folder = given
        missing = [name for name in archive.members if not (folder / name).is_file()]
        if missing:
            raise UserError(f"data.path: {folder / missing[0]} not found ({corpus} needs "
                            f"{_describe_layout(archive)} under data.path, as extracted from {archive.name})")
        return folder.resolve()
    return fetch_archive(archive, cache_dir(config) / corpus, opener or urllib.request.urlopen)


def _describe_layout(archive: RemoteArchive) -> str:
    names = list(archive.members)
    if len(names) <= 3:
        return ", ".join(names)
    return f"{names[0]} ... {names[-3]} and {', '.join(names[-2:])} ({len(names)} files)"


def fetch_archive(archive: RemoteArchive, folder: Path, opener=urllib.request.urlopen) -> Path:
    """Returns the corpus folder, downloading the archive and extracting the corpus' files first if needed.

    The download and the extraction go to a temporary folder; the files are
    moved into place only after the archive's checksum passed, so an
    interrupted or bad download leaves nothing.

    Args:
        archive: What to fetch.
        folder: The corpus' cache folder.
        opener: ``urlopen``-like callable (tests pass a local one).

    Raises:
        UserError: If offline (naming the files and where to put them), or on
            a checksum mismatch or a member missing from the archive.
    """
    if all((folder / name).is_file() for name in archive.members):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    recorded = folder / (archive.name + ".sha256")
    expected = archive.sha256 or (recorded.read_text().strip() if recorded.is_file() else None)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        download = Path(tmp) / archive.name
        try:
            with opener(archive.url, timeout=60) as response, open(download, "wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
        except OSError as e:
            reason = getattr(e, "reason", None) or e
            raise UserError(f"cannot download {archive.url} ({reason}); put {_describe_layout(archive)} from "
                            f"{archive.name} into {folder} (or point data.path at a folder holding them)") from None
        actual = sha256_of(download)
        if expected and actual != expected:
            raise UserError(f"{archive.url}: {archive.name} SHA-256 mismatch ({actual[:12]}... != {expected[:12]}...)")
        extracted = _extract_members(download, archive, Path(tmp) / "files")
        for name in archive.members:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(extracted / name, folder / name)
        if not archive.sha256:
            recorded.write_text(actual + "\n")
    return folder


def _extract_members(download: Path, archive: RemoteArchive, out: Path) -> Path:
    wanted = {member: name for name, member in archive.members.items()}
    try:
        if archive.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(download) as tar:
                for info in tar:  # one pass over the stream: a .tar.gz has no index
                    name = wanted.pop(info.name.removeprefix("./"), None)
                    if name is not None and info.isfile():
                        _copy_member(tar.extractfile(info), out / name)
        else:
            with zipfile.ZipFile(download) as z:
                for member, name in list(wanted.items()):
                    if member in z.namelist():
                        with z.open(member) as src:
                            _copy_member(src, out / name)
                        del wanted[member]
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
        raise UserError(f"{archive.url}: cannot extract {archive.name} ({e})") from None
    if wanted:
        raise UserError(f"{archive.url}: {archive.name} has no member {next(iter(wanted))}")
    return out


def _copy_member(src, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as f:
        shutil.copyfileobj(src, f, 1 << 20)
