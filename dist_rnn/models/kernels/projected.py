"""The projected LSTM recurrence (LSTMP, Sak et al. 2014) of
:class:`~dist_rnn.models.projected_lstm.ProjectedLSTM`: a time-major forward
loop with a hand-written backward pass, like the kernels of :mod:`.plain`.

Per step, with gates in Keras' order (i, f, c, o)::

    z_t = x_t W + h_{t-1} U + b              (4 * units)
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(c)
    m_t = sigmoid(o) * tanh(c_t)             (units)
    h_t = m_t P                              (projection_size, no bias)

The loop does only ``h @ U``, the gates and ``m @ P``; the reverse loop
carries ``dh`` and ``dc``, and the ``U`` and ``P`` gradients are one matmul
each over all timesteps.
"""

from __future__ import annotations

import tensorflow as tf

from dist_rnn.models.kernels.common import rows_matmul, shifted, tensor_array, weight_grad, with_custom_gradient


def lstmp(proj, h0, c0, rkernel, pkernel, mask, units, projection_size):
    """The projected LSTM recurrence over ``proj`` ``(T, B, 4U)``.

    ``proj`` (``x @ W + b``) and ``rkernel`` ``(P, 4U)`` come with the c-gate
    columns doubled, as for :func:`~.plain.lstm`; ``pkernel`` ``(U, P)`` is the
    projection; ``mask`` ``(B, P)`` (or None) drops ``h`` before ``h @ U``.

    Returns:
        ``h_seq`` ``(T, B, P)``, ``h_T`` ``(B, P)``, ``c_T`` ``(B, U)``.
    """
    return with_custom_gradient(lstmp_forward, lstmp_backward, [proj, h0, c0, rkernel, pkernel], mask, 3,
                                units=units, projection_size=projection_size)


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
        y = tf.sigmoid(proj[t] + rows_matmul(hm, rkernel_t))
        yi, yf, yc, yo = tf.split(y, 4, axis=-1)
        c_new = c * yf + yi * (2.0 * yc - 1.0)  # tanh(a) = 2 sigmoid(2a) - 1
        m = tf.tanh(c_new) * yo
        h_new = tf.matmul(m, pkernel)
        return (t + 1, h_new, c_new, ta_h.write(t, h_new), ta_c.write(t, c_new), ta_y.write(t, y),
                ta_m.write(t, m))

    out = tf.while_loop(
        lambda t, *_: t < steps, step,
        (tf.constant(0), h0, c0,
         tensor_array(cdt, steps, [None, projection_size]),
         tensor_array(cdt, steps, [None, units]),
         tensor_array(cdt, steps, [None, 4 * units]),
         tensor_array(cdt, steps, [None, units])),
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
    h_prev = shifted(h0, h_seq)
    c_prev = shifted(c0, c_seq)
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
         tensor_array(cdt, steps, [None, 4 * units]),
         tensor_array(cdt, steps, [None, projection_size])),
        parallel_iterations=1,
    )
    dz_seq, dh_seq = out[3].stack(), out[4].stack()
    if mask is not None:
        h_prev = h_prev * mask
    return dz_seq, out[1], out[2], weight_grad(h_prev, dz_seq), weight_grad(m_seq, dh_seq)
