"""The run configuration's keys: one dataclass per YAML section, with each key's type, meaning and default.

A key is added here (field, type, docstring line) and its value checks in
:mod:`dist_rnn.config.validation`; loading (:mod:`dist_rnn.config.loading`)
needs no change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

CORPORA = ("stdlib", "file", "tinyshakespeare", "ptb", "text8", "wikitext2", "wikitext103", "enwik8", "lm1b")
CELLS = ("lstm", "gru", "ln_lstm", "ln_gru", "rnn")
INITIALIZERS = ("keras", "unit_scaling")
# Cells whose recurrent state is (h, c) rather than h alone.
TWO_STATE_CELLS = ("lstm", "ln_lstm")


@dataclass
class DataConfig:
    """Where the text comes from and how it is tokenized.

    Attributes:
        corpus: ``stdlib`` (the running Python's standard library source, the
            embedded default), ``file`` (UTF-8 text files), ``tinyshakespeare``,
            ``ptb``, ``text8``, ``wikitext2``/``wikitext103`` (the raw
            variants), ``enwik8`` (the first 10^8 bytes cut 90M/5M/5M,
            ``byte`` level) or ``lm1b`` (One Billion Word: its 99 training
            shards, held-out shard 1 as valid and 0 as test); downloaded once
            into ``cache_dir`` unless ``path`` points at a local copy.
        path: A file, glob pattern, folder of shards, or a list of them
            (``file``; ``.gz`` files are decompressed), the corpus file
            (``tinyshakespeare``, ``text8``, ``enwik8``) or the folder laid
            out as the corpus' archive (``ptb``, ``wikitext2``,
            ``wikitext103``, ``lm1b``); refused with ``stdlib`` and together
            with ``train_file``. A resumed run may read its data from another
            path if the text is the same.
        train_file: Explicit training file; with ``valid_file``/``test_file``
            replaces the corpus and its fractional split.
        valid_file: Explicit validation file (needs ``train_file``).
        test_file: Explicit test file (needs ``train_file``).
        split: Train/valid/test fractions of the token stream when the corpus
            is one stream (``stdlib``, ``file``, ``tinyshakespeare``, ``text8``).
        level: ``char`` (Unicode characters), ``byte`` (UTF-8 bytes, 256
            ids), ``word`` (whitespace-separated, each newline an ``<eos>``)
            or ``subword`` (SentencePiece pieces trained on the training
            split, see ``vocab_size``).
        max_chars: Read at most this many characters of the corpus (``stdlib``,
            ``file``, ``tinyshakespeare``, ``text8``; bytes at ``byte``
            level and for ``enwik8``); ``null`` reads everything.
        max_vocab: Keep the most frequent tokens of the training split, mapping
            the rest to ``<unk>``; ``null`` keeps all (``char``/``word``).
        min_count: Keep only tokens seen at least this often in the training
            split (``char``/``word``); default 1 keeps all.
        vocab_size: Number of SentencePiece pieces (``subword``, required
            there; byte fallback needs more than 256 + 2).
        subword_model: SentencePiece algorithm, ``unigram`` or ``bpe``.
        subword_sample_chars: The subword model is trained on the first this
            many characters of the training split.
        cache_dir: Download and prepared-data cache (``prepared/`` in it);
            default ``$DIST_RNN_CACHE`` or ``~/.cache/dist-rnn``.
        random_offset: Start each training epoch at a seeded random offset in
            ``[0, num_steps)`` so truncation boundaries move between epochs.
        train_on_whole_text: Train on the whole text of a one-stream corpus
            instead of its ``split[0]`` part; validation and test are still
            the parts ``split`` gives, so they are text the model trained on.
            Only for reproducing setups that trained on a whole file (the
            classic char-rnn tutorials); their "validation" loss is not
            held out. Not with ``ptb`` or ``train_file``.
    """

    corpus: Literal["stdlib", "file", "tinyshakespeare", "ptb", "text8", "wikitext2", "wikitext103", "enwik8",
                    "lm1b"] = "stdlib"
    path: Optional[Union[str, list[str]]] = None
    train_file: Optional[str] = None
    valid_file: Optional[str] = None
    test_file: Optional[str] = None
    split: list[float] = field(default_factory=lambda: [0.9, 0.05, 0.05])
    level: Literal["char", "byte", "word", "subword"] = "char"
    max_chars: Optional[int] = None
    max_vocab: Optional[int] = None
    cache_dir: Optional[str] = None
    random_offset: bool = False
    min_count: int = 1
    vocab_size: Optional[int] = None
    subword_model: Literal["unigram", "bpe"] = "unigram"
    subword_sample_chars: int = 10_000_000
    train_on_whole_text: bool = False


@dataclass
class ModelConfig:
    """Embedding, stacked recurrent layers and the softmax projection.

    Attributes:
        cell: Recurrent cell of every layer: ``lstm``, ``gru`` (fused cuDNN on
            a GPU), ``ln_lstm``, ``ln_gru`` (layer-normalized) or ``rnn``.
        num_layers: Number of stacked recurrent layers.
        hidden_size: Units per recurrent layer.
        embedding_size: Width of the token embedding.
        dropout: Dropout rate on non-recurrent connections only: after the
            embedding, between layers and before the softmax (Zaremba et al.).
        recurrent_dropout: Variational dropout on the state fed to each
            layer's recurrent matmul, one mask per sequence drawn from (step
            seed, layer, global row), for every cell; on ``lstm``/``gru`` it
            rules out cuDNN (dist-rnn's fused recurrence runs instead).
        tie_embeddings: Share the input embedding with the output layer (for
            ``adaptive``: each cluster's rows). When the last layer's width
            (``projection_size`` or ``hidden_size``) differs from
            ``embedding_size``, a learned projection to ``embedding_size``
            comes first.
        cudnn: ``auto`` uses the fused kernel where eligible, ``require`` fails
            before training unless every layer can use it (and builds them with
            Keras' ``use_cudnn=True``), ``off`` forces dist-rnn's fused
            recurrence (the CPU path) even on a GPU. ``train.jit_compile``,
            ``mixed_bfloat16`` and ``dist-rnn export`` also use the fused recurrence
            (``require`` is refused with the first two).
        init_scale: If set, initialize every weight uniformly in
            ``[-init_scale, init_scale]`` (the PTB recipe); else Keras defaults.
            Either way each weight draws its own values, fixed by ``train.seed``.
        initializer: Starting weights when ``init_scale`` is not set.
            ``keras`` (default): Keras' defaults (Glorot-uniform input kernels
            and projection, orthogonal recurrent kernels, embedding uniform in
            +-0.05, zero biases, LSTM forget bias 1). ``unit_scaling``: the
            default of ``tf.get_variable`` before TensorFlow 1.0, which the
            classic char-rnn tutorials relied on: every matrix uniform in
            ``+-sqrt(3 / fan_in)``, fan_in being its rows. The embedding's
            fan_in is the vocabulary size and the projection's
            ``hidden_size``; a recurrent layer's input and recurrent kernels
            are the two parts of the tutorials' single matrix over the
            concatenated ``[input, state]``, so both use fan_in = input width
            + ``hidden_size``. GRU update and reset gates start with bias 1.0
            (``ln_gru``: their layer-norm shifts), as TensorFlow's old
            ``GRUCell``; other biases and layer-norm parameters keep their
            starts. Each weight draws its own values, fixed by ``train.seed``;
            the kernel choice (cuDNN or not) does not depend on it.
        weight_drop: AWD-LSTM regularizer: DropConnect rate on each layer's
            recurrent kernel, one mask per training step applied to the
            weights (scaled by ``1 / (1 - rate)``), the same for every time
            step and row; ``lstm``/``gru`` keep their kernel (cuDNN or the
            fused recurrence). Default 0 (off).
        embedding_dropout: AWD-LSTM regularizer: fraction of word types
            (rows of the embedding matrix) dropped at each training step,
            kept rows scaled by ``1 / (1 - rate)``; a tied output projection
            keeps every row. Default 0 (off).
        dropout_input: Locked (variational) dropout on the embedding output:
            one mask per sequence row, shared across the window's time
            steps. Default 0 (off).
        dropout_hidden: Locked dropout between recurrent layers. Default 0.
        dropout_output: Locked dropout on the last layer's output, before
            the projection. Default 0. All these masks are drawn from (seed,
            step, site, global row), so resume is exact and every replica
            layout drops the same units; ``dropout`` (per time step) still
            applies on top when set.
        output: The output layer. ``softmax``: full float32 logits.
            ``sampled``: sampled softmax in training (``num_sampled``
            candidates per step from a log-uniform (Zipfian) sampler over the
            frequency-sorted ids, drawn with replacement from the step seed,
            accidental hits removed), the exact full softmax in evaluation and
            generation; same weights as ``softmax``. ``adaptive``: adaptive
            softmax (Grave et al. 2017) with ``cutoffs`` and ``div_value``,
            exact normalized log-probabilities everywhere.
        num_sampled: Candidates per training step of ``sampled`` (shared by
            every token of the global batch); below the vocabulary size.
        cutoffs: ``adaptive``: increasing ids where the head ends and each tail
            cluster starts, each below the vocabulary size, e.g.
            ``[20000, 40000, 200000]``.
        div_value: ``adaptive``: tail cluster ``i`` (from 1) projects to
            ``width / div_value ** i`` dimensions (at least 1).
        projection_size: ``lstm`` only: LSTM with a recurrent projection (Sak
            et al. 2014); the carried and emitted state ``h`` has this width,
            the cell state ``hidden_size``. ``null``: none.
    """

    cell: Literal["lstm", "gru", "ln_lstm", "ln_gru", "rnn"] = "lstm"
    num_layers: int = 2
    hidden_size: int = 256
    embedding_size: int = 256
    dropout: float = 0.0
    recurrent_dropout: float = 0.0
    tie_embeddings: bool = False
    cudnn: Literal["auto", "require", "off"] = "auto"
    init_scale: Optional[float] = None
    initializer: Literal["keras", "unit_scaling"] = "keras"
    # AWD-LSTM regularizers (issue #19), all off by default.
    weight_drop: float = 0.0
    embedding_dropout: float = 0.0
    dropout_input: float = 0.0
    dropout_hidden: float = 0.0
    dropout_output: float = 0.0
    output: Literal["softmax", "sampled", "adaptive"] = "softmax"
    num_sampled: int = 8192
    cutoffs: list[int] = field(default_factory=list)
    div_value: float = 4.0
    projection_size: Optional[int] = None


@dataclass
class ScheduleConfig:
    """Learning-rate schedule.

    Attributes:
        name: ``constant``; ``exponential`` (``lr * decay_rate ** (step /
            decay_steps)``, floored with ``staircase``); ``epoch`` (``lr *
            decay_rate ** max(epoch - decay_start_epoch, 0)`` with epochs
            counted from 1, the PTB recipe); ``cosine`` (linear warmup over
            ``warmup_steps`` then cosine to ``min_learning_rate`` at
            ``total_steps``); ``plateau`` (``lr * factor ** n`` after the
            ``n``-th run of ``patience`` evaluations in a row without a new
            lowest validation loss; the count is saved in checkpoints).
        decay_rate: Multiplicative decay factor.
        decay_steps: Steps per decay period (``exponential``).
        staircase: Decay in discrete jumps (``exponential``).
        decay_start_epoch: Last epoch at the full rate (``epoch``).
        warmup_steps: Linear warmup steps (``cosine``; and the linear scaling
            rule's warmup when ``optimizer.scale_lr_with_replicas`` is on).
        total_steps: Step at which cosine reaches its floor; ``null``
            (default): the run's length (``train.max_steps``, or the steps
            of ``train.max_epochs`` epochs if that ends first). A run shorter
            than ``warmup_steps`` just ends during the warmup.
        min_learning_rate: Cosine floor.
        factor: Multiplier of the rate at each ``plateau`` decay, in (0, 1).
        patience: Evaluations in a row without a new lowest validation loss
            before a ``plateau`` decay (the count restarts after each decay).
    """

    name: Literal["constant", "exponential", "epoch", "cosine", "plateau"] = "constant"
    decay_rate: float = 0.1
    decay_steps: int = 1000
    staircase: bool = True
    decay_start_epoch: int = 1
    warmup_steps: int = 0
    total_steps: Optional[int] = None
    min_learning_rate: float = 0.0
    # Plateau decay (issue #19).
    factor: float = 0.1
    patience: int = 1


@dataclass
class OptimizerConfig:
    """Optimizer, clipping and schedule.

    Attributes:
        name: ``sgd``, ``adam``, ``adamw``, ``rmsprop``, ``adagrad`` or
            ``ntasgd`` (non-monotonically triggered averaged SGD, Merity et
            al. 2017: plain SGD until an evaluation's validation loss is above
            the lowest of the evaluations before the last ``nonmono``, then
            SGD whose evaluated, best-checkpointed, sampled and exported
            weights are the average of every iterate since the switch).
        learning_rate: Base learning rate.
        momentum: Momentum (``sgd``, ``rmsprop``).
        beta_1: Adam/AdamW first-moment decay.
        beta_2: Adam/AdamW second-moment decay.
        epsilon: Numerical epsilon of adaptive optimizers.
        weight_decay: With ``adamw``: its decoupled weight decay. With any
            other optimizer: L2 regularization as AWD-LSTM uses it (PyTorch's
            ``weight_decay``): ``weight_decay * w`` is added to every
            weight's gradient after the all-reduce and the clip, right before
            the update, so neither the logged ``grad_norm`` nor the clip
            includes it. Default 0 (off).
        clip_norm: Clip the all-reduced gradient to this global norm; 0 is off.
        scale_lr_with_replicas: Multiply the learning rate by the replica count
            (linear scaling rule), ramped up over ``schedule.warmup_steps``.
        schedule: Learning-rate schedule.
        nonmono: ``ntasgd``: how many of the latest evaluations the switch
            test leaves out of the minimum it compares with.
        ema_decay: Keep an exponential moving average of the weights
            (``avg = d * avg + (1 - d) * weights`` after the n-th applied
            step, ``d = min(ema_decay, (1 + n) / (10 + n))``, starting from
            the weights after the first step) and evaluate,
            checkpoint as best, sample and export it; 0 (default) is off. The
            raw weights stay in the checkpoints for resume. Not with ``ntasgd``.
    """

    name: Literal["sgd", "adam", "adamw", "rmsprop", "adagrad", "ntasgd"] = "adam"
    learning_rate: float = 0.002
    momentum: float = 0.0
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7
    weight_decay: float = 0.0
    clip_norm: float = 5.0
    scale_lr_with_replicas: bool = False
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # Weight averaging (issue #19).
    nonmono: int = 5
    ema_decay: float = 0.0


@dataclass
class LossScaleConfig:
    """Dynamic loss scaling for ``mixed_float16``.

    Attributes:
        initial: Starting loss scale.
        growth_interval: Finite steps in a row before the scale doubles.
        backoff: Factor applied to the scale after a non-finite step.
        max_scale: Upper bound on the scale.
    """

    initial: float = 32768.0
    growth_interval: int = 2000
    backoff: float = 0.5
    max_scale: float = 2.0**24


@dataclass
class EarlyStoppingConfig:
    """Stop training when the validation loss stops improving.

    Attributes:
        patience: Stop after this many evaluations in a row whose validation
            loss is not below the lowest so far by more than ``min_delta``
            (0: off). The count is saved in checkpoints, so a resumed run
            continues it. The run then ends as at its last step (checkpoint,
            final evaluation).
        min_delta: The improvement (nats) a validation loss must make on the
            lowest so far to restart the count.
    """

    patience: int = 0
    min_delta: float = 0.0


@dataclass
class TrainConfig:
    """Batching, length of training, precision and evaluation cadence.

    Attributes:
        batch_size: Global batch (rows of the token stream) across all
            replicas; must divide by the replica count.
        num_steps: Truncated-BPTT length (tokens per row per batch).
        max_steps: Stop after this many optimizer steps (``null``: no limit).
        max_epochs: Stop after this many epochs (``null``: no limit). At
            least one of ``max_steps`` and ``max_epochs`` must be set.
        seed: Seed of weights, dropout and data offsets.
        eval_every: Evaluate on the validation split every N steps (0: only
            at the end).
        eval_batch_size: Rows of the evaluation stream; default ``batch_size``.
        log_every: One log line (and metrics.jsonl line) every N steps; with
            several workers also how often they agree on a stop signal.
        precision: ``float32``, ``mixed_float16`` or ``mixed_bfloat16``.
        loss_scale: Dynamic loss scaling (``mixed_float16`` only).
        jit_compile: Compile the train step with XLA (``lstm``/``gru`` then
            run dist-rnn's fused recurrence, not cuDNN, also on a GPU).
        deterministic: Turn on TensorFlow op determinism.
        sample_length: Characters/words of the sample generated at each
            evaluation and at the end (0: none).
        sample_prime: Prime text of that sample (empty: a newline).
        loss_normalization: What the training objective averages over.
            ``token`` (default): the mean cross-entropy over every token of
            the global batch. ``sequence``: summed over the ``num_steps``
            time steps of a row and averaged over the rows, as the TensorFlow
            PTB tutorial (Zaremba et al.) does; its gradient, hence the
            logged ``grad_norm`` and what ``clip_norm`` and the learning rate
            act on, is ``num_steps`` times larger. The logged loss is nats
            per token either way.
        max_consecutive_skips: Stop the run with an error (exit code 1,
            naming the last good checkpoint) after this many optimizer steps
            in a row were skipped for a non-finite gradient, in any precision.
        ar: Activation regularization (AWD-LSTM): adds ``ar * mean(h ** 2)``
            of the last layer's dropped output to the training objective.
            Logged as ``ar_loss``; not in the logged or evaluated loss.
            Default 0 (off).
        tar: Temporal activation regularization: adds ``tar * mean((h_t -
            h_{t-1}) ** 2)`` of the last layer's output before dropout, within
            each window. Logged as ``tar_loss``. Default 0 (off).
        accumulate_steps: Process each replica's rows as this many row blocks
            in sequence (each with its own rows' carried state), summing their
            gradients before the one all-reduce, clip and apply of the step:
            the same update as without accumulation (up to float32 summation
            order) with a k-th of the activation memory. Must divide the rows
            per replica (``batch_size`` / replicas).
        early_stopping: Stop on a validation plateau (off by default).
        variable_length: AWD-LSTM's variable-length BPTT (default false):
            each step's window is ``num_steps`` tokens with probability 0.95,
            else ``num_steps / 2``, plus a normal jitter of standard deviation
            5, truncated, at least 5 and at most ``num_steps + 20`` tokens
            (see :mod:`dist_rnn.data.variable_length`), drawn from
            (``seed``, step) so every replica agrees; the step's learning
            rate (the logged ``learning_rate`` too) is scaled by ``length /
            num_steps``. The windows tile each row; the epoch's last one is
            cut to the tokens left. Needs ``loss_normalization: token`` and
            ``num_steps >= 5``; may be switched only at an epoch's start. With
            ``jit_compile`` XLA compiles once per distinct length.
    """

    batch_size: int = 32
    num_steps: int = 100
    max_steps: Optional[int] = None
    max_epochs: Optional[int] = 1
    seed: int = 0
    eval_every: int = 0
    eval_batch_size: Optional[int] = None
    log_every: int = 50
    precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = "float32"
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)
    jit_compile: bool = False
    deterministic: bool = False
    sample_length: int = 200
    sample_prime: str = ""
    loss_normalization: Literal["token", "sequence"] = "token"
    max_consecutive_skips: int = 20
    # AWD-LSTM activation regularizers (issue #19), off by default.
    ar: float = 0.0
    tar: float = 0.0
    # Accumulation and early stopping (issue #19).
    accumulate_steps: int = 1
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    # Variable-length BPTT (issue #19).
    variable_length: bool = False


@dataclass
class CheckpointConfig:
    """Checkpoint cadence and retention.

    Attributes:
        every_steps: Save every N steps (and always at the end); 0 saves only
            at the end.
        every_seconds: Also save when this many seconds passed since the last
            save (0: off), so the work a lost worker costs is bounded in time
            whatever the step speed. The chief's clock decides and all workers
            agree on the step, at the cadence of the stop check (every step on
            one process, every ``train.log_every`` steps on several).
        keep: Rolling checkpoints kept in ``RUN_DIR/checkpoints``.
        fallback: On a corrupt latest checkpoint, resume from the previous
            good one instead of failing.
    """

    every_steps: int = 1000
    every_seconds: float = 0.0
    keep: int = 3
    fallback: bool = False


@dataclass
class DistributeConfig:
    """Where the replicas are.

    Attributes:
        backend: ``none`` (one device), ``mirrored`` (all GPUs of this host, or
            ``cpu_devices`` logical CPUs), ``multiworker`` (from ``TF_CONFIG``)
            or ``horovod``.
        cpu_devices: Logical CPU devices for ``mirrored`` on a host without
            GPUs (0: use the GPUs).
        timeout_seconds: ``multiworker``: heartbeat timeout of the
            coordination service; a worker silent this long is declared lost
            and the others' collectives fail instead of hanging (a worker that
            exits is noticed at once). Not a per-collective timeout: that
            starts threads for every collective.
    """

    backend: Literal["none", "mirrored", "multiworker", "horovod"] = "none"
    cpu_devices: int = 0
    timeout_seconds: float = 300.0


@dataclass
class LoggingConfig:
    """Terminal and TensorBoard output.

    Attributes:
        tensorboard: Write TensorBoard event files under ``RUN_DIR``.
        progress: Progress bar: ``auto`` (only on a terminal), ``on``, ``off``.
        profile_steps: ``[first, last]`` steps to trace with the TensorFlow
            profiler into ``RUN_DIR/train``; empty for none.
        histograms_every: Weight and gradient histograms every N steps (0: off).
    """

    tensorboard: bool = True
    progress: Literal["auto", "on", "off"] = "auto"
    profile_steps: list[int] = field(default_factory=list)
    histograms_every: int = 0


@dataclass
class Config:
    """A whole run: every section of the YAML file."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distribute: DistributeConfig = field(default_factory=DistributeConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as nested plain dicts (YAML-ready)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """Returns the config as YAML text."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Keys a resume may not change: they define the model's shape, its vocabulary,
# the optimizer's state or the meaning of the saved data position and carried
# state. Where the data is read from (``data.path``, ``data.train_file``, ...)
# is not among them: a resume compares the data's text instead (see
# ``dist_rnn.app.check_same_data``). Everything else (schedule, logging,
# cadence, backend, replica count and precision) may change; the
# EPOCH_INVARIANT_KEYS only at an epoch boundary.
RESUME_INVARIANT_KEYS = (
    "optimizer.name",
    "data.corpus", "data.split", "data.level",
    "data.max_chars", "data.max_vocab", "data.train_on_whole_text",
    "data.min_count", "data.vocab_size", "data.subword_model", "data.subword_sample_chars",
    "model.cell", "model.num_layers", "model.hidden_size",
    "model.embedding_size", "model.tie_embeddings",
    "train.batch_size", "train.num_steps",
    "model.output", "model.cutoffs", "model.div_value", "model.projection_size",
)

# Resume-invariant keys added after runs were written: a run's fingerprint
# covers them only where they differ from these defaults, so checkpoints of
# runs without them keep their fingerprint.
LATER_INVARIANT_DEFAULTS = {"model.output": "softmax", "model.cutoffs": [], "model.div_value": 4.0,
                            "model.projection_size": None}

# Keys a resume may change only at an epoch boundary: with
# ``data.random_offset`` they decide where the current epoch's windows start,
# so a change in the middle of an epoch would shift the windows under the
# carried state.
EPOCH_INVARIANT_KEYS = ("train.seed", "data.random_offset")

# Keys that say where the data is read from: ``eval`` and ``generate`` may
# override them (``--set data.path=...``) for a run whose data moved.
DATA_LOCATION_KEYS = ("data.path", "data.train_file", "data.valid_file", "data.test_file", "data.cache_dir")


def resume_invariant_differences(old: Config, new: Config) -> list[str]:
    """Lists ``key: old -> new`` for the :data:`RESUME_INVARIANT_KEYS` that differ."""
    old_d, new_d = flatten(old.to_dict()), flatten(new.to_dict())
    return [f"{key}: {old_d.get(key)!r} -> {new_d.get(key)!r}" for key in RESUME_INVARIANT_KEYS
            if old_d.get(key) != new_d.get(key)]


def resume_invariant_values(config: Config) -> dict[str, Any]:
    """The :data:`RESUME_INVARIANT_KEYS` of ``config`` that a checkpoint's fingerprint covers."""
    flat = flatten(config.to_dict())
    return {k: flat[k] for k in RESUME_INVARIANT_KEYS
            if k not in LATER_INVARIANT_DEFAULTS or flat[k] != LATER_INVARIANT_DEFAULTS[k]}


def changed_keys(old: Config, new: Config) -> list[str]:
    """Lists ``key: old -> new`` for every key that differs."""
    old_d, new_d = flatten(old.to_dict()), flatten(new.to_dict())
    return [f"{k}: {old_d.get(k)!r} -> {new_d.get(k)!r}" for k in sorted(set(old_d) | set(new_d))
            if old_d.get(k) != new_d.get(k)]


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Flattens nested dicts to dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
