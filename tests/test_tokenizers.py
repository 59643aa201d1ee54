"""Tokenizers: ids compatible with Vocabulary, round trips, streamed encoding equal to whole-text encoding."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest

from dist_rnn.data.tokenizers import (ByteTokenizer, cut_after_whitespace, cut_before_space, fit_tokenizer,
                                      load_tokenizer, word_tokens)
from dist_rnn.data.vocab import EOS, UNK, Vocabulary, tokenize
from dist_rnn.errors import UserError

WEIRD = "the cat\tsat\r\non <eos> mat\x85x\u2028y\x1cz\x0bw  \n\nÜnïcödé ✓ 𝄞 end\n  trailing "


def data(level, **kw):
    base = dict(level=level, max_vocab=None, min_count=1, vocab_size=None, subword_model="unigram",
                subword_sample_chars=10_000_000)
    base.update(kw)
    return SimpleNamespace(**base)


def random_pieces(text: str, seed: int, max_len: int = 7) -> list[str]:
    rng = random.Random(seed)
    pieces, i = [], 0
    while i < len(text):
        n = rng.randint(0, max_len)  # empty pieces too
        pieces.append(text[i:i + n])
        i += n
    return pieces


def test_word_tokens_equal_vocab_tokenize():
    assert word_tokens(WEIRD) == tokenize(WEIRD, "word")
    rng = random.Random(3)
    alphabet = list("ab \t\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\u00a0\u3000<eos>é")
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert word_tokens(text) == tokenize(text, "word"), repr(text)


@pytest.mark.parametrize("level", ["char", "word"])
def test_char_and_word_ids_are_vocabulary_ids(level, shakespeare_slice):
    text = shakespeare_slice.read_text(encoding="utf-8")[:30_000] + WEIRD
    tok = fit_tokenizer(data(level), random_pieces(text, 0, 5000))
    vocab = Vocabulary.build(tokenize(text, level), level)
    assert tok.kind == level and tok.vocab.tokens == vocab.tokens and tok.size == len(vocab)
    other = "unseen ☃ words\nthe cat\n"
    assert tok.encode(other).tolist() == vocab.encode(tokenize(other, level)).tolist()
    assert tok.encode(other).dtype == np.int32
    if level == "char":
        assert tok.decode(tok.encode(text)) == text
        assert tok.encode("☃").tolist() == [0]  # unseen character -> <unk>
    else:
        assert tok.encode("zzzq the\n").tolist() == [0, vocab.tokens.index("the"), vocab.tokens.index(EOS)]


@pytest.mark.parametrize("level", ["char", "word"])
def test_streamed_encoding_equals_whole_text(level):
    text = WEIRD * 20
    tok = fit_tokenizer(data(level), [text])
    whole = tok.encode(text)
    for seed in range(5):
        streamed = np.concatenate(list(tok.encode_stream(random_pieces(text, seed))))
        np.testing.assert_array_equal(streamed, whole)


def test_max_vocab_and_min_count():
    text = "a a a a b b b c c d\n"
    tok = fit_tokenizer(data("word", max_vocab=3), [text])
    assert tok.vocab.tokens == [UNK, "a", "b"]
    tok = fit_tokenizer(data("word", min_count=2), [text])
    assert tok.vocab.tokens == [UNK, "a", "b", "c"]  # d (1x) and <eos> (1x) dropped
    assert tok.encode("d\n").tolist() == [0, 0]
    tok = fit_tokenizer(data("char", min_count=3), ["aaabbbbc"])
    assert tok.vocab.tokens == [UNK, "b", "a"]


def test_empty_training_split_is_refused():
    with pytest.raises(UserError, match="training split is empty"):
        fit_tokenizer(data("char"), ["", ""])
    with pytest.raises(UserError, match="training split is empty"):
        fit_tokenizer(data("word"), [" \t "])


def test_byte_tokenizer():
    tok = ByteTokenizer()
    text = "héllo ✓\n"
    ids = tok.encode(text)
    assert tok.size == 256 and ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode([0xFF, 0x41]) == "\ufffdA"  # invalid UTF-8 is replaced, not an error
    assert tok.token_of(65) == "A" and tok.token_of(10) == "<0x0A>"
    streamed = np.concatenate(list(tok.encode_stream([text.encode()[:2], text.encode()[2:]])))
    assert streamed.tolist() == ids.tolist()


def test_cut_helpers_keep_the_text():
    text = "ab cd\nef  gh ijk\n\nlm"
    for seed in range(5):
        pieces = random_pieces(text, seed, 4)
        cut = list(cut_after_whitespace(pieces))
        assert "".join(cut) == text
        assert all(c[-1].isspace() for c in cut[:-1])
        lines = list(cut_before_space(pieces, max_carry=3))
        assert "".join(lines) == text
        assert all(c.endswith("\n") or c[len(c):] == "" for c in lines)


@pytest.fixture(scope="module")
def subword_text(shakespeare_slice):
    return shakespeare_slice.read_text(encoding="utf-8")[:60_000]


@pytest.mark.parametrize("model", ["unigram", "bpe"])
def test_subword_round_trip_and_stream(model, subword_text, tmp_path):
    tok = fit_tokenizer(data("subword", vocab_size=400, subword_model=model, subword_sample_chars=40_000),
                        random_pieces(subword_text, 1, 3000))
    assert tok.kind == "subword" and tok.size == 400
    text = subword_text[40_000:45_000] + WEIRD + "\n\n tabs\tand ✓ 𝄞 unseen\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text)  # pieces are longer than characters
    assert tok.token_of(int(tok.encode("\n")[0])) == "\n"
    streamed = np.concatenate(list(tok.encode_stream(random_pieces(text, 2, 50))))
    np.testing.assert_array_equal(streamed, ids)
    # A line far longer than the carry bound is cut before a space: the ids do not change.
    long_line = subword_text[:5000].replace("\n", " ")
    cut = list(cut_before_space(random_pieces(long_line, 4, 300), max_carry=200))
    assert len(cut) > 5
    np.testing.assert_array_equal(np.concatenate([tok.encode(c) for c in cut]), tok.encode(long_line))
    files = tok.save(tmp_path)
    assert sorted(files) == ["spm.model", "tokenizer.json"]
    loaded = load_tokenizer(tmp_path)
    assert loaded.kind == "subword" and loaded.size == 400
    np.testing.assert_array_equal(loaded.encode(text), ids)


def test_subword_training_is_deterministic(subword_text):
    config = data("subword", vocab_size=400, subword_sample_chars=20_000)
    a = fit_tokenizer(config, [subword_text])
    b = fit_tokenizer(config, [subword_text])
    assert a.model_proto == b.model_proto


def test_subword_that_cannot_train_names_the_key():
    with pytest.raises(UserError, match=r"data\.vocab_size.*5000.*lower data\.vocab_size") as info:
        fit_tokenizer(data("subword", vocab_size=5000), ["tiny text\nonly a few words\n"])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("level", ["char", "word", "byte"])
def test_save_load_and_old_vocab_json(level, tmp_path):
    text = "the cat sat\non the mat ✓\n"
    tok = fit_tokenizer(data(level), [text])
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.kind == level and loaded.size == tok.size
    np.testing.assert_array_equal(loaded.encode(text), tok.encode(text))
    if level != "byte":
        # tokenizer.json is a vocab.json: Vocabulary reads it, and a run's old vocab.json loads as a tokenizer.
        assert Vocabulary.load(tmp_path / "tokenizer.json").tokens == tok.vocab.tokens
        old = tmp_path / "vocab.json"
        Vocabulary.build(tokenize(text, level), level).save(old)
        np.testing.assert_array_equal(load_tokenizer(old).encode(text), tok.encode(text))


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="tokenizer not found"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"kind": "subword", "model": "spm.model"}', encoding="utf-8")
    with pytest.raises(UserError, match="tokenizer not found: .*spm.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"kind": "klingon"}', encoding="utf-8")
    with pytest.raises(UserError, match="not a dist-rnn tokenizer"):
        load_tokenizer(tmp_path)
