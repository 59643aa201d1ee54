"""Fused recurrent sequence layers: layer-normalized LSTM, layer-normalized GRU, vanilla RNN,
and Keras' LSTM/GRU with the same fused recurrence wherever cuDNN does not run.

Every layer here has the call contract of
``keras.layers.LSTM(units, return_sequences=True, return_state=True)``::

    sequences, *final_states = layer(x, initial_state=None, training=False)

``x`` is ``(batch, time, features)``; ``sequences`` is ``(batch, time, units)``;
the final states are ``[h, c]`` for :class:`LayerNormLSTM` and ``[h]`` for
:class:`LayerNormGRU` and :class:`VanillaRNN`, each ``(batch, units)``.
``initial_state`` is a list of tensors in that order, or ``None`` for zeros.

Why these are not ``keras.layers.RNN(cell)``: a per-step cell pays for the
input matmul at every step and lets autodiff differentiate a ``while_loop``
(one stack push/pop per intermediate per step). These layers instead

* project the inputs of all timesteps in one ``(T*B, in) @ W`` matmul outside
  the recurrence;
* run the recurrence time-major in one ``tf.while_loop`` doing only ``h @ U``
  and the elementwise / layer-norm work per step, with the layer norms of the
  gates fused into one op on a ``(B, gates, units)`` view;
* carry a hand-written backward pass (``tf.custom_gradient``): the reverse loop
  only does the sequential part of backpropagation through time; everything
  that is elementwise over all timesteps (activation derivatives, gain/shift
  gradients) and the recurrent-kernel gradient (one ``(U, T*B) @ (T*B, G*U)``
  matmul) is computed vectorized outside the loop.

Numerics: layer-norm statistics (mean, variance), gains and shifts are always
in float32 (float64 for a float64 layer), whatever the compute dtype; the
matmuls and the other elementwise work run in the layer's compute dtype, so
under ``mixed_float16`` / ``mixed_bfloat16`` the variables are float32 and the
outputs and final states are float16 / bfloat16. The layer-norm epsilon is
:data:`LN_EPSILON` (``1e-5``), added to the variance.

Recurrent dropout is variational (Gal & Ghahramani 2016): with
``recurrent_dropout > 0``, ``training=True`` and a ``seed`` passed to the call,
one mask of shape ``(batch, units)`` is drawn per call (per sequence) and
multiplied, with the ``1 / (1 - rate)`` scaling, into ``h`` before the
recurrent matmul at every timestep. Only the matmul input is masked; the
carried state is not (this holds for :class:`LSTM` and :class:`GRU` too).
The mask is stateless (:func:`recurrent_dropout_mask`): a pure function of
the call's ``seed``, the layer's ``dropout_salt`` and the row's index in the
global batch (``rows``), so it is the same after a resume and on any replica
layout. Without a ``seed`` nothing is dropped.
"""

from __future__ import annotations

import keras
import tensorflow as tf

__all__ = ["LN_EPSILON", "LayerNormLSTM", "LayerNormGRU", "VanillaRNN", "LSTM", "GRU", "recurrent_dropout_mask"]

#: Epsilon added to the variance in every layer normalization of this module.
LN_EPSILON = 1e-5


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def _cast(x, dtype):
    """``tf.cast`` that adds no op when ``x`` already has ``dtype``."""
    return x if x.dtype == dtype else tf.cast(x, dtype)


def recurrent_dropout_mask(rate, units, batch, dtype, seed, salt, rows=None):
    """The variational recurrent-dropout mask of one layer for one call.

    Drawn statelessly for the whole global batch and sliced to this replica's
    rows, as the non-recurrent dropout of ``dist_rnn.model.StatelessDropout``:
    row ``g`` of the global batch gets the same mask however the rows are
    spread over replicas, and the same mask again when a step is re-run
    (after a resume).

    Args:
        rate: Fraction of units dropped, in ``(0, 1)``.
        units: Width of the state.
        batch: Rows of this replica (scalar int tensor).
        dtype: dtype of the mask.
        seed: int ``[2]`` stateless seed of the call (the training step's).
        salt: Folded into ``seed`` so that each layer draws its own mask.
        rows: int ``[2]``: (first global row of this replica's batch, global
            batch rows), or None when ``batch`` is the whole batch.

    Returns:
        ``(batch, units)`` tensor of ``0`` and ``1 / (1 - rate)``.
    """
    layer_seed = tf.random.experimental.stateless_fold_in(seed, salt)
    if rows is None:
        keep = tf.random.stateless_uniform(tf.stack([batch, units]), seed=layer_seed) >= rate
    else:
        uniform = tf.random.stateless_uniform(tf.stack([rows[1], units]), seed=layer_seed)
        keep = uniform[rows[0]:rows[0] + batch] >= rate
    return tf.cast(keep, dtype) * tf.cast(1.0 / (1.0 - rate), dtype)


def _call_dropout_mask(rate, units, batch, dtype, training, seed, salt, rows):
    """:func:`recurrent_dropout_mask` when a call drops (rate > 0, training, a seed), else None."""
    if rate == 0.0 or seed is None or training is None or training is False:
        return None
    if training is True:
        return recurrent_dropout_mask(rate, units, batch, dtype, seed, salt, rows)
    return tf.cond(tf.cast(training, tf.bool),
                   lambda: recurrent_dropout_mask(rate, units, batch, dtype, seed, salt, rows),
                   lambda: tf.ones(tf.stack([batch, units]), dtype))


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


def _sum_tb(x):
    """Sum over the time and batch axes of a ``(T, B, n)`` tensor."""
    return tf.reduce_sum(x, axis=[0, 1])


def _shifted(first, seq):
    """``[first, seq[0], ..., seq[T-2]]``: the previous state at every step."""
    return tf.concat([first[tf.newaxis], seq[:-1]], axis=0)


# Matmul layouts. Measured on the 2-core CPU (TF 2.21, default threading, in
# a while_loop / tf.function): for B=32, U=256, 4U=1024, ``h @ U`` takes
# 0.21 ms but ``(U^T h^T)^T`` 0.18 ms; ``dz @ U^T`` 0.98 ms, ``(U dz^T)^T``
# 0.26 ms and ``dz @ Ut`` with ``Ut = U^T`` materialized once outside the
# loop 0.20 ms. For the (T*B)-row weight gradients (3200 x 256 by 3200 x
# 1024) ``matmul(A, D, transpose_a=True)`` takes 12.3 ms but
# ``(D^T A)^T`` with explicit transposes 17 ms (grappler folds the inner
# transpose into the matmul and keeps the outer one). On GPU these are noise.


def _rows_matmul(rows, kernel_t):
    """``rows @ transpose(kernel_t)`` for a few rows, as ``(kernel_t @ rows^T)^T``."""
    return tf.transpose(tf.matmul(kernel_t, rows, transpose_b=True))


def _weight_grad(a, d):
    """``a^T @ d`` for tall ``a`` ``(..., m)`` and ``d`` ``(..., n)``: ``(m, n)``."""
    a2 = tf.reshape(a, [-1, tf.shape(a)[-1]])
    d2 = tf.reshape(d, [-1, tf.shape(d)[-1]])
    return tf.matmul(a2, d2, transpose_a=True)


@tf.custom_gradient
def _project(x, kernel):
    """``x @ kernel`` for ``x`` ``(rows, in)``, with the kernel gradient in the fast layout."""

    def grad(dy):
        return tf.matmul(dy, kernel, transpose_b=True), _weight_grad(x, dy)

    return tf.matmul(x, kernel), grad


def _tensor_array(dtype, size, shape):
    return tf.TensorArray(dtype, size=size, element_shape=tf.TensorShape(shape))


# --------------------------------------------------------------------------
# Recurrences: time-major, input projections precomputed, hand-written BPTT
# --------------------------------------------------------------------------
#
# Each cell has a forward function (returns the outputs plus the per-step
# values the backward pass needs, one TensorArray each) and a backward
# function (the reverse loop plus the vectorized parameter gradients).
# ``_with_custom_gradient`` glues them into one differentiable op.
#
# Variants measured (train step, 2 x 256 units, B=32, T=100, CPU) and dropped:
# autodiff through tf.scan or a while_loop with TensorArrays (about Keras-LSTM
# speed; 1.4x slower than this code with the matmul layouts above), packing the saved
# values into fewer TensorArrays (slower: the concats cost more than the
# loop variables they save), and XLA-compiling the loops with
# ``tf.function(jit_compile=True)`` (no faster once the layouts were fixed,
# plus a compile per new input shape).

_GRAPH_FUNCTIONS = {}


def _graph_function(fn):
    """``fn`` in graph mode; in eager mode a cached ``tf.function`` of it.

    An eager ``tf.while_loop`` runs as a Python loop (20x slower per step).
    """
    if not tf.executing_eagerly():
        return fn
    if fn not in _GRAPH_FUNCTIONS:
        _GRAPH_FUNCTIONS[fn] = tf.function(fn, reduce_retracing=True)
    return _GRAPH_FUNCTIONS[fn]


def _with_custom_gradient(forward, backward, tensors, mask, num_outputs, **static):
    """Runs ``forward(*tensors, mask, **static)`` as one op whose gradient is ``backward``.

    ``forward`` returns ``num_outputs`` outputs followed by saved tensors;
    ``backward(output_grads, tensors, mask, outputs + saved, **static)`` returns one
    gradient per entry of ``tensors``. ``mask`` (recurrent dropout, may be
    ``None``) gets no gradient.
    """
    forward = _graph_function(forward)
    backward = _graph_function(backward)
    has_mask = mask is not None
    n = len(tensors)

    @tf.custom_gradient
    def run(*args):
        # stop_gradient: the tape must not differentiate (or, for an eager
        # tf.function, build a recording variant of) the forward pass.
        inputs = [tf.stop_gradient(a) for a in args[:n]]
        m = tf.stop_gradient(args[n]) if has_mask else None
        result = forward(*inputs, m, **static)
        outputs, saved = tuple(result[:num_outputs]), tuple(result[num_outputs:])

        def grad(*d_outputs):
            d_outputs = [
                tf.zeros_like(o) if d is None else _cast(d, o.dtype)
                for d, o in zip(d_outputs, outputs)
            ]
            grads = list(backward(tuple(d_outputs), tuple(inputs), m, outputs + saved, **static))
            return grads + ([None] if has_mask else [])

        return outputs, grad

    return run(*(list(tensors) + ([mask] if has_mask else [])))


def _lnlstm_forward(proj, h0, c0, rkernel, gain, bias, cell_gamma, cell_beta, mask, units, eps):
    """Forward pass of :class:`LayerNormLSTM` over ``proj`` ``(T, B, 4U)``.

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
        z = proj[t] + _rows_matmul(hm, rkernel_t)
        zhat, rz = _ln_forward(_cast(z, sdt), 4, units, eps)
        y = tf.sigmoid(_cast(zhat * gain + bias, cdt))
        yi, yj, yf, yo = tf.split(y, 4, axis=-1)
        # Ba et al.: the carried cell state is the unnormalized one; only the
        # output path sees LN_c(c).
        c_new = c * yf + yi * (2.0 * yj - 1.0)
        chat, rc = _ln_forward(_cast(c_new, sdt), 1, units, eps)
        h_new = tf.tanh(_cast(chat * cell_gamma + cell_beta, cdt)) * yo
        return (t + 1, h_new, c_new, ta_h.write(t, h_new), ta_c.write(t, c_new),
                ta_y.write(t, y), ta_zhat.write(t, zhat), ta_rz.write(t, rz),
                ta_chat.write(t, chat), ta_rc.write(t, rc))

    out = tf.while_loop(
        lambda t, *_: t < steps, step,
        (tf.constant(0), h0, c0,
         _tensor_array(cdt, steps, [None, units]),
         _tensor_array(cdt, steps, [None, units]),
         _tensor_array(cdt, steps, [None, 4 * units]),
         _tensor_array(sdt, steps, [None, 4 * units]),
         _tensor_array(sdt, steps, [None, 4, 1]),
         _tensor_array(sdt, steps, [None, units]),
         _tensor_array(sdt, steps, [None, 1, 1])),
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
    h_prev = _shifted(h0, h_seq)
    c_prev = _shifted(c0, c_seq)
    tanh_c = tf.tanh(_cast(chat_seq * cell_gamma + cell_beta, cdt))
    yi, yj, yf, yo = tf.split(y_seq, 4, axis=-1)
    # Vectorized over time: dL/dc_t = dh_t * a_t + (carried); the sigmoid
    # arguments get dL/du = [dc_raw, dc_raw, dc_raw, dh] * k; dc_{t-1} = dc_raw * yf.
    a = yo * (1.0 - tf.square(tanh_c))
    k = tf.concat([2.0 * yj - 1.0, 2.0 * yi, c_prev, tanh_c], -1) * (y_seq * (1.0 - y_seq))

    def back(t, dh_carry, dc_carry, ta_dz, ta_du, ta_dcn):
        dh = d_h_seq[t] + dh_carry
        dcn = dh * a[t]  # gradient at LN_c(c_t), which only the output path sees
        dc_raw = _cast(_ln_backward(_cast(dcn, sdt) * cell_gamma, chat_seq[t], rc_seq[t], 1, units), cdt) + dc_carry
        du = tf.concat([dc_raw, dc_raw, dc_raw, dh], -1) * k[t]
        dz = _cast(_ln_backward(_cast(du, sdt) * gain, zhat_seq[t], rz_seq[t], 4, units), cdt)
        dh_next = tf.matmul(dz, rkernel_t)
        if mask is not None:
            dh_next = dh_next * mask
        return (t - 1, dh_next, dc_raw * yf[t],
                ta_dz.write(t, dz), ta_du.write(t, du), ta_dcn.write(t, dcn))

    out = tf.while_loop(
        lambda t, *_: t >= 0, back,
        (steps - 1, d_h_last, d_c_last,
         _tensor_array(cdt, steps, [None, 4 * units]),
         _tensor_array(cdt, steps, [None, 4 * units]),
         _tensor_array(cdt, steps, [None, units])),
        parallel_iterations=1,
    )
    dh0, dc0 = out[1], out[2]
    dz_seq, du_seq, dcn_seq = [ta.stack() for ta in out[3:]]
    du_s, dcn_s = _cast(du_seq, sdt), _cast(dcn_seq, sdt)
    if mask is not None:
        h_prev = h_prev * mask
    return (
        dz_seq,
        dh0,
        dc0,
        _weight_grad(h_prev, dz_seq),
        _sum_tb(du_s * zhat_seq),
        _sum_tb(du_s),
        _sum_tb(dcn_s * chat_seq),
        _sum_tb(dcn_s),
    )


def _lngru_forward(proj, h0, rkernel, gate_gamma, gate_beta, cand_gamma, cand_beta, mask, units, eps):
    """Forward pass of :class:`LayerNormGRU` over ``proj`` ``(T, B, 3U)`` (order z, r, n).

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
        hu_zr, hu_n = tf.split(_rows_matmul(hm, rkernel_t), [2 * units, units], axis=-1)
        ghat, rg = _ln_forward(_cast(proj_zr[t] + hu_zr, sdt), 2, units, eps)
        zr = tf.sigmoid(_cast(ghat * gate_gamma + gate_beta, cdt))
        z, r = tf.split(zr, 2, axis=-1)
        qhat, rq = _ln_forward(_cast(proj_n[t] + r * hu_n, sdt), 1, units, eps)
        n = tf.tanh(_cast(qhat * cand_gamma + cand_beta, cdt))
        h_new = n + z * (h - n)
        return (t + 1, h_new, ta_h.write(t, h_new), ta_zr.write(t, zr), ta_hn.write(t, hu_n),
                ta_n.write(t, n), ta_ghat.write(t, ghat), ta_rg.write(t, rg),
                ta_qhat.write(t, qhat), ta_rq.write(t, rq))

    out = tf.while_loop(
        lambda t, *_: t < steps, step,
        (tf.constant(0), h0,
         _tensor_array(cdt, steps, [None, units]),
         _tensor_array(cdt, steps, [None, 2 * units]),
         _tensor_array(cdt, steps, [None, units]),
         _tensor_array(cdt, steps, [None, units]),
         _tensor_array(sdt, steps, [None, 2 * units]),
         _tensor_array(sdt, steps, [None, 2, 1]),
         _tensor_array(sdt, steps, [None, units]),
         _tensor_array(sdt, steps, [None, 1, 1])),
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
    h_prev = _shifted(h0, h_seq)
    z, r = tf.split(zr_seq, 2, axis=-1)
    # Vectorized over time: d(z argument) = dh * kz; d(candidate LN output)
    # = dh * kn; d(r argument) = dq * kr; dL/d(hU_n) = dq * r.
    kz = (h_prev - n_seq) * z * (1.0 - z)
    kn = (1.0 - z) * (1.0 - tf.square(n_seq))
    kr = hn_seq * r * (1.0 - r)

    def back(t, dh_carry, ta_dhu, ta_dq, ta_dgate, ta_dcand):
        dh = d_h_seq[t] + dh_carry
        dcand = dh * kn[t]
        dq = _cast(_ln_backward(_cast(dcand, sdt) * cand_gamma, qhat_seq[t], rq_seq[t], 1, units), cdt)
        dgate = tf.concat([dh * kz[t], dq * kr[t]], -1)
        dg = _cast(_ln_backward(_cast(dgate, sdt) * gate_gamma, ghat_seq[t], rg_seq[t], 2, units), cdt)
        dhu = tf.concat([dg, dq * r[t]], -1)
        dh_rec = tf.matmul(dhu, rkernel_t)
        if mask is not None:
            dh_rec = dh_rec * mask
        return (t - 1, dh * z[t] + dh_rec, ta_dhu.write(t, dhu), ta_dq.write(t, dq),
                ta_dgate.write(t, dgate), ta_dcand.write(t, dcand))

    out = tf.while_loop(
        lambda t, *_: t >= 0, back,
        (steps - 1, d_h_last,
         _tensor_array(cdt, steps, [None, 3 * units]),
         _tensor_array(cdt, steps, [None, units]),
         _tensor_array(cdt, steps, [None, 2 * units]),
         _tensor_array(cdt, steps, [None, units])),
        parallel_iterations=1,
    )
    dh0 = out[1]
    dhu_seq, dq_seq, dgate_seq, dcand_seq = [ta.stack() for ta in out[2:]]
    dgate_s, dcand_s = _cast(dgate_seq, sdt), _cast(dcand_seq, sdt)
    if mask is not None:
        h_prev = h_prev * mask
    return (
        tf.concat([dhu_seq[:, :, : 2 * units], dq_seq], -1),
        dh0,
        _weight_grad(h_prev, dhu_seq),
        _sum_tb(dgate_s * ghat_seq),
        _sum_tb(dgate_s),
        _sum_tb(dcand_s * qhat_seq),
        _sum_tb(dcand_s),
    )


def _vanilla_forward(proj, h0, rkernel, mask, units):
    """Forward pass of :class:`VanillaRNN`; ``proj`` ``(T, B, U)`` includes the bias.

    Returns:
        ``h_seq, h_T`` (nothing else is saved for the backward pass).
    """
    rkernel_t = tf.transpose(rkernel)
    steps = tf.shape(proj)[0]

    def step(t, h, ta_h):
        hm = h if mask is None else h * mask
        h_new = tf.tanh(proj[t] + _rows_matmul(hm, rkernel_t))
        return t + 1, h_new, ta_h.write(t, h_new)

    _, h_last, ta_h = tf.while_loop(
        lambda t, *_: t < steps, step, loop_vars=
        (tf.constant(0), h0, _tensor_array(proj.dtype, steps, [None, units])),
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
        (steps - 1, d_h_last, _tensor_array(proj.dtype, steps, [None, units])),
    )
    dpre_seq = ta.stack()
    h_prev = _shifted(h0, h_seq)
    if mask is not None:
        h_prev = h_prev * mask
    return dpre_seq, dh0, _weight_grad(h_prev, dpre_seq)


# --------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------


class _FusedRecurrentLayer(keras.layers.Layer):
    """Shared plumbing of the fused sequence layers (not a public layer).

    Subclasses set ``_num_gates`` and ``_num_states``, create their extra
    weights in ``_build_extra`` and run their recurrence in ``_recur``.
    """

    #: Why this layer never uses a fused (cuDNN) kernel; read by the model code.
    fused_kernel_reason = "custom cell"
    _num_gates = 1
    _num_states = 1

    def __init__(
        self,
        units,
        recurrent_dropout=0.0,
        kernel_initializer="glorot_uniform",
        recurrent_initializer="orthogonal",
        dropout_salt=0,
        return_sequences=True,
        return_state=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if int(units) != units or units <= 0:
            raise ValueError(f"units must be a positive integer, got {units!r}")
        if not 0.0 <= recurrent_dropout < 1.0:
            raise ValueError(f"recurrent_dropout must be in [0, 1), got {recurrent_dropout!r}")
        self.units = int(units)
        self.recurrent_dropout = float(recurrent_dropout)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.recurrent_initializer = keras.initializers.get(recurrent_initializer)
        self.dropout_salt = int(dropout_salt)
        self.return_sequences = bool(return_sequences)
        self.return_state = bool(return_state)
        self.input_spec = keras.layers.InputSpec(ndim=3)

    @property
    def state_size(self):
        """Sizes of the states, in the order of ``initial_state`` and the outputs."""
        return [self.units] * self._num_states

    def build(self, input_shape):
        """Creates the weights for inputs of shape ``(batch, time, features)``."""
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError(f"{self.name}: the last input dimension must be known, got {input_shape}")
        gates = self._num_gates * self.units
        self.kernel = self.add_weight(
            name="kernel", shape=(input_dim, gates), initializer=self.kernel_initializer
        )
        self.recurrent_kernel = self.add_weight(
            name="recurrent_kernel", shape=(self.units, gates), initializer=self.recurrent_initializer
        )
        self._build_extra()
        self.input_spec = keras.layers.InputSpec(ndim=3, axes={-1: input_dim})

    def _build_extra(self):
        pass

    def _ln_weight(self, name, size, init):
        # Layer-norm gains/shifts stay in the variable dtype (float32 under mixed
        # precision) when read inside call: autocast=False.
        return self.add_weight(name=name, shape=(size,), initializer=init, autocast=False)

    def _stats_dtype(self):
        return tf.float64 if tf.as_dtype(self.compute_dtype) == tf.float64 else tf.float32

    def call(self, inputs, initial_state=None, training=None, seed=None, rows=None):
        """Runs the layer over a batch of sequences.

        Args:
            inputs: ``(batch, time, features)`` tensor; ``time`` may be 1.
            initial_state: ``None`` (zeros) or a list with one ``(batch, units)``
                tensor per entry of ``state_size``.
            training: Whether recurrent dropout is active.
            seed: int ``[2]`` stateless seed of the recurrent-dropout mask
                (see :func:`recurrent_dropout_mask`); None: no dropout.
            rows: int ``[2]``: first global row of ``inputs`` and the global
                batch rows (None: ``inputs`` is the whole batch).

        Returns:
            ``[sequences (batch, time, units), *final_states]`` (the default);
            with ``return_sequences=False`` the first entry is the last output
            ``(batch, units)``, with ``return_state=False`` only that entry is
            returned (not in a list).
        """
        cdt = tf.as_dtype(self.compute_dtype)
        x = _cast(tf.convert_to_tensor(inputs), cdt)
        batch = tf.shape(x)[0]
        if initial_state is None:
            states = [tf.zeros(tf.stack([batch, self.units]), cdt) for _ in range(self._num_states)]
        else:
            if not isinstance(initial_state, (list, tuple)):
                initial_state = [initial_state]
            if len(initial_state) != self._num_states:
                raise ValueError(
                    f"{self.name}: expected {self._num_states} initial state tensor(s), "
                    f"got {len(initial_state)}"
                )
            states = [_cast(tf.convert_to_tensor(s), cdt) for s in initial_state]
        mask = _call_dropout_mask(self.recurrent_dropout, self.units, batch, cdt, training, seed,
                                  self.dropout_salt, rows)
        # One matmul for the input projection of every timestep, time-major.
        x_tm = tf.transpose(x, [1, 0, 2])
        kernel = _cast(tf.convert_to_tensor(self.kernel), cdt)
        proj = _project(tf.reshape(x_tm, [-1, x.shape[-1]]), kernel)
        proj = tf.reshape(proj, tf.concat([tf.shape(x_tm)[:2], [kernel.shape[-1]]], 0))
        rkernel = _cast(tf.convert_to_tensor(self.recurrent_kernel), cdt)
        h_seq, *finals = self._recur(proj, states, rkernel, mask)
        output = tf.transpose(h_seq, [1, 0, 2]) if self.return_sequences else finals[0]
        return [output] + list(finals) if self.return_state else output

    def compute_output_shape(self, input_shape):
        """Shapes of the outputs (see :meth:`call`) for ``input_shape``."""
        batch, steps = input_shape[0], input_shape[1]
        output = (batch, steps, self.units) if self.return_sequences else (batch, self.units)
        if not self.return_state:
            return output
        return [output] + [(batch, self.units)] * self._num_states

    def get_config(self):
        """Returns the constructor arguments (plus the base layer's) as a dict."""
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "recurrent_dropout": self.recurrent_dropout,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "recurrent_initializer": keras.initializers.serialize(self.recurrent_initializer),
                "dropout_salt": self.dropout_salt,
                "return_sequences": self.return_sequences,
                "return_state": self.return_state,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="dist_rnn")
class LayerNormLSTM(_FusedRecurrentLayer):
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
        gain = _cast(tf.convert_to_tensor(self.gate_gamma), sdt) * scale
        bias = _cast(tf.convert_to_tensor(self.gate_beta), sdt) * scale + shift
        tensors = [
            proj, states[0], states[1], rkernel, gain, bias,
            _cast(tf.convert_to_tensor(self.cell_gamma), sdt),
            _cast(tf.convert_to_tensor(self.cell_beta), sdt),
        ]
        return _with_custom_gradient(
            _lnlstm_forward, _lnlstm_backward, tensors, mask, 3, units=self.units, eps=LN_EPSILON
        )

    def get_config(self):
        """Returns the constructor arguments (plus the base layer's) as a dict."""
        config = super().get_config()
        config["forget_bias"] = self.forget_bias
        return config


@keras.saving.register_keras_serializable(package="dist_rnn")
class LayerNormGRU(_FusedRecurrentLayer):
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
        tensors = [
            proj, states[0], rkernel,
            _cast(tf.convert_to_tensor(self.gate_gamma), sdt),
            _cast(tf.convert_to_tensor(self.gate_beta), sdt),
            _cast(tf.convert_to_tensor(self.candidate_gamma), sdt),
            _cast(tf.convert_to_tensor(self.candidate_beta), sdt),
        ]
        return _with_custom_gradient(
            _lngru_forward, _lngru_backward, tensors, mask, 2, units=self.units, eps=LN_EPSILON
        )


@keras.saving.register_keras_serializable(package="dist_rnn")
class VanillaRNN(_FusedRecurrentLayer):
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
        bias = _cast(tf.convert_to_tensor(self.bias), proj.dtype)
        return _with_custom_gradient(
            _vanilla_forward, _vanilla_backward, [proj + bias, states[0], rkernel], mask, 2,
            units=self.units,
        )

    def get_config(self):
        """Returns the constructor arguments (plus the base layer's) as a dict."""
        config = super().get_config()
        config["bias_initializer"] = keras.initializers.serialize(self.bias_initializer)
        return config


# --------------------------------------------------------------------------
# Keras' LSTM and GRU with the fused recurrence off cuDNN
# --------------------------------------------------------------------------
#
# ``keras.layers.LSTM``/``GRU`` run cuDNN on a GPU; anywhere else they fall
# back to a generic per-step cell (the input matmul at every step, autodiff
# through the while_loop). The subclasses below keep the Keras layers, their
# weights and checkpoint layout and their cuDNN path unchanged, and replace
# only that fallback by the recurrences of this module: the input projection
# of all timesteps in one matmul, a lean time-major loop and a hand-written
# backward pass.
#
# Measured on the 2-core CPU (train step of a 2 x 256 char model, B=32, T=100,
# same hand-written loop; see docs/benchmarks.md): LSTM 1.8x and GRU 1.4x the
# tokens/s of Keras' generic fallback. TF's own fused CPU op (``BlockLSTMV2`` + its gradient) was also
# measured: one 256-unit layer forward + backward takes 300 ms against 120 ms
# here, so it is not used.


def _lstm_forward(proj, h0, c0, rkernel, mask, units):
    """Forward pass of :class:`LSTM` over ``proj`` ``(T, B, 4U)`` (gate order i, f, c, o).

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
        y = tf.sigmoid(proj[t] + _rows_matmul(hm, rkernel_t))
        yi, yf, yc, yo = tf.split(y, 4, axis=-1)
        c_new = c * yf + yi * (2.0 * yc - 1.0)
        h_new = tf.tanh(c_new) * yo
        return t + 1, h_new, c_new, ta_h.write(t, h_new), ta_c.write(t, c_new), ta_y.write(t, y)

    out = tf.while_loop(
        lambda t, *_: t < steps, step,
        (tf.constant(0), h0, c0,
         _tensor_array(cdt, steps, [None, units]),
         _tensor_array(cdt, steps, [None, units]),
         _tensor_array(cdt, steps, [None, 4 * units])),
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
    h_prev = _shifted(h0, h_seq)
    c_prev = _shifted(c0, c_seq)
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
        (steps - 1, d_h_last, d_c_last, _tensor_array(cdt, steps, [None, 4 * units])),
        parallel_iterations=1,
    )
    dz_seq = out[3].stack()
    if mask is not None:
        h_prev = h_prev * mask
    return dz_seq, out[1], out[2], _weight_grad(h_prev, dz_seq)


def _gru_forward(proj, h0, rkernel, rbias, mask, units):
    """Forward pass of :class:`GRU` (``reset_after``) over ``proj`` ``(T, B, 3U)`` (order z, r, h).

    ``mask`` (recurrent dropout, or None) multiplies ``h`` before the
    recurrent matmul; the update ``h_t = hh + z * (h_{t-1} - hh)`` uses the
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
        hu_zr, hu_h = tf.split(_rows_matmul(hm, rkernel_t) + rbias, [2 * units, units], axis=-1)
        zr = tf.sigmoid(proj_zr[t] + hu_zr)
        z, r = tf.split(zr, 2, axis=-1)
        hh = tf.tanh(proj_h[t] + r * hu_h)
        h_new = hh + z * (h - hh)
        return (t + 1, h_new, ta_h.write(t, h_new), ta_zr.write(t, zr), ta_hu.write(t, hu_h),
                ta_hh.write(t, hh))

    out = tf.while_loop(
        lambda t, *_: t < steps, step,
        (tf.constant(0), h0,
         _tensor_array(cdt, steps, [None, units]),
         _tensor_array(cdt, steps, [None, 2 * units]),
         _tensor_array(cdt, steps, [None, units]),
         _tensor_array(cdt, steps, [None, units])),
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
    h_prev = _shifted(h0, h_seq)
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
         _tensor_array(cdt, steps, [None, 3 * units]),
         _tensor_array(cdt, steps, [None, units])),
        parallel_iterations=1,
    )
    dhu_seq, dh_seq = out[2].stack(), out[3].stack()
    d_proj = tf.concat([dhu_seq[:, :, : 2 * units], dh_seq * kh], -1)
    h_prev_masked = h_prev if mask is None else h_prev * mask
    return d_proj, out[1], _weight_grad(h_prev_masked, dhu_seq), _sum_tb(dhu_seq)


def _time_major_projection(x, kernel, bias):
    """``x @ kernel + bias`` for ``x`` ``(B, T, in)``, time-major ``(T, B, out)``, in one matmul."""
    x_tm = tf.transpose(x, [1, 0, 2])
    proj = _project(tf.reshape(x_tm, [-1, x.shape[-1]]), kernel) + bias
    return tf.reshape(proj, tf.concat([tf.shape(x_tm)[:2], [kernel.shape[-1]]], 0))


class _FusedFallback:
    """Mixin for ``keras.layers.LSTM``/``GRU``: the fused recurrence wherever cuDNN does not run.

    Keras' cuDNN path runs (``use_cudnn=True``, or ``"auto"`` with a GPU
    visible) unless the layer has recurrent dropout, which cuDNN lacks: then
    the fused recurrence runs with the stateless mask of
    :func:`recurrent_dropout_mask` (never Keras' generic cell and its
    ``SeedGenerator``), and with ``use_cudnn=True`` Keras raises. Every
    configuration the fused recurrence does not cover (masks, input dropout,
    ``go_backwards``, ``unroll``, ``stateful``, other activations, no bias)
    goes to Keras unchanged.

    Args:
        dropout_salt: Folded into the call's ``seed`` so that each layer draws
            its own recurrent-dropout mask.
        *args, **kwargs: Those of ``keras.layers.LSTM``/``GRU``.
    """

    def __init__(self, *args, dropout_salt=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.dropout_salt = int(dropout_salt)

    def runs_cudnn(self) -> bool:
        """Whether Keras' cuDNN path runs (with ``use_cudnn=True``: is required) in this process."""
        if self.use_cudnn is True:
            return True
        return (self.use_cudnn == "auto" and not self.cell.recurrent_dropout
                and bool(tf.config.list_logical_devices("GPU")))

    def _fused_eligible(self, mask) -> bool:
        cell = self.cell
        if mask is not None or self.go_backwards or self.unroll or self.stateful or cell.dropout:
            return False
        if not cell.use_bias or not self._fused_cell_ok():
            return False
        if cell.activation is not keras.activations.tanh or cell.recurrent_activation is not keras.activations.sigmoid:
            return False
        return not self.runs_cudnn()

    def _fused_cell_ok(self) -> bool:
        return True

    def call(self, sequences, initial_state=None, mask=None, training=False, seed=None, rows=None):
        """Keras' ``call``, plus the stateless recurrent-dropout mask.

        Args:
            sequences: ``(batch, time, features)`` inputs.
            initial_state: List of ``(batch, units)`` states, or None for zeros.
            mask: Keras' timestep mask (not fused: goes to Keras).
            training: Whether recurrent dropout is active.
            seed: int ``[2]`` stateless seed of the recurrent-dropout mask
                (see :func:`recurrent_dropout_mask`); None: no dropout.
            rows: int ``[2]``: first global row of ``sequences`` and the global
                batch rows (None: ``sequences`` is the whole batch).

        Raises:
            ValueError: If ``seed`` asks for recurrent dropout in a
                configuration only Keras' generic cell runs (its masks would
                come from a stateful generator, not from ``seed``).
        """
        if not self._fused_eligible(mask):
            if seed is not None and self.cell.recurrent_dropout and training is not False and not self.runs_cudnn():
                raise ValueError(f"{self.name}: seeded recurrent dropout needs the fused recurrence, "
                                 "which this configuration does not use")
            return super().call(sequences, initial_state=initial_state, mask=mask, training=training)
        cdt = tf.as_dtype(self.cell.compute_dtype)
        x = _cast(tf.convert_to_tensor(sequences), cdt)
        batch = tf.shape(x)[0]
        units = self.cell.units
        if initial_state is None:
            initial_state = [tf.zeros(tf.stack([batch, units]), cdt) for _ in range(self._num_states)]
        elif not isinstance(initial_state, (list, tuple)):
            initial_state = [initial_state]
        states = [_cast(tf.convert_to_tensor(s), cdt) for s in initial_state]
        rmask = _call_dropout_mask(self.cell.recurrent_dropout, units, batch, cdt, training, seed,
                                   self.dropout_salt, rows)
        h_seq, *finals = self._fused(x, states, cdt, rmask)
        output = tf.transpose(h_seq, [1, 0, 2]) if self.return_sequences else finals[0]
        return (output, *finals) if self.return_state else output

    def _weight(self, variable, dtype):
        return _cast(tf.convert_to_tensor(variable), dtype)

    def get_config(self):
        """Keras' config plus ``dropout_salt``."""
        return {**super().get_config(), "dropout_salt": self.dropout_salt}


@keras.saving.register_keras_serializable(package="dist_rnn")
class LSTM(_FusedFallback, keras.layers.LSTM):
    """``keras.layers.LSTM`` (same arguments, weights and cuDNN path) with the fused recurrence off cuDNN.

    Recurrent dropout masks only the ``h`` fed to the recurrent matmul (as
    Keras' LSTM cell does), with one stateless mask per call.
    """

    _num_states = 2

    def _fused(self, x, states, cdt, rmask):
        units = self.cell.units
        one = tf.ones([units], cdt)
        scale = tf.concat([one, one, 2.0 * one, one], 0)  # c gate: tanh(a) = 2 sigmoid(2a) - 1
        kernel = self._weight(self.cell.kernel, cdt) * scale
        bias = self._weight(self.cell.bias, cdt) * scale
        rkernel = self._weight(self.cell.recurrent_kernel, cdt) * scale
        proj = _time_major_projection(x, kernel, bias)
        return _with_custom_gradient(_lstm_forward, _lstm_backward, [proj, states[0], states[1], rkernel],
                                     rmask, 3, units=units)


@keras.saving.register_keras_serializable(package="dist_rnn")
class GRU(_FusedFallback, keras.layers.GRU):
    """``keras.layers.GRU`` (same arguments, weights and cuDNN path) with the fused recurrence off cuDNN.

    Only ``reset_after=True`` (Keras' default and cuDNN's variant) is fused.
    Recurrent dropout masks only the ``h`` fed to the recurrent matmul, one
    stateless mask per call for all three gates; the update
    ``z * h + (1 - z) * candidate`` uses the unmasked ``h``.
    """

    _num_states = 1

    def _fused_cell_ok(self) -> bool:
        return bool(self.cell.reset_after)

    def _fused(self, x, states, cdt, rmask):
        units = self.cell.units
        bias = self._weight(self.cell.bias, cdt)  # (2, 3U): input bias, recurrent bias
        proj = _time_major_projection(x, self._weight(self.cell.kernel, cdt), bias[0])
        return _with_custom_gradient(_gru_forward, _gru_backward,
                                     [proj, states[0], self._weight(self.cell.recurrent_kernel, cdt), bias[1]],
                                     rmask, 2, units=units)
