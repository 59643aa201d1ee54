"""Gradient accumulation: a replica's rows processed as ``train.accumulate_steps`` blocks in sequence.

Each block is a contiguous run of the replica's rows with its own carried
state, so the rows' state streams are the same as without accumulation. The
blocks' gradients are summed on the replica before the one all-reduce of the
step (:mod:`dist_rnn.training.gradients`; row-sparse ones are concatenated). Every block's objective is its loss
sum over the same global denominator as the whole batch's, so the summed
gradient is the gradient of the global objective, weighted by token counts
exactly as without accumulation; only the float32 summation order differs.
Dropout masks are drawn per global row, so each block passes the global index
of its first row.
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from dist_rnn.training import gradients


def block_slices(structure, index: int, block_rows: tf.Tensor):
    """Rows ``index * block_rows .. (index + 1) * block_rows - 1`` of every tensor in ``structure``."""
    return tf.nest.map_structure(lambda t: t[index * block_rows:(index + 1) * block_rows], structure)


def accumulate(forward_backward: Callable, blocks: int, inputs, targets, states, seed, rows, scale):
    """Runs ``forward_backward`` on ``blocks`` row blocks in sequence and sums their results.

    Args:
        forward_backward: ``(inputs, targets, states, seed, rows, scale) ->
            (loss_sum, new_states, grads, penalty_terms)`` of one block; the
            penalty terms (a dict, maybe empty) are shares of the global
            objective, so they are summed like the loss.
        blocks: ``train.accumulate_steps``; divides the replica's rows.
        inputs, targets: The replica's ``[rows, time]`` windows.
        states: The replica's carried state (a flat tuple of ``[rows, units]``).
        seed: The step seed.
        rows: int ``[2]``: the replica's first global row and the global batch rows.
        scale: The loss scale (1 outside float16).

    Returns:
        ``(loss_sum, new_states, grads, penalty_terms)`` of the replica's rows:
        loss sums, gradients and penalty terms summed over the blocks, the new
        states concatenated in row order.
    """
    # A static block size where the rows are known keeps the blocks' shapes
    # static, as the recurrent kernels' loops need for the carried state.
    block_rows = inputs.shape[0] // blocks if inputs.shape[0] is not None else tf.shape(inputs)[0] // blocks
    loss_sum, grads, new_states, penalty_terms = None, None, [], {}
    for index in range(blocks):
        block = block_slices((inputs, targets, states), index, block_rows)
        if grads is not None:
            # One block's activations at a time: the next block starts after
            # this one's gradients exist (the point of accumulating).
            with tf.control_dependencies([gradients.values_of(g) for g in grads if g is not None]):
                block = tf.nest.map_structure(tf.identity, block)
        block_first_row = tf.stack([rows[0] + index * block_rows, rows[1]])
        block_loss, block_states, block_grads, block_terms = forward_backward(*block, seed, block_first_row, scale)
        new_states.append(block_states)
        penalty_terms = {name: penalty_terms[name] + value if name in penalty_terms else value
                         for name, value in block_terms.items()}
        if grads is None:
            loss_sum, grads = block_loss, list(block_grads)
        else:
            loss_sum = loss_sum + block_loss
            grads = [b if g is None else g if b is None else gradients.add(g, b) for g, b in zip(grads, block_grads)]
    concatenated = tf.nest.map_structure(lambda *parts: tf.concat(parts, axis=0), *new_states)
    return loss_sum, concatenated, grads, penalty_terms
