"""The recurrent layer class behind each ``model.cell`` name."""

from __future__ import annotations

from dist_rnn.models.keras_rnn import GRU, LSTM
from dist_rnn.models.layer_norm import LayerNormGRU, LayerNormLSTM
from dist_rnn.models.vanilla import VanillaRNN

# lstm/gru: Keras' layers (cuDNN on a GPU) with dist-rnn's fused CPU recurrence;
# the others exist only as dist-rnn layers.
RECURRENT_LAYERS = {
    "lstm": LSTM,
    "gru": GRU,
    "ln_lstm": LayerNormLSTM,
    "ln_gru": LayerNormGRU,
    "rnn": VanillaRNN,
}
