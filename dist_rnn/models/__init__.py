"""The language model and its recurrent layers.

Importing this package registers every custom Keras class of dist-rnn (under
``package="dist_rnn"``), so that a saved ``.keras`` model loads.

Modules, top-down:

- :mod:`.model`: :class:`LanguageModel` (embedding, stacked recurrent layers,
  stateless dropout, output projection), :func:`build_model`, and which
  kernel each layer runs (:func:`kernel_report`).
- :mod:`.layers`: :data:`RECURRENT_LAYERS`, the layer class of each ``model.cell``.
- :mod:`.keras_rnn`: :class:`LSTM`, :class:`GRU` (Keras' layers, dist-rnn's
  fused recurrence off cuDNN).
- :mod:`.layer_norm`: :class:`LayerNormLSTM`, :class:`LayerNormGRU`;
  :mod:`.vanilla`: :class:`VanillaRNN`; both on the base of :mod:`.fused_layer`.
- :mod:`.dropout`: the stateless variational recurrent-dropout mask.
- :mod:`.kernels`: the recurrences themselves, with hand-written backward passes.

Nothing here imports from :mod:`dist_rnn.training` or the command-line layer.
"""

from dist_rnn.models.dropout import recurrent_dropout_mask
from dist_rnn.models.keras_rnn import GRU, LSTM
from dist_rnn.models.layer_norm import LN_EPSILON, LayerNormGRU, LayerNormLSTM
from dist_rnn.models.layers import RECURRENT_LAYERS
from dist_rnn.models.model import (LanguageModel, LayerKernel, build_model, check_cudnn_requirement, cudnn_excluded_by,
                                   kernel_report, recurrent_layer)
from dist_rnn.models.vanilla import VanillaRNN

__all__ = [
    "LanguageModel", "build_model", "recurrent_layer", "kernel_report", "LayerKernel", "check_cudnn_requirement",
    "cudnn_excluded_by",
    "RECURRENT_LAYERS", "LSTM", "GRU", "LayerNormLSTM", "LayerNormGRU", "VanillaRNN", "LN_EPSILON",
    "recurrent_dropout_mask",
]
