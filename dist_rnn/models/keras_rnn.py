"""Keras' LSTM and GRU with dist-rnn's fused recurrence wherever cuDNN does not run.

``keras.layers.LSTM``/``GRU`` run cuDNN on a GPU; anywhere else they fall
back to a generic per-step cell (the input matmul at every step, autodiff
through the while_loop). :class:`LSTM` and :class:`GRU` keep the Keras layers,
their arguments, weights, checkpoint layout and cuDNN path unchanged, and
replace only that fallback by the recurrences of
:mod:`dist_rnn.models.kernels.plain`: the input projection of all timesteps
in one matmul, a lean time-major loop and a hand-written backward pass.
Recurrent dropout is that of :mod:`dist_rnn.models.dropout` (one stateless
mask per call on the ``h`` fed to the recurrent matmul). Weight drop
(:mod:`dist_rnn.models.awd_dropout`) replaces the recurrent kernel by its
dropped copy for the duration of one call, so whichever path runs (cuDNN,
the fused recurrence, Keras' generic cell) uses the dropped matrix.
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from dist_rnn.models.awd_dropout import dropped_weight
from dist_rnn.models.dropout import call_dropout_mask
from dist_rnn.models.kernels.common import cast, time_major_projection
from dist_rnn.models.kernels import compiled
from dist_rnn.models.kernels.plain import gru, lstm

__all__ = ["LSTM", "GRU"]


class _FusedFallback:
    """Mixin for ``keras.layers.LSTM``/``GRU``: the fused recurrence wherever cuDNN does not run.

    Keras' cuDNN path runs (``use_cudnn=True``, or ``"auto"`` with a GPU
    visible) unless the layer has recurrent dropout, which cuDNN lacks: then
    the fused recurrence runs with the stateless mask of
    :func:`~dist_rnn.models.dropout.recurrent_dropout_mask` (never Keras' generic cell and its
    ``SeedGenerator``), and with ``use_cudnn=True`` Keras raises. Every
    configuration the fused recurrence does not cover (masks, input dropout,
    ``go_backwards``, ``unroll``, ``stateful``, other activations, no bias)
    goes to Keras unchanged.

    Args:
        dropout_salt: Folded into the call's ``seed`` so that each layer draws
            its own recurrent-dropout mask.
        weight_drop: DropConnect rate of the recurrent kernel, one mask per
            call (``model.weight_drop``); does not change the kernel choice.
        weight_drop_salt: Folded into the call's ``seed`` for the weight-drop mask.
        *args, **kwargs: Those of ``keras.layers.LSTM``/``GRU``.
    """

    def __init__(self, *args, dropout_salt=0, weight_drop=0.0, weight_drop_salt=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.dropout_salt = int(dropout_salt)
        if not 0.0 <= weight_drop < 1.0:
            raise ValueError(f"weight_drop must be in [0, 1), got {weight_drop!r}")
        self.weight_drop = float(weight_drop)
        self.weight_drop_salt = int(weight_drop_salt)

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
                (see :func:`~dist_rnn.models.dropout.recurrent_dropout_mask`); None: no dropout.
            rows: int ``[2]``: first global row of ``sequences`` and the global
                batch rows (None: ``sequences`` is the whole batch).

        Raises:
            ValueError: If ``seed`` asks for recurrent dropout in a
                configuration only Keras' generic cell runs (its masks would
                come from a stateful generator, not from ``seed``).
        """
        with self._weight_dropped(training, seed):
            return self._call(sequences, initial_state, mask, training, seed, rows)

    @contextlib.contextmanager
    def _weight_dropped(self, training, seed):
        """The cell's ``recurrent_kernel`` is its weight-dropped copy inside the block (when the call drops).

        The attribute is swapped past Keras' attribute tracking
        (``object.__setattr__``), so the variable stays the layer's weight and
        receives the gradient through the mask; it is restored even when the
        call raises.
        """
        cell = self.cell
        variable = cell.recurrent_kernel
        if not self.weight_drop or seed is None or training is None or training is False:
            yield
            return
        # In the compute dtype, as Keras reads the variable inside the layer (cuDNN takes it as given).
        kernel = cast(tf.convert_to_tensor(variable), tf.as_dtype(cell.compute_dtype))
        dropped = dropped_weight(kernel, self.weight_drop, training, seed, self.weight_drop_salt)
        object.__setattr__(cell, "recurrent_kernel", dropped)
        try:
            yield
        finally:
            object.__setattr__(cell, "recurrent_kernel", variable)

    def _call(self, sequences, initial_state, mask, training, seed, rows):
        if not self._fused_eligible(mask):
            if seed is not None and self.cell.recurrent_dropout and training is not False and not self.runs_cudnn():
                raise ValueError(f"{self.name}: seeded recurrent dropout needs the fused recurrence, "
                                 "which this configuration does not use")
            return super().call(sequences, initial_state=initial_state, mask=mask, training=training)
        cdt = tf.as_dtype(self.cell.compute_dtype)
        x = cast(tf.convert_to_tensor(sequences), cdt)
        batch = tf.shape(x)[0]
        units = self.cell.units
        if initial_state is None:
            initial_state = [tf.zeros(tf.stack([batch, units]), cdt) for _ in range(self._num_states)]
        elif not isinstance(initial_state, (list, tuple)):
            initial_state = [initial_state]
        states = [cast(tf.convert_to_tensor(s), cdt) for s in initial_state]
        rmask = call_dropout_mask(self.cell.recurrent_dropout, units, batch, cdt, training, seed,
                                   self.dropout_salt, rows)
        h_seq, *finals = self._fused(x, states, cdt, rmask)
        output = tf.transpose(h_seq, [1, 0, 2]) if self.return_sequences else finals[0]
        return (output, *finals) if self.return_state else output

    def _weight(self, variable, dtype):
        return cast(tf.convert_to_tensor(variable), dtype)

    def get_config(self):
        """Keras' config plus ``dropout_salt`` and the weight drop."""
        return {**super().get_config(), "dropout_salt": self.dropout_salt, "weight_drop": self.weight_drop,
                "weight_drop_salt": self.weight_drop_salt}


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
        proj = time_major_projection(x, kernel, bias)
        recurrence = compiled.lstm if compiled.uses_compiled("lstm") else lstm
        return recurrence(proj, states[0], states[1], rkernel, rmask, units=units)


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
        proj = time_major_projection(x, self._weight(self.cell.kernel, cdt), bias[0])
        recurrence = compiled.gru if compiled.uses_compiled("gru") else gru
        return recurrence(proj, states[0], self._weight(self.cell.recurrent_kernel, cdt), bias[1], rmask,
                          units=units)
