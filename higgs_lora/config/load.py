"""Building a `RunConfig`: a YAML file and `key=value` overrides (`train.lr=2e-4 lora.r=32`), coerced to the
fields' types, every problem reported together, each naming its key and what to do:

- unknown keys (with the closest valid key suggested),
- values of the wrong type (`train.max_steps=ten`),
- impossible combinations (validate.py).

`save_config` writes the resolved config; `load_config` reads it back equal to what was saved. Imports schema,
files and yaml, no torch. See docs/training.md ("Configuration").
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from higgs_lora.config.schema import ConfigError, RunConfig
from higgs_lora.files import atomic_write_text


class _Raw(str):
    """A value typed on the command line, kept as text until its field's type is known.

    Typed values are parsed as YAML (so `lora.target_modules=[q_proj,v_proj]` is a list), except for string
    fields, which take the text as typed (so `train.resume=no` stays the string 'no', not YAML's False).
    """


def is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of each field of dataclass `cls`, by field name."""
    return typing.get_type_hints(cls)


def type_name(tp: Any) -> str:
    """A field type as the help and the error messages write it (`'bf16' | 'fp16'`, `list of str`, ...)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        return f"list of {type_name(inner)}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert `value` to the field type `tp`, or raise ValueError with a message naming `key`."""
    origin = typing.get_origin(tp)
    wanted = type_name(tp)
    if isinstance(value, _Raw) and tp is not str:
        try:
            value = yaml.safe_load(str(value)) if str(value) != "" else ""
        except yaml.YAMLError as err:
            raise ValueError(
                f"{key}: cannot parse {str(value)!r} ({err.__class__.__name__}); expected {wanted}"
            ) from None
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ValueError:
                continue  # try the next member of the union; the error below names them all
        raise ValueError(f"{key}={value!r} is not {wanted}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ValueError(f"{key}={value!r} is not one of {', '.join(repr(c) for c in choices)}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):  # `a,b,c` on the command line
            value = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}={value!r} is not a list; write [a, b] in YAML or a,b on the command line")
        return [_coerce(f"{key}[{i}]", item, inner) for i, item in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}={value!r} is not a bool; use true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{key}={value!r} is not an integer")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads 2e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ValueError(f"{key}={value!r} is not a number")
        if not math.isfinite(number):  # .nan / .inf in YAML, nan / inf on the command line
            raise ValueError(f"{key}={value!r} is not a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return str(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{key}={value!r} is not a string; quote it in YAML")
    raise TypeError(f"{key}: unsupported field type {tp!r}")  # a programming error in this module


def _build(cls: type, values: Any, prefix: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from a mapping, collecting unknown keys and type errors into `problems`."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        problems.append(f"{prefix or 'the config'} must be a mapping of keys to values, not {type(values).__name__}")
        values = {}
    hints = field_types(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        full_key = f"{prefix}{key}"
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys here: {', '.join(known)}"
            problems.append(f"unknown key {full_key}{hint}")
            continue
        tp = hints[key]
        if is_dataclass_type(tp):
            kwargs[key] = _build(tp, values[key], f"{full_key}.", problems)
            continue
        try:
            kwargs[key] = _coerce(full_key, value, tp)
        except ValueError as err:
            problems.append(str(err))
    if cls is RunConfig and problems:
        # Key and type errors are reported first: the cross-field checks in RunConfig need well-typed values.
        raise ConfigError(problems)
    return cls(**kwargs)


def _set_override(tree: dict[str, Any], override: str, problems: list[str]) -> None:
    """Apply one `a.b.c=value` override to the nested dict `tree`."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        problems.append(f"override {override!r} is not key=value (e.g. train.lr=2e-4)")
        return
    cls: type = RunConfig
    node = tree
    parts = key.split(".")
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        prefix = ".".join(parts[:depth])
        if part not in names:
            close = difflib.get_close_matches(part, names, n=1)
            where = f"{prefix}." if prefix else ""
            hint = f"; did you mean {where}{close[0]}?" if close else f"; valid keys here: {', '.join(names)}"
            problems.append(f"unknown key {key} in override {override!r}{hint}")
            return
        tp = field_types(cls)[part]
        last = depth == len(parts) - 1
        if is_dataclass_type(tp):
            if last:
                problems.append(
                    f"override {override!r} names a section; set one of its keys, "
                    f"e.g. {key}.{dataclasses.fields(tp)[0].name}=..."
                )
                return
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node, cls = child, tp
        elif not last:
            problems.append(f"override {override!r}: {'.'.join(parts[: depth + 1])} is a value, not a section")
            return
        else:
            node[part] = _Raw(text)


def build_config(base: dict[str, Any] | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Build a validated RunConfig from a (YAML-shaped) dict and `key=value` overrides.

    Raises ConfigError listing every problem: unknown keys, wrong types, impossible combinations.
    """
    tree = _deep_copy(base or {})
    problems: list[str] = []
    if not isinstance(tree, dict):
        raise ConfigError([f"the config must be a mapping of sections, not {type(tree).__name__}"])
    for override in overrides:
        _set_override(tree, override, problems)
    return _build(RunConfig, tree, "", problems)


def _deep_copy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _deep_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_deep_copy(v) for v in tree]
    return tree


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict (an empty file is an empty dict)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {path} does not exist"])
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise ConfigError([f"config file {path} cannot be read ({err.strerror or err})"]) from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            [
                f"config file {path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                "is it the right file?"
            ]
        ) from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError([f"{path} is not valid YAML: {err}"]) from None
    except RecursionError:
        raise ConfigError([f"{path} is nested too deeply to be a config"]) from None
    return tree or {}


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML run config (or only defaults when `path` is None) and apply overrides."""
    return build_config(load_yaml(path) if path else {}, overrides)


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically. `load_config(path)` gives back an equal config."""
    return atomic_write_text(path, cfg.to_yaml())
