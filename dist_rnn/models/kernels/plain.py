"""The plain recurrences: LSTM and GRU (the non-cuDNN path of Keras' layers in
:mod:`dist_rnn.models.keras_rnn`) and the vanilla tanh RNN
(:class:`~dist_rnn.models.vanilla.VanillaRNN`), each a time-major forward loop
with a hand-written backward pass.

The public functions take the precomputed input projection ``proj``
(``(T, B, gates * U)``, see :func:`~.common.time_major_projection`), the
initial states, the recurrent weights and the recurrent-dropout mask (or
None), and return ``h_seq`` ``(T, B, U)`` followed by the final states; they
are differentiable with respect to every tensor but the mask.

Measured on the 2-core CPU (train step of a 2 x 256 char model, B=32, T=100,
same hand-written loop; see docs/benchmarks.md): LSTM 1.8x and GRU 1.4x the
tokens/s of Keras' generic fallback. TF's own fused CPU op (``BlockLSTMV2`` +
its gradient) was also measured: one 256-unit layer forward + backward takes
300 ms against 120 ms here, so it is not used.
"""

from __future__ import annotations

import tensorflow as tf

from dist_rnn.models.kernels.common import (rows_matmul, shifted, sum_tb, tensor_array, weight_grad,
                                            with_custom_gradient)


def lstm(proj, h0, c0, rkernel, mask, units):
    """The LSTM recurrence (gate order i, f, c, o) over ``proj`` ``(T, B, 4U)``.

    ``proj`` (``x @ W + b``) and ``rkernel`` come with the c-gate columns
    doubled so that one sigmoid gives every gate (``tanh(a) = 2 sigmoid(2a) - 1``).

    Returns:
        ``h_seq, h_T, c_T``.
    """
    return with_custom_gradient(_lstm_forward, _lstm_backward, [proj, h0, c0, rkernel], mask, 3, units=units)


def gru(proj, h0, rkernel, rbias, mask, units):
    """The GRU recurrence (``reset_after``, gate order z, r, h) over ``proj`` ``(T, B, 3U)``.

    ``rbias`` is the recurrent bias, added to ``h @ rkernel`` before the reset gate.

    Returns:
        ``h_seq, h_T``.
    """
    return with_custom_gradient(_gru_forward, _gru_backward, [proj, h0, rkernel, rbias], mask, 2, units=units)


def vanilla(proj, h0, rkernel, mask, units):
    """The tanh RNN recurrence over ``proj`` ``(T, B, U)`` (bias included).

    Returns:
        ``h_seq, h_T``.
    """
    return with_custom_gradient(_vanilla_forward, _vanilla_backward, [proj, h0, rkernel], mask, 2, units=units)


def _lstm_forward(proj, h0, c0, rkernel, mask, units):
    """Forward pass of :class:`~dist_rnn.models.keras_rnn.LSTM` over ``proj`` ``(T, B, 4U)`` (gate order i, f, c, o).

    ``proj`` (``x @ W + b``) and ``rkernel`` come with the c-gate columns
    doubled so that one sigmoid gives every gate (``tanh(a) = 2 sigmoid(2a) - 1``).
    ``mask`` (recurrent dropout, or None) multiplies ``h`` before the recurrent matmul.

    Returns:
        ``h_seq, h_T, c_T``, then the saved ``c_seq`` and ``y`` (sigmoid outputs).
    """
    cdt = proj.dtype
    rkernel_t = tf.transpose(rkernel)
    steps = tf.shape(proj)[0]

    def step(t, h, c, ta_h, ta_c, ta_y):
        hm = h if mask is None else h * mask
        y = tf.sigmoid(proj[t] + rows_matmul(hm, rkernel_t))
        yi, yf, yc, yo = tf.split(y, 4, axis=-1)
        c_new = c * yf + yi * (2.0 * yc - 1.0)
        h_new = tf.tanh(c_new) * yo
        return t + 1, h_new, c_new, ta_h.write(t, h_new), ta_c.write(t, c_new), ta_y.write(t, y)

    out = tf.while_loop(
        lambda t, *_: t < steps, step,
        (tf.constant(0), h0, c0,
         tensor_array(cdt, steps, [None, units]),
         tensor_array(cdt, steps, [None, units]),
         tensor_array(cdt, steps, [None, 4 * units])),
        parallel_iterations=1,
    )
    return out[3].stack(), out[1], out[2], out[4].stack(), out[5].stack()


def _lstm_backward(d_outputs, inputs, mask, saved, units):
    """Backward pass of :func:`_lstm_forward`: gradients of ``proj, h0, c0, rkernel``."""
    d_h_seq, d_h_last, d_c_last = d_outputs
    proj, h0, c0, rkernel = inputs
    h_seq, _, _, c_seq, y_seq = saved
    cdt = proj.dtype
    steps = tf.shape(proj)[0]
    rkernel_t = tf.transpose(rkernel)
    h_prev = shifted(h0, h_seq)
    c_prev = shifted(c0, c_seq)
    tanh_c = tf.tanh(c_seq)
    yi, yf, yc, yo = tf.split(y_seq, 4, axis=-1)
    # Vectorized over time: dL/dc_t = dh_t * a_t + (carried); the sigmoid
    # arguments get [dc, dc, dc, dh] * k; dc_{t-1} = dc * f.
    a = yo * (1.0 - tf.square(tanh_c))
    k = tf.concat([2.0 * yc - 1.0, c_prev, 2.0 * yi, tanh_c], -1) * (y_seq * (1.0 - y_seq))

    def back(t, dh_carry, dc_carry, ta_dz):
        dh = d_h_seq[t] + dh_carry
        dc = dh * a[t] + dc_carry
        dz = tf.concat([dc, dc, dc, dh], -1) * k[t]
        dh_prev = tf.matmul(dz, rkernel_t)
        if mask is not None:
            dh_prev = dh_prev * mask
        return t - 1, dh_prev, dc * yf[t], ta_dz.write(t, dz)

    out = tf.while_loop(
        lambda t, *_: t >= 0, back,
        (steps - 1, d_h_last, d_c_last, tensor_array(cdt, steps, [None, 4 * units])),
        parallel_iterations=1,
    )
    dz_seq = out[3].stack()
    if mask is not None:
        h_prev = h_prev * mask
    return dz_seq, out[1], out[2], weight_grad(h_prev, dz_seq)


def _gru_forward(proj, h0, rkernel, rbias, mask, units):
    """Forward pass of :class:`~dist_rnn.models.keras_rnn.GRU` (``reset_after``) over ``proj`` ``(T, B, 3U)``.

    Gate order z, r, h. ``mask`` (recurrent dropout, or None) multiplies ``h``
    before the recurrent matmul; the update ``h_t = hh + z * (h_{t-1} - hh)`` uses the
    unmasked state.

    Returns:
        ``h_seq, h_T``, then the saved ``zr`` (gates), ``hu_h`` (recurrent
        candidate term) and ``hh`` (candidate).
    """
    cdt = proj.dtype
    rkernel_t = tf.transpose(rkernel)
    steps = tf.shape(proj)[0]
    proj_zr = proj[:, :, : 2 * units]
    proj_h = proj[:, :, 2 * units:]

    def step(t, h, ta_h, ta_zr, ta_hu, ta_hh):
        hm = h if mask is None else h * mask
        hu_zr, hu_h = tf.split(rows_matmul(hm, rkernel_t) + rbias, [2 * units, units], axis=-1)
        zr = tf.sigmoid(proj_zr[t] + hu_zr)
        z, r = tf.split(zr, 2, axis=-1)
        hh = tf.tanh(proj_h[t] + r * hu_h)
        h_new = hh + z * (h - hh)
        return (t + 1, h_new, ta_h.write(t, h_new), ta_zr.write(t, zr), ta_hu.write(t, hu_h),
                ta_hh.write(t, hh))

    out = tf.while_loop(
        lambda t, *_: t < steps, step,
        (tf.constant(0), h0,
         tensor_array(cdt, steps, [None, units]),
         tensor_array(cdt, steps, [None, 2 * units]),
         tensor_array(cdt, steps, [None, units]),
         tensor_array(cdt, steps, [None, units])),
        parallel_iterations=1,
    )
    return (out[2].stack(), out[1]) + tuple(ta.stack() for ta in out[3:])


def _gru_backward(d_outputs, inputs, mask, saved, units):
    """Backward pass of :func:`_gru_forward`: gradients of ``proj, h0, rkernel, rbias``."""
    d_h_seq, d_h_last = d_outputs
    proj, h0, rkernel, rbias = inputs
    h_seq, _, zr_seq, hu_seq, hh_seq = saved
    cdt = proj.dtype
    steps = tf.shape(proj)[0]
    rkernel_t = tf.transpose(rkernel)
    h_prev = shifted(h0, h_seq)
    z, r = tf.split(zr_seq, 2, axis=-1)
    # Vectorized over time: the gradient of (h @ U + b_r) is [dh, dh, dh] * k.
    kh = (1.0 - z) * (1.0 - tf.square(hh_seq))
    k = tf.concat([(h_prev - hh_seq) * z * (1.0 - z), kh * hu_seq * r * (1.0 - r), kh * r], -1)

    def back(t, dh_carry, ta_dhu, ta_dh):
        dh = d_h_seq[t] + dh_carry
        dhu = tf.concat([dh, dh, dh], -1) * k[t]
        dh_rec = tf.matmul(dhu, rkernel_t)
        if mask is not None:
            dh_rec = dh_rec * mask
        return (t - 1, dh_rec + dh * z[t], ta_dhu.write(t, dhu), ta_dh.write(t, dh))

    out = tf.while_loop(
        lambda t, *_: t >= 0, back,
        (steps - 1, d_h_last,
         tensor_array(cdt, steps, [None, 3 * units]),
         tensor_array(cdt, steps, [None, units])),
        parallel_iterations=1,
    )
    dhu_seq, dh_seq = out[2].stack(), out[3].stack()
    d_proj = tf.concat([dhu_seq[:, :, : 2 * units], dh_seq * kh], -1)
    h_prev_masked = h_prev if mask is None else h_prev * mask
    return d_proj, out[1], weight_grad(h_prev_masked, dhu_seq), sum_tb(dhu_seq)


def _vanilla_forward(proj, h0, rkernel, mask, units):
    """Forward pass of :class:`~dist_rnn.models.vanilla.VanillaRNN`; ``proj`` ``(T, B, U)`` includes the bias.

    Returns:
        ``h_seq, h_T`` (nothing else is saved for the backward pass).
    """
    rkernel_t = tf.transpose(rkernel)
    steps = tf.shape(proj)[0]

    def step(t, h, ta_h):
        hm = h if mask is None else h * mask
        h_new = tf.tanh(proj[t] + rows_matmul(hm, rkernel_t))
        return t + 1, h_new, ta_h.write(t, h_new)

    _, h_last, ta_h = tf.while_loop(
        lambda t, *_: t < steps, step, loop_vars=
        (tf.constant(0), h0, tensor_array(proj.dtype, steps, [None, units])),
    )
    return ta_h.stack(), h_last


def _vanilla_backward(d_outputs, inputs, mask, saved, units):
    """Backward pass of :func:`_vanilla_forward`: gradients of all its tensor inputs."""
    d_h_seq, d_h_last = d_outputs
    proj, h0, rkernel = inputs
    steps = tf.shape(proj)[0]
    rkernel_t = tf.transpose(rkernel)
    h_seq = saved[0]
    dtanh = 1.0 - tf.square(h_seq)

    def back(t, dh_carry, ta):
        dpre = (d_h_seq[t] + dh_carry) * dtanh[t]
        dh_rec = tf.matmul(dpre, rkernel_t)
        if mask is not None:
            dh_rec = dh_rec * mask
        return t - 1, dh_rec, ta.write(t, dpre)

    _, dh0, ta = tf.while_loop(
        lambda t, *_: t >= 0, back, loop_vars=
        (steps - 1, d_h_last, tensor_array(proj.dtype, steps, [None, units])),
    )
    dpre_seq = ta.stack()
    h_prev = shifted(h0, h_seq)
    if mask is not None:
        h_prev = h_prev * mask
    return dpre_seq, dh0, weight_grad(h_prev, dpre_seq)
