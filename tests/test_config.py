"""Config loading: YAML merge, --set overrides, type and value checks, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dist_rnn.config import (Config, config_from_dict, load_config, resume_invariant_differences,
                             parse_override, save_config)
from dist_rnn.errors import UserError

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").glob("*.yaml"))


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def error_of(paths=(), overrides=()) -> str:
    with pytest.raises(UserError) as info:
        load_config(list(paths), list(overrides))
    return str(info.value)


# ---------------------------------------------------------------- merging


def test_defaults_without_files():
    config = load_config([], [])
    assert config == Config()
    assert config.model.hidden_size == 256
    assert config.optimizer.schedule.name == "constant"


def test_files_merge_left_to_right_nested_sections_merged(tmp_path):
    a = write(tmp_path, "a.yaml", """
model:
  cell: gru
  hidden_size: 64
  embedding_size: 32
optimizer:
  learning_rate: 0.5
  schedule:
    name: exponential
    decay_rate: 0.5
train:
  batch_size: 8
""")
    b = write(tmp_path, "b.yaml", """
model:
  hidden_size: 128
optimizer:
  schedule:
    decay_steps: 77
""")
    config = load_config([a, b])
    # Rightmost wins ...
    assert config.model.hidden_size == 128
    # ... but sections (and nested sections) are merged, not replaced.
    assert config.model.cell == "gru"
    assert config.model.embedding_size == 32
    assert config.optimizer.learning_rate == 0.5
    assert config.optimizer.schedule.name == "exponential"
    assert config.optimizer.schedule.decay_rate == 0.5
    assert config.optimizer.schedule.decay_steps == 77
    assert config.train.batch_size == 8
    # Untouched keys keep their defaults.
    assert config.train.num_steps == Config().train.num_steps

    # Order matters: b then a gives a's hidden size.
    assert load_config([b, a]).model.hidden_size == 64


def test_empty_file_is_no_change(tmp_path):
    empty = write(tmp_path, "empty.yaml", "# nothing\n")
    assert load_config([empty]) == Config()


# ---------------------------------------------------------------- --set


def test_set_overrides_are_parsed_as_yaml(tmp_path):
    base = write(tmp_path, "base.yaml", "train:\n  batch_size: 8\n  max_steps: 100\nmodel:\n  dropout: 0.2\n")
    config = load_config([base], [
        "train.batch_size=64",               # int, beats the file
        "optimizer.learning_rate=0.25",      # float
        "model.dropout=0",                   # int accepted for a float key
        "data.split=[0.8, 0.1, 0.1]",        # list
        "logging.profile_steps=[2, 3]",      # list of ints
        "train.max_epochs=null",             # null
        "data.max_vocab=",                   # empty value is null too
        "optimizer.schedule.name=cosine",    # nested section absent from the files
        "optimizer.schedule.warmup_steps=5",
        "train.loss_scale.initial=1024",     # nested section of a section
        "train.sample_prime=def ",           # string kept verbatim (YAML strips the space)
    ])
    assert config.train.batch_size == 64 and isinstance(config.train.batch_size, int)
    assert config.optimizer.learning_rate == 0.25
    assert config.model.dropout == 0.0 and isinstance(config.model.dropout, float)
    assert config.data.split == [0.8, 0.1, 0.1]
    assert config.logging.profile_steps == [2, 3]
    assert config.train.max_epochs is None
    assert config.train.max_steps == 100
    assert config.data.max_vocab is None
    assert config.optimizer.schedule.name == "cosine"
    assert config.optimizer.schedule.warmup_steps == 5
    assert config.optimizer.schedule.decay_rate == 0.1  # sibling keys keep defaults
    assert config.train.loss_scale.initial == 1024.0
    assert config.train.loss_scale.growth_interval == 2000
    assert config.train.sample_prime == "def"


def test_later_set_wins():
    config = load_config([], ["model.hidden_size=10", "model.hidden_size=20"])
    assert config.model.hidden_size == 20


def test_parse_override():
    assert parse_override("a.b.c=[1, 2]") == (["a", "b", "c"], [1, 2])
    assert parse_override("x.y=a=b") == (["x", "y"], "a=b")  # split on the first '=' only
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        parse_override("train.batch_size")
    with pytest.raises(UserError, match="empty key"):
        parse_override("train..batch_size=3")
    with pytest.raises(UserError, match="not valid YAML"):
        parse_override("data.split=[0.5, 0.5")


def test_set_exponent_float_without_dot():
    config = load_config([], ["optimizer.learning_rate=1e-3"])
    assert config.optimizer.learning_rate == pytest.approx(1e-3)


def test_set_exponent_float_with_dot():
    assert load_config([], ["optimizer.learning_rate=1.0e-3"]).optimizer.learning_rate == pytest.approx(1e-3)


# ---------------------------------------------------------------- unknown keys and types


def test_unknown_key_names_dotted_key_and_suggests(tmp_path):
    path = write(tmp_path, "typo.yaml", "model:\n  hiden_size: 16\n")
    message = error_of([path])
    assert "'model.hiden_size'" in message
    assert "did you mean 'model.hidden_size'" in message
    assert path in message  # where it came from


def test_unknown_section_suggests(tmp_path):
    message = error_of([write(tmp_path, "s.yaml", "modle:\n  hidden_size: 16\n")])
    assert "'modle'" in message and "did you mean 'model'" in message


def test_unknown_nested_key_from_set_suggests():
    message = error_of(overrides=["optimizer.schedule.warmup_step=3"])
    assert "'optimizer.schedule.warmup_step'" in message
    assert "'optimizer.schedule.warmup_steps'" in message
    assert "--set" in message


def test_unknown_key_without_close_match_lists_valid_keys():
    message = error_of(overrides=["distribute.zzzzzz=1"])
    assert "'distribute.zzzzzz'" in message
    assert "backend" in message and "cpu_devices" in message


@pytest.mark.parametrize("text, key, expected", [
    ('train:\n  batch_size: "32"\n', "train.batch_size", "expected int"),
    ("model:\n  dropout: true\n", "model.dropout", "expected float"),
    ("train:\n  max_steps: 2.5\n", "train.max_steps", "expected int or null"),
    ("data:\n  split: 0.9\n", "data.split", "expected list of float"),
    ("logging:\n  tensorboard: 1\n", "logging.tensorboard", "expected bool"),
    ("model: 5\n", "model", "expected a mapping"),
])
def test_wrong_type_names_key(tmp_path, text, key, expected):
    message = error_of([write(tmp_path, "t.yaml", text)])
    assert f"'{key}'" in message or message.startswith(f"{key}:")
    assert expected in message


def test_literal_typo_suggests_choice(tmp_path):
    message = error_of([write(tmp_path, "c.yaml", "model:\n  cell: lstn\n")])
    assert "'model.cell'" in message
    assert "did you mean 'lstm'" in message


def test_literal_bare_on_off_map_back_to_words():
    # YAML 1.1 reads a bare off/on as false/true; a Literal with those words takes them back.
    assert load_config([], ["logging.progress=off"]).logging.progress == "off"
    assert load_config([], ["logging.progress=on"]).logging.progress == "on"
    # ... but a bool is no cell name.
    message = error_of(overrides=["model.cell=true"])
    assert "'model.cell'" in message and "is not one of" in message


def test_top_level_must_be_mapping(tmp_path):
    message = error_of([write(tmp_path, "list.yaml", "- a\n- b\n")])
    assert "top level must be a mapping" in message


# ---------------------------------------------------------------- invalid values


@pytest.mark.parametrize("overrides, key", [
    (["optimizer.learning_rate=-1"], "optimizer.learning_rate"),
    (["optimizer.learning_rate=0"], "optimizer.learning_rate"),
    (["train.num_steps=0"], "train.num_steps"),
    (["distribute.backend=mirrored", "distribute.cpu_devices=4", "train.batch_size=30"], "train.batch_size"),
    (["distribute.backend=mirrored", "distribute.cpu_devices=4", "train.eval_batch_size=6"],
     "train.eval_batch_size"),
    (["distribute.cpu_devices=2"], "distribute.cpu_devices"),
    (["model.dropout=1.0"], "model.dropout"),
    (["model.recurrent_dropout=-0.1"], "model.recurrent_dropout"),
    (["optimizer.schedule.name=cosine", "optimizer.schedule.total_steps=0"], "optimizer.schedule.total_steps"),
    (["optimizer.schedule.total_steps=0"], "optimizer.schedule.total_steps"),
    (["optimizer.schedule.name=cosine", "optimizer.schedule.total_steps=10", "optimizer.schedule.warmup_steps=10"],
     "optimizer.schedule.total_steps"),
    (["train.max_steps=null", "train.max_epochs=null"], "train.max_steps"),
    (["data.split=[0.9, 0.2, 0.0]"], "data.split"),
    (["data.corpus=file"], "data.path"),
    (["data.corpus=ptb"], "data.level"),
    (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay"),
    (["logging.profile_steps=[5, 2]"], "logging.profile_steps"),
    (["data.max_vocab=1"], "data.max_vocab"),
    (["model.initializer=glorot"], "model.initializer"),
    (["model.initializer=unit_scaling", "model.init_scale=0.1"], "model.initializer"),
    (["data.train_on_whole_text=true", "data.corpus=ptb", "data.level=word"], "data.train_on_whole_text"),
    (["data.train_on_whole_text=true", "data.corpus=file", "data.train_file=a.txt"], "data.train_on_whole_text"),
])
def test_invalid_values_name_the_key(overrides, key):
    message = error_of(overrides=overrides)
    assert f"config key '{key}'" in message


def test_invalid_value_names_its_source(tmp_path):
    path = write(tmp_path, "zero.yaml", "train:\n  num_steps: 0\n")
    message = error_of([path])
    assert "config key 'train.num_steps'" in message
    assert path in message


def test_divisible_batch_accepted():
    config = load_config([], ["distribute.backend=mirrored", "distribute.cpu_devices=4", "train.batch_size=32"])
    assert config.distribute.cpu_devices == 4


def test_divisibility_message_names_replicas():
    message = error_of(overrides=["distribute.backend=mirrored", "distribute.cpu_devices=4", "train.batch_size=30"])
    assert "30" in message and "4 replicas" in message


def test_tie_embeddings_with_other_sizes_ok():
    # #18: a learned projection maps the last layer to the embedding width (the output layer's tie_projection).
    config = load_config([], ["model.tie_embeddings=true", "model.embedding_size=64", "model.hidden_size=128"])
    assert config.model.tie_embeddings is True


def test_tie_embeddings_with_equal_sizes_ok():
    config = load_config([], ["model.tie_embeddings=true", "model.embedding_size=32", "model.hidden_size=32"])
    assert config.model.tie_embeddings is True


def test_cosine_with_total_steps_ok():
    config = load_config([], ["optimizer.schedule.name=cosine", "optimizer.schedule.total_steps=50",
                              "train.max_steps=null"])
    assert config.optimizer.schedule.total_steps == 50


# ---------------------------------------------------------------- files


def test_invalid_yaml_gives_file_and_line(tmp_path):
    path = write(tmp_path, "bad.yaml", "model:\n  hidden_size: 16\n  cell: [lstm\ntrain:\n  batch_size: 4\n")
    # The unclosed flow sequence opened on line 3 is detected at 'train:' on line 4.
    assert error_of([path]).startswith(f"{path}:4: invalid YAML")


def test_invalid_yaml_mapping_line(tmp_path):
    path = write(tmp_path, "indent.yaml", "model:\n  hidden_size: 16\n   cell: gru\n")
    assert error_of([path]) == f"{path}:3: invalid YAML: mapping values are not allowed here"


def test_invalid_yaml_line_number_exact(tmp_path):
    # A tab in the indentation: the scanner stops on line 3.
    path = write(tmp_path, "tab.yaml", "model:\n  hidden_size: 16\n\tcell: gru\n")
    assert error_of([path]).startswith(f"{path}:3: invalid YAML")


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    assert error_of([path]) == f"config file not found: {path}"


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train:\n  sample_prime: \"caf\xe9\"\n".encode("latin-1"))
    assert "not UTF-8" in error_of([str(path)])


def test_saved_config_reloads_equal(tmp_path):
    config = load_config([], [
        "data.corpus=file", "data.path=[a.txt, b.txt]", "data.split=[0.8, 0.1, 0.1]", "data.max_vocab=100",
        "model.cell=ln_gru", "model.hidden_size=48", "model.embedding_size=48", "model.tie_embeddings=true",
        "model.dropout=0.25", "model.init_scale=0.05",
        "optimizer.name=sgd", "optimizer.learning_rate=1.0", "optimizer.momentum=0.9",
        "optimizer.epsilon=1.0e-8",
        "optimizer.schedule.name=epoch", "optimizer.schedule.decay_rate=0.5",
        "train.max_steps=1000", "train.sample_prime='ROMEO: '",  # quoted: bare 'ROMEO:' is a YAML mapping
        "logging.profile_steps=[3, 5]",
    ])
    path = tmp_path / "config.yaml"
    save_config(config, path)
    reloaded = config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")))
    assert reloaded == config
    assert resume_invariant_differences(config, reloaded) == []
    assert load_config([str(path)]) == config
    assert reloaded.optimizer.epsilon == pytest.approx(1e-8)
    assert reloaded.train.loss_scale.max_scale == 2.0 ** 24
    assert reloaded.train.sample_prime == "ROMEO: "


def test_resume_invariant_differences():
    old = load_config([], ["model.hidden_size=16"])
    new = load_config([], ["model.hidden_size=32", "optimizer.learning_rate=0.1"])
    assert resume_invariant_differences(old, new) == ["model.hidden_size: 16 -> 32"]


# ---------------------------------------------------------------- shipped configs


def test_there_are_shipped_configs():
    assert CONFIG_FILES, "configs/*.yaml is empty"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_shipped_config_loads_and_validates(path):
    config = load_config([str(path)])
    assert isinstance(config, Config)
    # Reloading the resolved form gives the same config.
    assert config_from_dict(yaml.safe_load(config.to_yaml())) == config


def test_initializer_checked_by_validate_also_when_built_in_code():
    from dist_rnn.config import validate

    config = Config()
    config.model.initializer = "glorot"  # bypasses the loader's type check
    with pytest.raises(UserError, match="config key 'model.initializer'"):
        validate(config)
