"""Typed, validated run configuration.

A run is described by YAML files merged left to right (rightmost wins) and
``--set section.key=value`` overrides (value parsed as YAML). The merged mapping
is checked against the dataclasses below: unknown keys (with the closest valid
key), wrong types and invalid values raise :class:`~dist_rnn.errors.UserError`
before anything runs. The resolved config is saved as ``RUN_DIR/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from dist_rnn.errors import UserError

CORPORA = ("stdlib", "file", "tinyshakespeare", "ptb", "text8")
CELLS = ("lstm", "gru", "ln_lstm", "ln_gru", "rnn")
# Cells whose recurrent state is (h, c) rather than h alone.
TWO_STATE_CELLS = ("lstm", "ln_lstm")


@dataclass
class DataConfig:
    """Where the text comes from and how it is tokenized.

    Attributes:
        corpus: ``stdlib`` (the running Python's standard library source, the
            embedded default), ``file`` (UTF-8 text files), ``tinyshakespeare``,
            ``ptb`` or ``text8`` (downloaded once into ``cache_dir`` unless
            ``path`` points at a local copy).
        path: A file or list of files (``file``, ``tinyshakespeare``, ``text8``)
            or a folder with ``ptb.{train,valid,test}.txt`` (``ptb``); refused
            with ``stdlib`` and together with ``train_file``. A resumed run may
            read its data from another path if the text is the same.
        train_file: Explicit training file; with ``valid_file``/``test_file``
            replaces the corpus and its fractional split.
        valid_file: Explicit validation file (needs ``train_file``).
        test_file: Explicit test file (needs ``train_file``).
        split: Train/valid/test fractions of the token stream when the corpus
            is one stream (``stdlib``, ``file``, ``tinyshakespeare``, ``text8``).
        level: ``char`` or ``word`` tokens. Word level splits on whitespace and
            turns each newline into ``<eos>``.
        max_chars: Read at most this many characters of the corpus (``stdlib``
            and ``file``); ``null`` reads everything.
        max_vocab: Keep the most frequent tokens of the training split, mapping
            the rest to ``<unk>``; ``null`` keeps all.
        cache_dir: Download cache; default ``$DIST_RNN_CACHE`` or
            ``~/.cache/dist-rnn``.
        random_offset: Start each training epoch at a seeded random offset in
            ``[0, num_steps)`` so truncation boundaries move between epochs.
    """

    corpus: Literal["stdlib", "file", "tinyshakespeare", "ptb", "text8"] = "stdlib"
    path: Optional[Union[str, list[str]]] = None
    train_file: Optional[str] = None
    valid_file: Optional[str] = None
    test_file: Optional[str] = None
    split: list[float] = field(default_factory=lambda: [0.9, 0.05, 0.05])
    level: Literal["char", "word"] = "char"
    max_chars: Optional[int] = None
    max_vocab: Optional[int] = None
    cache_dir: Optional[str] = None
    random_offset: bool = False


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
            ``total_steps``).
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
    """

    name: Literal["constant", "exponential", "epoch", "cosine"] = "constant"
    decay_rate: float = 0.1
    decay_steps: int = 1000
    staircase: bool = True
    decay_start_epoch: int = 1
    warmup_steps: int = 0
    total_steps: Optional[int] = None
    min_learning_rate: float = 0.0


@dataclass
class OptimizerConfig:
    """Optimizer, clipping and schedule.

    Attributes:
        name: ``sgd``, ``adam``, ``adamw``, ``rmsprop`` or ``adagrad``.
        learning_rate: Base learning rate.
        momentum: Momentum (``sgd``, ``rmsprop``).
        beta_1: Adam/AdamW first-moment decay.
        beta_2: Adam/AdamW second-moment decay.
        epsilon: Numerical epsilon of adaptive optimizers.
        weight_decay: Decoupled weight decay (``adamw``).
        clip_norm: Clip the all-reduced gradient to this global norm; 0 is off.
        scale_lr_with_replicas: Multiply the learning rate by the replica count
            (linear scaling rule), ramped up over ``schedule.warmup_steps``.
        schedule: Learning-rate schedule.
    """

    name: Literal["sgd", "adam", "adamw", "rmsprop", "adagrad"] = "adam"
    learning_rate: float = 0.002
    momentum: float = 0.0
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7
    weight_decay: float = 0.0
    clip_norm: float = 5.0
    scale_lr_with_replicas: bool = False
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


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


@dataclass
class CheckpointConfig:
    """Checkpoint cadence and retention.

    Attributes:
        every_steps: Save every N steps (and always at the end); 0 saves only
            at the end.
        keep: Rolling checkpoints kept in ``RUN_DIR/checkpoints``.
        fallback: On a corrupt latest checkpoint, resume from the previous
            good one instead of failing.
    """

    every_steps: int = 1000
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
    "data.max_chars", "data.max_vocab",
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


def resume_invariant_values(config: "Config") -> dict[str, Any]:
    """The :data:`RESUME_INVARIANT_KEYS` of ``config`` that a checkpoint's fingerprint covers."""
    flat = flatten(config.to_dict())
    return {k: flat[k] for k in RESUME_INVARIANT_KEYS
            if k not in LATER_INVARIANT_DEFAULTS or flat[k] != LATER_INVARIANT_DEFAULTS[k]}

# Keys a resume may change only at an epoch boundary: with
# ``data.random_offset`` they decide where the current epoch's windows start,
# so a change in the middle of an epoch would shift the windows under the
# carried state.
EPOCH_INVARIANT_KEYS = ("train.seed", "data.random_offset")

# Keys that say where the data is read from: ``eval`` and ``generate`` may
# override them (``--set data.path=...``) for a run whose data moved.
DATA_LOCATION_KEYS = ("data.path", "data.train_file", "data.valid_file", "data.test_file", "data.cache_dir")


# --------------------------------------------------------------------------
# Loading and merging


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` (no dot) as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+][0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: str):
    """Parses YAML text with :class:`_Loader`."""
    return yaml.load(text, Loader=_Loader)


def _read_yaml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        loaded = yaml_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}: invalid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
    return loaded


def _merge_into(target: dict, source: dict, origin: str, provenance: dict, prefix: str = "") -> None:
    for key, value in source.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge_into(target[key], value, origin, provenance, dotted + ".")
        else:
            target[key] = value
            _record(provenance, dotted, value, origin)


def _record(provenance: dict, dotted: str, value: Any, origin: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _record(provenance, f"{dotted}.{k}", v, origin)
    else:
        provenance[dotted] = origin


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parses one ``--set section.key=value`` override.

    Args:
        text: ``dotted.key=value``; the value is parsed as YAML.

    Returns:
        The key path and the parsed value.

    Raises:
        UserError: If the text has no ``=`` or the value is not valid YAML.
    """
    if "=" not in text:
        raise UserError(f"--set {text}: expected KEY=VALUE, e.g. --set train.batch_size=64")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"--set {text}: empty key")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise UserError(f"--set {text}: value is not valid YAML") from None
    return key.split("."), value


def load_config(paths: list[str] = (), overrides: list[str] = (), base: dict | None = None) -> Config:
    """Merges YAML files and overrides into a validated :class:`Config`.

    Args:
        paths: YAML files, merged left to right (rightmost wins).
        overrides: ``section.key=value`` strings applied after the files.
        base: A mapping applied before the files (e.g. a saved run config).

    Returns:
        The validated config.

    Raises:
        UserError: On a missing or malformed file, an unknown key, a wrong type
            or an invalid value. The message names the key and its source.
    """
    merged: dict[str, Any] = {}
    provenance: dict[str, str] = {}
    if base:
        _merge_into(merged, base, "saved run config", provenance)
    for path in paths:
        _merge_into(merged, _read_yaml(path), path, provenance)
    for text in overrides:
        keys, value = parse_override(text)
        node = merged
        for k in keys[:-1]:
            child = node.get(k)
            if not isinstance(child, dict):
                child = {}
                node[k] = child
            node = child
        if isinstance(value, dict) and isinstance(node.get(keys[-1]), dict):
            # `--set train={max_steps: 10}` merges into the section, like a file.
            _merge_into(node[keys[-1]], value, "--set", provenance, ".".join(keys) + ".")
        else:
            node[keys[-1]] = value
            _record(provenance, ".".join(keys), value, "--set")
    config = _build(Config, merged, "", provenance)
    try:
        validate(config)
    except _InvalidValue as e:
        raise UserError(f"{e}{_where(e.key, provenance)}") from None
    return config


def config_from_dict(data: dict[str, Any]) -> Config:
    """Builds and validates a config from nested dicts (e.g. a saved run)."""
    config = _build(Config, data, "", {})
    validate(config)
    return config


def save_config(config: Config, path: Path) -> None:
    """Writes the resolved config as YAML."""
    path.write_text(config.to_yaml(), encoding="utf-8")


# --------------------------------------------------------------------------
# Type checking


def _where(dotted: str, provenance: dict) -> str:
    origin = provenance.get(dotted)
    return f" (from {origin})" if origin else ""


def _build(cls, data: Any, prefix: str, provenance: dict):
    section = prefix.rstrip(".") or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{section}: expected a mapping of keys, got {data!r}{_where(section, provenance)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            dotted = f"{prefix}{key}"
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid keys: {', '.join(names)})"
            raise UserError(f"unknown config key '{dotted}'{hint}{_where(dotted, provenance)}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        dotted = f"{prefix}{name}"
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, data[name], dotted + ".", provenance)
        else:
            kwargs[name] = _coerce(data[name], hint, dotted, provenance)
    return cls(**kwargs)


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is list:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint, dotted: str, provenance: dict) -> Any:
    result = _try_coerce(value, hint)
    if result is _NO_MATCH:
        origin = typing.get_origin(hint)
        if origin is Literal:
            choices = [str(a) for a in typing.get_args(hint)]
            close = difflib.get_close_matches(str(value), choices, n=1)
            suggestion = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(
                f"config key '{dotted}': {value!r} is not one of {', '.join(choices)}{suggestion}"
                f"{_where(dotted, provenance)}")
        raise UserError(
            f"config key '{dotted}': expected {_type_name(hint)}, got {value!r}{_where(dotted, provenance)}")
    return result


_NO_MATCH = object()


def _try_coerce(value: Any, hint) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(hint):
            result = _try_coerce(value, arg)
            if result is not _NO_MATCH:
                return result
        return _NO_MATCH
    if origin is Literal:
        choices = typing.get_args(hint)
        if isinstance(value, bool):
            # YAML 1.1 reads a bare `off`/`on` as false/true: map it back.
            word = "on" if value else "off"
            return word if word in choices else _NO_MATCH
        return value if value in choices else _NO_MATCH
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return _NO_MATCH
        (item_hint,) = typing.get_args(hint)
        items = [_try_coerce(v, item_hint) for v in value]
        return _NO_MATCH if any(i is _NO_MATCH for i in items) else items
    if hint is type(None):
        return None if value is None else _NO_MATCH
    if hint is bool:
        return value if isinstance(value, bool) else _NO_MATCH
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO_MATCH
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return _NO_MATCH
        return float(value)
    if hint is str:
        return value if isinstance(value, str) else _NO_MATCH
    raise TypeError(f"unsupported config type {hint}")


# --------------------------------------------------------------------------
# Value checks


class _InvalidValue(UserError):
    """A value check failed; ``key`` lets the loader add where the value came from."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config key '{key}': {message}")
        self.key = key


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise _InvalidValue(key, message)


def validate(config: Config) -> None:
    """Checks values and cross-field constraints that types cannot express.

    Args:
        config: The config to check.

    Raises:
        UserError: Naming the first offending key.
    """
    d, m, o, s, t = config.data, config.model, config.optimizer, config.optimizer.schedule, config.train
    _require(len(d.split) == 3 and all(0 <= f <= 1 for f in d.split) and math.isclose(sum(d.split), 1.0, abs_tol=1e-6)
             and d.split[0] > 0, "data.split", f"expected three fractions [train, valid, test] summing to 1 with train > 0, got {d.split}")
    _require(d.max_chars is None or d.max_chars > 0, "data.max_chars", f"must be positive, got {d.max_chars}")
    _require(d.max_vocab is None or d.max_vocab >= 2, "data.max_vocab", f"must be at least 2, got {d.max_vocab}")
    _require(d.corpus != "file" or d.path is not None or d.train_file is not None, "data.path",
             "corpus 'file' needs data.path (or data.train_file/valid_file/test_file)")
    _require(d.corpus != "ptb" or d.level == "word", "data.level", "the ptb corpus is word level")
    # Keys that would be silently ignored are refused.
    _require(d.path is None or d.corpus != "stdlib", "data.path",
             "data.corpus 'stdlib' reads no file; set data.corpus (file, tinyshakespeare, ptb or text8) "
             "to read data.path")
    _require(d.path is None or d.train_file is None, "data.path",
             "data.path and data.train_file are both set; data.train_file (with valid_file/test_file) "
             "replaces data.path: set one of them")
    for key, value in (("data.valid_file", d.valid_file), ("data.test_file", d.test_file)):
        _require(value is None or d.train_file is not None, key,
                 f"{key} needs data.train_file (without it the splits come from data.corpus and {key} is unused)")
    _require(m.num_layers >= 1, "model.num_layers", f"must be at least 1, got {m.num_layers}")
    _require(m.hidden_size >= 1, "model.hidden_size", f"must be positive, got {m.hidden_size}")
    _require(m.embedding_size >= 1, "model.embedding_size", f"must be positive, got {m.embedding_size}")
    _require(0 <= m.dropout < 1, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    _require(0 <= m.recurrent_dropout < 1, "model.recurrent_dropout", f"must be in [0, 1), got {m.recurrent_dropout}")
    _validate_output(m, t)
    _require(m.init_scale is None or m.init_scale > 0, "model.init_scale", f"must be positive, got {m.init_scale}")
    _require(o.learning_rate > 0, "optimizer.learning_rate", f"must be positive, got {o.learning_rate}")
    _require(o.clip_norm >= 0, "optimizer.clip_norm", f"must be >= 0 (0 turns clipping off), got {o.clip_norm}")
    _require(0 <= o.momentum < 1, "optimizer.momentum", f"must be in [0, 1), got {o.momentum}")
    _require(0 < o.beta_1 < 1, "optimizer.beta_1", f"must be in (0, 1), got {o.beta_1}")
    _require(0 < o.beta_2 < 1, "optimizer.beta_2", f"must be in (0, 1), got {o.beta_2}")
    _require(o.epsilon > 0, "optimizer.epsilon", f"must be positive, got {o.epsilon}")
    _require(o.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _require(o.weight_decay == 0 or o.name == "adamw", "optimizer.weight_decay", "only optimizer.name 'adamw' has decoupled weight decay")
    _require(s.decay_rate > 0, "optimizer.schedule.decay_rate", f"must be positive, got {s.decay_rate}")
    _require(s.decay_steps >= 1, "optimizer.schedule.decay_steps", f"must be at least 1, got {s.decay_steps}")
    _require(s.decay_start_epoch >= 0, "optimizer.schedule.decay_start_epoch", f"must be >= 0, got {s.decay_start_epoch}")
    _require(s.warmup_steps >= 0, "optimizer.schedule.warmup_steps", f"must be >= 0, got {s.warmup_steps}")
    _require(s.min_learning_rate >= 0, "optimizer.schedule.min_learning_rate", f"must be >= 0, got {s.min_learning_rate}")
    _require(s.total_steps is None or s.total_steps >= 1, "optimizer.schedule.total_steps",
             f"must be at least 1 (null: the run's length), got {s.total_steps}")
    # Only a horizon the user wrote is checked against the warmup: the default
    # one (the run's length) may be shorter, and such a run just ends in the warmup.
    _require(s.name != "cosine" or s.total_steps is None or s.total_steps > s.warmup_steps,
             "optimizer.schedule.total_steps",
             f"must exceed optimizer.schedule.warmup_steps ({s.warmup_steps}), got {s.total_steps}")
    _require(m.cudnn != "require" or not t.jit_compile, "model.cudnn",
             "'require' conflicts with train.jit_compile: true (XLA cannot compile the cuDNN kernel); "
             "set model.cudnn to auto or train.jit_compile to false")
    _require(m.cudnn != "require" or t.precision != "mixed_bfloat16", "model.cudnn",
             "'require' conflicts with train.precision: mixed_bfloat16 (lstm/gru run the fused recurrence "
             "in bfloat16: no documented cuDNN bfloat16 RNN); set model.cudnn to auto or another precision")
    _require(t.batch_size >= 1, "train.batch_size", f"must be positive, got {t.batch_size}")
    _require(t.eval_batch_size is None or t.eval_batch_size >= 1, "train.eval_batch_size", f"must be positive, got {t.eval_batch_size}")
    _require(t.num_steps >= 1, "train.num_steps", f"must be at least 1, got {t.num_steps}")
    _require(t.max_steps is None or t.max_steps >= 1, "train.max_steps", f"must be at least 1, got {t.max_steps}")
    _require(t.max_epochs is None or t.max_epochs >= 1, "train.max_epochs", f"must be at least 1, got {t.max_epochs}")
    _require(t.max_steps is not None or t.max_epochs is not None, "train.max_steps", "set train.max_steps or train.max_epochs")
    _require(t.eval_every >= 0, "train.eval_every", f"must be >= 0, got {t.eval_every}")
    _require(t.log_every >= 1, "train.log_every", f"must be at least 1, got {t.log_every}")
    _require(t.sample_length >= 0, "train.sample_length", f"must be >= 0, got {t.sample_length}")
    _require(t.max_consecutive_skips >= 1, "train.max_consecutive_skips",
             f"must be at least 1, got {t.max_consecutive_skips}")
    ls = t.loss_scale
    _require(ls.initial >= 1, "train.loss_scale.initial", f"must be >= 1, got {ls.initial}")
    _require(ls.growth_interval >= 1, "train.loss_scale.growth_interval", f"must be at least 1, got {ls.growth_interval}")
    _require(0 < ls.backoff < 1, "train.loss_scale.backoff", f"must be in (0, 1), got {ls.backoff}")
    _require(ls.max_scale >= ls.initial, "train.loss_scale.max_scale", f"must be >= initial ({ls.initial}), got {ls.max_scale}")
    c = config.checkpoint
    _require(c.every_steps >= 0, "checkpoint.every_steps", f"must be >= 0, got {c.every_steps}")
    _require(c.keep >= 1, "checkpoint.keep", f"must be at least 1, got {c.keep}")
    dist = config.distribute
    _require(dist.cpu_devices >= 0, "distribute.cpu_devices", f"must be >= 0, got {dist.cpu_devices}")
    _require(dist.timeout_seconds > 0, "distribute.timeout_seconds", f"must be positive, got {dist.timeout_seconds}")
    _require(dist.cpu_devices == 0 or dist.backend == "mirrored", "distribute.cpu_devices", "only the mirrored backend uses logical CPU devices")
    if dist.backend == "mirrored" and dist.cpu_devices:
        check_divisible(config, dist.cpu_devices)
    lg = config.logging
    _require(lg.profile_steps == [] or (len(lg.profile_steps) == 2 and 1 <= lg.profile_steps[0] <= lg.profile_steps[1]),
             "logging.profile_steps", f"expected [first, last] with 1 <= first <= last, got {lg.profile_steps}")
    _require(lg.histograms_every >= 0, "logging.histograms_every", f"must be >= 0, got {lg.histograms_every}")


def _validate_output(m: ModelConfig, t: TrainConfig) -> None:
    """Checks the output-layer and projection keys that need no vocabulary (see :func:`check_output_vocab`)."""
    _require(m.num_sampled >= 1, "model.num_sampled", f"must be at least 1, got {m.num_sampled}")
    _require(m.div_value >= 1, "model.div_value", f"must be >= 1, got {m.div_value}")
    _require(all(isinstance(c, int) and not isinstance(c, bool) for c in m.cutoffs), "model.cutoffs",
             f"expected a list of integers, got {m.cutoffs}")
    _require(all(c > 0 for c in m.cutoffs) and all(a < b for a, b in zip(m.cutoffs, m.cutoffs[1:])), "model.cutoffs",
             f"must be positive and strictly increasing, got {m.cutoffs}")
    _require(m.output != "adaptive" or m.cutoffs, "model.cutoffs",
             "model.output 'adaptive' needs at least one cutoff, e.g. [2000, 10000]")
    _require(m.output == "adaptive" or not m.cutoffs, "model.cutoffs",
             f"only model.output 'adaptive' uses cutoffs (model.output is {m.output!r})")
    _require(m.output != "adaptive" or not t.jit_compile, "model.output",
             "'adaptive' conflicts with train.jit_compile: true (its clusters have data-dependent sizes, "
             "which XLA cannot compile); set train.jit_compile to false")
    _require(m.projection_size is None or m.projection_size >= 1, "model.projection_size",
             f"must be positive, got {m.projection_size}")
    _require(m.projection_size is None or m.cell == "lstm", "model.projection_size",
             f"only model.cell 'lstm' has a projection, got model.cell {m.cell!r}")


def check_output_vocab(m: ModelConfig, vocab_size: int) -> None:
    """Checks the output-layer keys against the vocabulary size, known once the data is read.

    Raises:
        UserError: Naming ``model.num_sampled`` or ``model.cutoffs``.
    """
    _require(m.output != "sampled" or m.num_sampled < vocab_size, "model.num_sampled",
             f"must be below the vocabulary size ({vocab_size}), got {m.num_sampled}")
    _require(m.output != "adaptive" or m.cutoffs[-1] < vocab_size, "model.cutoffs",
             f"must all be below the vocabulary size ({vocab_size}), got {m.cutoffs}")


def check_divisible(config: Config, num_replicas: int) -> None:
    """Checks that the global batches split evenly over the replicas.

    Raises:
        UserError: If ``train.batch_size`` (or ``eval_batch_size``) does not
            divide by ``num_replicas``.
    """
    t = config.train
    _require(t.batch_size % num_replicas == 0, "train.batch_size",
             f"global batch {t.batch_size} does not divide by the {num_replicas} replicas")
    eval_batch = t.eval_batch_size or t.batch_size
    _require(eval_batch % num_replicas == 0, "train.eval_batch_size",
             f"evaluation batch {eval_batch} does not divide by the {num_replicas} replicas")


def resume_invariant_differences(old: Config, new: Config) -> list[str]:
    """Lists ``key: old -> new`` for the :data:`RESUME_INVARIANT_KEYS` that differ."""
    old_d, new_d = flatten(old.to_dict()), flatten(new.to_dict())
    return [f"{key}: {old_d.get(key)!r} -> {new_d.get(key)!r}" for key in RESUME_INVARIANT_KEYS
            if old_d.get(key) != new_d.get(key)]


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
