"""The base of dist-rnn's own fused sequence layers (layer-norm LSTM/GRU, vanilla RNN).

Every such layer has the call contract of
``keras.layers.LSTM(units, return_sequences=True, return_state=True)``::

    sequences, *final_states = layer(x, initial_state=None, training=False)

``x`` is ``(batch, time, features)``; ``sequences`` is ``(batch, time, units)``;
the final states are ``[h, c]`` for a two-state cell and ``[h]`` otherwise,
each ``(batch, units)``. ``initial_state`` is a list of tensors in that
order, or ``None`` for zeros. Recurrent dropout is that of
:mod:`dist_rnn.models.dropout`.

Why these are not ``keras.layers.RNN(cell)``: a per-step cell pays for the
input matmul at every step and lets autodiff differentiate a ``while_loop``
(one stack push/pop per intermediate per step). These layers instead project
the inputs of all timesteps in one ``(T*B, in) @ W`` matmul outside the
recurrence and run a kernel of :mod:`dist_rnn.models.kernels` (time-major
loop, hand-written backward pass).

Numerics: the matmuls and the elementwise work run in the layer's compute
dtype, so under ``mixed_float16`` / ``mixed_bfloat16`` the variables are
float32 and the outputs and final states are float16 / bfloat16; layer-norm
statistics, gains and shifts stay float32 (:meth:`FusedRecurrentLayer._stats_dtype`).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from dist_rnn.models.dropout import call_dropout_mask
from dist_rnn.models.kernels.common import cast, time_major_projection


class FusedRecurrentLayer(keras.layers.Layer):
    """Base of dist-rnn's own sequence layers (not a layer to build by itself).

    Holds what they share: arguments, the input and recurrent kernels, the
    initial states, the recurrent-dropout mask and the input projection.
    Subclasses set ``_num_gates`` and ``_num_states``, create their extra
    weights in ``_build_extra`` and run their kernel in ``_recur(proj, states,
    rkernel, mask)``.

    Args:
        units: Size of the state(s).
        recurrent_dropout: Rate of the variational dropout on ``h`` before
            the recurrent matmul (one mask per sequence).
        kernel_initializer: Initializer of ``kernel``.
        recurrent_initializer: Initializer of ``recurrent_kernel``.
        dropout_salt: Folded into the call's ``seed`` so that each layer
            draws its own recurrent-dropout mask.
        return_sequences: Return all outputs (default) or only the last one.
        return_state: Also return the final states (default).
        **kwargs: Base ``keras.layers.Layer`` arguments (``name``, ``dtype``...).
    """

    #: Why this layer never uses a fused (cuDNN) kernel; read by
    #: :func:`dist_rnn.models.model.kernel_report`.
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
                (see :func:`~dist_rnn.models.dropout.recurrent_dropout_mask`); None: no dropout.
            rows: int ``[2]``: first global row of ``inputs`` and the global
                batch rows (None: ``inputs`` is the whole batch).

        Returns:
            ``[sequences (batch, time, units), *final_states]`` (the default);
            with ``return_sequences=False`` the first entry is the last output
            ``(batch, units)``, with ``return_state=False`` only that entry is
            returned (not in a list).
        """
        cdt = tf.as_dtype(self.compute_dtype)
        x = cast(tf.convert_to_tensor(inputs), cdt)
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
            states = [cast(tf.convert_to_tensor(s), cdt) for s in initial_state]
        mask = call_dropout_mask(self.recurrent_dropout, self.units, batch, cdt, training, seed,
                                  self.dropout_salt, rows)
        proj = time_major_projection(x, cast(tf.convert_to_tensor(self.kernel), cdt))
        rkernel = cast(tf.convert_to_tensor(self.recurrent_kernel), cdt)
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
