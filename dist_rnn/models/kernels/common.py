"""Plumbing shared by every recurrence kernel: dtype casts, the input projection,
the matmul layouts, the per-step storage and the custom-gradient wrapper.

Each kernel (:mod:`.plain`, :mod:`.layer_norm`) is a forward function, which
returns the outputs plus the per-step values its backward pass needs (one
``TensorArray`` each), and a backward function, which runs the reverse loop
and computes the parameter gradients vectorized over all timesteps.
:func:`with_custom_gradient` glues the two into one differentiable op.
"""

from __future__ import annotations

import tensorflow as tf


def cast(x, dtype):
    """``tf.cast`` that adds no op when ``x`` already has ``dtype``."""
    return x if x.dtype == dtype else tf.cast(x, dtype)


def sum_tb(x):
    """Sum over the time and batch axes of a ``(T, B, n)`` tensor."""
    return tf.reduce_sum(x, axis=[0, 1])


def shifted(first, seq):
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


def rows_matmul(rows, kernel_t):
    """``rows @ transpose(kernel_t)`` for a few rows, as ``(kernel_t @ rows^T)^T``."""
    return tf.transpose(tf.matmul(kernel_t, rows, transpose_b=True))


def weight_grad(a, d):
    """``a^T @ d`` for tall ``a`` ``(..., m)`` and ``d`` ``(..., n)``: ``(m, n)``."""
    a2 = tf.reshape(a, [-1, tf.shape(a)[-1]])
    d2 = tf.reshape(d, [-1, tf.shape(d)[-1]])
    return tf.matmul(a2, d2, transpose_a=True)


@tf.custom_gradient
def _project(x, kernel):
    """``x @ kernel`` for ``x`` ``(rows, in)``, with the kernel gradient in the fast layout."""

    def grad(dy):
        return tf.matmul(dy, kernel, transpose_b=True), weight_grad(x, dy)

    return tf.matmul(x, kernel), grad


def time_major_projection(x, kernel, bias=None):
    """The input projection of every timestep in one matmul, outside the recurrence.

    Args:
        x: ``(batch, time, features)`` inputs.
        kernel: ``(features, out)`` input kernel.
        bias: ``(out,)`` bias added to the projection, or None.

    Returns:
        ``x @ kernel (+ bias)``, time-major: ``(time, batch, out)``.
    """
    x_tm = tf.transpose(x, [1, 0, 2])
    proj = _project(tf.reshape(x_tm, [-1, x.shape[-1]]), kernel)
    if bias is not None:
        proj = proj + bias
    return tf.reshape(proj, tf.concat([tf.shape(x_tm)[:2], [kernel.shape[-1]]], 0))


def tensor_array(dtype, size, shape):
    """A ``TensorArray`` of ``size`` per-step values of ``shape`` (a list, ``None`` for the batch)."""
    return tf.TensorArray(dtype, size=size, element_shape=tf.TensorShape(shape))


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


def with_custom_gradient(forward, backward, tensors, mask, num_outputs, **static):
    """Runs ``forward(*tensors, mask, **static)`` as one op whose gradient is ``backward``.

    Args:
        forward: Returns ``num_outputs`` outputs followed by the saved tensors.
        backward: ``backward(output_grads, tensors, mask, outputs + saved, **static)``
            returns one gradient per entry of ``tensors``.
        tensors: The differentiable inputs of ``forward``.
        mask: Recurrent-dropout mask, or None; gets no gradient.
        num_outputs: How many leading results of ``forward`` are outputs.
        **static: Python arguments of both functions (``units``, ``eps``).

    Returns:
        The ``num_outputs`` outputs.
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
                tf.zeros_like(o) if d is None else cast(d, o.dtype)
                for d, o in zip(d_outputs, outputs)
            ]
            grads = list(backward(tuple(d_outputs), tuple(inputs), m, outputs + saved, **static))
            return grads + ([None] if has_mask else [])

        return outputs, grad

    return run(*(list(tensors) + ([mask] if has_mask else [])))
