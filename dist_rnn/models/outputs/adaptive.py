"""``model.output: adaptive``: adaptive softmax (Grave et al. 2017), exact log-probabilities.

With cutoffs ``c_1 < ... < c_k`` and ``c_{k+1} = V``, the head is a softmax
over the ``c_1`` most frequent ids plus one token per tail cluster; tail
cluster ``i`` is a softmax over ids ``[c_i, c_{i+1})`` behind a projection to
``max(1, D // div_value ** i)`` dimensions. ``log p(w)`` is the head's
log-probability for a head id, else that of its cluster's token plus the
cluster's. Every probability is normalized exactly: the probabilities of all
``V`` ids sum to 1. In training and evaluation each tail cluster is computed
only for the tokens whose target it holds, so no ``[tokens, vocab]`` tensor
is built; :meth:`AdaptiveSoftmax.call` builds the full log-probabilities
(generation, export).

Tied (``model.tie_embeddings``): the head ids and each cluster's ids use the
rows of the input embedding (width ``E``) as output vectors: the head after
a ``tie_projection`` ``D -> E`` when ``D != E``, tail cluster ``i`` through
its own ``D -> d_i -> E`` projections; the cluster tokens have their own vectors.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from dist_rnn.models.outputs.chunks import chunked_token_nll


def cluster_dims(width: int, cutoffs: list[int], div_value: float) -> list[int]:
    """Projection width of each tail cluster: ``max(1, width // div_value ** i)`` for ``i = 1 .. k``."""
    return [max(1, int(width // (div_value ** i))) for i in range(1, len(cutoffs) + 1)]


@keras.saving.register_keras_serializable(package="dist_rnn")
class AdaptiveSoftmax(keras.layers.Layer):
    """Adaptive softmax output layer; its weights and computation are float32.

    Args:
        vocab_size: Number of output classes.
        cutoffs: Increasing ids where the head ends and each tail cluster
            starts (each below ``vocab_size``).
        div_value: Tail cluster ``i`` projects to ``width / div_value ** i`` dimensions.
        tied_embedding: An Embedding layer whose rows are the output vectors, or None.
        kernel_initializer: Initializer of every kernel (a fresh seed per
            weight is derived from it, see :meth:`_initializer`).
    """

    def __init__(self, vocab_size: int, cutoffs, div_value: float = 4.0, tied_embedding=None,
                 kernel_initializer="glorot_uniform", **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.cutoffs = [int(c) for c in cutoffs]
        self.div_value = float(div_value)
        self.tied_embedding = tied_embedding
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bounds = self.cutoffs + [vocab_size]

    @property
    def head_size(self) -> int:
        """Head classes: the ``cutoffs[0]`` most frequent ids and one token per tail cluster."""
        return self.cutoffs[0] + len(self.cutoffs)

    def _initializer(self, index: int):
        # A seeded Keras initializer returns the same values on every call: each weight gets its own seed.
        config = keras.initializers.serialize(self.kernel_initializer)
        seed = config.get("config", {}).get("seed")
        if seed is not None:
            config["config"]["seed"] = (int(seed) + 7919 * (index + 1)) & 0x7FFFFFFF
        return keras.initializers.deserialize(config)

    def build(self, input_shape):
        width = input_shape[-1]
        tied = self.tied_embedding is not None
        emb = self.tied_embedding.output_dim if tied else None
        count = iter(range(1000))
        self.tie_projection = None
        if tied:
            if width != emb:
                self.tie_projection = self.add_weight(name="tie_projection", shape=(width, emb),
                                                      initializer=self._initializer(next(count)))
            self.cluster_kernel = self.add_weight(name="cluster_kernel", shape=(width, len(self.cutoffs)),
                                                  initializer=self._initializer(next(count)))
        else:
            self.head_kernel = self.add_weight(name="head_kernel", shape=(width, self.head_size),
                                               initializer=self._initializer(next(count)))
        self.head_bias = self.add_weight(name="head_bias", shape=(self.head_size,), initializer="zeros")
        # One attribute per weight: tf.train.Checkpoint does not see variables inside a Python list.
        for i, dim in enumerate(cluster_dims(width, self.cutoffs, self.div_value)):
            size = self.bounds[i + 1] - self.bounds[i]
            setattr(self, f"tail_{i}_projection", self.add_weight(
                name=f"tail_{i}_projection", shape=(width, dim), initializer=self._initializer(next(count))))
            setattr(self, f"tail_{i}_kernel", self.add_weight(
                name=f"tail_{i}_kernel", shape=(dim, emb) if tied else (dim, size),
                initializer=self._initializer(next(count))))
            setattr(self, f"tail_{i}_bias", self.add_weight(name=f"tail_{i}_bias", shape=(size,), initializer="zeros"))

    def _embedding_rows(self, start, end):
        return tf.cast(self.tied_embedding.embeddings[start:end], tf.float32)

    def head_logits(self, hidden):
        """float32 ``[N, head_size]`` head logits of float32 ``[N, D]`` outputs."""
        if self.tied_embedding is None:
            return tf.matmul(hidden, self.head_kernel) + self.head_bias
        projected = hidden if self.tie_projection is None else tf.matmul(hidden, self.tie_projection)
        words = tf.matmul(projected, self._embedding_rows(0, self.cutoffs[0]), transpose_b=True)
        return tf.concat([words, tf.matmul(hidden, self.cluster_kernel)], axis=1) + self.head_bias

    def tail_logits(self, i, hidden):
        """float32 ``[N, size_i]`` logits of tail cluster ``i`` (from 0) for ``[N, D]`` outputs."""
        small = tf.matmul(hidden, getattr(self, f"tail_{i}_projection"))
        kernel, bias = getattr(self, f"tail_{i}_kernel"), getattr(self, f"tail_{i}_bias")
        if self.tied_embedding is None:
            return tf.matmul(small, kernel) + bias
        rows = self._embedding_rows(self.bounds[i], self.bounds[i + 1])
        return tf.matmul(tf.matmul(small, kernel), rows, transpose_b=True) + bias

    def call(self, inputs, targets=None, training=False, seed=None):
        """Log-probabilities, or with ``targets`` the per-token loss (see :meth:`token_nll`).

        Computing inside the layer call keeps every weight read in float32
        (the layer's policy), even under a mixed-precision model.

        Args:
            inputs: ``[..., D]`` last-layer outputs.
            targets: None, or int ``[B, T]`` target ids.
            training, seed: As for :meth:`token_nll`.

        Returns:
            float32 ``[..., vocab]`` log-probabilities, or float32 ``[B, T]`` losses.
        """
        if targets is None:
            return self.log_probs(inputs)
        return self.token_nll(inputs, targets, training=training, seed=seed)

    def log_probs(self, inputs):
        """Exact float32 log-probabilities ``[..., vocab]`` of ``inputs`` ``[..., D]`` (sum to 1 over the vocabulary)."""
        shape = tf.shape(inputs)
        hidden = tf.reshape(tf.cast(inputs, tf.float32), [-1, inputs.shape[-1]])
        head = tf.nn.log_softmax(self.head_logits(hidden))
        c1 = self.cutoffs[0]
        parts = [head[:, :c1]]
        for i in range(len(self.cutoffs)):
            parts.append(head[:, c1 + i:c1 + i + 1] + tf.nn.log_softmax(self.tail_logits(i, hidden)))
        return tf.reshape(tf.concat(parts, axis=1), tf.concat([shape[:-1], [self.vocab_size]], 0))

    def exact_token_nll(self, hidden, targets):
        """float32 ``[B, T]`` negative log-likelihoods, each tail cluster only for the tokens it holds.

        The head's and each cluster's part is one fused cross-entropy
        (``sparse_softmax_cross_entropy_with_logits``): for the backward pass it
        keeps only its ``[tokens, size]`` softmax-minus-one-hot, not the
        logits, their log-softmax and a dense gradient of a gather besides.
        With op determinism on (``train.deterministic: true``) TensorFlow computes
        that op as log-softmax and gather, so those runs do not get the saving.
        """
        shape = tf.shape(targets)
        h = tf.reshape(tf.cast(hidden, tf.float32), [-1, hidden.shape[-1]])
        t = tf.reshape(tf.cast(targets, tf.int32), [-1])
        c1 = self.cutoffs[0]
        cluster = tf.searchsorted(tf.constant(self.cutoffs, tf.int32), t, side="right")  # 0: head
        head_index = tf.where(cluster == 0, t, c1 + cluster - 1)
        nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=head_index, logits=self.head_logits(h))
        for i in range(len(self.cutoffs)):
            rows = tf.where(cluster == i + 1)  # [M, 1]
            local = tf.gather_nd(t, rows) - self.bounds[i]
            tail = tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=local, logits=self.tail_logits(i, tf.gather_nd(h, rows)))
            nll = tf.tensor_scatter_nd_add(nll, rows, tail)
        return tf.reshape(nll, shape)

    def token_nll(self, hidden, targets, training=False, seed=None):
        """Exact per-token negative log-likelihood (nats) of ``targets`` (call it through ``call``).

        Args:
            hidden: ``[B, T, D]`` last-layer outputs (after dropout).
            targets: int ``[B, T]`` target ids.
            training: True computes the whole batch at once; False works in
                row slices of bounded memory.
            seed: Unused (the interface of every output layer).

        Returns:
            float32 ``[B, T]``.
        """
        del seed
        if training:
            return self.exact_token_nll(hidden, targets)
        widest = max(self.head_size, *(b - a for a, b in zip(self.bounds, self.bounds[1:])))
        return chunked_token_nll(self.exact_token_nll, hidden, targets, widest)

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "cutoffs": self.cutoffs,
                "div_value": self.div_value,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer)}
