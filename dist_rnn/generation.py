"""Sampling text from a language model, token by token with the state carried."""

from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

from dist_rnn.errors import UserError
from dist_rnn.data.tokenizers import Tokenizer, as_tokenizer
from dist_rnn.data.vocab import Vocabulary


def check_sampling_args(temperature: float, top_k: int, top_p: float, length: int, num_samples: int = 1) -> None:
    """Rejects invalid sampling arguments with a one-line error.

    Raises:
        UserError: Naming the argument.
    """
    if not temperature >= 0:
        raise UserError(f"--temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 is off), got {top_k}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")
    if length < 0:
        raise UserError(f"--length must be >= 0, got {length}")
    if num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {num_samples}")


def choose_next(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0,
                top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Picks the next token of each row from float logits.

    Args:
        logits: ``[batch, vocab]`` logits.
        rng: Random generator (its state advances by one draw per row).
        temperature: Softmax temperature; 0 picks the argmax (greedy).
        top_k: Keep only the k most likely tokens (0: all); exactly k, ties
            at the k-th place going to the lower token ids.
        top_p: Keep the smallest set of most likely tokens whose probability
            reaches ``top_p`` (nucleus sampling; 1: all).

    Returns:
        ``[batch]`` int token ids.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        return logits.argmax(axis=-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        # A stable sort of the negated logits: among equal logits the lower id ranks first.
        top = np.argsort(-logits, axis=-1, kind="stable")[:, :top_k]
        kept = np.full_like(logits, -np.inf)
        np.put_along_axis(kept, top, np.take_along_axis(logits, top, axis=-1), axis=-1)
        logits = kept
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        cumulative = np.cumsum(sorted_probs, axis=-1)
        # Keep a token while the mass before it is below top_p (the first always stays).
        keep_sorted = (cumulative - sorted_probs) < top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    draws = rng.random((probs.shape[0], 1))
    return np.minimum((probs.cumsum(axis=-1) < draws).sum(axis=-1), probs.shape[-1] - 1)


class Sampler:
    """Generates text from a model function ``(tokens, states) -> (logits, states)``.

    Args:
        step_fn: Runs the model on ``[batch, time]`` int32 tokens and a state
            tuple (None for zeros), returning float32 logits and the new state.
        tokenizer: The run's tokenizer (a char/word :class:`~dist_rnn.data.vocab.Vocabulary` is taken as one).
    """

    def __init__(self, step_fn: Callable, tokenizer: Tokenizer | Vocabulary):
        self.step_fn = step_fn
        self.tokenizer = as_tokenizer(tokenizer)

    def prime_ids(self, prime: str, warn: Callable[[str], None] | None = None) -> list[int]:
        """Encodes the prime; unknown tokens become ``<unk>`` with a warning."""
        ids = [int(i) for i in self.tokenizer.encode(prime)] if prime else []
        if not ids:
            # No prime (or only spaces at word level): start as after a line break (<eos> at word level;
            # <unk> if the corpus has no line break).
            return [int(self.tokenizer.encode("\n")[0])]
        unknown = self.tokenizer.unknown(prime)
        if unknown and warn is not None:
            shown = ", ".join(repr(t) for t in unknown[:5])
            warn(f"prime has {len(unknown)} token(s) outside the vocabulary, mapped to <unk>: {shown}")
        return ids

    def generate(self, prime: str = "", length: int = 200, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, num_samples: int = 1,
                 on_tokens: Callable[[list[int]], None] | None = None,
                 warn: Callable[[str], None] | None = None) -> list[list[int]]:
        """Samples ``num_samples`` continuations in one batch.

        Args:
            prime: Text that warms the state (its last token conditions the
                first sample).
            length: Tokens to generate.
            temperature: 0 for greedy decoding.
            top_k: Top-k filter (0: off).
            top_p: Nucleus filter (1: off).
            seed: Seed; the same seed gives the same text.
            num_samples: Continuations generated in one batch.
            on_tokens: Called with the new token id of every sample as soon
                as it is produced (streaming; :meth:`Tokenizer.text_stream` turns them into text).
            warn: Called with a warning about unknown prime tokens.

        Returns:
            The generated ids (prime excluded) of each sample.
        """
        check_sampling_args(temperature, top_k, top_p, length, num_samples)
        rng = np.random.default_rng(seed)
        ids = self.prime_ids(prime, warn)
        tokens = tf.constant([ids] * num_samples, tf.int32)
        logits, states = self.step_fn(tokens, None)
        out: list[list[int]] = [[] for _ in range(num_samples)]
        for _ in range(length):
            nxt = choose_next(np.asarray(logits)[:, -1, :], rng, temperature, top_k, top_p)
            for row, token in zip(out, nxt):
                row.append(int(token))
            if on_tokens is not None:
                on_tokens([int(t) for t in nxt])
            logits, states = self.step_fn(tf.constant(nxt[:, None], tf.int32), states)
        return out


def model_step_fn(model) -> Callable:
    """Wraps a :class:`~dist_rnn.models.model.LanguageModel` as a compiled sampler step function."""

    @tf.function(reduce_retracing=True)
    def with_state(tokens, states):
        return model(tokens, states, training=False, last_only=True)

    @tf.function(reduce_retracing=True)
    def from_zero(tokens):
        return model(tokens, None, training=False, last_only=True)

    def step(tokens, states):
        return from_zero(tokens) if states is None else with_state(tokens, states)

    return step
