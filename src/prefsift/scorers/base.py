"""The scorer interface and its one registry.

A scorer is scikit-learn-plain: its parameters are a typed `Params` dataclass (defaults, help, ranges, checked at
construction), it declares the roles it `needs` from the provider (`prefsift.resources.ROLES`), the columns it
writes and its own selection rule, and one method maps the pairs to score columns. The score stage never
special-cases a scorer, and a scorer's parameters reach YAML (`methods: [{name: irm, band_low: 0.2}]`) and the CLI
(`--param band_low=0.2`) without any other file knowing them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

import numpy as np

from prefsift.errors import ConfigError
from prefsift.maths import check_band
from prefsift.settings import Checked, from_dict, option


@dataclasses.dataclass
class ScorerParams(Checked):
    """A scorer without parameters of its own."""


BAND_LOW, BAND_HIGH = 0.1, 0.9  # the middle band's default percentiles: the TIF paper's 10-90%


@dataclasses.dataclass
class BandParams(ScorerParams):
    """Percentile cut-offs of the middle band a band rule keeps."""

    band_low: float = option(BAND_LOW, "Lower percentile of the middle band kept.", low=0.0, high=1.0)
    band_high: float = option(BAND_HIGH, "Upper percentile of the middle band kept.", low=0.0, high=1.0)

    def check(self) -> None:
        check_band(self.band_low, self.band_high)


class Scorer:
    """Maps the pairs of a `Resources` provider to score columns. Subclasses set the class attributes, a `Params`
    dataclass when they have parameters, and `score`."""

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()  # roles, keys of prefsift.resources.ROLES
    columns: ClassVar[tuple[str, ...]]  # the score columns it writes
    Params: ClassVar[type[ScorerParams]] = ScorerParams
    ceiling: ClassVar[bool] = False  # selects by hidden labels (a benchmark's oracle): a ceiling, not a method
    # inputs beyond the roles, in the words `prefsift methods` prints (a reward model or rating columns, ...)
    inputs: ClassVar[str] = ""

    def __init__(self, params: ScorerParams | None = None) -> None:
        self.params = params if params is not None else self.Params()

    def score(self, resources) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def completion_columns(self) -> tuple[str, str] | None:
        """The score columns of each pair's chosen and rejected completion when the method selects completions and
        its subsets train with KTO (ISA, as its paper); None: it selects pairs and they train with DPO."""
        return None

    def requirements(self) -> str:
        """What the method needs, as the flags and columns a user gives: its roles (the reference defaults to
        the policy) and its other `inputs`; "nothing" only when it reads nothing but the pairs."""
        from prefsift.resources import flag_of

        flags = [flag_of(role) for role in self.needs]
        if "policy" in self.needs and "reference" in self.needs:
            flags[self.needs.index("reference")] = "--reference (default: --model)"
        parts = [", ".join(flags)] if flags else []
        parts += [self.inputs] if self.inputs else []
        return "; and ".join(parts) or "nothing"

    def missing_input(self, has_reward_model: bool, columns: list[str]) -> str | None:
        """Why this scorer cannot score data with these input `columns` (and a reward model or not), beyond the
        roles it `needs`; None when it can. `prefsift compare` leaves such a method out of `all`."""
        return None

    def compute_passes(self, n_pairs: int, n_validation: int) -> float:
        """Pair passes (forward-pass equivalents over one pair) the scorer spends beyond the log-prob passes of the
        roles it needs, which the pipeline counts itself: what the compute column charges it."""
        return 0.0

    def selection_rule(self) -> dict[str, Any]:
        """`select_indices` keyword arguments of the method's own rule (rule, column(s), band cut-offs). A
        fraction or count given by the user replaces the cut-offs."""
        if isinstance(self.params, BandParams):
            return {"rule": "band", "column": self.columns[0], "low": self.params.band_low,
                    "high": self.params.band_high}
        return {"rule": "top", "column": self.columns[0]}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "params": dataclasses.asdict(self.params), "needs": list(self.needs),
                "columns": list(self.columns), "rule": self.selection_rule()}


SCORERS: dict[str, type[Scorer]] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
    if cls.name in SCORERS and SCORERS[cls.name] is not cls:
        raise ValueError(f"two scorers are named {cls.name!r}: {SCORERS[cls.name]} and {cls}")
    SCORERS[cls.name] = cls
    return cls


def get_scorer(name: str, **params: Any) -> Scorer:
    """The scorer `name` with its parameters checked (one line naming the bad one, before any model pass)."""
    if name not in SCORERS:
        raise ConfigError(f"unknown method '{name}' (known: {', '.join(sorted(SCORERS))})")
    cls = SCORERS[name]
    return cls(from_dict(cls.Params, params, f"method '{name}'"))


def labelled(scorer: Scorer, label: str) -> Scorer:
    """`scorer` under another name, so one method can run twice with other parameters in one comparison (e.g. ISA's
    two sort orders): its rows, timings and manifest entry carry `label`, and its columns are renamed to match
    (isa, isa_chosen → isa_typical, isa_typical_chosen) so the two never overwrite each other's scores."""
    cls = type(scorer)
    stem, new = cls.name.replace("-", "_"), label.replace("-", "_")

    def rename(column: str) -> str:
        return new + column[len(stem):] if column.startswith(stem) else f"{new}_{column}"

    class Labelled(cls):  # type: ignore[valid-type, misc]
        name = label
        method = cls.name

        def __init__(self, params: ScorerParams | None = None) -> None:
            super().__init__(params)
            self.columns = tuple(rename(c) for c in self.columns)

        def score(self, resources) -> dict[str, np.ndarray]:
            return {rename(k): v for k, v in super().score(resources).items()}

        def selection_rule(self) -> dict[str, Any]:
            # the unlabelled scorer's rule, renamed once: the base rule reads `self.columns`, which are this copy's
            # renamed ones already (`irm` labelled `irm-narrow` selected on `irm_narrow_narrow`)
            rule = cls(self.params).selection_rule()
            if rule.get("column"):
                rule["column"] = rename(rule["column"])
            if rule.get("columns"):
                rule["columns"] = [rename(c) for c in rule["columns"]]
            return rule

        def completion_columns(self) -> tuple[str, str] | None:
            columns = super().completion_columns()
            return None if columns is None else (rename(columns[0]), rename(columns[1]))

        def describe(self) -> dict[str, Any]:
            return {**super().describe(), "method": cls.name}

    Labelled.__name__ = Labelled.__qualname__ = f"{cls.__name__}[{label}]"
    return Labelled(scorer.params)


def parse_methods(specs: list) -> list[Scorer]:
    """The methods of a run (names, or {name: ..., <param>: ...} mappings) as scorer objects, their parameters
    checked, each method once."""
    scorers = [parse_method(m) for m in specs]
    names = [s.name for s in scorers]
    if len(set(names)) != len(names):
        raise ConfigError(f"methods: each method once (got {', '.join(names)})")
    return scorers


def parse_method(spec: Any) -> Scorer:
    """A method as YAML gives it: a name, or a mapping {name: ..., <param>: ..., label: ...}; `label` names a second
    run of the same method with other parameters."""
    if isinstance(spec, str):
        return get_scorer(spec)
    if isinstance(spec, dict) and isinstance(spec.get("name"), str):
        params = {k: v for k, v in spec.items() if k not in ("name", "label")}
        scorer = get_scorer(spec["name"], **params)
        label = spec.get("label")
        if label is None or label == scorer.name:
            return scorer
        if not isinstance(label, str) or not re.fullmatch(r"[a-z][a-z0-9-]*", label) or label in SCORERS:
            raise ConfigError(f"method label {label!r}: lower-case letters, digits and '-', and not another "
                              "method's name")
        return labelled(scorer, label)
    raise ConfigError(f"a method is a name or a mapping with a 'name' key (got {spec!r})")
