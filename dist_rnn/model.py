"""The recurrent language model: embedding, stacked recurrent layers, projection.

Dropout (``model.dropout``) is applied to non-recurrent connections (after
the embedding, between layers and before the softmax), as in Zaremba et al.
2014; ``model.recurrent_dropout`` adds variational dropout on the state fed
to each layer's recurrent matmul (``dist_rnn.cells``). All masks are drawn
statelessly over the global batch from a seed passed with each call, and each
replica keeps the rows it owns: a step's dropout depends only on (run seed,
step, dropout site, row), not on how rows are spread over replicas. Runs are
reproducible, resumable bit for bit, and equal across replica counts, and no
random-generator variable has to be mirrored or checkpointed.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import tensorflow as tf

from dist_rnn.config import ModelConfig
from dist_rnn.errors import UserError

FUSED_CELLS = ("lstm", "gru")
TWO_STATE_CELLS = ("lstm", "ln_lstm")
#: Recurrent layer ``i`` folds ``RECURRENT_DROPOUT_SALT + i`` into the step seed (the
#: non-recurrent dropout sites use salts 0 .. num_layers).
RECURRENT_DROPOUT_SALT = 1000
#: ``model.cudnn`` -> ``use_cudnn`` of Keras' LSTM/GRU (True: Keras raises if cuDNN cannot run).
USE_CUDNN = {"auto": "auto", "require": True, "off": False}


def states_per_layer(cell: str) -> int:
    """Number of state tensors a layer of ``cell`` carries (LSTM: h and c)."""
    return 2 if cell in TWO_STATE_CELLS else 1


@dataclass(frozen=True)
class LayerKernel:
    """Which kernel one recurrent layer runs, and why.

    Every layer runs either the fused cuDNN kernel or dist-rnn's fused
    recurrence (``dist_rnn.cells``: one input matmul, hand-written backward
    pass); Keras' generic per-step cell never runs.

    Attributes:
        index: Layer index, from 0.
        cell: ``model.cell``.
        units: Hidden units.
        fused: Whether the layer runs the fused cuDNN kernel.
        reason: Why it runs dist-rnn's fused recurrence instead (empty when
            it runs cuDNN).
    """

    index: int
    cell: str
    units: int
    fused: bool
    reason: str

    def line(self) -> str:
        """One line of the kernel report."""
        kernel = "cuDNN fused" if self.fused else f"dist-rnn fused recurrence ({self.reason})"
        return f"layer {self.index}  {self.cell}  {self.units} units  kernel: {kernel}"


def kernel_report(config: ModelConfig, gpu_visible: bool) -> list[LayerKernel]:
    """Says for each layer whether it runs the fused cuDNN kernel, as ``cells.LSTM``/``GRU`` decide.

    Args:
        config: The ``model`` section.
        gpu_visible: Whether a GPU is visible to this process.

    Returns:
        One entry per layer.
    """
    report = []
    for i in range(config.num_layers):
        if config.cell not in FUSED_CELLS:
            fused, reason = False, "custom cell"
        elif config.cudnn == "off":
            fused, reason = False, "model.cudnn: off"
        elif config.recurrent_dropout > 0:
            fused, reason = False, "recurrent dropout: cuDNN has none"
        elif not gpu_visible:
            fused, reason = False, "no GPU visible"
        else:
            fused, reason = True, ""
        report.append(LayerKernel(i, config.cell, config.hidden_size, fused, reason))
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


@keras.saving.register_keras_serializable(package="dist_rnn")
class OutputProjection(keras.layers.Layer):
    """Projects hidden states to float32 vocabulary logits, optionally tied to the embedding.

    Args:
        vocab_size: Number of output classes.
        tied_embedding: An Embedding layer whose matrix is reused (transposed).
        kernel_initializer: Initializer of the untied kernel and of the bias.
    """

    def __init__(self, vocab_size: int, tied_embedding=None, kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(dtype="float32", **kwargs)
        self.vocab_size = vocab_size
        self.tied_embedding = tied_embedding
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        if self.tied_embedding is None:
            self.kernel = self.add_weight(name="kernel", shape=(input_shape[-1], self.vocab_size),
                                          initializer=self.kernel_initializer)
        self.bias = self.add_weight(name="bias", shape=(self.vocab_size,), initializer="zeros")

    def call(self, inputs):
        inputs = tf.cast(inputs, tf.float32)
        if self.tied_embedding is not None:
            kernel = tf.cast(self.tied_embedding.embeddings, tf.float32)
            logits = tf.matmul(inputs, kernel, transpose_b=True)
        else:
            logits = tf.matmul(inputs, self.kernel)
        return logits + self.bias

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer)}


def recurrent_layer(config: ModelConfig, index: int, initializer=None, seed: int = 0):
    """Recurrent layer ``index`` of the model that ``config`` describes.

    Args:
        config: The ``model`` section (cell, units, recurrent dropout, cuDNN use).
        index: Layer index (names the layer and offsets its recurrent-dropout salt).
        initializer: Initializer of every weight (the PTB ``init_scale``
            recipe), or None for the layer's defaults.
        seed: Run seed; fixes the (unused) dropout generator Keras' LSTM/GRU
            cells create, so that building draws no global randomness.

    Returns:
        ``cells.LSTM``/``cells.GRU`` (Keras' layers: cuDNN on a GPU unless
        recurrent dropout, dist-rnn's fused recurrence elsewhere; ``model.cudnn:
        require`` builds them with ``use_cudnn=True``) or a dist-rnn
        layer-norm/vanilla layer, with ``return_sequences`` and
        ``return_state``. Recurrent dropout is drawn per call from the
        ``seed``/``rows`` passed to the layer, salted with
        ``RECURRENT_DROPOUT_SALT + index``.
    """
    common = dict(return_sequences=True, return_state=True, name=f"{config.cell}_{index}")
    init = {} if initializer is None else dict(kernel_initializer=initializer, recurrent_initializer=initializer)
    from dist_rnn import cells

    if config.cell in FUSED_CELLS:
        # Keras' LSTM/GRU (cuDNN on a GPU, same weights) whose non-cuDNN path
        # runs the fused recurrence of dist_rnn.cells instead of Keras' generic cell.
        cls = cells.LSTM if config.cell == "lstm" else cells.GRU
        extra = {"reset_after": True} if config.cell == "gru" else {}
        if initializer is not None:
            extra["bias_initializer"] = initializer
            if config.cell == "lstm":
                extra["unit_forget_bias"] = False
        return cls(config.hidden_size, activation="tanh", recurrent_activation="sigmoid", use_bias=True,
                   unroll=False, recurrent_dropout=config.recurrent_dropout,
                   use_cudnn=USE_CUDNN[config.cudnn], seed=seed + 1000 + index,
                   dropout_salt=RECURRENT_DROPOUT_SALT + index, **init, **extra, **common)
    cls = {"ln_lstm": cells.LayerNormLSTM, "ln_gru": cells.LayerNormGRU, "rnn": cells.VanillaRNN}[config.cell]
    return cls(config.hidden_size, recurrent_dropout=config.recurrent_dropout,
               dropout_salt=RECURRENT_DROPOUT_SALT + index, **init, **common)


@keras.saving.register_keras_serializable(package="dist_rnn")
class LanguageModel(keras.Model):
    """Embedding -> stacked recurrent layers -> dropout -> float32 logits.

    The model is stateful only through its arguments: it takes the initial
    recurrent state and returns the final one, so the trainer can carry state
    per replica from batch to batch.

    Args:
        vocab_size: Vocabulary size.
        config: The ``model`` section.
        seed: Seed of the weight initializers and dropout sites.
    """

    def __init__(self, vocab_size: int, config: ModelConfig, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.model_config = config
        self.seed = seed
        initializer = (keras.initializers.RandomUniform(-config.init_scale, config.init_scale, seed=seed)
                       if config.init_scale else None)
        self.embedding = keras.layers.Embedding(
            vocab_size, config.embedding_size, name="embedding",
            embeddings_initializer=initializer or keras.initializers.RandomUniform(-0.05, 0.05, seed=seed))
        self.recurrent_layers = [recurrent_layer(config, i, initializer, seed) for i in range(config.num_layers)]
        # tf.train.Checkpoint does not see layers inside a Python list: give
        # each its own attribute so checkpoints hold their weights under model/.
        for i, layer in enumerate(self.recurrent_layers):
            setattr(self, f"recurrent_{i}", layer)
        self.dropouts = [StatelessDropout(config.dropout, salt=i, name=f"dropout_{i}")
                         for i in range(config.num_layers + 1)]
        self.projection = OutputProjection(vocab_size, self.embedding if config.tie_embeddings else None,
                                           kernel_initializer=initializer or "glorot_uniform", name="projection")
        self.state_counts = [states_per_layer(config.cell)] * config.num_layers

    @property
    def num_state_tensors(self) -> int:
        """Length of the flat state tuple."""
        return sum(self.state_counts)

    def initial_state(self, batch_size: int) -> tuple:
        """Zero state: a flat tuple of float32 ``[batch_size, hidden_size]`` tensors."""
        return tuple(tf.zeros([batch_size, self.model_config.hidden_size], tf.float32)
                     for _ in range(self.num_state_tensors))

    def call(self, tokens, states=None, training=False, seed=None, rows=None):
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

        Returns:
            ``(logits, states)``: float32 ``[batch, time, vocab]`` logits and the
            flat tuple of final states, in float32.
        """
        if states is None:
            states = self.initial_state(tf.shape(tokens)[0])
        x = self.embedding(tokens)
        x = self.dropouts[0](x, seed=seed, rows=rows, training=training)
        new_states, pos = [], 0
        for i, layer in enumerate(self.recurrent_layers):
            n = self.state_counts[i]
            layer_states = [tf.cast(s, self.compute_dtype) for s in states[pos:pos + n]]
            pos += n
            outputs = layer(x, initial_state=layer_states, training=training, seed=seed, rows=rows)
            x = outputs[0]
            new_states.extend(tf.cast(s, tf.float32) for s in outputs[1:])
            x = self.dropouts[i + 1](x, seed=seed, rows=rows, training=training)
        return self.projection(x), tuple(new_states)

    def get_config(self):
        from dataclasses import asdict

        return {**super().get_config(), "vocab_size": self.vocab_size,
                "config": asdict(self.model_config), "seed": self.seed}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        model_config = ModelConfig(**config.pop("config"))
        return cls(config.pop("vocab_size"), model_config, seed=config.pop("seed"), **config)


def build_model(config: ModelConfig, vocab_size: int, seed: int) -> LanguageModel:
    """Creates the model and its variables (call inside the strategy scope).

    Args:
        config: The ``model`` section.
        vocab_size: Vocabulary size.
        seed: Initializer seed.

    Returns:
        A built :class:`LanguageModel`.
    """
    model = LanguageModel(vocab_size, config, seed=seed, name="language_model")
    model(tf.zeros([1, 1], tf.int32), training=False)
    return model
