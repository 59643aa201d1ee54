"""LSTM with a recurrent projection (LSTMP, Sak et al. 2014), on dist-rnn's fused recurrence.

Per step, with gates in Keras' order (i, f, c, o)::

    z_t = x_t W + h_{t-1} U + b              (4 * units)
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(c)
    m_t = sigmoid(o) * tanh(c_t)             (units)
    h_t = m_t P                              (projection_size, no bias)

``h`` (the projected state) is both the layer's output and the carried state
fed to the recurrent matmul; ``c`` keeps ``units``. The input projection of all
timesteps is one matmul, the loop does only ``h @ U``, the gates and ``m @ P``,
and the backward pass is hand-written (the reverse loop carries ``dh`` and
``dc``; the ``U`` and ``P`` gradients are one matmul each over all timesteps),
as for the other kernels of :mod:`dist_rnn.models.cells`. Recurrent dropout
masks the ``h`` fed to ``h @ U`` (one stateless mask of ``projection_size`` per call).

No cuDNN path: TensorFlow's ``CudnnRNNV3`` op has a ``num_proj`` argument, but
Keras' ``LSTM`` layer (the only cuDNN LSTM dist-rnn builds) exposes none, so
this layer runs the fused recurrence on every device (the kernel report says so).
"""

from __future__ import annotations

import keras
import tensorflow as tf

# The shared kernel plumbing (the module may be split into kernels and layers).
from dist_rnn.models.cells import (_call_dropout_mask, _cast, _rows_matmul, _shifted, _tensor_array,
                                   _time_major_projection, _weight_grad, _with_custom_gradient)

#: Why a projected LSTM never runs cuDNN (kernel report).
NO_CUDNN_REASON = "projected LSTM: Keras' LSTM exposes no cuDNN projection"


def lstmp_forward(proj, h0, c0, rkernel, pkernel, mask, units, projection_size):
    """Forward pass over ``proj`` ``(T, B, 4U)`` (``x @ W + b``, c-gate columns doubled like ``rkernel``).

    Args:
        proj: ``(T, B, 4U)`` input projections with the bias.
        h0: ``(B, P)`` initial projected state; ``c0``: ``(B, U)`` initial cell state.
        rkernel: ``(P, 4U)`` recurrent kernel; ``pkernel``: ``(U, P)`` projection.
        mask: ``(B, P)`` recurrent-dropout mask on ``h`` before ``h @ U``, or None.
        units, projection_size: ``U`` and ``P``.

    Returns:
        ``h_seq, h_T, c_T``, then the saved ``c_seq``, ``y`` (sigmoid outputs) and ``m_seq``.
    """
    cdt = proj.dtype
    rkernel_t = tf.transpose(rkernel)
    steps = tf.shape(proj)[0]

    def step(t, h, c, ta_h, ta_c, ta_y, ta_m):
        hm = h if mask is None else h * mask
        y = tf.sigmoid(proj[t] + _rows_matmul(hm, rkernel_t))
        yi, yf, yc, yo = tf.split(y, 4, axis=-1)
        c_new = c * yf + yi * (2.0 * yc - 1.0)  # tanh(a) = 2 sigmoid(2a) - 1
        m = tf.tanh(c_new) * yo
        h_new = tf.matmul(m, pkernel)
        return (t + 1, h_new, c_new, ta_h.write(t, h_new), ta_c.write(t, c_new), ta_y.write(t, y),
                ta_m.write(t, m))

    out = tf.while_loop(
        lambda t, *_: t < steps, step,
        (tf.constant(0), h0, c0,
         _tensor_array(cdt, steps, [None, projection_size]),
         _tensor_array(cdt, steps, [None, units]),
         _tensor_array(cdt, steps, [None, 4 * units]),
         _tensor_array(cdt, steps, [None, units])),
        parallel_iterations=1,
    )
    return out[3].stack(), out[1], out[2], out[4].stack(), out[5].stack(), out[6].stack()


def lstmp_backward(d_outputs, inputs, mask, saved, units, projection_size):
    """Backward pass of :func:`lstmp_forward`: gradients of ``proj, h0, c0, rkernel, pkernel``."""
    d_h_seq, d_h_last, d_c_last = d_outputs
    proj, h0, c0, rkernel, pkernel = inputs
    h_seq, _, _, c_seq, y_seq, m_seq = saved
    cdt = proj.dtype
    steps = tf.shape(proj)[0]
    rkernel_t = tf.transpose(rkernel)
    pkernel_t = tf.transpose(pkernel)
    h_prev = _shifted(h0, h_seq)
    c_prev = _shifted(c0, c_seq)
    tanh_c = tf.tanh(c_seq)
    yi, yf, yc, yo = tf.split(y_seq, 4, axis=-1)
    # Vectorized over time: dc_t = dm_t * a_t + (carried); the sigmoid
    # arguments get [dc, dc, dc, dm] * k; dc_{t-1} = dc * f.
    a = yo * (1.0 - tf.square(tanh_c))
    k = tf.concat([2.0 * yc - 1.0, c_prev, 2.0 * yi, tanh_c], -1) * (y_seq * (1.0 - y_seq))

    def back(t, dh_carry, dc_carry, ta_dz, ta_dh):
        dh = d_h_seq[t] + dh_carry
        dm = tf.matmul(dh, pkernel_t)
        dc = dm * a[t] + dc_carry
        dz = tf.concat([dc, dc, dc, dm], -1) * k[t]
        dh_prev = tf.matmul(dz, rkernel_t)
        if mask is not None:
            dh_prev = dh_prev * mask
        return t - 1, dh_prev, dc * yf[t], ta_dz.write(t, dz), ta_dh.write(t, dh)

    out = tf.while_loop(
        lambda t, *_: t >= 0, back,
        (steps - 1, d_h_last, d_c_last,
         _tensor_array(cdt, steps, [None, 4 * units]),
         _tensor_array(cdt, steps, [None, projection_size])),
        parallel_iterations=1,
    )
    dz_seq, dh_seq = out[3].stack(), out[4].stack()
    if mask is not None:
        h_prev = h_prev * mask
    return dz_seq, out[1], out[2], _weight_grad(h_prev, dz_seq), _weight_grad(m_seq, dh_seq)


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
        x = _cast(tf.convert_to_tensor(inputs), cdt)
        batch = tf.shape(x)[0]
        if initial_state is None:
            initial_state = [tf.zeros(tf.stack([batch, n]), cdt) for n in self.state_size]
        h0, c0 = [_cast(tf.convert_to_tensor(s), cdt) for s in initial_state]
        mask = _call_dropout_mask(self.recurrent_dropout, self.projection_size, batch, cdt, training, seed,
                                  self.dropout_salt, rows)
        one = tf.ones([self.units], cdt)
        scale = tf.concat([one, one, 2.0 * one, one], 0)  # c gate: tanh(a) = 2 sigmoid(2a) - 1
        weight = lambda v: _cast(tf.convert_to_tensor(v), cdt)  # noqa: E731
        proj = _time_major_projection(x, weight(self.kernel) * scale, weight(self.bias) * scale)
        h_seq, h_last, c_last = _with_custom_gradient(
            lstmp_forward, lstmp_backward,
            [proj, h0, c0, weight(self.recurrent_kernel) * scale, weight(self.projection_kernel)], mask, 3,
            units=self.units, projection_size=self.projection_size)
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
