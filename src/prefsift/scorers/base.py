"""The scorer interface and its one registry.

A scorer declares the models it needs and maps the pairs to score columns; the pipeline never special-cases one.
Models and log-prob passes live in the `ScoringContext`, so scorers that share a pass (irm and lossdiff both need
the policy's log-probs) run it once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from prefsift.errors import ConfigError, PrefsiftError
from prefsift.logps import LogpsRun, compute_logps
from prefsift.manifest import tokenizer_fingerprint

ROLE_FLAGS = {"policy": "--model", "reference": "--reference", "validation": "--validation",
              "reward_model": "--reward-model"}
# TRL's column names for the policy and reference passes; the validation pass follows the same pattern.
LOGPS_COLUMNS = {"policy": ("chosen_logps", "rejected_logps"),
                 "reference": ("ref_chosen_logps", "ref_rejected_logps"),
                 "validation": ("val_chosen_logps", "val_rejected_logps")}


@dataclass
class ScoringContext:
    """What scorers read: the pairs, the loaded models by role, and the engine settings."""

    pairs: object  # datasets.Dataset with pair_id, prompt, chosen, rejected (+ the input's extra columns in raw)
    raw: object | None = None
    models: dict = field(default_factory=dict)  # role -> prefsift.models.LoadedModel
    beta: float = 0.1
    max_length: int | None = 1024
    batch_tokens: int = 8192
    seed: int = 0
    out_dir: Path | None = None  # where resumable shards go
    data_hash: str = ""
    band: tuple[float, float] = (0.1, 0.9)
    seconds: dict = field(default_factory=dict)  # role -> seconds of its log-prob pass (a shared pass: once)
    _logps: dict = field(default_factory=dict)

    def model(self, role: str):
        if role not in self.models:
            raise PrefsiftError(f"this method needs a {role} model ({ROLE_FLAGS[role]})")
        return self.models[role]

    def logps(self, role: str) -> np.ndarray:
        """(n, 2) summed chosen/rejected log-probs under the model of `role`, computed once per distinct model."""
        loaded = self.model(role)
        key = id(loaded.model)
        if key not in self._logps:
            run = None
            if self.out_dir is not None:
                identity = {"model": loaded.source, "fingerprint": loaded.fingerprint, "max_length": self.max_length,
                            "dtype": str(next(loaded.model.parameters()).dtype),
                            "tokenizer": tokenizer_fingerprint(loaded.tokenizer), "data": self.data_hash}
                run = LogpsRun(self.out_dir, role, identity)
            start = time.perf_counter()
            self._logps[key] = compute_logps(loaded.model, loaded.tokenizer, self.pairs, max_length=self.max_length,
                                             batch_tokens=self.batch_tokens, run=run, desc=f"{role} log-probs")
            self.seconds[role] = time.perf_counter() - start
        return self._logps[key]

    def logps_columns(self) -> dict[str, np.ndarray]:
        """Every computed pass under its TRL column names, for scores.parquet."""
        out = {}
        for role, (chosen, rejected) in LOGPS_COLUMNS.items():
            if role in self.models and id(self.models[role].model) in self._logps:
                values = self._logps[id(self.models[role].model)]
                out[chosen], out[rejected] = values[:, 0], values[:, 1]
        return out


def implicit_reward_margin(policy: np.ndarray, reference: np.ndarray, beta: float) -> np.ndarray:
    """Δ = β[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))], from (n, 2) log-prob arrays."""
    return beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))


def dpo_loss(margin: np.ndarray) -> np.ndarray:
    """−log σ(Δ), computed stably."""
    return np.logaddexp(0.0, -margin)


class Scorer:
    """Maps the pairs of a `ScoringContext` to score columns. Subclasses set the class attributes."""

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()  # roles, keys of ROLE_FLAGS
    columns: ClassVar[tuple[str, ...]]  # the score columns it writes
    default_rule: ClassVar[dict] = {"rule": "top"}  # how `select` uses the columns unless told otherwise

    def score(self, context: ScoringContext) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @classmethod
    def selection_rule(cls) -> dict:
        """`select_indices` keyword arguments of the method's own rule: rule plus column or columns."""
        rule = dict(cls.default_rule)
        if "columns" not in rule:
            rule.setdefault("column", cls.columns[0])
        return rule


SCORERS: dict[str, type[Scorer]] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
    SCORERS[cls.name] = cls
    return cls


def get_scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise ConfigError(f"unknown method '{name}' (known: {', '.join(sorted(SCORERS))})")
    return SCORERS[name]()
