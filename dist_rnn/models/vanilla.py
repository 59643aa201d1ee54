"""The plain (Elman) tanh RNN sequence layer, on the recurrence of
:func:`dist_rnn.models.kernels.plain.vanilla`. Call contract and recurrent
dropout: see :mod:`dist_rnn.models.fused_layer`.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from dist_rnn.models.fused_layer import FusedRecurrentLayer
from dist_rnn.models.kernels.common import cast
from dist_rnn.models.kernels.plain import vanilla

__all__ = ["VanillaRNN"]


@keras.saving.register_keras_serializable(package="dist_rnn")
class VanillaRNN(FusedRecurrentLayer):
    """Plain (Elman) tanh RNN sequence layer, for teaching and baselines.

    For each timestep, with ``m`` the recurrent-dropout mask (all ones unless
    training with ``recurrent_dropout > 0``)::

        h_t = tanh(x_t @ W + (m * h_{t-1}) @ U + b)

    Weights, in ``get_weights()`` order: ``kernel (features, U)``,
    ``recurrent_kernel (U, U)``, ``bias (U,)``.

    Args:
        units: Size of ``h``.
        recurrent_dropout: Rate of the variational dropout on ``h`` before
            the recurrent matmul (one mask per sequence).
        kernel_initializer: Initializer of ``kernel``.
        recurrent_initializer: Initializer of ``recurrent_kernel``.
        bias_initializer: Initializer of ``bias``.
        dropout_salt: Folded into the call's ``seed`` so that each layer
            draws its own recurrent-dropout mask.
        return_sequences: Return all outputs (default) or only the last one.
        return_state: Also return the final states (default). The defaults
            give the contract of ``keras.layers.LSTM(units,
            return_sequences=True, return_state=True)``.
        **kwargs: Base ``keras.layers.Layer`` arguments (``name``, ``dtype``...).

    Call: ``[sequences, h] = layer(x, initial_state=[h0], training=...)``.
    """

    _num_gates = 1
    _num_states = 1

    def __init__(
        self,
        units,
        recurrent_dropout=0.0,
        kernel_initializer="glorot_uniform",
        recurrent_initializer="orthogonal",
        bias_initializer="zeros",
        dropout_salt=0,
        return_sequences=True,
        return_state=True,
        **kwargs,
    ):
        super().__init__(
            units,
            recurrent_dropout=recurrent_dropout,
            kernel_initializer=kernel_initializer,
            recurrent_initializer=recurrent_initializer,
            dropout_salt=dropout_salt,
            return_sequences=return_sequences,
            return_state=return_state,
            **kwargs,
        )
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def _build_extra(self):
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer=self.bias_initializer)

    def _recur(self, proj, states, rkernel, mask):
        bias = cast(tf.convert_to_tensor(self.bias), proj.dtype)
        return vanilla(proj + bias, states[0], rkernel, mask, units=self.units)

    def get_config(self):
        """Returns the constructor arguments (plus the base layer's) as a dict."""
        config = super().get_config()
        config["bias_initializer"] = keras.initializers.serialize(self.bias_initializer)
        return config
