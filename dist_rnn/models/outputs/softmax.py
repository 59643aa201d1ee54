"""``model.output: softmax``: the full softmax over the vocabulary."""

from __future__ import annotations

import keras
import tensorflow as tf

from dist_rnn.models.outputs.chunks import chunked_token_nll


@keras.saving.register_keras_serializable(package="dist_rnn")
class OutputProjection(keras.layers.Layer):
    """Projects hidden states to float32 vocabulary logits, optionally tied to the embedding.

    The matmul (the largest of a word model) runs in the compute dtype
    (bfloat16/float16 under mixed precision); its result is cast to float32
    before the float32 bias is added, so softmax and loss stay float32.

    Args:
        vocab_size: Number of output classes.
        tied_embedding: An Embedding layer whose matrix is reused (transposed).
            When the inputs are not as wide as the embedding, a learned
            ``tie_projection`` (no bias) maps them to its width first.
        kernel_initializer: Initializer of the untied kernel (the bias starts
            at zero) and of the ``tie_projection``.
        tie_projection_initializer: Initializer of ``tie_projection`` (default:
            ``kernel_initializer``).
    """

    #: Lay the untied kernel out ``[vocab, width]`` (one class per row, so a
    #: gather of classes has a row-sparse gradient) instead of ``[width, vocab]``.
    class_rows_kernel = False

    def __init__(self, vocab_size: int, tied_embedding=None, kernel_initializer="glorot_uniform",
                 tie_projection_initializer=None, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.tied_embedding = tied_embedding
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.tie_projection_initializer = keras.initializers.get(tie_projection_initializer or kernel_initializer)

    def build(self, input_shape):
        self.tie_projection = None
        if self.tied_embedding is None and self.class_rows_kernel:
            # Not autocast, so that ``.value`` is the variable (sparse reads);
            # the values are those of the [width, vocab] layout, transposed.
            self.kernel = self.add_weight(name="kernel", shape=(self.vocab_size, input_shape[-1]),
                                          initializer=_transposed(self.kernel_initializer), autocast=False)
        elif self.tied_embedding is None:
            self.kernel = self.add_weight(name="kernel", shape=(input_shape[-1], self.vocab_size),
                                          initializer=self.kernel_initializer)
        elif input_shape[-1] != self.tied_embedding.output_dim:
            self.tie_projection = self.add_weight(name="tie_projection",
                                                  shape=(input_shape[-1], self.tied_embedding.output_dim),
                                                  initializer=self.tie_projection_initializer)
        self.bias = self.add_weight(name="bias", shape=(self.vocab_size,), initializer="zeros", autocast=False)

    def call(self, inputs, targets=None, training=False, seed=None):
        """Logits, or with ``targets`` the per-token loss (see :meth:`token_nll`).

        The loss is computed inside the layer call, so the layer's dtype policy
        (not the calling model's autocast) decides how its weights are read.

        Args:
            inputs: ``[..., width]`` last-layer outputs.
            targets: None, or int ``[B, T]`` target ids.
            training, seed: As for :meth:`token_nll`.

        Returns:
            float32 ``[..., vocab]`` logits, or float32 ``[B, T]`` losses.
        """
        if targets is None:
            return self.logits(inputs)
        return self.token_nll(inputs, targets, training=training, seed=seed)

    def logits(self, inputs):
        """Float32 logits ``[..., vocab]`` of ``inputs`` ``[..., width]``."""
        cdt = tf.as_dtype(self.compute_dtype)
        # One 2-D matmul over all tokens: a [B, T, D] x [D, V] matmul is a
        # broadcasting BatchMatMul whose kernel gradient is built per batch row,
        # [B, D, V] (4 GB at 20 x 512 x 100k), before it is summed.
        shape = tf.shape(inputs)
        inputs = tf.reshape(tf.cast(inputs, cdt), [-1, inputs.shape[-1]])
        if self.tied_embedding is not None:
            if self.tie_projection is not None:
                inputs = tf.matmul(inputs, tf.cast(self.tie_projection, cdt))
            kernel = tf.cast(self.tied_embedding.embeddings, cdt)
            logits = tf.matmul(inputs, kernel, transpose_b=True)
        elif self.class_rows_kernel:
            logits = tf.matmul(inputs, tf.cast(self.kernel, cdt), transpose_b=True)
        else:
            logits = tf.matmul(inputs, tf.cast(self.kernel, cdt))
        logits = tf.cast(logits, tf.float32) + tf.cast(self.bias, tf.float32)
        return tf.reshape(logits, tf.concat([shape[:-1], [self.vocab_size]], 0))

    def exact_token_nll(self, hidden, targets):
        """Float32 ``[B, T]`` cross-entropies of the full softmax (all logits of ``hidden`` at once)."""
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(targets, tf.int32),
                                                              logits=self.logits(hidden))

    def token_nll(self, hidden, targets, training=False, seed=None):
        """Per-token negative log-likelihood (nats) of ``targets`` under the full softmax (call it through ``call``).

        Args:
            hidden: ``[B, T, width]`` last-layer outputs (after dropout).
            targets: int ``[B, T]`` target ids.
            training: True computes the logits of the whole batch at once
                (the gradient needs them anyway); False works in row slices
                of bounded memory (:mod:`~dist_rnn.models.outputs.chunks`).
            seed: Unused (the interface of every output layer).

        Returns:
            float32 ``[B, T]``.
        """
        del seed
        if training:
            return self.exact_token_nll(hidden, targets)
        return chunked_token_nll(self.exact_token_nll, hidden, targets, self.vocab_size)

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "tie_projection_initializer": keras.initializers.serialize(self.tie_projection_initializer)}


def _transposed(initializer):
    """An initializer of ``[a, b]`` weights: ``initializer``'s ``[b, a]`` values, transposed."""
    def initialize(shape, dtype=None):
        return tf.transpose(initializer((shape[1], shape[0]), dtype=dtype))
    return initialize
