"""Value checks of a run configuration: ranges and cross-key constraints that types cannot express.

Each failed check raises :class:`InvalidValue` naming the key; the loader adds
where the value came from (file or ``--set``).
"""

from __future__ import annotations

import math

from dist_rnn.config.schema import INITIALIZERS, Config, ModelConfig
from dist_rnn.errors import UserError


class InvalidValue(UserError):
    """A value check failed; ``key`` lets the loader add where the value came from."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config key '{key}': {message}")
        self.key = key


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise InvalidValue(key, message)



def validate(config: Config) -> None:
    """Checks values and cross-field constraints that types cannot express.

    Args:
        config: The config to check.

    Raises:
        UserError: Naming the first offending key.
    """
    _validate_data(config)
    _validate_model(config)
    _validate_optimizer(config)
    _validate_precision(config)
    _validate_train(config)
    _validate_checkpoint_and_distribute(config)
    _validate_logging(config)
    _validate_regularizers(config)
    _validate_training_recipe(config)


def _validate_data(config: Config) -> None:
    d = config.data
    _require(len(d.split) == 3 and all(0 <= f <= 1 for f in d.split) and math.isclose(sum(d.split), 1.0, abs_tol=1e-6)
             and d.split[0] > 0, "data.split", f"expected three fractions [train, valid, test] summing to 1 with train > 0, got {d.split}")
    _require(d.max_chars is None or d.max_chars > 0, "data.max_chars", f"must be positive, got {d.max_chars}")
    _require(d.max_vocab is None or d.max_vocab >= 2, "data.max_vocab", f"must be at least 2, got {d.max_vocab}")
    _require(d.corpus != "file" or d.path is not None or d.train_file is not None, "data.path",
             "corpus 'file' needs data.path (or data.train_file/valid_file/test_file)")
    _require(d.corpus != "ptb" or d.level == "word", "data.level", "the ptb corpus is word level")
    _require(d.corpus != "enwik8" or d.level == "byte", "data.level",
             "the enwik8 corpus is byte level (its standard split is in bytes)")
    _require(d.min_count >= 1, "data.min_count", f"must be at least 1, got {d.min_count}")
    _require(d.level == "subword" or d.vocab_size is None, "data.vocab_size",
             f"only data.level 'subword' uses it (level is {d.level!r}; char/word use data.max_vocab)")
    _require(d.level != "subword" or (d.vocab_size is not None and d.vocab_size > 258), "data.vocab_size",
             f"data.level 'subword' needs a vocab_size above 258 (256 byte pieces, <unk>, newline), got {d.vocab_size}")
    _require(d.level != "subword" or d.max_vocab is None, "data.max_vocab",
             "data.level 'subword' sizes its vocabulary by data.vocab_size")
    _require(d.subword_sample_chars >= 1, "data.subword_sample_chars", f"must be positive, got {d.subword_sample_chars}")
    # Keys that would be silently ignored are refused.
    _require(d.path is None or d.corpus != "stdlib", "data.path",
             "data.corpus 'stdlib' reads no file; set data.corpus (file or a built-in corpus: tinyshakespeare, "
             "ptb, text8, wikitext2, wikitext103, enwik8, lm1b) to read data.path")
    _require(d.path is None or d.train_file is None, "data.path",
             "data.path and data.train_file are both set; data.train_file (with valid_file/test_file) "
             "replaces data.path: set one of them")
    for key, value in (("data.valid_file", d.valid_file), ("data.test_file", d.test_file)):
        _require(value is None or d.train_file is not None, key,
                 f"{key} needs data.train_file (without it the splits come from data.corpus and {key} is unused)")
    _require(not d.train_on_whole_text or (d.corpus != "ptb" and d.train_file is None), "data.train_on_whole_text",
             "needs a one-stream corpus cut by data.split (stdlib, file, tinyshakespeare or text8), "
             "not data.corpus 'ptb' or data.train_file")


def _validate_model(config: Config) -> None:
    m = config.model
    _require(m.num_layers >= 1, "model.num_layers", f"must be at least 1, got {m.num_layers}")
    _require(m.hidden_size >= 1, "model.hidden_size", f"must be positive, got {m.hidden_size}")
    _require(m.embedding_size >= 1, "model.embedding_size", f"must be positive, got {m.embedding_size}")
    _require(0 <= m.dropout < 1, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    _require(0 <= m.recurrent_dropout < 1, "model.recurrent_dropout", f"must be in [0, 1), got {m.recurrent_dropout}")
    _validate_output(config)
    _require(m.init_scale is None or m.init_scale > 0, "model.init_scale", f"must be positive, got {m.init_scale}")
    _require(m.initializer in INITIALIZERS, "model.initializer",
             f"must be one of {', '.join(INITIALIZERS)}, got {m.initializer!r}")
    _require(m.init_scale is None or m.initializer == "keras", "model.initializer",
             f"{m.initializer!r} conflicts with model.init_scale ({m.init_scale}), which sets every weight's "
             "range itself; set one of them")


def _validate_output(config: Config) -> None:
    """Checks the output-layer and projection keys that need no vocabulary (see :func:`check_output_vocab`)."""
    m, t = config.model, config.train
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


def _validate_optimizer(config: Config) -> None:
    o, s = config.optimizer, config.optimizer.schedule
    _require(o.learning_rate > 0, "optimizer.learning_rate", f"must be positive, got {o.learning_rate}")
    _require(o.clip_norm >= 0, "optimizer.clip_norm", f"must be >= 0 (0 turns clipping off), got {o.clip_norm}")
    _require(0 <= o.momentum < 1, "optimizer.momentum", f"must be in [0, 1), got {o.momentum}")
    _require(0 < o.beta_1 < 1, "optimizer.beta_1", f"must be in (0, 1), got {o.beta_1}")
    _require(0 < o.beta_2 < 1, "optimizer.beta_2", f"must be in (0, 1), got {o.beta_2}")
    _require(o.epsilon > 0, "optimizer.epsilon", f"must be positive, got {o.epsilon}")
    _require(o.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}")
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


def _validate_precision(config: Config) -> None:
    m, t = config.model, config.train
    _require(m.cudnn != "require" or not t.jit_compile, "model.cudnn",
             "'require' conflicts with train.jit_compile: true (XLA cannot compile the cuDNN kernel); "
             "set model.cudnn to auto or train.jit_compile to false")
    _require(m.cudnn != "require" or t.precision != "mixed_bfloat16", "model.cudnn",
             "'require' conflicts with train.precision: mixed_bfloat16 (lstm/gru run the fused recurrence "
             "in bfloat16: no documented cuDNN bfloat16 RNN); set model.cudnn to auto or another precision")


def _validate_train(config: Config) -> None:
    t = config.train
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


def _validate_checkpoint_and_distribute(config: Config) -> None:
    c = config.checkpoint
    _require(c.every_steps >= 0, "checkpoint.every_steps", f"must be >= 0, got {c.every_steps}")
    _require(c.every_seconds >= 0, "checkpoint.every_seconds", f"must be >= 0, got {c.every_seconds}")
    _require(c.keep >= 1, "checkpoint.keep", f"must be at least 1, got {c.keep}")
    dist = config.distribute
    _require(dist.cpu_devices >= 0, "distribute.cpu_devices", f"must be >= 0, got {dist.cpu_devices}")
    _require(dist.timeout_seconds > 0, "distribute.timeout_seconds", f"must be positive, got {dist.timeout_seconds}")
    _require(dist.cpu_devices == 0 or dist.backend == "mirrored", "distribute.cpu_devices", "only the mirrored backend uses logical CPU devices")
    if dist.backend == "mirrored" and dist.cpu_devices:
        check_divisible(config, dist.cpu_devices)


def _validate_logging(config: Config) -> None:
    lg = config.logging
    _require(lg.profile_steps == [] or (len(lg.profile_steps) == 2 and 1 <= lg.profile_steps[0] <= lg.profile_steps[1]),
             "logging.profile_steps", f"expected [first, last] with 1 <= first <= last, got {lg.profile_steps}")
    _require(lg.histograms_every >= 0, "logging.histograms_every", f"must be >= 0, got {lg.histograms_every}")


def _validate_regularizers(config: Config) -> None:
    """The AWD-LSTM regularizers of issue #19 (``optimizer.weight_decay`` is checked with the optimizer)."""
    m, t = config.model, config.train
    for key in ("weight_drop", "embedding_dropout", "dropout_input", "dropout_hidden", "dropout_output"):
        rate = getattr(m, key)
        _require(0 <= rate < 1, f"model.{key}", f"must be in [0, 1), got {rate}")
    _require(not (m.weight_drop and m.projection_size), "model.weight_drop",
             "is not implemented for the projected LSTM (model.projection_size)")
    for key in ("ar", "tar"):
        value = getattr(t, key)
        _require(math.isfinite(value) and value >= 0, f"train.{key}", f"must be a finite number >= 0, got {value}")



def _validate_training_recipe(config: Config) -> None:
    """Accumulation, early stopping, plateau decay and weight averaging (issue #19)."""
    t, o, s = config.train, config.optimizer, config.optimizer.schedule
    _require(t.accumulate_steps >= 1, "train.accumulate_steps", f"must be at least 1, got {t.accumulate_steps}")
    _require(t.batch_size % t.accumulate_steps == 0, "train.accumulate_steps",
             f"{t.accumulate_steps} does not divide the rows per replica ({t.batch_size})")
    _require(t.early_stopping.patience >= 0, "train.early_stopping.patience",
             f"must be >= 0 (0 turns early stopping off), got {t.early_stopping.patience}")
    _require(t.early_stopping.min_delta >= 0, "train.early_stopping.min_delta",
             f"must be >= 0, got {t.early_stopping.min_delta}")
    _require(0 < s.factor < 1, "optimizer.schedule.factor", f"must be in (0, 1), got {s.factor}")
    _require(s.patience >= 1, "optimizer.schedule.patience", f"must be at least 1, got {s.patience}")
    _require(o.nonmono >= 1, "optimizer.nonmono", f"must be at least 1, got {o.nonmono}")
    _require(0 <= o.ema_decay < 1, "optimizer.ema_decay", f"must be in [0, 1) (0 turns it off), got {o.ema_decay}")
    _require(o.name != "ntasgd" or o.ema_decay == 0, "optimizer.ema_decay",
             "optimizer.name 'ntasgd' averages the weights itself; set one of them")
    _require(o.name != "ntasgd" or o.momentum == 0, "optimizer.momentum",
             f"optimizer.name 'ntasgd' is plain SGD (NT-ASGD with a non-SGD optimizer is not defined), got {o.momentum}")
    _require(not t.variable_length or t.loss_normalization == "token", "train.variable_length",
             "scales each step's learning rate by its window length, which train.loss_normalization 'sequence' "
             "already does (its loss sums the window's time steps); set loss_normalization to token")
    _require(not t.variable_length or t.num_steps >= 5, "train.variable_length",
             f"draws windows of at least 5 tokens around train.num_steps, which must then be at least 5, "
             f"got {t.num_steps}")


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
    per_replica = t.batch_size // num_replicas
    _require(per_replica % t.accumulate_steps == 0, "train.accumulate_steps",
             f"{t.accumulate_steps} does not divide the {per_replica} rows per replica "
             f"(train.batch_size {t.batch_size} over {num_replicas} replicas)")

