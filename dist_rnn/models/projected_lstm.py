"""LSTM with a recurrent projection (LSTMP, Sak et al. 2014), on dist-rnn's fused recurrence.

Per step, with gates in Keras' order (i, f, c, o)::

    z_t = x_t W + h_{t-1} U + b              (4 * units)
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(c)
    m_t = sigmoid(o) * tanh(c_t)             (units)
    h_t = m_t P                              (projection_size, no bias)

``h`` (the projected state) is both the layer's output and the carried state
fed to the recurrent matmul; ``c`` keeps ``units``. The input projection of all
timesteps is one matmul; the recurrence is
:func:`dist_rnn.models.kernels.projected.lstmp` (hand-written backward pass, as
the other kernels of :mod:`dist_rnn.models.kernels`), or with
``DIST_RNN_COMPILED_KERNELS=on`` its compiled op
:func:`dist_rnn.models.kernels.compiled.lstmp`. Recurrent dropout masks the
``h`` fed to ``h @ U`` (one stateless mask of ``projection_size`` per call).

No cuDNN path: TensorFlow's ``CudnnRNNV3`` op has a ``num_proj`` argument, but
Keras' ``LSTM`` layer (the only cuDNN LSTM dist-rnn builds) exposes none, so
this layer runs the fused recurrence on every device (the kernel report says so).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from dist_rnn.models.dropout import call_dropout_mask
from dist_rnn.models.kernels import compiled
from dist_rnn.models.kernels.common import cast, time_major_projection
from dist_rnn.models.kernels.projected import lstmp

#: Why a projected LSTM never runs cuDNN (kernel report).
NO_CUDNN_REASON = "projected LSTM: Keras' LSTM exposes no cuDNN projection"


@keras.saving.register_keras_serializable(package="dist_rnn")
class ProjectedLSTM(keras.layers.Layer):
    """LSTM sequence layer with a recurrent projection; the contract of ``keras.layers.LSTM``.

    ``sequences, h, c = layer(x, initial_state=[h0, c0], training=..., seed=..., rows=...)``
    with ``sequences`` ``(batch, time, projection_size)``, ``h``
    ``(batch, projection_size)`` and ``c`` ``(batch, units)``.

    Args:
        units: Cell width (``model.hidden_size``).
        projection_size: Width of the projected state ``h`` (``model.projection_size``).
        recurrent_dropout: Variational dropout rate on ``h`` before ``h @ U``.
        kernel_initializer, recurrent_initializer, bias_initializer,
        projection_initializer: Initializers of ``W``, ``U``, ``b`` and ``P``.
        unit_forget_bias: Add 1 to the forget-gate bias at initialization (as Keras' LSTM).
        dropout_salt: Folded into the call's ``seed`` for the recurrent-dropout mask.
        return_sequences, return_state: As for ``keras.layers.LSTM`` (default True).
    """

    fused_kernel_reason = NO_CUDNN_REASON

    def __init__(self, units, projection_size, recurrent_dropout=0.0, kernel_initializer="glorot_uniform",
                 recurrent_initializer="orthogonal", bias_initializer="zeros", projection_initializer="glorot_uniform",
                 unit_forget_bias=True, dropout_salt=0, return_sequences=True, return_state=True, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.projection_size = int(projection_size)
        self.recurrent_dropout = float(recurrent_dropout)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.recurrent_initializer = keras.initializers.get(recurrent_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.projection_initializer = keras.initializers.get(projection_initializer)
        self.unit_forget_bias = bool(unit_forget_bias)
        self.dropout_salt = int(dropout_salt)
        self.return_sequences = bool(return_sequences)
        self.return_state = bool(return_state)

    @property
    def state_size(self):
        """``[projection_size, units]``: the sizes of ``h`` and ``c``."""
        return [self.projection_size, self.units]

    def build(self, input_shape):
        """Creates ``kernel`` ``(in, 4U)``, ``recurrent_kernel`` ``(P, 4U)``, ``bias`` ``(4U)``, ``projection_kernel`` ``(U, P)``."""
        gates = 4 * self.units
        self.kernel = self.add_weight(name="kernel", shape=(input_shape[-1], gates),
                                      initializer=self.kernel_initializer)
        self.recurrent_kernel = self.add_weight(name="recurrent_kernel", shape=(self.projection_size, gates),
                                                initializer=self.recurrent_initializer)
        bias_init = self.bias_initializer
        if self.unit_forget_bias:
            base, units = self.bias_initializer, self.units

            def bias_init(shape, dtype=None):
                return tf.concat([base((units,), dtype), tf.ones((units,), dtype), base((2 * units,), dtype)], 0)
        self.bias = self.add_weight(name="bias", shape=(gates,), initializer=bias_init)
        self.projection_kernel = self.add_weight(name="projection_kernel", shape=(self.units, self.projection_size),
                                                 initializer=self.projection_initializer)

    def call(self, inputs, initial_state=None, training=None, seed=None, rows=None):
        """Runs the layer over ``(batch, time, features)`` inputs (see the class docstring)."""
        cdt = tf.as_dtype(self.compute_dtype)
        x = cast(tf.convert_to_tensor(inputs), cdt)
        batch = tf.shape(x)[0]
        if initial_state is None:
            initial_state = [tf.zeros(tf.stack([batch, n]), cdt) for n in self.state_size]
        h0, c0 = [cast(tf.convert_to_tensor(s), cdt) for s in initial_state]
        mask = call_dropout_mask(self.recurrent_dropout, self.projection_size, batch, cdt, training, seed,
                                  self.dropout_salt, rows)
        one = tf.ones([self.units], cdt)
        scale = tf.concat([one, one, 2.0 * one, one], 0)  # c gate: tanh(a) = 2 sigmoid(2a) - 1
        weight = lambda v: cast(tf.convert_to_tensor(v), cdt)  # noqa: E731
        proj = time_major_projection(x, weight(self.kernel) * scale, weight(self.bias) * scale)
        recurrence = compiled.lstmp if compiled.uses_compiled("lstmp") else lstmp
        h_seq, h_last, c_last = recurrence(proj, h0, c0, weight(self.recurrent_kernel) * scale,
                                           weight(self.projection_kernel), mask, self.units, self.projection_size)
        output = tf.transpose(h_seq, [1, 0, 2]) if self.return_sequences else h_last
        return (output, h_last, c_last) if self.return_state else output

    def compute_output_shape(self, input_shape):
        batch, steps = input_shape[0], input_shape[1]
        output = (batch, steps, self.projection_size) if self.return_sequences else (batch, self.projection_size)
        return [output, (batch, self.projection_size), (batch, self.units)] if self.return_state else output

    def get_config(self):
        ser = keras.initializers.serialize
        return {**super().get_config(), "units": self.units, "projection_size": self.projection_size,
                "recurrent_dropout": self.recurrent_dropout, "kernel_initializer": ser(self.kernel_initializer),
                "recurrent_initializer": ser(self.recurrent_initializer),
                "bias_initializer": ser(self.bias_initializer),
                "projection_initializer": ser(self.projection_initializer),
                "unit_forget_bias": self.unit_forget_bias, "dropout_salt": self.dropout_salt,
                "return_sequences": self.return_sequences, "return_state": self.return_state}
