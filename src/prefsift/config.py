"""Typed config dataclasses (TRL style: every field has a `help`), loaded from YAML with strict keys."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from prefsift.errors import ConfigError

T = TypeVar("T")


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0]) if len(inner) == 1 else value
    if annotation is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool) and not isinstance(value, annotation):
        raise ConfigError(f"config field '{name}' must be {annotation.__name__} (got {value!r})")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config field '{name}' must be a list (got {value!r})")
        return [_coerce(name, item, args[0]) for item in value] if args else list(value)
    return value


def from_dict(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Build `cls` from a dict, refusing unknown keys and ill-typed values with one clear line."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of options")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)} (known: {', '.join(fields)})")
    kwargs = {}
    for key, value in values.items():
        sub = hints[key]
        if dataclasses.is_dataclass(sub):
            kwargs[key] = from_dict(sub, value, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(key, value, sub)
    return cls(**kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of options at the top level")
    return values


def describe(cls: type) -> list[tuple[str, str, str]]:
    """(name, default, help) of every field: the reference the README and `--help` show."""
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        rows.append((f.name, repr(default), f.metadata.get("help", "")))
    return rows
