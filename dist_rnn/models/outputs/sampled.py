"""``model.output: sampled``: sampled softmax in training, the exact full softmax elsewhere.

Training scores each target against ``num_sampled`` candidate classes drawn
once per step from a log-uniform (Zipfian) distribution over the ids, which
:mod:`dist_rnn.data.vocab` sorts by descending frequency (Jean et al. 2015;
Jozefowicz et al. 2016)::

    P(k) = (log(k + 2) - log(k + 1)) / log(V + 1),   k = 0 .. V-1

The candidates are drawn with replacement (so their expected counts are exact:
``num_sampled * P(k)``, which each logit is corrected by, ``logit - log(count)``),
from a stateless generator seeded by the step seed: the same candidates for
every token of the global batch, on every replica, after a resume. A candidate
equal to a token's target (an accidental hit) is removed from that token's
softmax. Nothing of size ``[tokens, vocab]`` is ever built in training.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from dist_rnn.models.outputs.softmax import OutputProjection

#: Folded into the step seed for the candidate draw (dropout sites use 0 .. 1000 + layers).
SAMPLER_SALT = 3000
#: Logit of a removed accidental hit: its exp is exactly 0 in float32.
REMOVED_LOGIT = -1e30


def log_uniform_log_probs(ids: tf.Tensor, vocab_size: int) -> tf.Tensor:
    """float32 ``log P(ids)`` under the log-uniform distribution over ``vocab_size`` ids."""
    k = tf.cast(ids, tf.float64)
    p = (tf.math.log1p(1.0 / (k + 1.0))) / math.log(vocab_size + 1.0)
    return tf.cast(tf.math.log(p), tf.float32)


def draw_candidates(seed: tf.Tensor, num_sampled: int, vocab_size: int) -> tf.Tensor:
    """int32 ``[num_sampled]`` ids drawn with replacement from the log-uniform distribution.

    Args:
        seed: int ``[2]`` stateless seed of the step.
        num_sampled: Number of draws.
        vocab_size: Ids are in ``[0, vocab_size)``.
    """
    site = tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int32), SAMPLER_SALT)
    u = tf.random.stateless_uniform([num_sampled], seed=site, dtype=tf.float64)
    ids = tf.floor(tf.exp(u * math.log(vocab_size + 1.0))) - 1.0
    return tf.cast(tf.clip_by_value(ids, 0.0, vocab_size - 1.0), tf.int32)


def sampled_token_nll(hidden, targets, vectors, bias, candidates, log_expected_counts, log_expected_targets):
    """Sampled-softmax negative log-likelihood of each target (float32).

    Args:
        hidden: float32 ``[N, D]`` outputs.
        targets: int ``[N]`` target ids.
        vectors: ``ids -> float32 [len(ids), D]`` output vectors of those classes.
        bias: float32 ``[V]`` output bias (a tensor, or the variable: then
            gathered with sparse reads).
        candidates: int ``[S]`` sampled ids (shared by every row).
        log_expected_counts: float32 ``[S]``: log of each candidate's expected count.
        log_expected_targets: float32 ``[N]``: the same for each target.

    Returns:
        float32 ``[N]``: ``logsumexp([true, sampled]) - true`` with corrected
        logits and accidental hits removed.
    """
    # One gather for targets and candidates: one set of gradient rows.
    count = tf.shape(targets)[0]
    rows = vectors(tf.concat([targets, candidates], 0))
    true_logits = (tf.reduce_sum(hidden * rows[:count], -1) + tf.gather(bias, targets)
                   - log_expected_targets)
    sampled_logits = (tf.matmul(hidden, rows[count:], transpose_b=True) + tf.gather(bias, candidates)
                      - log_expected_counts)
    hits = tf.equal(targets[:, None], candidates[None, :])
    sampled_logits = tf.where(hits, tf.constant(REMOVED_LOGIT, tf.float32), sampled_logits)
    logits = tf.concat([true_logits[:, None], sampled_logits], axis=1)
    return tf.reduce_logsumexp(logits, axis=1) - true_logits


@keras.saving.register_keras_serializable(package="dist_rnn")
class SampledSoftmax(OutputProjection):
    """Full-softmax weights trained with a sampled softmax; computes in float32.

    The weights (and their checkpoint names) are those of
    :class:`~dist_rnn.models.outputs.softmax.OutputProjection`, with the
    untied kernel laid out ``[vocab, width]``: gathering the classes' rows
    gives a row-sparse (``tf.IndexedSlices``) gradient, where gathering columns
    of ``[width, vocab]`` built a dense ``[width, vocab]`` one. Its initial
    values are the ``[width, vocab]`` layout's, transposed.

    Args:
        vocab_size: Number of output classes.
        num_sampled: Candidates drawn per training step.
        tied_embedding, kernel_initializer, tie_projection_initializer: As
            for :class:`~dist_rnn.models.outputs.softmax.OutputProjection`.
    """

    def __init__(self, vocab_size: int, num_sampled: int, tied_embedding=None, kernel_initializer="glorot_uniform",
                 tie_projection_initializer=None, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(vocab_size, tied_embedding, kernel_initializer, tie_projection_initializer, **kwargs)
        self.num_sampled = num_sampled
        #: Read the gathered rows with sparse reads (set for row-sparse updates:
        #: ``LanguageModel.use_row_sparse_reads``).
        self.row_reads = False

    class_rows_kernel = True
    #: Training reads a tied embedding by rows only (a gather), never whole.
    reads_tied_embedding_by_rows = True

    def _weight(self, variable):
        # A float32 variable that is not autocast: .value is the variable, and
        # tf.gather of a variable is its sparse read.
        return variable.value if self.row_reads else tf.cast(variable, tf.float32)

    def _vectors(self, ids):
        weights = self.tied_embedding.embeddings if self.tied_embedding is not None else self.kernel
        return tf.cast(tf.gather(self._weight(weights), ids), tf.float32)

    def _projected(self, hidden):
        hidden = tf.cast(hidden, tf.float32)
        if self.tied_embedding is not None and self.tie_projection is not None:
            hidden = tf.matmul(hidden, tf.cast(self.tie_projection, tf.float32))
        return hidden

    def token_nll(self, hidden, targets, training=False, seed=None):
        """Per-token negative log-likelihood (nats): sampled in training with a seed, else exact (call it through ``call``).

        Args:
            hidden: ``[B, T, width]`` last-layer outputs (after dropout).
            targets: int ``[B, T]`` target ids.
            training: Whether this is a training step.
            seed: int ``[2]`` step seed that draws the candidates; None (or
                ``training`` False) gives the exact full softmax in row slices.

        Returns:
            float32 ``[B, T]``.
        """
        if not training or seed is None:
            return super().token_nll(hidden, targets, training=False)
        shape = tf.shape(targets)
        flat_targets = tf.reshape(tf.cast(targets, tf.int32), [-1])
        flat_hidden = self._projected(tf.reshape(hidden, [-1, hidden.shape[-1]]))
        candidates = draw_candidates(seed, self.num_sampled, self.vocab_size)
        log_count = math.log(self.num_sampled)
        nll = sampled_token_nll(flat_hidden, flat_targets, self._vectors, self._weight(self.bias), candidates,
                                log_uniform_log_probs(candidates, self.vocab_size) + log_count,
                                log_uniform_log_probs(flat_targets, self.vocab_size) + log_count)
        return tf.reshape(nll, shape)

    def get_config(self):
        return {**super().get_config(), "num_sampled": self.num_sampled}
