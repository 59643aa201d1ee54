"""The recurrent layer class behind each ``model.cell`` name."""

from __future__ import annotations

from dist_rnn.models import cells

# lstm/gru: Keras' layers (cuDNN on a GPU) with dist-rnn's fused CPU recurrence;
# the others exist only as dist-rnn layers.
RECURRENT_LAYERS = {
    "lstm": cells.LSTM,
    "gru": cells.GRU,
    "ln_lstm": cells.LayerNormLSTM,
    "ln_gru": cells.LayerNormGRU,
    "rnn": cells.VanillaRNN,
}
