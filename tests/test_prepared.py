"""PreparedCorpus: the prepared folder read through numpy.memmap, its identity and bits per byte."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dist_rnn.data.prepared import PreparedCorpus, bits_per_byte
from dist_rnn.errors import UserError
from prepared_folder import write_prepared


def test_splits_are_read_only_memmaps_of_the_token_files(tmp_path):
    rng = np.random.default_rng(0)
    train, valid = rng.integers(0, 300, 5000), rng.integers(0, 300, 700)
    corpus = PreparedCorpus.open(write_prepared(tmp_path / "p", {"train": train, "valid": valid}, 300,
                                                source_bytes={"train": 9000, "valid": 1400}))
    assert isinstance(corpus.train, np.memmap) and corpus.train.dtype == np.dtype("<u2")  # 300 ids need uint16
    np.testing.assert_array_equal(corpus.train, train)
    np.testing.assert_array_equal(corpus.split("valid"), valid)
    assert len(corpus.test) == 0  # an empty split (an empty file cannot be mapped)
    assert corpus.split("train") is corpus.train  # mapped once
    with pytest.raises(ValueError):
        corpus.train[0] = 1
    assert (corpus.tokens("valid"), corpus.source_bytes("valid"), corpus.vocab_size, corpus.level) == (700, 1400, 300, "char")


@pytest.mark.parametrize("vocab, dtype", [(256, "uint8"), (257, "uint16"), (70_000, "uint32")])
def test_token_dtype_follows_the_manifest(tmp_path, vocab, dtype):
    ids = np.array([0, vocab - 1, 5, vocab - 2])
    corpus = PreparedCorpus.open(write_prepared(tmp_path / "p", {"train": ids}, vocab))
    assert corpus.train.dtype == np.dtype(dtype)
    assert corpus.train.tolist() == ids.tolist()


def test_identity_ignores_time_and_place_but_not_tokens_or_tokenizer(tmp_path):
    ids = {"train": np.arange(100) % 7, "valid": np.arange(10) % 7}
    a = PreparedCorpus.open(write_prepared(tmp_path / "a", ids, 7))
    # Prepared on another host at another time from the same sources: the same tokens.
    b = PreparedCorpus.open(write_prepared(tmp_path / "host2" / "b", ids, 7, created="2027-05-05T00:00:00Z",
                                           data={"corpus": "file", "path": "/elsewhere/src.txt"}))
    assert a.data_sha256 == b.data_sha256 and len(a.data_sha256) == 64
    other_tokens = PreparedCorpus.open(write_prepared(tmp_path / "c", {**ids, "valid": np.arange(11) % 7}, 7))
    other_tokenizer = PreparedCorpus.open(write_prepared(tmp_path / "d", ids, 7, tokenizer_text='{"x": 1}'))
    assert len({a.data_sha256, other_tokens.data_sha256, other_tokenizer.data_sha256}) == 3


def test_folder_without_manifest_is_refused_naming_the_folder(tmp_path):
    folder = write_prepared(tmp_path / "p", {"train": np.arange(10)}, 10)
    (folder / "manifest.json").unlink()  # what an interrupted prepare leaves
    with pytest.raises(UserError, match="not a prepared corpus.*no manifest.json"):
        PreparedCorpus.open(folder)


def test_other_format_version_is_refused(tmp_path):
    folder = write_prepared(tmp_path / "p", {"train": np.arange(10)}, 10)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_version"] = 2
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="format version 2, this dist-rnn reads version 1"):
        PreparedCorpus.open(folder)


@pytest.mark.parametrize("damage", ["truncate", "delete", "manifest"])
def test_damaged_folder_is_a_one_line_error_naming_the_file(tmp_path, damage):
    folder = write_prepared(tmp_path / "p", {"train": np.arange(1000) % 300}, 300)
    if damage == "truncate":
        (folder / "train.bin").write_bytes((folder / "train.bin").read_bytes()[:-3])
    elif damage == "delete":
        (folder / "train.bin").unlink()
    else:
        (folder / "manifest.json").write_text('{"format_version": 1, "dtype": "uint16"')
    with pytest.raises(UserError) as caught:
        PreparedCorpus.open(folder)
    message = str(caught.value)
    assert "\n" not in message
    assert "damaged prepared data" in message and f"delete {folder}" in message
    if damage == "manifest":
        assert message.startswith(f"{folder / 'manifest.json'}: ")
    else:
        assert message.startswith(f"{folder / 'train.bin'}: ")
        assert ("1997 bytes, the manifest says 1000 tokens of uint16" if damage == "truncate" else "missing") in message


def test_bits_per_byte_charges_the_whole_text():
    # 1 nat per token, 1000 tokens over 2000 bytes: 1000 / ln 2 bits over 2000 bytes.
    assert bits_per_byte(1.0, 1000, 2000) == pytest.approx(0.5 / math.log(2))
    # Byte level: tokens == bytes, so bits per byte is the loss in bits.
    assert bits_per_byte(0.9, 5000, 5000) == pytest.approx(0.9 / math.log(2))
    assert bits_per_byte(1.0, 0, 0) is None
