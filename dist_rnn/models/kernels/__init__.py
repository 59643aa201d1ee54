"""Recurrence kernels: pure functions of tensors, no Keras.

Each kernel runs one recurrent layer over a whole sequence, time-major, from
the precomputed input projection of every timestep, in one ``tf.while_loop``
doing only ``h @ U`` and the elementwise (and layer-norm) work per step, and
carries a hand-written backward pass (``tf.custom_gradient``).

- :mod:`.common`: dtype casts, the one input projection, matmul layouts,
  the custom-gradient wrapper.
- :mod:`.plain`: :func:`~.plain.lstm`, :func:`~.plain.gru`, :func:`~.plain.vanilla`.
- :mod:`.layer_norm`: :func:`~.layer_norm.ln_lstm`, :func:`~.layer_norm.ln_gru`.
- :mod:`.compiled`: the same recurrences as compiled C++ ops (``csrc/``, built on
  first use; so far ``lstm``, ``gru``, ``ln_lstm``, ``ln_gru`` and ``lstmp``, opt-in with ``DIST_RNN_COMPILED_KERNELS=on``).
- :mod:`.projected`: :func:`~.projected.lstmp` (LSTM with a recurrent projection).
"""

from dist_rnn.models.kernels.common import time_major_projection
from dist_rnn.models.kernels.layer_norm import ln_gru, ln_lstm
from dist_rnn.models.kernels.plain import gru, lstm, vanilla
from dist_rnn.models.kernels.projected import lstmp

__all__ = ["time_major_projection", "lstm", "gru", "vanilla", "ln_lstm", "ln_gru", "lstmp"]
