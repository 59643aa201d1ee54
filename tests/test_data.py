"""Vocabulary, stateful stream batching, corpora and the download cache."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dist_rnn.data.batching import StreamBatcher
from dist_rnn.config import DataConfig, load_config
from dist_rnn.data.corpora import RemoteFile, fetch, load_splits, split_text
from dist_rnn.data.encoding import encode_corpus
from dist_rnn.errors import UserError
from dist_rnn.data.vocab import EOS, UNK, Vocabulary, tokenize

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"
PTB = DATA / "ptb"


# ====================================================================== vocabulary


def test_ids_unk_first_then_by_frequency_ties_by_token():
    vocab = Vocabulary.build(list("abbcccddde"), "char")
    # c and d both occur 3 times: tie broken by the token itself.
    assert vocab.tokens == [UNK, "c", "d", "b", "a", "e"]
    assert vocab.unk_id == 0
    assert vocab.encode(list("cab")).tolist() == [1, 4, 3]
    assert vocab.encode(["z"]).tolist() == [0]
    assert vocab.encode(list("ab")).dtype == np.int32


def test_literal_unk_token_in_training_data_is_not_duplicated():
    vocab = Vocabulary.build(["x", UNK, UNK, UNK, "y", "y"], "word")
    assert vocab.tokens == [UNK, "y", "x"]


def test_char_round_trip():
    text = "To be, or not to be:\nthat is the question. Ünïcödé ✓\n"
    vocab = Vocabulary.build(tokenize(text, "char"), "char")
    ids = vocab.encode_text(text)
    assert len(ids) == len(text)
    assert vocab.decode(ids) == text
    assert len(vocab) == len(set(text)) + 1


def test_word_tokenize_newline_is_eos():
    assert tokenize("the cat  sat\n on\tthe mat\n\nend", "word") == [
        "the", "cat", "sat", EOS, "on", "the", "mat", EOS, EOS, "end"]


def test_word_round_trip():
    text = "the cat sat\non the mat\nthe end\n"
    vocab = Vocabulary.build(tokenize(text, "word"), "word")
    ids = vocab.encode_text(text)
    assert len(ids) == 8 + 3
    assert ids.tolist().count(vocab.tokens.index(EOS)) == 3
    assert vocab.decode(ids) == text
    assert vocab.tokens[:3] == [UNK, EOS, "the"]  # eos 3x, the 3x: '<eos>' < 'the'


def test_max_vocab_maps_rare_tokens_to_unk():
    vocab = Vocabulary.build(list("aaaabbbccd"), "char", max_size=3)
    assert vocab.tokens == [UNK, "a", "b"]
    assert vocab.encode(list("abcdx")).tolist() == [1, 2, 0, 0, 0]
    assert vocab.unknown(list("abcdcx")) == ["c", "d", "x"]


def test_save_load_round_trip(tmp_path):
    vocab = Vocabulary.build(list("héllo wörld\n"), "char")
    path = tmp_path / "vocab.json"
    vocab.save(path)
    loaded = Vocabulary.load(path)
    assert loaded == vocab
    assert loaded.tokens == vocab.tokens and loaded.level == "char"
    words = Vocabulary.build(["a", "b", EOS], "word")
    words.save(path)
    assert Vocabulary.load(path) == words
    assert Vocabulary.load(path) != vocab


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="vocabulary not found"):
        Vocabulary.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="not a dist-rnn vocabulary"):
        Vocabulary.load(bad)
    bad.write_text('{"level": "char", "tokens": ["a", "b"]}', encoding="utf-8")  # no <unk>
    with pytest.raises(UserError, match="not a dist-rnn vocabulary"):
        Vocabulary.load(bad)


# ====================================================================== batching


def all_windows(batcher: StreamBatcher, epoch: int):
    return [batcher.window(epoch, k) for k in range(batcher.batches_in_epoch(epoch))]


def test_rows_and_counts():
    b = StreamBatcher(np.arange(1003), batch_size=4, num_steps=10)
    assert b.rows.shape == (4, 250)  # the 3 leftover tokens are dropped
    assert b.row_length == 250
    assert b.batches_in_epoch() == 24  # (250 - 1) // 10
    assert b.tokens_per_epoch() == 24 * 10 * 4
    inputs, targets = b.window(1, 0)
    assert inputs.shape == targets.shape == (4, 10)
    assert inputs[:, 0].tolist() == [0, 250, 500, 750]


def test_targets_are_inputs_shifted_by_one():
    ids = np.random.default_rng(0).integers(0, 50, size=2000).astype(np.int32)
    b = StreamBatcher(ids, batch_size=5, num_steps=7)
    for inputs, targets in all_windows(b, 1):
        np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])


def test_row_continuity_across_batches():
    ids = np.random.default_rng(1).integers(0, 50, size=2000).astype(np.int32)
    b = StreamBatcher(ids, batch_size=5, num_steps=7)
    windows = all_windows(b, 1)
    assert len(windows) == (400 - 1) // 7
    for (_, targets_k), (inputs_next, _) in zip(windows, windows[1:]):
        np.testing.assert_array_equal(inputs_next[:, 0], targets_k[:, -1])


@pytest.mark.parametrize("random_offset", [False, True])
def test_exact_token_coverage(random_offset):
    batch, steps = 4, 10
    b = StreamBatcher(np.arange(1003), batch, steps, seed=5, random_offset=random_offset)
    for epoch in (1, 2, 3):
        n, off = b.batches_in_epoch(epoch), b.offset(epoch)
        windows = all_windows(b, epoch)
        inputs = np.concatenate([w[0] for w in windows], axis=1)
        targets = np.concatenate([w[1] for w in windows], axis=1)
        for i in range(batch):
            row_start = i * 250 + off
            # Inputs walk the row without gap or repeat; targets are the next tokens.
            np.testing.assert_array_equal(inputs[i], np.arange(row_start, row_start + n * steps))
            np.testing.assert_array_equal(targets[i], np.arange(row_start + 1, row_start + 1 + n * steps))
            covered = np.union1d(inputs[i], targets[i])
            np.testing.assert_array_equal(covered, np.arange(row_start, row_start + n * steps + 1))
        # Not one more window fits in the row.
        assert off + (n + 1) * steps + 1 > b.row_length
    if not random_offset:
        assert b.batches_in_epoch() == 24


def test_dataset_matches_window():
    ids = np.random.default_rng(2).integers(0, 30, size=1500).astype(np.int32)
    for random_offset in (False, True):
        b = StreamBatcher(ids, batch_size=3, num_steps=9, seed=11, random_offset=random_offset)
        for epoch, start in ((1, 0), (2, 5), (3, b.batches_in_epoch(3) - 1)):
            got = [(x.numpy(), y.numpy()) for x, y in b.dataset(epoch, start)]
            expected = [b.window(epoch, k) for k in range(start, b.batches_in_epoch(epoch))]
            assert len(got) == len(expected) > 0
            for (gx, gy), (ex, ey) in zip(got, expected):
                assert gx.dtype == np.int32
                np.testing.assert_array_equal(gx, ex)
                np.testing.assert_array_equal(gy, ey)


def test_window_pipeline_runs_without_autotuning():
    # An autotuned iterator's model thread made deleting the iterator at an
    # epoch's end block for up to the autotuner's period (36 s measured).
    b = StreamBatcher(np.arange(1003), batch_size=4, num_steps=10)
    options = b.dataset(1).options()
    assert options.autotune.enabled is False
    assert b.dataset(2, 3).options().autotune.enabled is False


def test_random_offset_deterministic_per_seed_and_epoch():
    ids = np.arange(5000)
    a = StreamBatcher(ids, 4, 20, seed=7, random_offset=True)
    b = StreamBatcher(ids, 4, 20, seed=7, random_offset=True)
    c = StreamBatcher(ids, 4, 20, seed=8, random_offset=True)
    offsets_a = [a.offset(e) for e in range(1, 11)]
    assert offsets_a == [b.offset(e) for e in range(1, 11)]
    assert offsets_a == [a.offset(e) for e in range(1, 11)]  # asking again changes nothing
    assert all(0 <= o < 20 for o in offsets_a)
    assert len(set(offsets_a)) > 1  # moves between epochs
    assert offsets_a != [c.offset(e) for e in range(1, 11)]  # depends on the seed
    np.testing.assert_array_equal(a.window(3, 0)[0][:, 0], a.rows[:, a.offset(3)])
    assert a.batches_in_epoch(3) == (a.row_length - 1 - a.offset(3)) // 20
    # Without random_offset every epoch starts at 0.
    plain = StreamBatcher(ids, 4, 20, seed=7)
    assert [plain.offset(e) for e in range(1, 6)] == [0] * 5


def test_random_offset_never_empties_an_epoch():
    # Rows of 15 tokens fit exactly one window of 10 (+1 target) at offsets 0..4 only.
    b = StreamBatcher(np.arange(60), batch_size=4, num_steps=10, seed=0, random_offset=True)
    assert [b.batches_in_epoch(e) for e in range(1, 21)] == [1] * 20


def test_smallest_corpus_that_fits():
    b = StreamBatcher(np.arange(44), batch_size=4, num_steps=10)
    assert b.batches_in_epoch() == 1


def test_too_small_corpus_raises():
    with pytest.raises(UserError) as info:
        StreamBatcher(np.arange(43), batch_size=4, num_steps=10, split="valid")
    message = str(info.value)
    assert "valid split" in message
    assert "43 tokens" in message
    assert "train.batch_size 4" in message
    assert "train.num_steps 10" in message


# ====================================================================== corpora


def test_split_text_fractions():
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    s = split_text(text, [0.8, 0.15, 0.05])
    assert (len(s.train), len(s.valid), len(s.test)) == (800, 150, 50)
    assert s.train + s.valid + s.test == text
    s = split_text(text, [0.9, 0.1, 0.0])
    assert (len(s.train), len(s.valid), len(s.test)) == (900, 100, 0)
    s = split_text("abcdefg", [0.5, 0.25, 0.25])
    assert (s.train, s.valid, s.test) == ("abcd", "ef", "g")  # round(3.5)=4, round(1.75)=2


def test_file_corpus_path_list_and_max_chars(tmp_path):
    (tmp_path / "a.txt").write_text("a" * 60, encoding="utf-8")
    (tmp_path / "b.txt").write_text("b" * 40, encoding="utf-8")
    cfg = DataConfig(corpus="file", path=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], split=[0.5, 0.3, 0.2])
    s = load_splits(cfg)
    assert (s.train, s.valid, s.test) == ("a" * 50, "a" * 10 + "b" * 20, "b" * 20)
    cfg.max_chars = 70
    s = load_splits(cfg)
    assert s.train + s.valid + s.test == "a" * 60 + "b" * 10
    assert len(s.train) == 35


def test_train_on_whole_text_trains_on_every_split_and_keeps_valid_and_test(tmp_path):
    (tmp_path / "a.txt").write_text("abcdefghij" * 10, encoding="utf-8")
    cfg = DataConfig(corpus="file", path=str(tmp_path / "a.txt"), split=[0.8, 0.15, 0.05])
    held_out = load_splits(cfg)
    cfg.train_on_whole_text = True
    whole = load_splits(cfg)
    assert whole.train == "abcdefghij" * 10
    assert (whole.valid, whole.test) == (held_out.valid, held_out.test) and len(whole.valid) == 15
    # A run's data identity changes with it (a resume cannot switch silently).
    assert whole.sha256() != held_out.sha256()
    # 'j' only occurs in the last 20%: now it is in the vocabulary, not <unk>.
    cfg.path = str(tmp_path / "b.txt")
    (tmp_path / "b.txt").write_text("ab" * 40 + "j" * 20, encoding="utf-8")
    assert "j" in encode_corpus(cfg).vocab.decode(encode_corpus(cfg).valid)


def test_file_corpus_train_valid_test_files(tmp_path):
    for name, text in (("tr.txt", "hello world\n"), ("va.txt", "low\n"), ("te.txt", "held\nzz")):
        (tmp_path / name).write_text(text, encoding="utf-8")
    config = load_config([], ["data.corpus=file", f"data.train_file={tmp_path / 'tr.txt'}",
                              f"data.valid_file={tmp_path / 'va.txt'}", f"data.test_file={tmp_path / 'te.txt'}"])
    s = load_splits(config.data)
    assert (s.train, s.valid, s.test) == ("hello world\n", "low\n", "held\nzz")
    corpus = encode_corpus(config.data)
    assert len(corpus.vocab) == len(set("hello world\n")) + 1
    assert corpus.vocab.decode(corpus.valid) == "low\n"
    # 'z' never occurs in the training file: it maps to <unk>.
    assert corpus.test.tolist()[-2:] == [0, 0]
    assert corpus.split("test") is corpus.test


def test_file_corpus_missing_file_names_key(tmp_path):
    cfg = DataConfig(corpus="file", path=str(tmp_path / "nope.txt"))
    with pytest.raises(UserError, match=r"data\.path: file not found: .*nope\.txt"):
        load_splits(cfg)


def test_file_corpus_not_utf8(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"abc\xff\xfe")
    with pytest.raises(UserError, match="not UTF-8 text"):
        load_splits(DataConfig(corpus="file", path=str(tmp_path / "bin.txt")))


def test_byte_order_mark_is_not_a_token(tmp_path):
    (tmp_path / "plain.txt").write_text("hello there\n", encoding="utf-8")
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + "hello there\n".encode("utf-8"))
    (tmp_path / "bom2.txt").write_bytes(b"\xef\xbb\xbf" + "more\n".encode("utf-8"))
    split = [1.0, 0.0, 0.0]
    plain = encode_corpus(DataConfig(corpus="file", path=str(tmp_path / "plain.txt"), split=split))
    bom = encode_corpus(DataConfig(corpus="file", path=str(tmp_path / "bom.txt"), split=split))
    assert "\ufeff" not in bom.vocab.tokens
    assert bom.vocab == plain.vocab and bom.data_sha256 == plain.data_sha256
    assert bom.train.tolist() == plain.train.tolist()
    # Every file of a list loses its own mark, and so do explicit split files.
    both = load_splits(DataConfig(corpus="file", path=[str(tmp_path / "bom.txt"), str(tmp_path / "bom2.txt")],
                                  split=split))
    assert both.train == "hello there\nmore\n"
    files = load_splits(load_config([], ["data.corpus=file", f"data.train_file={tmp_path / 'bom.txt'}",
                                         f"data.valid_file={tmp_path / 'bom2.txt'}"]).data)
    assert (files.train, files.valid) == ("hello there\n", "more\n")
    word = encode_corpus(DataConfig(corpus="file", path=str(tmp_path / "bom.txt"), split=split, level="word"))
    assert word.vocab.tokens[1:] == sorted(["hello", "there", EOS])


def test_same_text_has_the_same_checksum_wherever_it_is(tmp_path):
    (tmp_path / "a.txt").write_text("abcdef" * 100, encoding="utf-8")
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / "b.txt").write_text("abcdef" * 100, encoding="utf-8")
    (tmp_path / "c.txt").write_text("abcdeF" * 100, encoding="utf-8")
    sums = [encode_corpus(DataConfig(corpus="file", path=str(tmp_path / name))).data_sha256
            for name in ("a.txt", "moved/b.txt", "c.txt")]
    assert sums[0] == sums[1] != sums[2]
    # The split boundaries are part of the identity, not only the concatenated text.
    other_split = encode_corpus(DataConfig(corpus="file", path=str(tmp_path / "a.txt"), split=[0.8, 0.1, 0.1]))
    assert other_split.data_sha256 != sums[0]


def make_ptb_folder(folder: Path) -> Path:
    folder.mkdir()
    (folder / "ptb.train.txt").write_text(" the cat sat \n the dog <unk> \n", encoding="utf-8")
    (folder / "ptb.valid.txt").write_text(" the bird sat \n", encoding="utf-8")
    (folder / "ptb.test.txt").write_text(" a cat \n", encoding="utf-8")
    return folder


def test_ptb_folder_word_level(tmp_path):
    folder = make_ptb_folder(tmp_path / "ptb")
    config = load_config([], ["data.corpus=ptb", "data.level=word", f"data.path={folder}"])
    corpus = encode_corpus(config.data)
    vocab = corpus.vocab
    assert vocab.level == "word"
    # 'the' 2x and '<eos>' 2x come first ('<eos>' < 'the'), then singletons alphabetically.
    assert vocab.tokens == [UNK, EOS, "the", "cat", "dog", "sat"]
    assert vocab.decode(corpus.train) == "the cat sat\nthe dog <unk>\n"
    assert corpus.train.tolist() == [2, 3, 5, 1, 2, 4, 0, 1]
    assert corpus.valid.tolist() == [2, 0, 5, 1]  # 'bird' is unknown
    assert corpus.test.tolist() == [0, 3, 1]


def test_ptb_folder_missing_file(tmp_path):
    folder = make_ptb_folder(tmp_path / "ptb")
    (folder / "ptb.test.txt").unlink()
    with pytest.raises(UserError, match=r"ptb\.test\.txt not found"):
        load_splits(DataConfig(corpus="ptb", level="word", path=str(folder)))
    with pytest.raises(UserError, match="needs a folder"):
        load_splits(DataConfig(corpus="ptb", level="word", path=str(tmp_path / "nowhere")))


def test_real_ptb_valid_text_word_level():
    text = (PTB / "ptb.valid.txt").read_text(encoding="utf-8")
    tokens = tokenize(text, "word")
    assert len(tokens) == 73760
    assert tokens.count(EOS) == text.count("\n") == 3370
    vocab = Vocabulary.build(tokens, "word")
    assert len(vocab) == 6022  # the literal <unk> of the PTB text is our <unk>
    ids = vocab.encode(tokens)
    assert int((ids == vocab.unk_id).sum()) == tokens.count(UNK) == 3485


def test_tinyshakespeare_local_file():
    cfg = DataConfig(corpus="tinyshakespeare", path=str(SHAKESPEARE), split=[0.9, 0.1, 0.0])
    corpus = encode_corpus(cfg)
    assert len(corpus.vocab) == 65 + 1
    assert corpus.vocab.tokens[0] == UNK
    assert corpus.vocab.tokens[1] == " "  # the most frequent character
    n = 1115394
    assert len(corpus.train) == round(0.9 * n) == 1003855
    assert len(corpus.valid) == n - 1003855 == 111539
    assert len(corpus.test) == 0
    text = SHAKESPEARE.read_text(encoding="utf-8")
    assert corpus.vocab.decode(corpus.valid[:200]) == text[1003855:1003855 + 200]
    assert not (corpus.train == corpus.vocab.unk_id).any()


def test_tinyshakespeare_wrong_file_is_rejected(tmp_path):
    fake = tmp_path / "input.txt"
    fake.write_text("not shakespeare\n", encoding="utf-8")
    with pytest.raises(UserError, match="SHA-256 mismatch"):
        load_splits(DataConfig(corpus="tinyshakespeare", path=str(fake)))


# ====================================================================== downloads


class FakeOpener:
    """A urlopen stand-in serving fixed bytes and counting calls."""

    def __init__(self, payload: bytes = b"", error: Exception | None = None):
        self.payload = payload
        self.error = error
        self.calls: list[str] = []

    def __call__(self, url, timeout=None):
        self.calls.append(url)
        if self.error is not None:
            raise self.error
        return io.BytesIO(self.payload)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_fetch_downloads_verifies_and_caches(tmp_path):
    payload = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"
    remote = RemoteFile("input.txt", "https://example.invalid/input.txt", sha(payload))
    opener = FakeOpener(payload)
    folder = tmp_path / "cache" / "tinyshakespeare"
    path = fetch(remote, folder, opener=opener)
    assert path == folder / "input.txt"
    assert path.read_bytes() == payload
    assert opener.calls == ["https://example.invalid/input.txt"]
    assert sorted(p.name for p in folder.iterdir()) == ["input.txt"]  # no temporary left over
    # Second call: served from the cache.
    assert fetch(remote, folder, opener=opener) == path
    assert len(opener.calls) == 1


def test_fetch_checksum_mismatch_leaves_nothing(tmp_path):
    remote = RemoteFile("input.txt", "https://example.invalid/input.txt", sha(b"the real thing"))
    folder = tmp_path / "cache"
    with pytest.raises(UserError, match="SHA-256 mismatch") as info:
        fetch(remote, folder, opener=FakeOpener(b"something else"))
    assert "input.txt" in str(info.value)
    assert not (folder / "input.txt").exists()
    assert list(folder.iterdir()) == []


def test_fetch_corrupt_cached_file_is_reported(tmp_path):
    payload = b"abc"
    remote = RemoteFile("f.txt", "https://example.invalid/f.txt", sha(payload))
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "f.txt").write_bytes(b"abd")
    opener = FakeOpener(payload)
    with pytest.raises(UserError, match="delete it to download again"):
        fetch(remote, folder, opener=opener)
    assert opener.calls == []


def test_fetch_without_recorded_sum_records_first_hash(tmp_path):
    payload = b"some text\n"
    remote = RemoteFile("text8", "https://example.invalid/t.txt", None)
    folder = tmp_path / "c"
    path = fetch(remote, folder, opener=FakeOpener(payload))
    assert (folder / "text8.sha256").read_text().strip() == sha(payload)
    path.write_bytes(b"tampered\n")
    with pytest.raises(UserError, match="SHA-256 mismatch"):
        fetch(remote, folder, opener=FakeOpener(payload))


def test_fetch_offline_names_file_and_target(tmp_path):
    remote = RemoteFile("input.txt", "https://example.invalid/input.txt", sha(b"x"))
    folder = tmp_path / "cache" / "tinyshakespeare"
    opener = FakeOpener(error=OSError("network is unreachable"))
    with pytest.raises(UserError) as info:
        fetch(remote, folder, opener=opener)
    message = str(info.value)
    assert "https://example.invalid/input.txt" in message
    assert "network is unreachable" in message
    assert f"put input.txt at {folder / 'input.txt'}" in message
    assert len(opener.calls) == 1
    assert list(folder.iterdir()) == []


def test_fetch_tar_gz_member(tmp_path):
    member_name = "./simple-examples/data/ptb.valid.txt"
    content = b" the cat sat \n"
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for name, data in ((member_name, content), ("./simple-examples/data/other.txt", b"nope\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    payload = archive.getvalue()
    remote = RemoteFile("ptb.valid.txt", "https://example.invalid/simple-examples.tgz", sha(content), member_name)
    folder = tmp_path / "cache" / "ptb"
    opener = FakeOpener(payload)
    path = fetch(remote, folder, opener=opener)
    assert path.read_bytes() == content
    assert sorted(p.name for p in folder.iterdir()) == ["ptb.valid.txt"]
    # A member that is not in the archive.
    missing = RemoteFile("x.txt", remote.url, None, "./simple-examples/data/missing.txt")
    with pytest.raises(UserError, match="cannot extract ./simple-examples/data/missing.txt"):
        fetch(missing, folder, opener=FakeOpener(payload))
    assert not (folder / "x.txt").exists()


def test_fetch_zip_member(tmp_path):
    content = b" anarchism originated as a term of abuse"
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("text8", content)
    remote = RemoteFile("text8", "https://example.invalid/text8.zip", None, "text8")
    path = fetch(remote, tmp_path / "text8", opener=FakeOpener(archive.getvalue()))
    assert path.read_bytes() == content
    with pytest.raises(UserError, match="cannot extract"):
        fetch(RemoteFile("y", remote.url, None, "text8"), tmp_path / "y", opener=FakeOpener(b"not a zip"))
