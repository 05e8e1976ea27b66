"""The settings mechanism (the configs themselves are `config.py`'s): each field of a config dataclass carries its
default, help and range, and from that one declaration come the checks at construction, the YAML keys and the CLI
flags (TRL builds its CLI and YAML from its config dataclasses the same way).

    @dataclass
    class EngineConfig(Checked):
        beta: float = option(0.1, "DPO temperature β.", low=0, low_open=True)

`Checked.__post_init__` refuses a value of the wrong type (a bool is not an int), a non-finite float, a value
outside its range or its choices, with one line naming the option. `from_dict` builds a config from YAML with
strict keys; `cli_options` adds a dataclass's fields to a typer command as flags.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml

from prefsift.errors import ConfigError

T = TypeVar("T")
_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, choices: tuple | None = None,
           default_factory: Any = _MISSING, cli: bool = True) -> Any:
    """A config field: its default, help text, allowed range ([low, high], open ends on request) and choices.
    `cli=False` keeps a field out of the generated flags (nested sections, lists)."""
    metadata = {"help": help, "low": low, "high": high, "low_open": low_open, "high_open": high_open,
                "choices": choices, "cli": cli}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the type inside Optional, whether None is allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        inner = [a for a in args if a is not type(None)]
        return (inner[0] if len(inner) == 1 else annotation), type(None) in args
    return annotation, False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def shown(value: Any, limit: int = 60) -> str:
    """`value` as an error line shows it: its repr, cut to `limit` characters (a config's list of a million items is
    not an 8 MB line); an integer too long for repr (sys.get_int_max_str_digits) by its size."""
    try:
        text = repr(value)
    except ValueError:
        text = f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    return _cut(text, limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_value(name: str, value: Any, annotation: Any, meta: dict) -> Any:
    kind, nullable = _base_type(annotation)
    where = name
    if value is None:
        if nullable:
            return None
        raise ConfigError(f"{where} must be set (got None)")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number (got {shown(value)})")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float
            raise ConfigError(f"{where} must be a finite number (got {shown(value)})") from None
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number (got {value})")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer (got {shown(value)})")
    elif kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false (got {shown(value)})")
    elif kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string (got {shown(value)})")
    elif typing.get_origin(kind) in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list (got {shown(value)})")
        (item,) = typing.get_args(kind) or (Any,)
        return [_check_value(f"{name}[{i}]", v, item, meta) for i, v in enumerate(value)]
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, meta['choices']))} (got {shown(value)})")
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value < low or (meta.get("low_open") and value == low)):
        raise ConfigError(f"{where} must be {'>' if meta.get('low_open') else '>='} {low} (got {shown(value)})")
    if high is not None and (value > high or (meta.get("high_open") and value == high)):
        raise ConfigError(f"{where} must be {'<' if meta.get('high_open') else '<='} {high} (got {shown(value)})")
    return value


class Checked:
    """Mixin of config dataclasses: every field is checked against its declaration at construction; `check()`
    adds the rules that tie fields together."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                continue
            setattr(self, f.name, _check_value(f.name, value, hints[f.name], dict(f.metadata)))
        self.check()

    def check(self) -> None:
        """Cross-field rules; a subclass overrides it."""


def from_dict(cls: type[T], values: dict[str, Any] | None, where: str = "config") -> T:
    """Build `cls` from a dict (YAML), refusing unknown keys and ill-typed values with one clear line."""
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of options (got {type(values).__name__})")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    unknown = sorted(str(k) for k in set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)} (known: {', '.join(fields)})")
    kwargs = {}
    for key, value in values.items():
        sub = hints[key]
        kwargs[key] = from_dict(sub, value, f"{where}.{key}") if dataclasses.is_dataclass(sub) else value
    try:
        return cls(**kwargs)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}" if where else str(error)) from None


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: `5e-7` is a number (PyYAML's YAML 1.1 rules read it as a string). Aliases (`*name`) are
    refused: a few hundred bytes of nested aliases expand to gigabytes (a "billion laughs"), and no option needs one."""

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"an alias (*{_cut(str(event.anchor), 30)}) at line {event.start_mark.line + 1}: "
                f"aliases are not allowed in a config; write the value out", None)
        return super().compose_node(parent, index)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML ({_cut(str(error).splitlines()[0], 200)})") from None
    except ValueError:  # PyYAML's int() of a scalar of more digits than Python converts
        raise ConfigError(f"{path}: a number too large to read (more than {sys.get_int_max_str_digits()} "
                          f"digits)") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of options at the top level")
    return values


def check_option(name: str, value: Any, annotation: Any, **limits: Any) -> Any:
    """`value` checked as a config field of type `annotation` is (with `option()`'s `low`, `high`, `choices`), for a
    keyword argument no config dataclass declares: the same one-line `ConfigError`; returns it (an int as a float
    where a float is asked)."""
    return _check_value(name, value, annotation, limits)


def cli_fields(cls: type) -> list[dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)  # type: ignore[arg-type]
            and not dataclasses.is_dataclass(hints[f.name])]


def _cli_type(annotation: Any) -> Any:
    kind, _ = _base_type(annotation)
    return kind if kind in (int, float, str, bool) else str


def cli_options(*classes: type, exclude: tuple[str, ...] = (), panel: Callable[[type, str], str] | None = None):
    """Decorate a typer command: every CLI field of `classes` becomes an option (`--max-length`, `--lora/--no-lora`)
    whose help and default come from the field, shown in the help panel `panel(cls, field name)` names (`--help`
    groups options by panel). The command receives `flags`: the options the user actually gave, as {field name:
    value}, to merge over YAML and defaults with `from_dict`.

    Options default to None here so that "not given" is visible; the dataclass's own default applies after."""

    def decorate(fn):
        import typer

        signature = inspect.signature(fn, eval_str=True)
        params = [p for p in signature.parameters.values() if p.name != "flags"]
        taken = {p.name for p in params}
        added: list[inspect.Parameter] = []
        for cls in classes:
            hints = typing.get_type_hints(cls)
            for f in cli_fields(cls):
                if f.name in taken or f.name in exclude:
                    continue
                taken.add(f.name)
                default = f.default if f.default is not _MISSING else None
                kind = _cli_type(hints[f.name])
                # help is plain text, never rich markup: prefsift's --help prints it as it is (cli.py)
                extra = f" [default: {default}]" if default not in (None, "") and kind is not bool else ""
                decl = [_flag(f.name) + (f"/--no-{f.name.replace('_', '-')}" if kind is bool else "")]
                annotation = Annotated[kind | None, typer.Option(*decl, help=f.metadata.get("help", "") + extra,
                                                                 show_default=kind is bool and default,
                                                                 rich_help_panel=panel(cls, f.name) if panel else None)]
                added.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                               annotation=annotation))
        names = [p.name for p in added]

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            flags = {name: kwargs.pop(name) for name in names if kwargs.get(name) is not None}
            for name in names:
                kwargs.pop(name, None)
            return fn(*args, flags=flags, **kwargs)

        keyword = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]
        wrapper.__signature__ = signature.replace(parameters=keyword + added)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in keyword + added}
        return wrapper

    return decorate


def split_flags(flags: dict[str, Any], *classes: type) -> list[dict[str, Any]]:
    """Route flat options (CLI flags, or a flat YAML mapping) to the dataclass that declares each."""
    parts: list[dict[str, Any]] = [{} for _ in classes]
    for key, value in flags.items():
        for part, cls in zip(parts, classes, strict=True):
            if key in {f.name for f in dataclasses.fields(cls)}:  # type: ignore[arg-type]
                part[key] = value
                break
        else:
            known = sorted({f.name for cls in classes for f in dataclasses.fields(cls)})  # type: ignore[arg-type]
            raise ConfigError(f"unknown option {shown(key, 40)} (known: {', '.join(known)})")
    return parts


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """`--param key=value` items → {key: value}, values read as YAML scalars (0.2 → float, true → bool)."""
    params: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param takes key=value (got {item!r})")
        method, dot, name = key.strip().rpartition(".")  # `method.key`: method names keep their dashes
        key = method + dot + name.replace("-", "_")
        try:
            params[key] = yaml.load(raw, Loader=_Loader) if raw.strip() else raw  # noqa: S506 - a SafeLoader
        except (yaml.YAMLError, ValueError):  # not YAML, an alias, an integer of too many digits: the text itself
            params[key] = raw
    return params
