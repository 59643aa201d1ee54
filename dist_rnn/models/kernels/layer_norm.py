"""The layer-normalized recurrences (Ba et al. 2016) behind
:class:`~dist_rnn.models.layer_norm.LayerNormLSTM` and
:class:`~dist_rnn.models.layer_norm.LayerNormGRU`, with the layer-norm forward
and backward steps they share.

The layer norms of a cell's gates are fused into one op on a
``(B, gates, units)`` view. Statistics, gains and shifts are in the statistics
dtype (float32, or float64 for a float64 layer); the matmuls and the other
elementwise work run in the dtype of ``proj``. The reverse loops only do the
sequential part of backpropagation through time; the gain/shift and
recurrent-kernel gradients are computed vectorized over all timesteps.
"""

from __future__ import annotations

import tensorflow as tf

from dist_rnn.models.kernels.common import (cast, rows_matmul, shifted, sum_tb, tensor_array, weight_grad,
                                            with_custom_gradient)


def ln_lstm(proj, h0, c0, rkernel, gain, bias, cell_gamma, cell_beta, mask, units, eps):
    """The layer-normalized LSTM recurrence (gate order i, j, f, o) over ``proj`` ``(T, B, 4U)``.

    ``gain``/``bias`` are the gate layer-norm gain/shift with the j-gate scale
    2 and the forget bias folded in (see :func:`_lnlstm_forward`);
    ``cell_gamma``/``cell_beta`` those of the cell-state norm. ``eps`` is added
    to every variance.

    Returns:
        ``h_seq, h_T, c_T``.
    """
    tensors = [proj, h0, c0, rkernel, gain, bias, cell_gamma, cell_beta]
    return with_custom_gradient(_lnlstm_forward, _lnlstm_backward, tensors, mask, 3, units=units, eps=eps)


def ln_gru(proj, h0, rkernel, gate_gamma, gate_beta, cand_gamma, cand_beta, mask, units, eps):
    """The layer-normalized GRU recurrence (gate order z, r, n) over ``proj`` ``(T, B, 3U)``.

    ``gate_gamma``/``gate_beta`` (``2U``) normalize the z and r gates,
    ``cand_gamma``/``cand_beta`` (``U``) the candidate. ``eps`` is added to
    every variance.

    Returns:
        ``h_seq, h_T``.
    """
    tensors = [proj, h0, rkernel, gate_gamma, gate_beta, cand_gamma, cand_beta]
    return with_custom_gradient(_lngru_forward, _lngru_backward, tensors, mask, 2, units=units, eps=eps)


def _ln_forward(x, groups, units, eps):
    """Normalizes each of ``groups`` consecutive ``units``-wide slices of ``x``.

    Args:
        x: ``(batch, groups * units)`` tensor in the statistics dtype.
        groups: Number of independent normalizations per row.
        units: Width of each normalized slice.
        eps: Added to the variance.

    Returns:
        ``(xhat, rstd)``: the normalized ``x`` (same shape) and the reciprocal
        standard deviations, ``(batch, groups, 1)``.
    """
    x3 = tf.reshape(x, [-1, groups, units])
    mean = tf.reduce_mean(x3, axis=-1, keepdims=True)
    centered = x3 - mean
    var = tf.reduce_mean(tf.square(centered), axis=-1, keepdims=True)
    rstd = tf.math.rsqrt(var + eps)
    return tf.reshape(centered * rstd, [-1, groups * units]), rstd


def _ln_backward(dxhat, xhat, rstd, groups, units):
    """Gradient of :func:`_ln_forward` w.r.t. its input, given d(loss)/d(xhat)."""
    d3 = tf.reshape(dxhat, [-1, groups, units])
    x3 = tf.reshape(xhat, [-1, groups, units])
    dx = rstd * (
        d3
        - tf.reduce_mean(d3, axis=-1, keepdims=True)
        - x3 * tf.reduce_mean(d3 * x3, axis=-1, keepdims=True)
    )
    return tf.reshape(dx, [-1, groups * units])


def _lnlstm_forward(proj, h0, c0, rkernel, gain, bias, cell_gamma, cell_beta, mask, units, eps):
    """Forward pass of :class:`~dist_rnn.models.layer_norm.LayerNormLSTM` over ``proj`` ``(T, B, 4U)``.

    ``gain``/``bias`` are the gate layer-norm gain/shift with the j-gate
    scale 2 and the forget bias folded in, so that one sigmoid gives every
    gate (``tanh(a) = 2 * sigmoid(2a) - 1``).

    Returns:
        ``h_seq, h_T, c_T``, then the saved per-step values ``c_seq``,
        ``gates`` (sigmoid outputs), ``zhat``, ``rstd_z``, ``chat``, ``rstd_c``.
    """
    cdt, sdt = proj.dtype, gain.dtype
    rkernel_t = tf.transpose(rkernel)
    steps = tf.shape(proj)[0]

    def step(t, h, c, ta_h, ta_c, ta_y, ta_zhat, ta_rz, ta_chat, ta_rc):
        hm = h if mask is None else h * mask
        z = proj[t] + rows_matmul(hm, rkernel_t)
        zhat, rz = _ln_forward(cast(z, sdt), 4, units, eps)
        y = tf.sigmoid(cast(zhat * gain + bias, cdt))
        yi, yj, yf, yo = tf.split(y, 4, axis=-1)
        # Ba et al.: the carried cell state is the unnormalized one; only the
        # output path sees LN_c(c).
        c_new = c * yf + yi * (2.0 * yj - 1.0)
        chat, rc = _ln_forward(cast(c_new, sdt), 1, units, eps)
        h_new = tf.tanh(cast(chat * cell_gamma + cell_beta, cdt)) * yo
        return (t + 1, h_new, c_new, ta_h.write(t, h_new), ta_c.write(t, c_new),
                ta_y.write(t, y), ta_zhat.write(t, zhat), ta_rz.write(t, rz),
                ta_chat.write(t, chat), ta_rc.write(t, rc))

    out = tf.while_loop(
        lambda t, *_: t < steps, step,
        (tf.constant(0), h0, c0,
         tensor_array(cdt, steps, [None, units]),
         tensor_array(cdt, steps, [None, units]),
         tensor_array(cdt, steps, [None, 4 * units]),
         tensor_array(sdt, steps, [None, 4 * units]),
         tensor_array(sdt, steps, [None, 4, 1]),
         tensor_array(sdt, steps, [None, units]),
         tensor_array(sdt, steps, [None, 1, 1])),
        parallel_iterations=1,
    )
    return (out[3].stack(), out[1], out[2]) + tuple(ta.stack() for ta in out[4:])


def _lnlstm_backward(d_outputs, inputs, mask, saved, units, eps):
    """Backward pass of :func:`_lnlstm_forward`: gradients of all its tensor inputs."""
    d_h_seq, d_h_last, d_c_last = d_outputs
    proj, h0, c0, rkernel, gain, bias, cell_gamma, cell_beta = inputs
    h_seq, _, _, c_seq, y_seq, zhat_seq, rz_seq, chat_seq, rc_seq = saved
    cdt, sdt = proj.dtype, gain.dtype
    steps = tf.shape(proj)[0]
    rkernel_t = tf.transpose(rkernel)
    h_prev = shifted(h0, h_seq)
    c_prev = shifted(c0, c_seq)
    tanh_c = tf.tanh(cast(chat_seq * cell_gamma + cell_beta, cdt))
    yi, yj, yf, yo = tf.split(y_seq, 4, axis=-1)
    # Vectorized over time: dL/dc_t = dh_t * a_t + (carried); the sigmoid
    # arguments get dL/du = [dc_raw, dc_raw, dc_raw, dh] * k; dc_{t-1} = dc_raw * yf.
    a = yo * (1.0 - tf.square(tanh_c))
    k = tf.concat([2.0 * yj - 1.0, 2.0 * yi, c_prev, tanh_c], -1) * (y_seq * (1.0 - y_seq))

    def back(t, dh_carry, dc_carry, ta_dz, ta_du, ta_dcn):
        dh = d_h_seq[t] + dh_carry
        dcn = dh * a[t]  # gradient at LN_c(c_t), which only the output path sees
        dc_raw = cast(_ln_backward(cast(dcn, sdt) * cell_gamma, chat_seq[t], rc_seq[t], 1, units), cdt) + dc_carry
        du = tf.concat([dc_raw, dc_raw, dc_raw, dh], -1) * k[t]
        dz = cast(_ln_backward(cast(du, sdt) * gain, zhat_seq[t], rz_seq[t], 4, units), cdt)
        dh_next = tf.matmul(dz, rkernel_t)
        if mask is not None:
            dh_next = dh_next * mask
        return (t - 1, dh_next, dc_raw * yf[t],
                ta_dz.write(t, dz), ta_du.write(t, du), ta_dcn.write(t, dcn))

    out = tf.while_loop(
        lambda t, *_: t >= 0, back,
        (steps - 1, d_h_last, d_c_last,
         tensor_array(cdt, steps, [None, 4 * units]),
         tensor_array(cdt, steps, [None, 4 * units]),
         tensor_array(cdt, steps, [None, units])),
        parallel_iterations=1,
    )
    dh0, dc0 = out[1], out[2]
    dz_seq, du_seq, dcn_seq = [ta.stack() for ta in out[3:]]
    du_s, dcn_s = cast(du_seq, sdt), cast(dcn_seq, sdt)
    if mask is not None:
        h_prev = h_prev * mask
    return (
        dz_seq,
        dh0,
        dc0,
        weight_grad(h_prev, dz_seq),
        sum_tb(du_s * zhat_seq),
        sum_tb(du_s),
        sum_tb(dcn_s * chat_seq),
        sum_tb(dcn_s),
    )


def _lngru_forward(proj, h0, rkernel, gate_gamma, gate_beta, cand_gamma, cand_beta, mask, units, eps):
    """Forward pass of :class:`~dist_rnn.models.layer_norm.LayerNormGRU` over ``proj`` ``(T, B, 3U)`` (order z, r, n).

    Returns:
        ``h_seq, h_T``, then the saved per-step values ``zr`` (gates),
        ``hU_n``, ``n``, ``ghat``, ``rstd_g``, ``qhat``, ``rstd_q``.
    """
    cdt, sdt = proj.dtype, gate_gamma.dtype
    rkernel_t = tf.transpose(rkernel)
    steps = tf.shape(proj)[0]
    proj_zr = proj[:, :, : 2 * units]
    proj_n = proj[:, :, 2 * units:]

    def step(t, h, ta_h, ta_zr, ta_hn, ta_n, ta_ghat, ta_rg, ta_qhat, ta_rq):
        hm = h if mask is None else h * mask
        hu_zr, hu_n = tf.split(rows_matmul(hm, rkernel_t), [2 * units, units], axis=-1)
        ghat, rg = _ln_forward(cast(proj_zr[t] + hu_zr, sdt), 2, units, eps)
        zr = tf.sigmoid(cast(ghat * gate_gamma + gate_beta, cdt))
        z, r = tf.split(zr, 2, axis=-1)
        qhat, rq = _ln_forward(cast(proj_n[t] + r * hu_n, sdt), 1, units, eps)
        n = tf.tanh(cast(qhat * cand_gamma + cand_beta, cdt))
        h_new = n + z * (h - n)
        return (t + 1, h_new, ta_h.write(t, h_new), ta_zr.write(t, zr), ta_hn.write(t, hu_n),
                ta_n.write(t, n), ta_ghat.write(t, ghat), ta_rg.write(t, rg),
                ta_qhat.write(t, qhat), ta_rq.write(t, rq))

    out = tf.while_loop(
        lambda t, *_: t < steps, step,
        (tf.constant(0), h0,
         tensor_array(cdt, steps, [None, units]),
         tensor_array(cdt, steps, [None, 2 * units]),
         tensor_array(cdt, steps, [None, units]),
         tensor_array(cdt, steps, [None, units]),
         tensor_array(sdt, steps, [None, 2 * units]),
         tensor_array(sdt, steps, [None, 2, 1]),
         tensor_array(sdt, steps, [None, units]),
         tensor_array(sdt, steps, [None, 1, 1])),
        parallel_iterations=1,
    )
    return (out[2].stack(), out[1]) + tuple(ta.stack() for ta in out[3:])


def _lngru_backward(d_outputs, inputs, mask, saved, units, eps):
    """Backward pass of :func:`_lngru_forward`: gradients of all its tensor inputs."""
    d_h_seq, d_h_last = d_outputs
    proj, h0, rkernel, gate_gamma, gate_beta, cand_gamma, cand_beta = inputs
    h_seq, _, zr_seq, hn_seq, n_seq, ghat_seq, rg_seq, qhat_seq, rq_seq = saved
    cdt, sdt = proj.dtype, gate_gamma.dtype
    steps = tf.shape(proj)[0]
    rkernel_t = tf.transpose(rkernel)
    h_prev = shifted(h0, h_seq)
    z, r = tf.split(zr_seq, 2, axis=-1)
    # Vectorized over time: d(z argument) = dh * kz; d(candidate LN output)
    # = dh * kn; d(r argument) = dq * kr; dL/d(hU_n) = dq * r.
    kz = (h_prev - n_seq) * z * (1.0 - z)
    kn = (1.0 - z) * (1.0 - tf.square(n_seq))
    kr = hn_seq * r * (1.0 - r)

    def back(t, dh_carry, ta_dhu, ta_dq, ta_dgate, ta_dcand):
        dh = d_h_seq[t] + dh_carry
        dcand = dh * kn[t]
        dq = cast(_ln_backward(cast(dcand, sdt) * cand_gamma, qhat_seq[t], rq_seq[t], 1, units), cdt)
        dgate = tf.concat([dh * kz[t], dq * kr[t]], -1)
        dg = cast(_ln_backward(cast(dgate, sdt) * gate_gamma, ghat_seq[t], rg_seq[t], 2, units), cdt)
        dhu = tf.concat([dg, dq * r[t]], -1)
        dh_rec = tf.matmul(dhu, rkernel_t)
        if mask is not None:
            dh_rec = dh_rec * mask
        return (t - 1, dh * z[t] + dh_rec, ta_dhu.write(t, dhu), ta_dq.write(t, dq),
                ta_dgate.write(t, dgate), ta_dcand.write(t, dcand))

    out = tf.while_loop(
        lambda t, *_: t >= 0, back,
        (steps - 1, d_h_last,
         tensor_array(cdt, steps, [None, 3 * units]),
         tensor_array(cdt, steps, [None, units]),
         tensor_array(cdt, steps, [None, 2 * units]),
         tensor_array(cdt, steps, [None, units])),
        parallel_iterations=1,
    )
    dh0 = out[1]
    dhu_seq, dq_seq, dgate_seq, dcand_seq = [ta.stack() for ta in out[2:]]
    dgate_s, dcand_s = cast(dgate_seq, sdt), cast(dcand_seq, sdt)
    if mask is not None:
        h_prev = h_prev * mask
    return (
        tf.concat([dhu_seq[:, :, : 2 * units], dq_seq], -1),
        dh0,
        weight_grad(h_prev, dhu_seq),
        sum_tb(dgate_s * ghat_seq),
        sum_tb(dgate_s),
        sum_tb(dcand_s * qhat_seq),
        sum_tb(dcand_s),
    )
