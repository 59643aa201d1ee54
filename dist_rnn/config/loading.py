"""Reading a run configuration: YAML files and ``--set`` overrides merged, type-checked, validated.

Files merge left to right (rightmost wins), then the overrides (value parsed
as YAML). The merged mapping is checked against the dataclasses of
:mod:`dist_rnn.config.schema`: unknown keys (with the closest valid key) and
wrong types raise :class:`~dist_rnn.errors.UserError` naming the key and
where its value came from; then :func:`~dist_rnn.config.validation.validate`
checks the values.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from dist_rnn.config.schema import Config
from dist_rnn.config.validation import InvalidValue, validate
from dist_rnn.errors import UserError, first_line


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
        problem = getattr(e, "problem", None) or first_line(e, limit=None)
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
    except InvalidValue as e:
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


