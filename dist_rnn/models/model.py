"""The recurrent language model: embedding, stacked recurrent layers, output layer.

Dropout (``model.dropout``) is applied to non-recurrent connections (after
the embedding, between layers and before the softmax), as in Zaremba et al.
2014; ``model.recurrent_dropout`` adds variational dropout on the state fed
to each layer's recurrent matmul (``dist_rnn.models.dropout``). All masks are drawn
statelessly over the global batch from a seed passed with each call, and each
replica keeps the rows it owns: a step's dropout depends only on (run seed,
step, dropout site, row), not on how rows are spread over replicas. Runs are
reproducible, resumable bit for bit, and equal across replica counts, and no
random-generator variable has to be mirrored or checkpointed. The AWD-LSTM
regularizers (weight drop, embedding dropout, locked dropout) follow the same
scheme (``dist_rnn.models.awd_dropout``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import keras
import tensorflow as tf

from dist_rnn.config import TWO_STATE_CELLS, ModelConfig, check_output_vocab
from dist_rnn.errors import UserError
from dist_rnn.models.awd_dropout import LOCKED_DROPOUT_SALT, WEIGHT_DROP_SALT, LockedDropout, embedding_dropout
from dist_rnn.models.kernels import compiled
from dist_rnn.models.layers import RECURRENT_LAYERS
from dist_rnn.models.outputs import OutputProjection, output_layer  # noqa: F401 (OutputProjection: re-exported)

FUSED_CELLS = ("lstm", "gru")
#: Recurrent layer ``i`` folds ``RECURRENT_DROPOUT_SALT + i`` into the step seed (the
#: non-recurrent dropout sites use salts 0 .. num_layers).
RECURRENT_DROPOUT_SALT = 1000
#: ``model.cudnn`` -> ``use_cudnn`` of Keras' LSTM/GRU (True: Keras raises if cuDNN cannot run).
USE_CUDNN = {"auto": "auto", "require": True, "off": False}
#: ``model.initializer: unit_scaling`` starts the GRU update and reset gates' bias here
#: (the ``bias_start`` of TensorFlow's pre-1.0 ``GRUCell``).
GRU_GATE_BIAS = 1.0


def states_per_layer(cell: str) -> int:
    """Number of state tensors a layer of ``cell`` carries (LSTM: h and c)."""
    return 2 if cell in TWO_STATE_CELLS else 1


@dataclass(frozen=True)
class LayerKernel:
    """Which kernel one recurrent layer runs, and why.

    Every layer runs either the fused cuDNN kernel or dist-rnn's fused
    recurrence (``dist_rnn.models.kernels``: one input matmul, hand-written backward
    pass); Keras' generic per-step cell never runs.

    Attributes:
        index: Layer index, from 0.
        cell: ``model.cell``.
        units: Hidden units.
        fused: Whether the layer runs the fused cuDNN kernel.
        reason: Why it runs dist-rnn's fused recurrence instead (empty when
            it runs cuDNN).
        compiled: Whether that recurrence is the compiled op
            (:mod:`dist_rnn.models.kernels.compiled`) rather than the graph loop.
        compiled_note: Why the compiled op was asked for but does not run ("" otherwise).
    """

    index: int
    cell: str
    units: int
    fused: bool
    reason: str
    compiled: bool = False
    compiled_note: str = ""

    def line(self) -> str:
        """One line of the kernel report."""
        if self.fused:
            kernel = "cuDNN fused"
        elif self.compiled:
            kernel = f"dist-rnn compiled recurrence ({self.reason})"
        else:
            note = f"; compiled op unavailable: {self.compiled_note}" if self.compiled_note else ""
            kernel = f"dist-rnn fused recurrence ({self.reason}{note})"
        return f"layer {self.index}  {self.cell}  {self.units} units  kernel: {kernel}"


def cudnn_excluded_by(jit_compile: bool = False, precision: str = "float32", export: bool = False) -> str:
    """Why ``lstm``/``gru`` must run dist-rnn's fused recurrence even on a GPU ("" when cuDNN may run).

    XLA cannot compile the cuDNN op (``CudnnRNNV3``); TensorFlow does not
    document cuDNN RNNs in bfloat16 (never run here); an export must load on
    machines without a GPU, where no ``CudnnRNNV3`` kernel exists.

    Args:
        jit_compile: ``train.jit_compile``.
        precision: The dtype policy the model is built under.
        export: Whether the model is traced for a SavedModel export.
    """
    if export:
        return "export: portable to CPU and GPU"
    if jit_compile:
        return "train.jit_compile: XLA cannot compile cuDNN"
    if precision == "mixed_bfloat16":
        return "mixed_bfloat16: no documented cuDNN bfloat16 RNN"
    return ""


def kernel_report(config: ModelConfig, gpu_visible: bool, jit_compile: bool = False, precision: str = "float32",
                  export: bool = False) -> list[LayerKernel]:
    """Says for each layer whether it runs the fused cuDNN kernel, as ``keras_rnn.LSTM``/``GRU`` decide,
    and otherwise whether its recurrence (``lstmp`` for a projected LSTM) is the compiled op.

    Args:
        config: The ``model`` section.
        gpu_visible: Whether a GPU is visible to this process.
        jit_compile, precision, export: As for :func:`cudnn_excluded_by`.

    Returns:
        One entry per layer.
    """
    excluded = cudnn_excluded_by(jit_compile, precision, export)
    report = []
    for i in range(config.num_layers):
        if config.cell not in FUSED_CELLS:
            fused, reason = False, RECURRENT_LAYERS[config.cell].fused_kernel_reason
        elif config.projection_size:
            from dist_rnn.models.projected_lstm import NO_CUDNN_REASON

            fused, reason = False, NO_CUDNN_REASON
        elif config.cudnn == "off":
            fused, reason = False, "model.cudnn: off"
        elif config.recurrent_dropout > 0:
            fused, reason = False, "recurrent dropout: cuDNN has none"
        elif excluded:
            fused, reason = False, excluded
        elif not gpu_visible:
            fused, reason = False, "no GPU visible"
        else:
            fused, reason = True, ""
        compiled_op, note = False, ""
        recurrence = compiled.recurrence_name(config.cell, config.projection_size)
        if not fused and compiled.enabled() and recurrence in compiled.COMPILED_RECURRENCES:
            if export:
                note = "export (the op library may be missing where it loads)"
            elif jit_compile:
                note = "train.jit_compile (XLA has no kernel for it)"
            elif gpu_visible:
                note = "a GPU is visible (the op has CPU kernels only)"
            else:
                compiled_op = compiled.uses_compiled(recurrence)
                note = "" if compiled_op else compiled.unavailable_reason()
        report.append(LayerKernel(i, config.cell, config.hidden_size, fused, reason, compiled_op, note))
    return report


def check_cudnn_requirement(config: ModelConfig, report: list[LayerKernel]) -> None:
    """Raises if ``model.cudnn: require`` and some layer cannot use the fused kernel."""
    if config.cudnn != "require":
        return
    bad = [f"layer {k.index} ({k.cell}): {k.reason}" for k in report if not k.fused]
    if bad:
        raise UserError("model.cudnn is 'require' but " + "; ".join(bad) + " cannot use the fused cuDNN kernel")


@keras.saving.register_keras_serializable(package="dist_rnn")
class StatelessDropout(keras.layers.Layer):
    """Dropout whose mask is a pure function of an explicit seed.

    Args:
        rate: Fraction of units dropped.
        salt: Folded into the seed so that each dropout site draws its own mask.
    """

    def __init__(self, rate: float, salt: int, **kwargs):
        super().__init__(**kwargs)
        self.rate = rate
        self.salt = salt

    def call(self, inputs, seed=None, rows=None, training=False):
        """Drops units when ``training`` and a seed is given; identity otherwise.

        Args:
            inputs: ``[rows, ...]`` activations of this replica.
            seed: int ``[2]`` stateless seed of the step.
            rows: int ``[2]``: (first global row of ``inputs``, global batch
                rows); the mask is drawn for the global batch and sliced, so
                every row gets the same mask on any replica layout. None means
                ``inputs`` is the whole batch.
            training: Whether to drop.
        """
        if not training or self.rate == 0 or seed is None:
            return inputs
        site_seed = tf.random.experimental.stateless_fold_in(seed, self.salt)
        shape = tf.shape(inputs)
        if rows is None:
            uniform = tf.random.stateless_uniform(shape, seed=site_seed)
        else:
            full = tf.concat([[rows[1]], shape[1:]], axis=0)
            uniform = tf.random.stateless_uniform(full, seed=site_seed)[rows[0]:rows[0] + shape[0]]
        keep = uniform >= self.rate
        scale = tf.cast(1.0 / (1.0 - self.rate), inputs.dtype)
        return tf.where(keep, inputs * scale, tf.zeros_like(inputs))

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "salt": self.salt}


def weight_seed(seed: int, weight: str) -> int:
    """Seed of one weight's initializer, derived from the model seed and the weight's name.

    A seeded Keras 3 initializer returns the same values on every call, so
    weights that shared one seed would start equal wherever their shapes
    match. Each weight gets its own seed instead: distinct streams for
    distinct weights, all fixed by ``train.seed``.

    Args:
        seed: The model seed (``train.seed``).
        weight: A name unique within the model, e.g. ``"lstm_1/kernel"``.

    Returns:
        A seed in ``[0, 2**31)``.
    """
    digest = hashlib.sha256(f"{seed}/{weight}".encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def unit_scaling_limit(fan_in: int) -> float:
    """Bound of ``model.initializer: unit_scaling``: ``sqrt(3 / fan_in)``, unit variance per input."""
    return math.sqrt(3.0 / fan_in)


def weight_initializer(config: ModelConfig, seed: int, weight: str, default=keras.initializers.GlorotUniform,
                       fan_in: int | None = None, **default_args):
    """A new initializer object for exactly one weight.

    Args:
        config: The ``model`` section (``init_scale``, ``initializer``).
        seed: The model seed.
        weight: The weight's name (see :func:`weight_seed`).
        default: Keras initializer class used without ``init_scale`` under
            ``model.initializer: keras``.
        fan_in: Rows of the matrix this weight is (part of), for
            ``model.initializer: unit_scaling``.
        **default_args: Its arguments other than ``seed``.

    Returns:
        ``RandomUniform(-init_scale, init_scale)`` when ``model.init_scale``
        is set (the PTB recipe); ``RandomUniform`` within
        :func:`unit_scaling_limit` of ``fan_in`` under ``unit_scaling``; else
        ``default(**default_args)``; seeded by :func:`weight_seed`.
    """
    s = weight_seed(seed, weight)
    if config.init_scale:
        return keras.initializers.RandomUniform(-config.init_scale, config.init_scale, seed=s)
    if config.initializer == "unit_scaling":
        limit = unit_scaling_limit(fan_in)
        return keras.initializers.RandomUniform(-limit, limit, seed=s)
    return default(seed=s, **default_args)


@keras.saving.register_keras_serializable(package="dist_rnn")
class GRUGateBias(keras.initializers.Initializer):
    """Keras GRU bias ``(2, 3U)`` (``reset_after``: input row, recurrent row) with the z and r gates at ``value``.

    The input row starts ``[value] * 2U + [0] * U`` and the recurrent row at
    zero, so each gate's summed bias is ``value`` for z and r and 0 for the
    candidate, on cuDNN and on the fused recurrence alike.

    Args:
        value: Starting bias of the update and reset gates.
    """

    def __init__(self, value: float = GRU_GATE_BIAS):
        self.value = float(value)

    def __call__(self, shape, dtype=None):
        if len(shape) != 2 or shape[0] != 2 or shape[1] % 3:
            raise ValueError(f"GRUGateBias expects a reset_after GRU bias of shape (2, 3 * units), got {shape}")
        units = shape[1] // 3
        row = tf.concat([tf.fill([2 * units], self.value), tf.zeros([units])], 0)
        return tf.cast(tf.stack([row, tf.zeros_like(row)]), dtype or "float32")

    def get_config(self):
        return {"value": self.value}


def recurrent_layer(config: ModelConfig, index: int, seed: int = 0, allow_cudnn: bool = True):
    """Recurrent layer ``index`` of the model that ``config`` describes.

    Args:
        config: The ``model`` section (cell, units, recurrent dropout, cuDNN
            use, ``init_scale``, ``initializer``).
        index: Layer index (names the layer and offsets its recurrent-dropout salt).
        seed: Model seed: each weight's initializer seed is derived from it
            (:func:`weight_seed`); it also fixes the (unused) dropout generator
            Keras' LSTM/GRU cells create, so that building draws no global randomness.
        allow_cudnn: False builds ``lstm``/``gru`` without cuDNN even on a GPU
            (see :func:`cudnn_excluded_by`); same weights either way.

    Returns:
        ``keras_rnn.LSTM``/``keras_rnn.GRU`` (Keras' layers: cuDNN on a GPU unless
        recurrent dropout, dist-rnn's fused recurrence elsewhere; ``model.cudnn:
        require`` builds them with ``use_cudnn=True``) or a dist-rnn
        layer-norm/vanilla layer, with ``return_sequences`` and
        ``return_state``. Recurrent dropout is drawn per call from the
        ``seed``/``rows`` passed to the layer, salted with
        ``RECURRENT_DROPOUT_SALT + index``.
    """
    name = f"{config.cell}_{index}"
    common = dict(return_sequences=True, return_state=True, name=name)
    # unit_scaling: the input and recurrent kernels are the two row blocks of the
    # tutorials' one matrix over [input, state], so both take its fan_in.
    # A projected LSTM's state (and so the next layer's input) is projection_size wide.
    width = config.projection_size or config.hidden_size
    fan_in = (config.embedding_size if index == 0 else width) + width
    init = dict(kernel_initializer=weight_initializer(config, seed, f"{name}/kernel", fan_in=fan_in),
                recurrent_initializer=weight_initializer(config, seed, f"{name}/recurrent_kernel",
                                                         keras.initializers.Orthogonal, fan_in=fan_in))
    if config.init_scale and config.cell in ("lstm", "gru", "rnn"):
        # The layer-norm cells have no bias; their gains and shifts keep their constant starts.
        init["bias_initializer"] = weight_initializer(config, seed, f"{name}/bias")
    if config.projection_size:
        return projected_lstm_layer(config, index, seed, name, init)
    cls = RECURRENT_LAYERS[config.cell]
    if config.cell in FUSED_CELLS:
        # Keras' LSTM/GRU (cuDNN on a GPU, same weights) whose non-cuDNN path
        # runs the fused recurrence of dist_rnn.models.kernels instead of Keras' generic cell.
        extra = {"reset_after": True} if config.cell == "gru" else {}
        if config.init_scale and config.cell == "lstm":
            extra["unit_forget_bias"] = False
        if config.initializer == "unit_scaling" and config.cell == "gru":
            init["bias_initializer"] = GRUGateBias(GRU_GATE_BIAS)
        return cls(config.hidden_size, activation="tanh", recurrent_activation="sigmoid", use_bias=True,
                   unroll=False, recurrent_dropout=config.recurrent_dropout,
                   use_cudnn=USE_CUDNN[config.cudnn] if allow_cudnn else False, seed=seed + 1000 + index,
                   dropout_salt=RECURRENT_DROPOUT_SALT + index, weight_drop=config.weight_drop,
                   weight_drop_salt=WEIGHT_DROP_SALT + index, **init, **extra, **common)
    if config.initializer == "unit_scaling" and config.cell == "ln_gru":
        init["gate_beta_initializer"] = keras.initializers.Constant(GRU_GATE_BIAS)
    return cls(config.hidden_size, recurrent_dropout=config.recurrent_dropout,
               dropout_salt=RECURRENT_DROPOUT_SALT + index, weight_drop=config.weight_drop,
               weight_drop_salt=WEIGHT_DROP_SALT + index, **init, **common)


def projected_lstm_layer(config: ModelConfig, index: int, seed: int, name: str, init: dict):
    """Layer ``index`` when ``model.projection_size`` is set: a :class:`~dist_rnn.models.projected_lstm.ProjectedLSTM`.

    Args:
        config: The ``model`` section.
        index: Layer index.
        seed: Model seed.
        name: Layer name.
        init: Its kernel, recurrent-kernel (and, with ``init_scale``, bias) initializers.
    """
    from dist_rnn.models.projected_lstm import ProjectedLSTM

    return ProjectedLSTM(config.hidden_size, config.projection_size, recurrent_dropout=config.recurrent_dropout,
                         projection_initializer=weight_initializer(config, seed, f"{name}/projection_kernel",
                                                                   fan_in=config.hidden_size),
                         unit_forget_bias=not config.init_scale, dropout_salt=RECURRENT_DROPOUT_SALT + index,
                         return_sequences=True, return_state=True, name=name, **init)


@keras.saving.register_keras_serializable(package="dist_rnn")
class LanguageModel(keras.Model):
    """Embedding -> stacked recurrent layers -> dropout -> float32 logits.

    The model is stateful only through its arguments: it takes the initial
    recurrent state and returns the final one, so the trainer can carry state
    per replica from batch to batch.

    Args:
        vocab_size: Vocabulary size.
        config: The ``model`` section.
        seed: Seed of the weight initializers (one stream per weight, see
            :func:`weight_seed`) and of the recurrent-dropout generators.
        allow_cudnn: False keeps ``lstm``/``gru`` off cuDNN even on a GPU
            (XLA, bfloat16, export); not saved in the Keras config, so a
            loaded ``.keras`` model decides on the machine that loads it.
    """

    def __init__(self, vocab_size: int, config: ModelConfig, seed: int = 0, allow_cudnn: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.model_config = config
        self.seed = seed
        self.embedding = keras.layers.Embedding(
            vocab_size, config.embedding_size, name="embedding",
            embeddings_initializer=weight_initializer(config, seed, "embedding/embeddings",
                                                      keras.initializers.RandomUniform, fan_in=vocab_size,
                                                      minval=-0.05, maxval=0.05))
        self.recurrent_layers = [recurrent_layer(config, i, seed, allow_cudnn)
                                 for i in range(config.num_layers)]
        # tf.train.Checkpoint does not see layers inside a Python list: give
        # each its own attribute so checkpoints hold their weights under model/.
        for i, layer in enumerate(self.recurrent_layers):
            setattr(self, f"recurrent_{i}", layer)
        self.dropouts = [StatelessDropout(config.dropout, salt=i, name=f"dropout_{i}")
                         for i in range(config.num_layers + 1)]
        # Locked dropout: site 0 on the embedding output, site i after layer i - 1.
        locked_rates = ([config.dropout_input] + [config.dropout_hidden] * (config.num_layers - 1)
                        + [config.dropout_output])
        self.locked_dropouts = [LockedDropout(rate, salt=LOCKED_DROPOUT_SALT + i, name=f"locked_dropout_{i}")
                                for i, rate in enumerate(locked_rates)]
        # Width of the last layer's output, and of each flat state tensor (h is
        # projection_size wide in a projected LSTM).
        h_size = config.projection_size or config.hidden_size
        self.projection = output_layer(config, vocab_size, self.embedding if config.tie_embeddings else None,
                                       weight_initializer(config, seed, "projection/kernel", fan_in=h_size),
                                       weight_initializer(config, seed, "projection/tie_projection", fan_in=h_size))
        self.state_counts = [states_per_layer(config.cell)] * config.num_layers
        self.state_sizes = [h_size, config.hidden_size][:states_per_layer(config.cell)] * config.num_layers
        #: Look tokens up with a sparse read of the embedding (see :meth:`use_row_sparse_reads`).
        self.embedding_row_reads = False

    def use_row_sparse_reads(self) -> None:
        """Reads gathered weight rows with sparse reads (``ResourceGather``) in training and evaluation.

        For row-sparse updates (:mod:`dist_rnn.training.sparse_updates`): once
        a variable is scattered into, TensorFlow copies all of it on every
        dense read, so the embedding and the sampled softmax's weights are then
        read by their rows only. The embedding keeps its dense read when the
        output layer also reads it whole (tied to a full or adaptive softmax):
        its gradient is dense there anyway. Values are unchanged.
        """
        rows_only = getattr(self.projection, "reads_tied_embedding_by_rows", False)
        self.embedding_row_reads = self.projection.tied_embedding is None or rows_only
        if hasattr(self.projection, "row_reads"):
            self.projection.row_reads = True

    def _embed(self, tokens):
        if not self.embedding_row_reads:
            return self.embedding(tokens)
        # The embedding's variable is not autocast: .value is the variable
        # itself, and tf.gather of a variable is its sparse read.
        rows = tf.gather(self.embedding.embeddings.value, tf.cast(tokens, tf.int32))
        return tf.cast(rows, self.embedding.compute_dtype)

    @property
    def num_state_tensors(self) -> int:
        """Length of the flat state tuple."""
        return sum(self.state_counts)

    def initial_state(self, batch_size: int) -> tuple:
        """Zero state: a flat tuple of float32 ``[batch_size, size]`` tensors (sizes: :attr:`state_sizes`)."""
        return tuple(tf.zeros([batch_size, size], tf.float32) for size in self.state_sizes)

    def call(self, tokens, states=None, training=False, seed=None, rows=None, targets=None, last_only=False,
             return_activations=False):
        """Runs the model over a window of tokens.

        Args:
            tokens: int ``[batch, time]`` token ids.
            states: Flat tuple of initial states (float32), or None for zeros.
            training: Applies dropout and recurrent dropout when True (and
                ``seed`` is given).
            seed: int ``[2]`` stateless seed of this call's dropout masks.
            rows: int ``[2]``: first global row of ``tokens`` and the global
                batch rows, so dropout masks do not depend on the replica
                layout (None: ``tokens`` is the whole batch).
            targets: int ``[batch, time]`` next tokens: return their per-token
                loss instead of logits (the output layer's ``token_nll``: in
                training its training loss, e.g. sampled; else exact, in
                bounded memory).
            return_activations: Also return the last layer's output before
                and after its dropout (for AR/TAR, ``dist_rnn.training.regularization``):
                ``(output, states, (raw, dropped))``, in the compute dtype.
            last_only: Return the logits of the last time step only
                (``[batch, 1, vocab]``: generation and export need no more).

        Returns:
            ``(logits, states)``: float32 ``[batch, time, vocab]`` logits (for
            ``adaptive``: log-probabilities) and the flat tuple of final
            states, in float32; with ``targets``, float32 ``[batch, time]``
            losses (nats) instead of the logits.
        """
        if states is None:
            states = self.initial_state(tf.shape(tokens)[0])
        x = self._embed(tokens)
        x = embedding_dropout(x, tokens, self.vocab_size, self.model_config.embedding_dropout, training, seed)
        x = self.dropouts[0](x, seed=seed, rows=rows, training=training)
        x = self.locked_dropouts[0](x, seed=seed, rows=rows, training=training)
        new_states, pos = [], 0
        for i, layer in enumerate(self.recurrent_layers):
            n = self.state_counts[i]
            layer_states = [tf.cast(s, self.compute_dtype) for s in states[pos:pos + n]]
            pos += n
            outputs = layer(x, initial_state=layer_states, training=training, seed=seed, rows=rows)
            x = raw = outputs[0]
            new_states.extend(tf.cast(s, tf.float32) for s in outputs[1:])
            x = self.dropouts[i + 1](x, seed=seed, rows=rows, training=training)
            x = self.locked_dropouts[i + 1](x, seed=seed, rows=rows, training=training)
        if targets is not None:
            output = self.projection(x, targets=targets, training=training, seed=seed)
        else:
            output = self.projection(x[:, -1:, :] if last_only else x)
        if return_activations:
            return output, tuple(new_states), (raw, x)
        return output, tuple(new_states)

    def get_config(self):
        from dataclasses import asdict

        return {**super().get_config(), "vocab_size": self.vocab_size,
                "config": asdict(self.model_config), "seed": self.seed}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        model_config = ModelConfig(**config.pop("config"))
        return cls(config.pop("vocab_size"), model_config, seed=config.pop("seed"), **config)


def build_model(config: ModelConfig, vocab_size: int, seed: int, allow_cudnn: bool = True) -> LanguageModel:
    """Creates the model and its variables (call inside the strategy scope).

    Args:
        config: The ``model`` section.
        vocab_size: Vocabulary size.
        seed: Initializer seed.
        allow_cudnn: False keeps ``lstm``/``gru`` off cuDNN even on a GPU
            (pass ``not cudnn_excluded_by(...)``).

    Returns:
        A built :class:`LanguageModel`.

    Raises:
        UserError: If ``model.num_sampled`` or ``model.cutoffs`` do not fit the vocabulary.
    """
    check_output_vocab(config, vocab_size)
    model = LanguageModel(vocab_size, config, seed=seed, allow_cudnn=allow_cudnn, name="language_model")
    model(tf.zeros([1, 1], tf.int32), training=False)
    return model
