"""The loss whose gradient the TensorBoard histograms show (``logging.histograms_every``).

The histogram pass differentiates one batch outside the training step, without
dropout. Calling the model for logits and taking their cross-entropy would build
``[batch, time, vocab]`` logits for every output layer (2.5 GB at 20 x 35
tokens and 267k words, plus their gradient); :func:`histogram_loss` instead
takes the output layer's training loss: the full softmax as in training, the
sampled softmax over the step's candidates, the adaptive softmax cluster by
cluster, so ``sampled`` and ``adaptive`` build no full-vocabulary tensor.
"""

from __future__ import annotations

import tensorflow as tf


def histogram_loss(model, tokens: tf.Tensor, targets: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Mean training loss (nats) of the output layer on one batch, without dropout.

    Args:
        model: A :class:`~dist_rnn.models.model.LanguageModel`.
        tokens: int ``[batch, time]`` inputs.
        targets: int ``[batch, time]`` next tokens.
        seed: int ``[2]`` step seed (``sampled`` draws its candidates from it).

    Returns:
        float32 scalar.
    """
    states = model.initial_state(tf.shape(tokens)[0])
    # last_only: the recurrent layers' outputs without the [batch, time, vocab]
    # logits (only the last step's, [batch, 1, vocab], are computed).
    _, _, (_, hidden) = model(tokens, states, training=False, last_only=True, return_activations=True)
    return tf.reduce_mean(model.projection(hidden, targets=targets, training=True, seed=seed))
