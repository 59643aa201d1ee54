"""Sampling: choose_next filters and statistics, the Sampler's state threading and prime."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dist_rnn.errors import UserError
from dist_rnn.generation import Sampler, check_sampling_args, choose_next
from dist_rnn.data.vocab import EOS, UNK, Vocabulary


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def random_logits(rows: int = 64, vocab: int = 17, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 3.0, size=(rows, vocab)).astype(np.float32)


# ====================================================================== choose_next


def test_temperature_zero_is_argmax():
    logits = random_logits()
    got = choose_next(logits, np.random.default_rng(0), temperature=0.0)
    np.testing.assert_array_equal(got, logits.argmax(axis=-1))


@pytest.mark.parametrize("temperature", [0.1, 1.0, 5.0, 1000.0])
def test_top_k_one_is_greedy(temperature):
    logits = random_logits(seed=1)
    got = choose_next(logits, np.random.default_rng(3), temperature=temperature, top_k=1)
    np.testing.assert_array_equal(got, logits.argmax(axis=-1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 50.0])
def test_tiny_top_p_is_greedy(temperature):
    logits = random_logits(seed=2)
    got = choose_next(logits, np.random.default_rng(4), temperature=temperature, top_p=1e-9)
    np.testing.assert_array_equal(got, logits.argmax(axis=-1))


def test_same_seed_same_draws_different_seed_differs():
    flat = np.zeros((500, 10), np.float32)
    a = choose_next(flat, np.random.default_rng(1))
    b = choose_next(flat, np.random.default_rng(1))
    c = choose_next(flat, np.random.default_rng(2))
    np.testing.assert_array_equal(a, b)
    assert (a != c).sum() > 300  # ~90% of the rows differ on a flat distribution over 10 tokens
    assert set(a.tolist()) == set(range(10))
    assert a.dtype.kind == "i" and a.shape == (500,)


def test_rng_advances_between_calls():
    flat = np.zeros((200, 10), np.float32)
    rng = np.random.default_rng(7)
    first, second = choose_next(flat, rng), choose_next(flat, rng)
    assert (first != second).any()


@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
def test_empirical_frequencies_match_softmax(temperature):
    logits = np.array([0.5, 1.0, -1.0, 2.0, 0.0, -0.3], np.float32)
    n = 20000
    draws = choose_next(np.tile(logits, (n, 1)), np.random.default_rng(123), temperature=temperature)
    freq = np.bincount(draws, minlength=len(logits)) / n
    expected = softmax(logits.astype(np.float64) / temperature)
    np.testing.assert_allclose(freq, expected, atol=0.02)


def test_top_k_frequencies_renormalized():
    logits = np.log(np.array([0.1, 0.4, 0.2, 0.3]))
    n = 20000
    draws = choose_next(np.tile(logits, (n, 1)), np.random.default_rng(5), top_k=2)
    freq = np.bincount(draws, minlength=4) / n
    np.testing.assert_allclose(freq, [0.0, 4 / 7, 0.0, 3 / 7], atol=0.02)
    assert freq[0] == 0.0 and freq[2] == 0.0


def test_top_k_keeps_exactly_k_tokens_when_logits_tie():
    # Four tokens tie for the highest logit: top_k=2 keeps two of them (the lowest ids), not all four.
    logits = np.array([0.0, 2.0, 2.0, 2.0, 2.0, 1.0])
    n = 20000
    draws = choose_next(np.tile(logits, (n, 1)), np.random.default_rng(7), top_k=2)
    freq = np.bincount(draws, minlength=6) / n
    np.testing.assert_allclose(freq, [0.0, 0.5, 0.5, 0.0, 0.0, 0.0], atol=0.02)
    # A tie across the k-th place: top_k=3 of [3, 2, 2, 2] keeps 3 and the first two 2s.
    draws = choose_next(np.tile([3.0, 2.0, 2.0, 2.0], (n, 1)), np.random.default_rng(8), top_k=3)
    assert set(np.unique(draws)) == {0, 1, 2}


def test_top_p_frequencies_renormalized():
    logits = np.log(np.array([0.15, 0.5, 0.05, 0.3]))
    n = 20000
    # Mass before each sorted token: 0, 0.5, 0.8, 0.95; top_p 0.7 keeps the two most likely.
    draws = choose_next(np.tile(logits, (n, 1)), np.random.default_rng(6), top_p=0.7)
    freq = np.bincount(draws, minlength=4) / n
    np.testing.assert_allclose(freq, [0.0, 0.625, 0.0, 0.375], atol=0.02)
    assert freq[0] == 0.0 and freq[2] == 0.0
    # top_p 0.9 keeps three.
    draws = choose_next(np.tile(logits, (n, 1)), np.random.default_rng(6), top_p=0.9)
    freq = np.bincount(draws, minlength=4) / n
    np.testing.assert_allclose(freq, [0.15 / 0.95, 0.5 / 0.95, 0.0, 0.3 / 0.95], atol=0.02)


def test_filters_work_per_row():
    logits = np.array([[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    got = choose_next(logits, np.random.default_rng(0), temperature=1.0, top_k=1)
    assert got.tolist() == [0, 2]


# ====================================================================== argument checks


@pytest.mark.parametrize("kwargs, flag", [
    (dict(temperature=-1.0), "--temperature"),
    (dict(temperature=math.nan), "--temperature"),
    (dict(top_k=-1), "--top-k"),
    (dict(top_p=0.0), "--top-p"),
    (dict(top_p=1.5), "--top-p"),
    (dict(top_p=-0.1), "--top-p"),
    (dict(length=-1), "--length"),
    (dict(num_samples=0), "--num-samples"),
])
def test_check_sampling_args_errors(kwargs, flag):
    args = dict(temperature=1.0, top_k=0, top_p=1.0, length=10, num_samples=1)
    args.update(kwargs)
    with pytest.raises(UserError) as info:
        check_sampling_args(**args)
    assert str(info.value).startswith(flag)


def test_check_sampling_args_accepts_edges():
    check_sampling_args(temperature=0.0, top_k=0, top_p=1.0, length=0, num_samples=1)
    check_sampling_args(temperature=2.0, top_k=5, top_p=1e-6, length=1, num_samples=8)


# ====================================================================== Sampler


VOCAB = Vocabulary([UNK, "a", "b", "c", "d"], "char")
V = len(VOCAB)


class FakeModel:
    """A step function whose logits at each position favour token (token + 1) % V.

    The state is (number of calls so far, running sum of the tokens seen per
    row); every call is recorded so the test can check how state is threaded.
    """

    def __init__(self, strength: float = 50.0):
        self.strength = strength
        self.calls: list[tuple[np.ndarray, object]] = []
        self.returned: list[tuple] = []

    def __call__(self, tokens, states):
        tokens = np.asarray(tokens)
        self.calls.append((tokens.copy(), states))
        logits = np.zeros(tokens.shape + (V,), np.float32)
        np.put_along_axis(logits, ((tokens + 1) % V)[..., None], self.strength, axis=-1)
        if states is None:
            count, total = 0, np.zeros(tokens.shape[0], np.int64)
        else:
            count, total = states
        new_states = (count + 1, total + tokens.sum(axis=1))
        self.returned.append(new_states)
        return logits, new_states


class FlatModel:
    def __call__(self, tokens, states):
        tokens = np.asarray(tokens)
        return np.zeros(tokens.shape + (V,), np.float32), states


def test_greedy_follows_the_model_and_threads_state():
    model = FakeModel()
    sampler = Sampler(model, VOCAB)
    ids = sampler.generate(prime="ab", length=6, temperature=0.0)
    # Prime 'ab' = [1, 2]; the last prime token conditions the first sample.
    assert ids == [[3, 4, 0, 1, 2, 3]]
    assert VOCAB.decode(ids[0]) == "cd\ufffdabc"  # char-level <unk> is shown as U+FFFD
    # One warm-up call on the whole prime from a zero state, then one call per token.
    assert len(model.calls) == 1 + 6
    first_tokens, first_states = model.calls[0]
    assert first_tokens.tolist() == [[1, 2]]
    assert first_states is None
    for k in range(1, len(model.calls)):
        tokens, states = model.calls[k]
        assert tokens.tolist() == [[ids[0][k - 1]]]
        # The state fed in is exactly the state the previous call returned.
        assert states is model.returned[k - 1]
    count, total = model.returned[-1]
    assert count == 7
    assert total.tolist() == [1 + 2 + 3 + 4 + 0 + 1 + 2 + 3]


def test_prime_warms_up_and_only_last_token_conditions():
    model = FakeModel()
    ids = Sampler(model, VOCAB).generate(prime="dcba", length=3, temperature=0.0)
    assert model.calls[0][0].tolist() == [[4, 3, 2, 1]]
    assert ids == [[2, 3, 4]]  # after 'a' comes 'b', not what follows 'd'


def test_sampling_with_strong_logits_batch_of_samples():
    model = FakeModel(strength=60.0)
    streamed: list[list[int]] = []
    ids = Sampler(model, VOCAB).generate(prime="c", length=5, temperature=1.0, seed=3, num_samples=3,
                                         on_tokens=streamed.append)
    assert ids == [[4, 0, 1, 2, 3]] * 3
    assert model.calls[0][0].tolist() == [[3], [3], [3]]
    assert model.returned[-1][1].tolist() == [3 + 4 + 0 + 1 + 2 + 3] * 3
    assert streamed == [[4] * 3, [0] * 3, [1] * 3, [2] * 3, [3] * 3]  # the new ids, as they come


def test_same_seed_same_text_different_seed_differs():
    sampler = Sampler(FlatModel(), VOCAB)
    a = sampler.generate(prime="a", length=60, seed=11)
    b = sampler.generate(prime="a", length=60, seed=11)
    c = sampler.generate(prime="a", length=60, seed=12)
    assert a == b
    assert a != c
    assert len(a[0]) == 60 and set(a[0]) <= set(range(V))


def test_zero_length_returns_empty_after_warm_up():
    model = FakeModel()
    assert Sampler(model, VOCAB).generate(prime="ab", length=0) == [[]]
    assert len(model.calls) == 1


def test_unknown_prime_chars_map_to_unk_with_warning():
    warnings: list[str] = []
    model = FakeModel()
    ids = Sampler(model, VOCAB).generate(prime="aZbQZ", length=2, temperature=0.0, warn=warnings.append)
    assert model.calls[0][0].tolist() == [[1, 0, 2, 0, 0]]
    assert ids == [[1, 2]]  # after <unk> (id 0) comes 'a'
    assert len(warnings) == 1
    assert "2 token(s)" in warnings[0]
    assert "'Z'" in warnings[0] and "'Q'" in warnings[0]
    assert "<unk>" in warnings[0]


def test_known_prime_gives_no_warning():
    warnings: list[str] = []
    Sampler(FakeModel(), VOCAB).generate(prime="abcd", length=1, warn=warnings.append)
    assert warnings == []


def test_empty_prime_starts_from_newline_or_eos():
    char_vocab = Vocabulary([UNK, "\n", "x"], "char")
    assert Sampler(FakeModel(), char_vocab).prime_ids("") == [1]
    word_vocab = Vocabulary([UNK, EOS, "the"], "word")
    assert Sampler(FakeModel(), word_vocab).prime_ids("") == [1]
    assert Sampler(FakeModel(), word_vocab).prime_ids("the zebra\n") == [2, 0, 1]


def test_bad_arguments_are_rejected_before_the_model_runs():
    model = FakeModel()
    with pytest.raises(UserError, match="--top-p"):
        Sampler(model, VOCAB).generate(prime="a", length=3, top_p=1.5)
    assert model.calls == []


def test_empty_prime_without_newline_in_vocab_does_not_warn():
    warnings: list[str] = []
    Sampler(FakeModel(), VOCAB).generate(prime="", length=1, warn=warnings.append)
    assert warnings == []
