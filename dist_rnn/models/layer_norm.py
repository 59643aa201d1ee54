"""Layer-normalized LSTM and GRU sequence layers (Ba et al. 2016), on the
recurrences of :mod:`dist_rnn.models.kernels.layer_norm`.

Layer-norm statistics (mean, biased variance over the units), gains and
shifts are in float32 (float64 for a float64 layer) whatever the compute
dtype; the epsilon added to the variance is :data:`LN_EPSILON`. Call contract
and recurrent dropout: see :mod:`dist_rnn.models.fused_layer`.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from dist_rnn.models.fused_layer import FusedRecurrentLayer
from dist_rnn.models.kernels import compiled
from dist_rnn.models.kernels.common import cast
from dist_rnn.models.kernels.layer_norm import ln_gru, ln_lstm

__all__ = ["LN_EPSILON", "LayerNormLSTM", "LayerNormGRU"]

#: Epsilon added to the variance in every layer normalization of these layers.
LN_EPSILON = 1e-5


@keras.saving.register_keras_serializable(package="dist_rnn")
class LayerNormLSTM(FusedRecurrentLayer):
    """Layer-normalized LSTM sequence layer (Ba et al. 2016).

    As in the classic TensorFlow char-rnn tutorials' layer-normalized LSTM,
    with gate order ``i, j, f, o``. For each timestep, with ``W`` the
    input kernel ``(features, 4U)``, ``U`` the recurrent kernel ``(U, 4U)`` and
    ``m`` the recurrent-dropout mask (all ones unless training with
    ``recurrent_dropout > 0``)::

        [i, j, f, o] = x_t @ W + (m * h_{t-1}) @ U          # no bias
        i, j, f, o   = LN_i(i), LN_j(j), LN_f(f), LN_o(o)    # separate gains/shifts
        c_t          = c_{t-1} * sigmoid(f + forget_bias) + sigmoid(i) * tanh(j)
        h_t          = tanh(LN_c(c_t)) * sigmoid(o)

    where ``LN(a) = gamma * (a - mean(a)) / sqrt(var(a) + 1e-5) + beta`` with
    mean and biased variance over the ``U`` units, gains initialised to 1 and
    shifts to 0. The carried (and returned) cell state ``c_t`` is the
    unnormalized one, as in Ba et al. and the tutorials (TF-contrib's
    ``LayerNormBasicLSTMCell`` carried ``LN_c(c_t)`` instead). The four gate normalizations are computed as one op
    on a ``(B, 4, U)`` view with gain/shift vectors of length ``4U``.

    Weights, in ``get_weights()`` order: ``kernel (features, 4U)``,
    ``recurrent_kernel (U, 4U)``, ``gate_gamma (4U,)``, ``gate_beta (4U,)``,
    ``cell_gamma (U,)``, ``cell_beta (U,)``.

    Args:
        units: Size of ``h`` and ``c``.
        forget_bias: Added to the normalized forget-gate pre-activation.
        recurrent_dropout: Rate of the variational dropout on ``h`` before
            the recurrent matmul (one mask per sequence).
        kernel_initializer: Initializer of ``kernel``.
        recurrent_initializer: Initializer of ``recurrent_kernel``.
        dropout_salt: Folded into the call's ``seed`` so that each layer
            draws its own recurrent-dropout mask.
        return_sequences: Return all outputs (default) or only the last one.
        return_state: Also return the final states (default). The defaults
            give the contract of ``keras.layers.LSTM(units,
            return_sequences=True, return_state=True)``.
        **kwargs: Base ``keras.layers.Layer`` arguments (``name``, ``dtype``...).

    Call: ``[sequences, h, c] = layer(x, initial_state=[h0, c0], training=...)``.
    """

    _num_gates = 4
    _num_states = 2

    def __init__(
        self,
        units,
        forget_bias=1.0,
        recurrent_dropout=0.0,
        kernel_initializer="glorot_uniform",
        recurrent_initializer="orthogonal",
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
        self.forget_bias = float(forget_bias)

    def _build_extra(self):
        self.gate_gamma = self._ln_weight("gate_gamma", 4 * self.units, "ones")
        self.gate_beta = self._ln_weight("gate_beta", 4 * self.units, "zeros")
        self.cell_gamma = self._ln_weight("cell_gamma", self.units, "ones")
        self.cell_beta = self._ln_weight("cell_beta", self.units, "zeros")

    def _recur(self, proj, states, rkernel, mask):
        sdt = self._stats_dtype()
        units = self.units
        # Fold the j gate's tanh(a) = 2 * sigmoid(2a) - 1 and the forget bias
        # into the gate layer-norm gain/shift (differentiated by autodiff).
        ones = tf.ones([units], sdt)
        zeros = tf.zeros([units], sdt)
        scale = tf.concat([ones, 2.0 * ones, ones, ones], 0)
        shift = tf.concat([zeros, zeros, self.forget_bias * ones, zeros], 0)
        gain = cast(tf.convert_to_tensor(self.gate_gamma), sdt) * scale
        bias = cast(tf.convert_to_tensor(self.gate_beta), sdt) * scale + shift
        recurrence = compiled.ln_lstm if compiled.uses_compiled("ln_lstm") else ln_lstm
        return recurrence(proj, states[0], states[1], rkernel, gain, bias,
                          cast(tf.convert_to_tensor(self.cell_gamma), sdt),
                          cast(tf.convert_to_tensor(self.cell_beta), sdt),
                          mask, units=self.units, eps=LN_EPSILON)

    def get_config(self):
        """Returns the constructor arguments (plus the base layer's) as a dict."""
        config = super().get_config()
        config["forget_bias"] = self.forget_bias
        return config


@keras.saving.register_keras_serializable(package="dist_rnn")
class LayerNormGRU(FusedRecurrentLayer):
    """Layer-normalized GRU sequence layer.

    Gate order in the kernels is ``z, r, n`` (as ``keras.layers.GRU``). For each
    timestep, with ``m`` the recurrent-dropout mask (all ones unless training
    with ``recurrent_dropout > 0``) and ``hm = m * h_{t-1}``::

        z   = sigmoid(LN_z(x_t @ W_z + hm @ U_z))
        r   = sigmoid(LN_r(x_t @ W_r + hm @ U_r))
        n   = tanh(LN_n(x_t @ W_n + r * (hm @ U_n)))
        h_t = z * h_{t-1} + (1 - z) * n

    (``z`` is the keep-old-state gate, Keras' convention; the reset gate acts
    after the recurrent matmul, as Keras' ``reset_after=True``.)
    ``LN(a) = gamma * (a - mean(a)) / sqrt(var(a) + 1e-5) + beta`` over the
    ``U`` units; ``LN_z`` and ``LN_r`` are separate normalizations computed as
    one op on a ``(B, 2, U)`` view. There are no biases: the layer-norm shifts
    play their role.

    Weights, in ``get_weights()`` order: ``kernel (features, 3U)``,
    ``recurrent_kernel (U, 3U)``, ``gate_gamma (2U,)``, ``gate_beta (2U,)``
    (z then r), ``candidate_gamma (U,)``, ``candidate_beta (U,)``.

    Args:
        units: Size of ``h``.
        recurrent_dropout: Rate of the variational dropout on ``h`` before
            the recurrent matmul (one mask per sequence).
        kernel_initializer: Initializer of ``kernel``.
        recurrent_initializer: Initializer of ``recurrent_kernel``.
        gate_beta_initializer: Initializer of ``gate_beta`` (default zeros;
            a constant 1.0 starts z and r like a GRU gate bias of 1.0).
        dropout_salt: Folded into the call's ``seed`` so that each layer
            draws its own recurrent-dropout mask.
        return_sequences: Return all outputs (default) or only the last one.
        return_state: Also return the final states (default). The defaults
            give the contract of ``keras.layers.LSTM(units,
            return_sequences=True, return_state=True)``.
        **kwargs: Base ``keras.layers.Layer`` arguments (``name``, ``dtype``...).

    Call: ``[sequences, h] = layer(x, initial_state=[h0], training=...)``.
    """

    _num_gates = 3
    _num_states = 1

    def __init__(self, units, gate_beta_initializer="zeros", **kwargs):
        super().__init__(units, **kwargs)
        self.gate_beta_initializer = keras.initializers.get(gate_beta_initializer)

    def get_config(self):
        """Returns the constructor arguments (plus the base layer's) as a dict."""
        return {**super().get_config(),
                "gate_beta_initializer": keras.initializers.serialize(self.gate_beta_initializer)}

    def _build_extra(self):
        self.gate_gamma = self._ln_weight("gate_gamma", 2 * self.units, "ones")
        self.gate_beta = self._ln_weight("gate_beta", 2 * self.units, self.gate_beta_initializer)
        self.candidate_gamma = self._ln_weight("candidate_gamma", self.units, "ones")
        self.candidate_beta = self._ln_weight("candidate_beta", self.units, "zeros")

    def _recur(self, proj, states, rkernel, mask):
        sdt = self._stats_dtype()
        recurrence = compiled.ln_gru if compiled.uses_compiled("ln_gru") else ln_gru
        return recurrence(proj, states[0], rkernel,
                          cast(tf.convert_to_tensor(self.gate_gamma), sdt),
                          cast(tf.convert_to_tensor(self.gate_beta), sdt),
                          cast(tf.convert_to_tensor(self.candidate_gamma), sdt),
                          cast(tf.convert_to_tensor(self.candidate_beta), sdt),
                          mask, units=self.units, eps=LN_EPSILON)
