"""Typed, validated run configuration.

A run is described by YAML files merged left to right (rightmost wins) and
``--set section.key=value`` overrides (value parsed as YAML). The merged mapping
is checked against the dataclasses of :mod:`~dist_rnn.config.schema`: unknown
keys (with the closest valid key), wrong types and invalid values raise
:class:`~dist_rnn.errors.UserError` before anything runs. The resolved config is
saved as ``RUN_DIR/config.yaml``.

Modules (every public name is importable from ``dist_rnn.config``):

* :mod:`~dist_rnn.config.schema`: the keys (one dataclass per section, each
  key's type, meaning and default), the key groups a resume checks, and
  comparing two configs.
* :mod:`~dist_rnn.config.loading`: reading files and overrides into a
  :class:`Config`, and saving one.
* :mod:`~dist_rnn.config.validation`: value and cross-key checks.
"""

from dist_rnn.config.loading import config_from_dict, load_config, parse_override, save_config, yaml_load
from dist_rnn.config.schema import (CELLS, CORPORA, INITIALIZERS, DATA_LOCATION_KEYS, EPOCH_INVARIANT_KEYS, RESUME_INVARIANT_KEYS,
                                    LATER_INVARIANT_DEFAULTS,
                                    TWO_STATE_CELLS, CheckpointConfig, Config, DataConfig, DistributeConfig,
                                    LoggingConfig, LossScaleConfig, ModelConfig, OptimizerConfig, ScheduleConfig,
                                    TrainConfig, changed_keys, flatten, resume_invariant_differences,
                                    resume_invariant_values)
from dist_rnn.config.validation import InvalidValue, check_divisible, check_output_vocab, validate

__all__ = [
    "CELLS", "CORPORA", "INITIALIZERS", "DATA_LOCATION_KEYS", "EPOCH_INVARIANT_KEYS", "RESUME_INVARIANT_KEYS", "TWO_STATE_CELLS",
    "LATER_INVARIANT_DEFAULTS",
    "CheckpointConfig", "Config", "DataConfig", "DistributeConfig", "LoggingConfig", "LossScaleConfig",
    "ModelConfig", "OptimizerConfig", "ScheduleConfig", "TrainConfig",
    "changed_keys", "flatten", "resume_invariant_differences", "resume_invariant_values",
    "config_from_dict", "load_config", "parse_override", "save_config", "yaml_load",
    "InvalidValue", "check_divisible", "check_output_vocab", "validate",
]
