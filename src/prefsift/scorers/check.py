"""`check_scorer`: the conformance checks every scorer passes, for scorer authors (scikit-learn's `check_estimator`
is the model). (Over 400 lines: one small function a check, each with its own message; they are read as a list.)

    from prefsift.scorers.check import check_scorer

    check_scorer(MyScorer)                 # the static checks: no model, no data
    check_scorer(MyScorer(), resources)    # and the dynamic ones: score a (tiny) provider

A broken rule raises AssertionError with one message, `scorer '<name>': <check>: <what is wrong>`. The checks hold a
scorer to what `Scorer` promises the rest of prefsift (the score stage, `select`, `run`, the CLI and YAML), no more.
Each has a name (`CHECKS`), which `expected_failed_checks` takes.

static, no resources (`STATIC_CHECKS`)
  name                `name` is a non-empty string without spaces or commas (`--method a,b` lists methods), not
                      `all` (compare's word for every method)
  registered          `SCORERS[name]` is the class, and `get_scorer(name)` builds one
  score_method        the class defines `score` (not the base class's)
  params              `Params` is a dataclass subclass of `ScorerParams`; every field has a help text, a default, a
                      type the settings check (bool, int, float, str, a list; or None), a name other than `name`
                      and `label` (a YAML method mapping's own keys); `Params()` and the scorer without parameters
                      build, with those defaults
  ranges              a field with a declared range (`option(low=, high=, low_open=, high_open=)`) is refused just
                      outside each end, and one with string `choices` a value outside them, by `get_scorer` with a
                      ConfigError naming the field
  needs               distinct roles of `prefsift.resources.ROLES`
  ceiling             a bool
  columns             a non-empty tuple of distinct non-empty strings, none of the score file's own (`pair_id`,
                      `*_logps`, `chosen_reward`, `rejected_reward`)
  selection_rule      `select_indices` keywords (rule, column/columns, low/high) naming a rule of
                      `prefsift.select.RULES` and only columns the scorer writes, which `select_indices` accepts both
                      ways prefsift applies it: with a budget in place of its cut-offs (`run`, `compare`) and, for a
                      band or intersection, with its own cut-offs (`prefsift select`)
  completion_columns  None, or two distinct declared columns
  missing_input       None or a reason (a non-empty string)
  compute_passes      a finite number >= 0 for a few (pairs, validation pairs)
  describe            a dict, JSON-serialisable (the score manifest records it)
  labelled            a copy under a label (`methods: [{name: ..., label: ...}]`) builds, and its rule and
                      completion columns name its renamed columns

dynamic, with a `Resources` whose roles cover `needs` and whose data `missing_input` accepts (`DYNAMIC_CHECKS`)
  score               `score(resources)` returns exactly the declared columns, each a 1-d float numpy array of one
                      value a pair, not all NaN; the scorer's own rule selects on them
  determinism         a new scorer with the same parameters, on a new provider of the same sources and seed (no
                      log-prob pass carried over), gives identical arrays
  another_seed        under another seed the columns are well formed too. Whether they differ is not checked: the
                      interface declares no seed use (random, density and selective read the seed; irm does not).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Callable
from typing import Any

import numpy as np

from prefsift.errors import ConfigError
from prefsift.resources import LOGPS_COLUMNS, REWARD_COLUMNS, ROLES, Resources
from prefsift.scorers.base import SCORERS, Scorer, ScorerParams, get_scorer, labelled

RULE_KEYS = ("rule", "column", "columns", "low", "high")  # the select_indices keywords a rule may carry
RESERVED_COLUMNS = ("pair_id", *REWARD_COLUMNS, *(c for pair in LOGPS_COLUMNS.values() for c in pair))
METHOD_KEYS = ("name", "label")  # a YAML method mapping's own keys: no parameter can be named so
SETTING_TYPES = (bool, int, float, str)  # the scalar types prefsift.settings checks (and lists of them)
CHECK_LABEL = "conformance-check"
PASS_SIZES = ((0, 0), (1, 0), (16, 4), (100_000, 1_000))  # (pairs, validation pairs) compute_passes is asked about

ScorerLike = str | type[Scorer] | Scorer


def check_scorer(scorer: ScorerLike, resources: Resources | None = None, *,
                 expected_failed_checks: dict[str, str] | None = None) -> None:
    """Run the conformance checks on `scorer` (a registered name, a scorer class, or an instance whose parameters
    the dynamic checks use); with `resources`, score them too. Raises AssertionError naming the scorer and the
    first broken check; ValueError when `resources` cannot feed the scorer (a role of `needs` missing, or
    `missing_input` says why).

    `expected_failed_checks` maps check names (`CHECKS`) to the reason each is known to fail, as scikit-learn's
    `check_estimator` takes them: such a check must fail, and one that passes is an AssertionError too (remove its
    entry)."""
    check_static(scorer, expected_failed_checks=expected_failed_checks)
    if resources is not None:
        check_dynamic(scorer, resources, expected_failed_checks=expected_failed_checks)


def check_static(scorer: ScorerLike, *, expected_failed_checks: dict[str, str] | None = None) -> None:
    """The checks that need no model or data."""
    instance, expected = _instance(scorer), _expected(expected_failed_checks)
    for name, check in STATIC_CHECKS.items():
        _run(instance, name, expected, check, instance)


def check_dynamic(scorer: ScorerLike, resources: Resources, *,
                  expected_failed_checks: dict[str, str] | None = None) -> None:
    """The checks that score `resources`."""
    instance, expected = _instance(scorer), _expected(expected_failed_checks)
    name = _name(instance)
    try:
        resources.require(tuple(instance.needs), name)
    except ConfigError as error:
        raise ValueError(f"check_scorer: these resources cannot feed scorer '{name}': {error}") from None
    raw = resources.pairs.raw
    reason = instance.missing_input(resources.has("reward_model"), list(raw.column_names) if raw is not None else [])
    if reason:
        raise ValueError(f"check_scorer: these resources cannot feed scorer '{name}': {reason}")
    first = _run(instance, "score", expected, check_score, instance, resources)
    if first is None:  # expected to fail: there is nothing to compare with
        return
    _run(instance, "determinism", expected, check_determinism, instance, resources, first)
    _run(instance, "another_seed", expected, check_another_seed, instance, resources)


# --- running and reporting -----------------------------------------------------------------------------------------
def _instance(scorer: ScorerLike) -> Scorer:
    if isinstance(scorer, Scorer):
        return scorer
    if isinstance(scorer, str):
        if scorer not in SCORERS:
            raise AssertionError(f"scorer '{scorer}': registered: no scorer is registered under that name "
                                 f"(known: {', '.join(sorted(SCORERS))})")
        scorer = SCORERS[scorer]
    if isinstance(scorer, type) and issubclass(scorer, Scorer):
        try:
            return scorer()
        except Exception as error:
            raise AssertionError(f"scorer '{getattr(scorer, 'name', scorer.__name__)}': params: "
                                 f"{scorer.__name__}() without parameters raises {error!r}") from error
    raise TypeError(f"check_scorer takes a scorer name, a Scorer subclass or a Scorer (got {scorer!r})")


def _expected(expected_failed_checks: dict[str, str] | None) -> dict[str, str]:
    expected = dict(expected_failed_checks or {})
    unknown = sorted(set(expected) - set(CHECKS))
    if unknown:
        raise ValueError(f"expected_failed_checks: unknown check(s) {', '.join(unknown)} (checks: "
                         f"{', '.join(CHECKS)})")
    return expected


def _run(scorer: Scorer, name: str, expected: dict[str, str], check: Callable, *args: Any) -> Any:
    """`check(*args)`'s result; a check expected to fail gives None when it does, and is an AssertionError when it
    passes."""
    if name not in expected:
        return check(*args)
    try:
        check(*args)
    except AssertionError:
        return None
    raise AssertionError(f"scorer '{_name(scorer)}': {name}: expected to fail ({expected[name]}) but passes: remove "
                         "it from expected_failed_checks")


def _name(scorer: Scorer) -> str:
    return str(getattr(type(scorer), "name", type(scorer).__name__))


def _fail(scorer: Scorer, check: str, detail: str) -> AssertionError:
    return AssertionError(f"scorer '{_name(scorer)}': {check}: {detail}")


def _require(condition: Any, scorer: Scorer, check: str, detail: str) -> None:
    if not condition:
        raise _fail(scorer, check, detail)


# --- static checks -------------------------------------------------------------------------------------------------
def check_name(scorer: Scorer) -> None:
    name = getattr(type(scorer), "name", None)
    _require(isinstance(name, str) and name, scorer, "name", f"`name` must be a non-empty string (got {name!r})")
    _require(not re.search(r"[\s,]", name) and name != "all", scorer, "name",
             f"{name!r}: no spaces or commas (--method lists names with commas), and not 'all' (compare's word for "
             "every method)")


def check_registered(scorer: Scorer) -> None:
    cls, name = type(scorer), _name(scorer)
    _require(name in SCORERS, scorer, "registered", "not in prefsift.scorers.SCORERS: decorate the class with "
             "@register (and import its module, or declare a `prefsift.scorers` entry point)")
    _require(SCORERS[name] is cls, scorer, "registered", f"SCORERS[{name!r}] is {SCORERS[name]!r}, not {cls!r}")
    try:
        built = get_scorer(name)
    except Exception as error:
        raise _fail(scorer, "registered", f"get_scorer({name!r}) raises {error!r}") from error
    _require(type(built) is cls, scorer, "registered", f"get_scorer({name!r}) builds {type(built)!r}, not {cls!r}")


def check_score_method(scorer: Scorer) -> None:
    _require(type(scorer).score is not Scorer.score, scorer, "score_method",
             "the class does not define score(resources)")


def _field_type(params_cls: type, field: dataclasses.Field) -> Any:
    """The field's type, None taken out of an Optional."""
    annotation = typing.get_type_hints(params_cls)[field.name]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return inner[0] if len(inner) == 1 else annotation
    return annotation


def check_params(scorer: Scorer) -> None:
    cls = type(scorer)
    params_cls = getattr(cls, "Params", None)
    _require(isinstance(params_cls, type) and dataclasses.is_dataclass(params_cls), scorer, "params",
             f"`Params` must be a dataclass (got {params_cls!r})")
    _require(issubclass(params_cls, ScorerParams), scorer, "params",
             f"{params_cls.__name__} must subclass ScorerParams (its fields are then checked at construction)")
    for field in dataclasses.fields(params_cls):
        where = f"{params_cls.__name__}.{field.name}"
        help_text = field.metadata.get("help")
        _require(isinstance(help_text, str) and help_text.strip(), scorer, "params",
                 f"{where} has no help text: declare it with prefsift.settings.option(default, help, ...)")
        _require(field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING,
                 scorer, "params", f"{where} has no default (a scorer builds without parameters)")
        _require(field.name not in METHOD_KEYS, scorer, "params",
                 f"{where}: no parameter can be named {field.name!r} (a YAML method mapping's own key)")
        kind = _field_type(params_cls, field)
        _require(kind in SETTING_TYPES or typing.get_origin(kind) in (list, tuple), scorer, "params",
                 f"{where} is typed {kind!r}: the settings check bool, int, float, str and lists (or None)")
    try:
        default = params_cls()
    except Exception as error:
        raise _fail(scorer, "params", f"{params_cls.__name__}() raises {error!r}") from error
    _require(isinstance(scorer.params, params_cls), scorer, "params",
             f"the scorer's params are a {type(scorer.params).__name__}, not its {params_cls.__name__}")
    try:
        built = cls()
    except Exception as error:
        raise _fail(scorer, "params", f"{cls.__name__}() raises {error!r}") from error
    _require(built.params == default, scorer, "params",
             f"{cls.__name__}() has params {built.params!r}, not the defaults {default!r}")


def _outside(kind: Any, meta: dict) -> list[tuple[Any, str]]:
    """Values just outside a field's declared range and choices, each with the bound it crosses."""
    out: list[tuple[Any, str]] = []
    low, high, low_open, high_open = meta.get("low"), meta.get("high"), meta.get("low_open"), meta.get("high_open")
    if kind is int:
        if low is not None:
            out.append((math.floor(low) if low_open else math.ceil(low) - 1, f"low={low}"))
        if high is not None:
            out.append((math.ceil(high) if high_open else math.floor(high) + 1, f"high={high}"))
    elif kind is float:
        if low is not None:
            out.append((float(low) if low_open else float(np.nextafter(low, -np.inf)), f"low={low}"))
        if high is not None:
            out.append((float(high) if high_open else float(np.nextafter(high, np.inf)), f"high={high}"))
    choices = meta.get("choices")
    if choices is not None and kind is str:
        out.append(("-".join(map(str, choices)) + "-none-of-these", f"choices {list(choices)}"))
    return out


def check_ranges(scorer: Scorer) -> None:
    params_cls, name = type(scorer).Params, _name(scorer)
    for field in dataclasses.fields(params_cls):
        for value, bound in _outside(_field_type(params_cls, field), dict(field.metadata)):
            try:
                get_scorer(name, **{field.name: value})
            except ConfigError as error:
                _require(field.name in str(error), scorer, "ranges",
                         f"{field.name}={value!r} is refused with a message that does not name it: {error}")
                continue
            except Exception as error:
                raise _fail(scorer, "ranges", f"{field.name}={value!r} (outside {bound}) raises {error!r}, not a "
                                              "ConfigError") from error
            raise _fail(scorer, "ranges", f"{field.name}={value!r}, outside its declared {bound}, is accepted")


def check_needs(scorer: Scorer) -> None:
    needs = scorer.needs
    _require(isinstance(needs, tuple | list) and all(isinstance(r, str) for r in needs), scorer, "needs",
             f"`needs` must be a tuple of role names (got {needs!r})")
    unknown = [r for r in needs if r not in ROLES]
    _require(not unknown, scorer, "needs", f"unknown role(s) {', '.join(unknown)} (roles: {', '.join(ROLES)})")
    _require(len(set(needs)) == len(needs), scorer, "needs", f"a role twice in {list(needs)}")


def check_ceiling(scorer: Scorer) -> None:
    _require(isinstance(scorer.ceiling, bool), scorer, "ceiling", f"`ceiling` must be a bool (got {scorer.ceiling!r})")


def check_columns(scorer: Scorer) -> None:
    columns = getattr(scorer, "columns", None)
    _require(isinstance(columns, tuple | list) and len(columns) > 0, scorer, "columns",
             f"`columns` must be a non-empty tuple of column names (got {columns!r})")
    _require(all(isinstance(c, str) and c for c in columns), scorer, "columns",
             f"every column must be a non-empty string (got {list(columns)})")
    _require(len(set(columns)) == len(columns), scorer, "columns", f"a column twice in {list(columns)}")
    reserved = [c for c in columns if c in RESERVED_COLUMNS or c.endswith("_logps")]
    _require(not reserved, scorer, "columns", f"{', '.join(reserved)}: the score file's own column name(s) "
             "(pair_id, the log-prob and reward passes')")


def _distinct_scores(columns) -> dict[str, Any]:
    n = 10
    scores: dict[str, Any] = {"pair_id": np.asarray([f"p{i:02d}" for i in range(n)], dtype=object)}
    for k, column in enumerate(columns):
        scores[column] = np.roll(np.arange(n, dtype=float), k)
    return scores


def _apply_rule(scorer: Scorer, check: str, rule: Any, columns, scores: dict[str, Any], what: str) -> None:
    """`rule` is select_indices keywords over `columns`, which select_indices accepts on `scores` both ways prefsift
    applies it: a budget in place of the cut-offs (`run`: low/high popped, a fraction given), and the rule's own
    cut-offs (`prefsift select` without a budget) when it has some."""
    from prefsift.select import RULES, select_indices

    _require(isinstance(rule, dict), scorer, check, f"selection_rule() must return a dict (got {rule!r})")
    extra = sorted(set(rule) - set(RULE_KEYS))
    _require(not extra, scorer, check, f"unknown key(s) {', '.join(extra)} in {rule} (the select_indices keywords "
             f"a rule carries: {', '.join(RULE_KEYS)})")
    _require(rule.get("rule") in RULES, scorer, check,
             f"rule {rule.get('rule')!r} is not one of prefsift.select.RULES ({', '.join(RULES)})")
    named = ([rule["column"]] if rule.get("column") is not None else []) + list(rule.get("columns") or [])
    unknown = [c for c in named if c not in columns]
    _require(not unknown, scorer, check,
             f"{rule} reads {', '.join(map(str, unknown))}, which is not among the columns {list(columns)}")
    kwargs = {k: v for k, v in rule.items() if k != "rule"}
    budget = {k: v for k, v in kwargs.items() if k not in ("low", "high")}
    ways = [("with a budget (fraction=0.5)", {**budget, **({} if rule["rule"] == "all" else {"fraction": 0.5})})]
    if "low" in kwargs or "high" in kwargs:
        ways.append(("with its own cut-offs", kwargs))
    n = len(scores["pair_id"])
    for how, given in ways:
        try:
            rows = np.asarray(select_indices(scores, rule["rule"], **given))
        except Exception as error:
            raise _fail(scorer, check, f"select_indices refuses {rule} {how} on {what}: {error}") from error
        _require(rows.ndim == 1 and (len(rows) == 0 or (rows.min() >= 0 and rows.max() < n)), scorer, check,
                 f"select_indices gives rows {rows!r} for {n} pairs")


def check_selection_rule(scorer: Scorer) -> None:
    _apply_rule(scorer, "selection_rule", scorer.selection_rule(), scorer.columns, _distinct_scores(scorer.columns),
                "distinct scores")


def _completion_columns(scorer: Scorer, check: str, completion, columns) -> None:
    if completion is None:
        return
    _require(isinstance(completion, tuple | list) and len(completion) == 2 and completion[0] != completion[1],
             scorer, check, f"completion_columns() must be None or two distinct columns (got {completion!r})")
    unknown = [c for c in completion if c not in columns]
    _require(not unknown, scorer, check, f"{', '.join(map(str, unknown))} not among the columns {list(columns)}")


def check_completion_columns(scorer: Scorer) -> None:
    _completion_columns(scorer, "completion_columns", scorer.completion_columns(), scorer.columns)


def check_missing_input(scorer: Scorer) -> None:
    for has_reward_model in (False, True):
        for columns in ([], ["prompt", "chosen", "rejected", "score_chosen", "score_rejected"]):
            reason = scorer.missing_input(has_reward_model, columns)
            _require(reason is None or (isinstance(reason, str) and reason), scorer, "missing_input",
                     f"missing_input({has_reward_model}, {columns}) must be None or a reason (got {reason!r})")


def check_compute_passes(scorer: Scorer) -> None:
    for n, n_validation in PASS_SIZES:
        passes = scorer.compute_passes(n, n_validation)
        _require(isinstance(passes, int | float | np.integer | np.floating) and not isinstance(passes, bool),
                 scorer, "compute_passes", f"compute_passes({n}, {n_validation}) must be a number (got {passes!r})")
        _require(math.isfinite(passes) and passes >= 0, scorer, "compute_passes",
                 f"compute_passes({n}, {n_validation}) = {passes}: must be finite and >= 0")


def check_describe(scorer: Scorer) -> None:
    description = scorer.describe()
    _require(isinstance(description, dict), scorer, "describe", f"describe() must be a dict (got {description!r})")
    try:
        json.dumps(description, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise _fail(scorer, "describe", f"describe() is not JSON-serialisable (the score manifest records it): "
                                        f"{error}") from error


def check_labelled(scorer: Scorer) -> None:
    try:
        copy = labelled(scorer, CHECK_LABEL)
    except Exception as error:
        raise _fail(scorer, "labelled", f"labelled(scorer, {CHECK_LABEL!r}) raises {error!r}") from error
    what = f"the copy labelled {CHECK_LABEL!r} (columns {list(copy.columns)})"
    try:
        _apply_rule(scorer, "labelled", copy.selection_rule(), copy.columns, _distinct_scores(copy.columns), what)
        _completion_columns(scorer, "labelled", copy.completion_columns(), copy.columns)
    except AssertionError as error:
        raise AssertionError(f"{error} [{what}]") from None


STATIC_CHECKS: dict[str, Callable[[Scorer], None]] = {
    "name": check_name, "registered": check_registered, "score_method": check_score_method, "params": check_params,
    "ranges": check_ranges, "needs": check_needs, "ceiling": check_ceiling, "columns": check_columns,
    "selection_rule": check_selection_rule, "completion_columns": check_completion_columns,
    "missing_input": check_missing_input, "compute_passes": check_compute_passes, "describe": check_describe,
    "labelled": check_labelled}


# --- dynamic checks ------------------------------------------------------------------------------------------------
def _scored(scorer: Scorer, resources: Resources, check: str, what: str) -> dict[str, np.ndarray]:
    """`scorer.score(resources)`, held to the declared columns: each a 1-d float array, a value a pair."""
    out = scorer.score(resources)
    _require(isinstance(out, dict), scorer, check, f"{what} must return a dict of columns (got {type(out)})")
    _require(set(out) == set(scorer.columns), scorer, check,
             f"{what} returns the columns {sorted(out)}, declared {sorted(scorer.columns)}")
    n = len(resources.pairs.pairs)
    for column in scorer.columns:
        values = out[column]
        _require(isinstance(values, np.ndarray), scorer, check,
                 f"{what}: column {column!r} is a {type(values).__name__}, not a numpy array")
        _require(values.ndim == 1 and len(values) == n, scorer, check,
                 f"{what}: column {column!r} has shape {values.shape}, not ({n},): one value a pair")
        _require(np.issubdtype(values.dtype, np.floating), scorer, check,
                 f"{what}: column {column!r} is {values.dtype}, not a float array")
        _require(not np.isnan(values).all(), scorer, check, f"{what}: column {column!r} is NaN for every pair")
    return out


def _fresh(resources: Resources, seed: int) -> Resources:
    """A provider of the same sources (those loaded, as loaded) under `seed`, with no pass carried over."""
    loaded = dict(resources._loaded)
    return Resources(resources.pairs, resources.engine, {**resources.sources, **loaded}, out_dir=resources.out_dir,
                     seed=seed, trust_remote_code=resources.trust_remote_code, allow_dropped=resources.allow_dropped,
                     _loaded=loaded, _by_source=dict(resources._by_source))


def check_score(scorer: Scorer, resources: Resources) -> dict[str, np.ndarray]:
    """The declared columns, well formed, on which the scorer's own rule selects; returns them."""
    scores = _scored(scorer, resources, "score", "score(resources)")
    table = {"pair_id": np.asarray(resources.pairs.pairs["pair_id"], dtype=object), **scores}
    _apply_rule(scorer, "score", scorer.selection_rule(), scorer.columns, table, "its own scores")
    return scores


def check_determinism(scorer: Scorer, resources: Resources, first: dict[str, np.ndarray]) -> None:
    again = _scored(type(scorer)(scorer.params), _fresh(resources, resources.seed), "determinism",
                    "a second score(resources) under the same seed")
    for column in scorer.columns:
        a, b = first[column], again[column]
        if np.array_equal(a, b, equal_nan=True):
            continue
        gaps = np.abs(a - b)[np.isfinite(a - b)]
        how = "NaN at other pairs" if not np.array_equal(np.isnan(a), np.isnan(b)) else (
            f"max |difference| {gaps.max():.3g}" if gaps.size else "infinite at other pairs")
        raise _fail(scorer, "determinism", f"column {column!r} differs between two scorings under the same seed "
                                           f"{resources.seed} ({how})")


def check_another_seed(scorer: Scorer, resources: Resources) -> None:
    _scored(type(scorer)(scorer.params), _fresh(resources, resources.seed + 1), "another_seed",
            f"score(resources) under another seed ({resources.seed + 1})")


DYNAMIC_CHECKS: dict[str, Callable[..., Any]] = {"score": check_score, "determinism": check_determinism,
                                                  "another_seed": check_another_seed}
CHECKS = (*STATIC_CHECKS, *DYNAMIC_CHECKS)  # every check's name, as expected_failed_checks names them

__all__ = ["CHECKS", "DYNAMIC_CHECKS", "STATIC_CHECKS", "check_dynamic", "check_scorer", "check_static"]
