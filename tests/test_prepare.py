"""prepare_corpus: token files equal to encode_corpus, manifest, reuse, change detection, atomicity, sources,
built-in corpora on local stand-ins, and bad input through the CLI."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import PTB, REPO, assert_one_line_error, run_cli
from dist_rnn.config import DataConfig, load_config
from dist_rnn.data import layouts
from dist_rnn.data.encoding import encode_corpus
from dist_rnn.data.prepare import FORMAT_VERSION, prepare_corpus, prepared_key, read_manifest
from dist_rnn.data.progress import ByteProgress
from dist_rnn.data.tokenizers import load_tokenizer
from dist_rnn.errors import UserError


def split_ids(folder: Path) -> dict[str, np.ndarray]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return {s: np.fromfile(folder / r["file"], dtype=manifest["dtype"]) for s, r in manifest["splits"].items()}


def assert_same_as_encode_corpus(config: DataConfig):
    folder = prepare_corpus(config, progress="off")
    ids, today = split_ids(folder), encode_corpus(config)
    assert load_tokenizer(folder).vocab.tokens == today.vocab.tokens
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(ids[split], today.split(split), err_msg=split)
    return folder


def empty_config(folder: Path) -> str:
    """Writes an empty YAML config (all defaults; the tests give the data keys by --set) and returns its path."""
    path = Path(folder) / "empty.yaml"
    path.write_text("data: {}\n", encoding="utf-8")
    return str(path)


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


# ====================================================================== same tokens as today


@pytest.mark.parametrize("level", ["char", "word"])
@pytest.mark.parametrize("split", [[0.8, 0.15, 0.05], [0.9, 0.1, 0.0], [0.5, 0.25, 0.25]])
def test_split_sizes_and_ids_equal_encode_corpus(level, split, shakespeare_slice, cache, monkeypatch):
    monkeypatch.setattr("dist_rnn.data.sources.CHUNK_BYTES", 4099)  # many chunks, cut mid-word and mid-character
    config = DataConfig(corpus="file", path=str(shakespeare_slice), level=level, split=split, cache_dir=cache)
    folder = assert_same_as_encode_corpus(config)
    manifest = read_manifest(folder)
    if level == "char":
        n = 120_000
        a = int(round(n * split[0]))
        assert [manifest["splits"][s]["tokens"] for s in ("train", "valid", "test")] == \
            [a, int(round(n * split[1])), n - a - int(round(n * split[1]))]


@pytest.mark.parametrize("level", ["char", "word"])
def test_max_vocab_and_min_count(level, shakespeare_slice, cache):
    config = DataConfig(corpus="file", path=str(shakespeare_slice), level=level, max_vocab=30, cache_dir=cache)
    assert len(assert_same_as_encode_corpus(config) and load_tokenizer(prepare_corpus(config)).vocab) == 30
    text = shakespeare_slice.read_text(encoding="utf-8")
    train = text[:int(round(len(text) * 0.9))]
    folder = prepare_corpus(DataConfig(corpus="file", path=str(shakespeare_slice), level=level, min_count=5,
                                       cache_dir=cache), progress="off")
    from collections import Counter

    from dist_rnn.data.vocab import tokenize

    counts = Counter(tokenize(train, level))
    kept = sorted((t for t, c in counts.items() if c >= 5), key=lambda t: (-counts[t], t))
    assert load_tokenizer(folder).vocab.tokens == ["<unk>"] + kept
    assert 10 < len(kept) < len(counts)


def test_file_list_max_chars_bom_and_unicode(tmp_path, cache, monkeypatch):
    monkeypatch.setattr("dist_rnn.data.sources.CHUNK_BYTES", 7)
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbf" + "héllo wörld ✓ 𝄞\nsecond line\n".encode() * 20)
    (tmp_path / "b.txt").write_text("more text\n" * 30 + "tail ✓", encoding="utf-8")
    paths = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    for level in ("char", "word"):
        for max_chars in (None, 700, 3):
            config = DataConfig(corpus="file", path=paths, level=level, max_chars=max_chars,
                                split=[0.6, 0.3, 0.1], cache_dir=cache)
            assert_same_as_encode_corpus(config)


def test_train_valid_test_files_and_ptb(tmp_path, cache):
    for name, text in (("tr.txt", "hello world\nthe end\n"), ("va.txt", "low\n"), ("te.txt", "held\nzz")):
        (tmp_path / name).write_text(text, encoding="utf-8")
    config = load_config([], ["data.corpus=file", f"data.train_file={tmp_path / 'tr.txt'}",
                              f"data.valid_file={tmp_path / 'va.txt'}", f"data.test_file={tmp_path / 'te.txt'}",
                              f"data.cache_dir={cache}"]).data
    assert_same_as_encode_corpus(config)
    only_train = load_config([], ["data.corpus=file", f"data.train_file={tmp_path / 'tr.txt'}",
                                  f"data.cache_dir={cache}", "data.level=word"]).data
    folder = assert_same_as_encode_corpus(only_train)
    assert read_manifest(folder)["splits"]["valid"]["tokens"] == 0
    if (PTB / "ptb.valid.txt").is_file():
        ptb = tmp_path / "ptb"
        ptb.mkdir()
        # The real valid/test files, the valid text standing in for training.
        for split, src in (("train", "valid"), ("valid", "valid"), ("test", "test")):
            (ptb / f"ptb.{split}.txt").write_bytes((PTB / f"ptb.{src}.txt").read_bytes())
        assert_same_as_encode_corpus(DataConfig(corpus="ptb", path=str(ptb), level="word", cache_dir=cache))


@pytest.mark.parametrize("level", ["byte", "subword"])
def test_encode_corpus_refuses_the_new_levels(level, shakespeare_slice):
    # Its word tokenizer would otherwise split the text silently (a wrong model, no error).
    config = DataConfig(corpus="file", path=str(shakespeare_slice), level=level,
                        vocab_size=500 if level == "subword" else None)
    with pytest.raises(UserError, match=f"config key 'data.level': '{level}' tokens are read from prepared data"):
        encode_corpus(config)


def test_stdlib_corpus(cache):
    assert_same_as_encode_corpus(DataConfig(corpus="stdlib", max_chars=50_000, cache_dir=cache))


# ====================================================================== manifest and files


def test_manifest_contents(shakespeare_slice, cache):
    config = DataConfig(corpus="file", path=str(shakespeare_slice), level="word", cache_dir=cache)
    folder = prepare_corpus(config, progress="off")
    assert folder == Path(cache) / "prepared" / prepared_key(config)
    assert len(folder.name) == 16
    m = json.loads((folder / "manifest.json").read_text())
    assert m["format_version"] == FORMAT_VERSION and m["key"] == folder.name
    assert m["data"]["level"] == "word" and m["data"]["path"] == str(shakespeare_slice)
    assert m["tokenizer"] == {"kind": "word", "files": ["tokenizer.json"]}
    assert m["dtype"] == "uint16" and 256 < m["vocab_size"] <= 65536
    raw = shakespeare_slice.read_bytes()
    assert m["sources"] == [{"path": str(shakespeare_slice), "size": len(raw),
                             "mtime_ns": os.stat(shakespeare_slice).st_mtime_ns,
                             "sha256": hashlib.sha256(raw).hexdigest()}]
    n = len(raw.decode())
    assert [m["splits"][s]["source_bytes"] for s in ("train", "valid", "test")] == \
        [int(round(n * 0.9)), int(round(n * 0.05)), n - int(round(n * 0.9)) - int(round(n * 0.05))]  # ASCII
    for split, record in m["splits"].items():
        assert record["file"] == f"{split}.bin"
        assert (folder / record["file"]).stat().st_size == 2 * record["tokens"]
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "test.bin", "tokenizer.json",
                                                       "train.bin", "valid.bin"]
    # Only the leftovers-free folder is there: no temporary sibling remains.
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_dtype_follows_vocabulary_size(tmp_path, cache):
    words = " ".join(f"w{i}" for i in range(70_000)) + "\n"
    (tmp_path / "many.txt").write_text(words, encoding="utf-8")
    config = DataConfig(corpus="file", path=str(tmp_path / "many.txt"), level="word", split=[1.0, 0.0, 0.0],
                        cache_dir=cache)
    folder = prepare_corpus(config, progress="off")
    m = read_manifest(folder)
    assert m["vocab_size"] == 70_002 and m["dtype"] == "uint32"
    ids = split_ids(folder)["train"]
    assert load_tokenizer(folder).decode(ids) == words
    byte = prepare_corpus(DataConfig(corpus="file", path=str(tmp_path / "many.txt"), level="byte",
                                     cache_dir=cache), progress="off")
    assert read_manifest(byte)["dtype"] == "uint8"


def test_key_ignores_cache_dir_and_random_offset_but_not_tokens(tmp_path):
    base = DataConfig(corpus="file", path="x.txt")
    assert prepared_key(base) == prepared_key(DataConfig(corpus="file", path="x.txt", cache_dir="/elsewhere",
                                                         random_offset=True))
    assert prepared_key(base) == prepared_key(DataConfig(corpus="file", path=str(Path("x.txt").resolve())))
    for change in (dict(level="word"), dict(max_vocab=10), dict(split=[0.8, 0.1, 0.1]), dict(path="y.txt"),
                   dict(min_count=2)):
        assert prepared_key(DataConfig(**{"corpus": "file", "path": "x.txt", **change})) != prepared_key(base)


# ====================================================================== reuse and change detection


def test_reuse_and_changed_source(tmp_path, cache):
    path = tmp_path / "text.txt"
    path.write_text("abcabc\n" * 100, encoding="utf-8")
    config = DataConfig(corpus="file", path=str(path), cache_dir=cache)
    folder = prepare_corpus(config, progress="off")
    manifest_time = (folder / "manifest.json").stat().st_mtime_ns
    assert prepare_corpus(config, progress="off") == folder
    assert (folder / "manifest.json").stat().st_mtime_ns == manifest_time  # reused, not rewritten
    # Touched but the same bytes: the hash decides, still reused.
    os.utime(path, ns=(1, 10**18))
    assert prepare_corpus(config, progress="off") == folder
    assert (folder / "manifest.json").stat().st_mtime_ns == manifest_time
    # Same size, other bytes, mtime moved: prepared again.
    path.write_text("xyzxyz\n" * 100, encoding="utf-8")
    os.utime(path, ns=(1, 2 * 10**18))
    assert prepare_corpus(config, progress="off") == folder
    assert load_tokenizer(folder).vocab.tokens[1:] == ["x", "y", "z", "\n"]
    assert read_manifest(folder)["sources"][0]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # Another size: prepared again.
    path.write_text("q\n" * 10, encoding="utf-8")
    assert split_ids(prepare_corpus(config, progress="off"))["train"].size == 18
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_a_new_file_matching_the_glob_prepares_again(tmp_path, cache):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.txt").write_text("aaaa\n", encoding="utf-8")
    config = DataConfig(corpus="file", path=str(shards / "*.txt"), split=[1.0, 0.0, 0.0], cache_dir=cache)
    assert split_ids(prepare_corpus(config, progress="off"))["train"].size == 5
    (shards / "b.txt").write_text("bbbb\n", encoding="utf-8")
    assert split_ids(prepare_corpus(config, progress="off"))["train"].size == 10


# ====================================================================== atomicity


KILL_SCRIPT = """
import os, signal, sys
from dist_rnn.config import DataConfig
from dist_rnn.data import prepare

def die(path, *args):
    if path.name == "valid.bin":
        os.kill(os.getpid(), signal.SIGKILL)  # a hard kill in the middle: no cleanup runs
    return real(path, *args)

real = prepare._write_split
prepare._write_split = die
prepare.prepare_corpus(DataConfig(corpus="file", path=sys.argv[1], cache_dir=sys.argv[2]), progress="off")
"""


def test_killed_prepare_leaves_nothing_taken_as_complete(shakespeare_slice, cache):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(shakespeare_slice), cache], env=env,
                            capture_output=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    config = DataConfig(corpus="file", path=str(shakespeare_slice), cache_dir=cache)
    root = Path(cache) / "prepared"
    leftovers = list(root.iterdir())
    assert [p.name.startswith(f".tmp-{prepared_key(config)}-") for p in leftovers] == [True]
    assert (leftovers[0] / "train.bin").stat().st_size > 0  # it was killed half-way
    assert not (root / prepared_key(config)).exists()
    folder = prepare_corpus(config, progress="off")  # prepares anew and removes the dead process' folder
    assert [p.name for p in root.iterdir()] == [folder.name]
    assert read_manifest(folder)["splits"]["train"]["tokens"] == 108_000


def test_error_half_way_leaves_nothing(shakespeare_slice, cache, monkeypatch):
    from dist_rnn.data import prepare

    real = prepare._write_split

    def fail(path, *args):
        if path.name == "test.bin":
            raise KeyboardInterrupt
        return real(path, *args)

    monkeypatch.setattr(prepare, "_write_split", fail)
    config = DataConfig(corpus="file", path=str(shakespeare_slice), cache_dir=cache)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(config, progress="off")
    assert list((Path(cache) / "prepared").iterdir()) == []


def test_a_worker_finishing_first_is_kept(shakespeare_slice, cache, monkeypatch):
    from dist_rnn.data import prepare

    config = DataConfig(corpus="file", path=str(shakespeare_slice), cache_dir=cache)
    final = Path(cache) / "prepared" / prepared_key(config)
    real = prepare._build

    def other_worker_wins(tmp, *args):
        real(tmp, *args)
        shutil.copytree(tmp, final)  # another process installs the same data while this one finishes
        (final / "theirs").write_text("kept", encoding="utf-8")

    monkeypatch.setattr(prepare, "_build", other_worker_wins)
    assert prepare_corpus(config, progress="off") == final
    assert (final / "theirs").read_text() == "kept"
    assert [p.name for p in final.parent.iterdir()] == [final.name]


def test_content_hash_is_the_same_wherever_prepared(tmp_path):
    text = "the same words\nin two places\n" * 50
    manifests = []
    for where in ("a", "b"):
        (tmp_path / where).mkdir()
        (tmp_path / where / "t.txt").write_text(text, encoding="utf-8")
        config = DataConfig(corpus="file", path=str(tmp_path / where / "t.txt"), level="word",
                            cache_dir=str(tmp_path / where / "cache"))
        manifests.append(read_manifest(prepare_corpus(config, progress="off")))
    assert manifests[0]["sources"] != manifests[1]["sources"] and manifests[0]["key"] != manifests[1]["key"]
    assert manifests[0]["content_sha256"] == manifests[1]["content_sha256"]
    (tmp_path / "b" / "t.txt").write_text(text.replace("two", "too"), encoding="utf-8")
    changed = read_manifest(prepare_corpus(DataConfig(corpus="file", path=str(tmp_path / "b" / "t.txt"),
                                                      level="word", cache_dir=str(tmp_path / "b" / "cache")),
                                           progress="off"))
    assert changed["content_sha256"] != manifests[0]["content_sha256"]


# ====================================================================== sources


def test_glob_folder_list_and_gzip_give_the_same_tokens(tmp_path, cache):
    text = "".join(f"line {i} of the shard ✓\n" for i in range(300))
    parts = [text[:2000], text[2000:4500], text[4500:]]
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir()
    packed.mkdir()
    for i, part in enumerate(parts):
        (plain / f"shard-{i}.txt").write_text(part, encoding="utf-8")
        with gzip.open(packed / f"shard-{i}.txt.gz", "wt", encoding="utf-8") as f:
            f.write(part)
    (plain / ".hidden").write_text("not read", encoding="utf-8")
    whole = tmp_path / "whole.txt"
    whole.write_text(text, encoding="utf-8")
    specs = [str(whole), str(plain), str(plain / "shard-*.txt"), str(packed / "*.gz"),
             [str(packed / "shard-0.txt.gz"), str(plain / "shard-1.txt"), str(packed / "shard-2.txt.gz")]]
    results = []
    for spec in specs:
        config = DataConfig(corpus="file", path=spec, level="word", cache_dir=cache)
        folder = prepare_corpus(config, progress="off")
        results.append((load_tokenizer(folder).vocab.tokens, {k: v.tolist() for k, v in split_ids(folder).items()}))
    assert all(r == results[0] for r in results[1:])
    sources = read_manifest(prepare_corpus(DataConfig(corpus="file", path=str(packed / "*.gz"), level="word",
                                                      cache_dir=cache), progress="off"))["sources"]
    assert [Path(s["path"]).name for s in sources] == ["shard-0.txt.gz", "shard-1.txt.gz", "shard-2.txt.gz"]
    assert sources[0]["sha256"] == hashlib.sha256((packed / "shard-0.txt.gz").read_bytes()).hexdigest()


# ====================================================================== built-in corpora on stand-ins


def write_wikitext(folder: Path) -> dict[str, str]:
    texts = {"train": " = Title = \n\n Some text , with @-@ hyphen .\n" * 30, "valid": " = V = \n valid text .\n",
             "test": " = T = \n test text ✓ .\n"}
    folder.mkdir(parents=True)
    for split, text in texts.items():
        (folder / f"wiki.{split}.raw").write_text(text, encoding="utf-8")
    return texts


@pytest.mark.parametrize("corpus", ["wikitext2", "wikitext103"])
def test_wikitext_from_a_local_copy(corpus, tmp_path, cache):
    texts = write_wikitext(tmp_path / f"{corpus}-raw")
    config = load_config([], [f"data.corpus={corpus}", f"data.path={tmp_path / f'{corpus}-raw'}", "data.level=char",
                              f"data.cache_dir={cache}"]).data
    folder = prepare_corpus(config, progress="off")
    tok, ids = load_tokenizer(folder), split_ids(folder)
    known = set(texts["train"])  # characters outside the training split are <unk>, decoded as U+FFFD
    assert {s: tok.decode(ids[s]) for s in ids} == {
        s: "".join(c if c in known else "\ufffd" for c in t) for s, t in texts.items()}
    assert "\ufffd" in tok.decode(ids["test"])


def test_enwik8_is_cut_90_5_5_in_bytes(tmp_path, cache):
    data = bytes(range(256)) * 40 + b"\xff\xfe tail"  # not UTF-8: byte level reads it anyway
    (tmp_path / "enwik8").write_bytes(data)
    (tmp_path / "copy.bin").write_bytes(data)
    config = load_config([], ["data.corpus=enwik8", f"data.path={tmp_path}", "data.level=byte",
                              f"data.cache_dir={cache}"]).data
    ids = split_ids(prepare_corpus(config, progress="off"))
    # data.path may also name the file itself, under any name.
    renamed = load_config([], ["data.corpus=enwik8", f"data.path={tmp_path / 'copy.bin'}", "data.level=byte",
                               f"data.cache_dir={cache}"]).data
    assert {k: v.tolist() for k, v in split_ids(prepare_corpus(renamed, progress="off")).items()} == \
        {k: v.tolist() for k, v in ids.items()}
    n = len(data)
    assert [len(ids[s]) for s in ("train", "valid", "test")] == \
        [round(n * 0.9), round(n * 0.05), n - round(n * 0.9) - round(n * 0.05)]
    assert np.concatenate(list(ids.values())).tobytes() == data
    # The real file's split: 10^8 bytes give exactly 90M/5M/5M.
    from dist_rnn.data.corpora import split_points

    assert split_points(layouts.ENWIK8_BYTES, layouts.ENWIK8_SPLIT) == (90_000_000, 95_000_000)


def test_lm1b_from_a_local_copy(tmp_path, cache):
    root = tmp_path / "1-billion-word-language-modeling-benchmark-r13output"
    train_dir = root / "training-monolingual.tokenized.shuffled"
    heldout = root / "heldout-monolingual.tokenized.shuffled"
    train_dir.mkdir(parents=True)
    heldout.mkdir()
    for i in range(1, 100):
        (train_dir / f"news.en-{i:05d}-of-00100").write_text(f"shard {i} says hello .\n", encoding="utf-8")
    (heldout / "news.en.heldout-00000-of-00050").write_text("test says hello .\n", encoding="utf-8")
    (heldout / "news.en.heldout-00001-of-00050").write_text("valid hello\n", encoding="utf-8")
    config = load_config([], ["data.corpus=lm1b", f"data.path={root}", "data.level=word",
                              f"data.cache_dir={cache}"]).data
    folder = prepare_corpus(config, progress="off")
    m, tok, ids = read_manifest(folder), load_tokenizer(folder), split_ids(folder)
    assert len(m["sources"]) == 101 and m["splits"]["train"]["tokens"] == 99 * 6
    assert tok.decode(ids["test"]) == "<unk> says hello .\n"
    assert tok.decode(ids["valid"]) == "<unk> hello\n"
    (heldout / "news.en.heldout-00001-of-00050").unlink()
    with pytest.raises(UserError, match="heldout-00001-of-00050 not found .*lm1b needs .*101 files"):
        prepare_corpus(config, progress="off")


def make_archive(tmp_path: Path, kind: str, members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buffer, "w") as z:
            for name, data in members.items():
                z.writestr(name, data)
    else:
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def serving(payload: bytes, calls: list):
    def opener(url, timeout):
        calls.append(url)
        return io.BytesIO(payload)
    return opener


def offline(url, timeout):
    raise OSError("no network")


def test_fetch_archive_extracts_once_and_checks_the_sum(tmp_path):
    archive = layouts.RemoteArchive("w.zip", "https://example.org/w.zip", None,
                                    {"wiki.train.raw": "w/wiki.train.raw", "wiki.test.raw": "w/wiki.test.raw"})
    payload = make_archive(tmp_path, "zip", {"w/wiki.train.raw": b"train", "w/wiki.test.raw": b"test",
                                             "w/other": b"x"})
    calls = []
    folder = layouts.fetch_archive(archive, tmp_path / "c", serving(payload, calls))
    assert (folder / "wiki.train.raw").read_bytes() == b"train" and not (folder / "other").exists()
    assert (folder / "w.zip.sha256").read_text().strip() == hashlib.sha256(payload).hexdigest()
    assert layouts.fetch_archive(archive, tmp_path / "c", offline) == folder and len(calls) == 1
    checked = layouts.RemoteArchive("w.zip", archive.url, "0" * 64, archive.members)
    with pytest.raises(UserError, match="w.zip SHA-256 mismatch"):
        layouts.fetch_archive(checked, tmp_path / "d", serving(payload, []))
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == []  # nothing left


def test_fetch_archive_tar_gz_subfolders(tmp_path):
    archive = layouts.ARCHIVES["lm1b"]
    members = {m: f"{name}\n".encode() for name, m in archive.members.items()}
    payload = make_archive(tmp_path, "tgz", members)
    real = layouts.RemoteArchive(archive.name, archive.url, hashlib.sha256(payload).hexdigest(), archive.members)
    folder = layouts.fetch_archive(real, tmp_path / "lm1b", serving(payload, []))
    shard = "training-monolingual.tokenized.shuffled/news.en-00042-of-00100"
    assert (folder / shard).read_text() == shard + "\n"
    missing = layouts.RemoteArchive(archive.name, archive.url, None, {**archive.members, "extra": "nope"})
    with pytest.raises(UserError, match="has no member nope"):
        layouts.fetch_archive(missing, tmp_path / "other", serving(payload, []))


@pytest.mark.parametrize("corpus,level,expect", [
    ("wikitext2", "char", "put wiki.train.raw, wiki.valid.raw, wiki.test.raw from wikitext-2-raw-v1.zip into "),
    ("wikitext103", "word", "from wikitext-103-raw-v1.zip into "),
    ("enwik8", "byte", "put enwik8 from enwik8.zip into "),
    ("lm1b", "word", "(101 files) from 1-billion-word-language-modeling-benchmark-r13output.tar.gz into "),
])
def test_offline_error_says_which_file_goes_where(corpus, level, expect, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("urllib.request.urlopen", offline)
    cache = tmp_path / "cache"
    code, out, err = run_cli(["prepare", empty_config(tmp_path), "--set", f"data.corpus={corpus}",
                              "--set", f"data.level={level}", "--set", f"data.cache_dir={cache}"], capsys)
    line = assert_one_line_error(code, out, err)
    assert expect in line and str(cache / corpus) in line and "data.path" in line
    assert not (cache / "prepared").exists()


def test_local_copy_missing_a_file_names_it(tmp_path, capsys):
    write_wikitext(tmp_path / "w")
    (tmp_path / "w" / "wiki.valid.raw").unlink()
    code, out, err = run_cli(["prepare", empty_config(tmp_path), "--set", "data.corpus=wikitext2", "--set",
                              f"data.path={tmp_path / 'w'}", "--set", f"data.cache_dir={tmp_path / 'c'}"], capsys)
    line = assert_one_line_error(code, out, err)
    assert f"{tmp_path / 'w' / 'wiki.valid.raw'} not found" in line and "wikitext-2-raw-v1.zip" in line


# ====================================================================== the CLI and bad input


def prepare_args(path, cache, *extra):
    return ["prepare", empty_config(Path(cache).parent), "--set", "data.corpus=file", "--set", f"data.path={path}",
            "--set", f"data.cache_dir={cache}", *extra]


def test_cli_prepare_prints_the_folder_and_counts(shakespeare_slice, cache, capsys):
    code, out, err = run_cli(prepare_args(shakespeare_slice, cache, "--set", "data.level=byte"), capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["tokenizer"] == "byte" and result["vocab_size"] == 256
    assert result["tokens"] == {"train": 108_000, "valid": 6_000, "test": 6_000}
    assert Path(result["prepared"]).parent == Path(cache) / "prepared"
    assert "encoding:" in out and "MB/s" in out  # log lines when not on a terminal


@pytest.mark.parametrize("content,level,expect", [
    (b"abc\xff\xfe", "char", "is not UTF-8 text (byte 3)"),
    (b"ok text\n" * 1000 + b"\xc3", "word", "is not UTF-8 text (it ends inside a character)"),
    (b"", "char", "data.path: the training split is empty (read from "),
    (b"", "subword", "data.path: the training split is empty (read from "),
])
def test_bad_source_one_line_error(content, level, expect, tmp_path, capsys):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    extra = ["--set", "data.vocab_size=300"] if level == "subword" else []
    code, out, err = run_cli(prepare_args(path, tmp_path / "c", "--set", f"data.level={level}", *extra), capsys)
    line = assert_one_line_error(code, out, err)
    assert expect in line
    if "UTF-8" in expect:
        assert "data.path" in line and str(path) in line
    assert list((tmp_path / "c" / "prepared").iterdir()) == []


def test_unreadable_and_bad_gzip_sources(tmp_path, capsys, monkeypatch):
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    code, out, err = run_cli(prepare_args(tmp_path / "bad.gz", tmp_path / "c"), capsys)
    assert "is not a readable gzip file" in assert_one_line_error(code, out, err)
    code, out, err = run_cli(prepare_args(tmp_path / "nothing-*.txt", tmp_path / "c"), capsys)
    assert "data.path: no file matches" in assert_one_line_error(code, out, err)
    # Root reads a file without permissions: the denial is simulated where the file is opened.
    locked = tmp_path / "locked.txt"
    locked.write_text("secret", encoding="utf-8")

    def denied(self):
        raise PermissionError(13, "Permission denied", self.path)

    monkeypatch.setattr("dist_rnn.data.sources.Source._open", denied)
    code, out, err = run_cli(prepare_args(locked, tmp_path / "c"), capsys)
    assert f"data.path: cannot read {locked}: Permission denied" in assert_one_line_error(code, out, err)


def test_subword_that_cannot_train_through_the_cli(tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("a few words\n" * 10, encoding="utf-8")
    code, out, err = run_cli(prepare_args(tmp_path / "tiny.txt", tmp_path / "c", "--set", "data.level=subword",
                                          "--set", "data.vocab_size=4000"), capsys)
    assert "config key 'data.vocab_size': SentencePiece cannot train 4000" in assert_one_line_error(code, out, err)
    assert list((tmp_path / "c" / "prepared").iterdir()) == []


@pytest.mark.parametrize("damage,expect", [
    (lambda f: (f / "train.bin").write_bytes((f / "train.bin").read_bytes()[:-1]), "train.bin: 107999 bytes"),
    (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json: missing"),
    (lambda f: (f / "manifest.json").write_text("{trunc", encoding="utf-8"), "not a dist-rnn manifest"),
    (lambda f: (f / "manifest.json").write_text(json.dumps(
        {**json.loads((f / "manifest.json").read_text()), "format_version": 99})), "format version 99"),
])
def test_damaged_or_foreign_cache_is_refused_untouched(damage, expect, shakespeare_slice, cache, capsys):
    code, out, err = run_cli(prepare_args(shakespeare_slice, cache), capsys)
    assert code == 0, err
    folder = Path(json.loads(out.strip().splitlines()[-1])["prepared"])
    damage(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, out, err = run_cli(prepare_args(shakespeare_slice, cache), capsys)
    line = assert_one_line_error(code, out, err)
    assert expect in line and f"delete {folder} to prepare again" in line
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.parametrize("overrides,expect", [
    (["data.level=subword"], "config key 'data.vocab_size': data.level 'subword' needs a vocab_size above 258"),
    (["data.vocab_size=500"], "config key 'data.vocab_size': only data.level 'subword' uses it"),
    (["data.level=subword", "data.vocab_size=500", "data.max_vocab=10"], "config key 'data.max_vocab'"),
    (["data.min_count=0"], "config key 'data.min_count': must be at least 1"),
    (["data.corpus=enwik8", "data.level=char"], "the enwik8 corpus is byte level"),
    (["data.level=bytes"], "data.level"),
])
def test_config_errors(overrides, expect, tmp_path, capsys):
    args = ["prepare", empty_config(tmp_path)]
    for o in overrides:
        args += ["--set", o]
    assert expect in assert_one_line_error(*run_cli(args, capsys))


# ====================================================================== progress


def test_progress_bar_on_a_terminal(capsys, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("dist_rnn.data.progress.time.monotonic", lambda: clock[0])
    meter = ByteProgress("counting", 50_000_000, mode="bar")
    for _ in range(4):
        clock[0] += 1.0
        meter.update(5_000_000)
    meter.close()
    err = capsys.readouterr().err
    frames = err.split("\r")[1:]
    assert len(frames) == 5 and err.endswith("\n")
    assert frames[0].startswith("counting: 5.0/50.0 MB, 5.0 MB/s, ETA 0:00:09")
    assert frames[3].startswith("counting: 20.0/50.0 MB, 5.0 MB/s, ETA 0:00:06")
    assert frames[4].startswith("counting: 20.0/50.0 MB, 5.0 MB/s, 4.0 s")


def test_progress_line_has_bytes_speed_and_eta(caplog, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("dist_rnn.data.progress.time.monotonic", lambda: clock[0])
    meter = ByteProgress("encoding", 10_000_000, mode="log", log_every=0.0)
    clock[0] += 2.0  # two seconds in
    with caplog.at_level("INFO", logger="dist_rnn"):
        meter.update(4_000_000)
        meter.close()
    first, last = [r.getMessage() for r in caplog.records]
    assert first.startswith("encoding: 4.0/10.0 MB, 2.0 MB/s, ETA 0:00:03")
    assert last.startswith("encoding: 4.0/10.0 MB, 2.0 MB/s, 2.0 s")


def test_bench_prepare_runs_small(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("dist_rnn_benchmark", REPO / "tools" / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)  # puts tools/ on sys.path: the bench package imports
    import bench.prepare_throughput as bench_prepare

    assert benchmark.main(["--prepare", "--mb", "0.3", "--vocab-size", "400", "--sample-chars", "100000"]) == 0
    out = capsys.readouterr().out
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["level"] for r in results] == ["byte", "char", "word", "subword"]
    for r in results:
        assert 0.29 < r["mb"] < 0.32 and r["seconds"] > 0 and r["passes"]["encoding"] >= 0
        # Rounded to 0.1 MB/s (a loaded machine may take seconds for 0.3 MB: 0.0 MB/s is possible); an idle
        # one takes milliseconds, where the rounding of "mb" (0.01) and "seconds" (1e-4) is a few percent.
        assert r["mb_per_s"] == pytest.approx(r["mb"] / r["seconds"], rel=0.05, abs=0.051)
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "tokenizer" not in line]
    assert [(row[0].strip(), float(row[6])) for row in rows] == [("byte", 50.0), ("char", 50.0), ("word", 10.0),
                                                                 ("subword", 5.0)]
    for row, r in zip(rows, results):  # met: CPU-time throughput against the target
        assert row[7].strip() == ("yes" if r["mb_per_cpu_s"] >= float(row[6]) else "no")
    text = bench_prepare.zipf_text(0.05)
    words = text.split()
    counts = sorted((words.count(w) for w in set(words[:50])), reverse=True)
    assert counts[0] > 10 * counts[-1]  # Zipfian: the head words are far more frequent than the tail


@pytest.mark.parametrize("level", ["char", "word"])
def test_train_on_whole_text_trains_on_every_split_and_keeps_the_held_parts(level, shakespeare_slice, cache,
                                                                            monkeypatch):
    monkeypatch.setattr("dist_rnn.data.sources.CHUNK_BYTES", 4099)
    config = DataConfig(corpus="file", path=str(shakespeare_slice), level=level, train_on_whole_text=True,
                        cache_dir=cache)
    folder = assert_same_as_encode_corpus(config)
    tokens = {s: read_manifest(folder)["splits"][s]["tokens"] for s in ("train", "valid", "test")}
    plain = read_manifest(prepare_corpus(dataclasses.replace(config, train_on_whole_text=False),
                                         progress="off"))["splits"]
    # Words cut at a split boundary count twice in the cut stream, once in the whole one.
    assert tokens["train"] - sum(plain[s]["tokens"] for s in ("train", "valid", "test")) in ((0,) if level == "char"
                                                                                           else (0, -1, -2))
    assert (tokens["valid"], tokens["test"]) == (plain["valid"]["tokens"], plain["test"]["tokens"])
