"""Output layers (``model.output``): one interface for the full, sampled and adaptive softmax.

Every output layer has

* ``call(hidden [..., D]) -> float32 [..., V]``: logits whose softmax is the
  model's exact distribution (adaptive: normalized log-probabilities), for
  generation and export;
* ``token_nll(hidden [B, T, D], targets [B, T], training, seed) -> float32
  [B, T]``: the per-token loss in nats. In training it is the layer's training
  loss (sampled: the sampled softmax from the step seed); otherwise the exact
  negative log-likelihood, computed in row slices of bounded memory.
"""

from __future__ import annotations

from dist_rnn.config import ModelConfig
from dist_rnn.models.outputs.adaptive import AdaptiveSoftmax
from dist_rnn.models.outputs.sampled import SampledSoftmax
from dist_rnn.models.outputs.softmax import OutputProjection

__all__ = ["AdaptiveSoftmax", "OutputProjection", "SampledSoftmax", "output_layer", "output_summary"]


def output_layer(config: ModelConfig, vocab_size: int, tied_embedding, kernel_initializer,
                 tie_projection_initializer):
    """The output layer ``model.output`` names, called ``projection``.

    Args:
        config: The ``model`` section.
        vocab_size: Vocabulary size.
        tied_embedding: The Embedding layer when ``model.tie_embeddings``, else None.
        kernel_initializer: Initializer of the output kernel(s).
        tie_projection_initializer: Initializer of the ``tie_projection``
            (used when tied and the last layer is not as wide as the embedding).
    """
    if config.output == "sampled":
        return SampledSoftmax(vocab_size, config.num_sampled, tied_embedding, kernel_initializer,
                              tie_projection_initializer, name="projection")
    if config.output == "adaptive":
        return AdaptiveSoftmax(vocab_size, config.cutoffs, config.div_value, tied_embedding, kernel_initializer,
                               name="projection")
    return OutputProjection(vocab_size, tied_embedding, kernel_initializer, tie_projection_initializer,
                            name="projection")


def output_summary(config: ModelConfig, layer) -> str:
    """One line for the run summary: the output layer, its settings and its parameter count.

    Args:
        config: The ``model`` section.
        layer: The built output layer.
    """
    if config.output == "sampled":
        kind = f"sampled softmax, {config.num_sampled} samples per step (exact softmax in evaluation)"
    elif config.output == "adaptive":
        kind = f"adaptive softmax, cutoffs {config.cutoffs}, div_value {config.div_value:g}"
    else:
        kind = "full softmax"
    shared = {id(v) for v in layer.tied_embedding.weights} if layer.tied_embedding is not None else set()
    count = sum(int(v.numpy().size) for v in layer.weights if id(v) not in shared)
    tied = " (plus the tied embedding)" if config.tie_embeddings else ""
    return f"{kind}, {count:,} parameters{tied}"
