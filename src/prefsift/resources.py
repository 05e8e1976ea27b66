"""What scorers need, by role, from one provider: models (policy, reference, validation model, reward model),
the validation pairs, an embedder, and trained copies that `run` registers. Each is loaded once (roles that name
the same source share one object and one log-prob pass), and each is described by a source and a content
fingerprint that a later process can reload from and check against.

The roles are declared once, here: `ROLES`. The score config's fields and the CLI flags name them; a scorer lists
the roles it `needs` and asks the provider for them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prefsift.config import EngineConfig
from prefsift.errors import ConfigError


@dataclass(frozen=True)
class Role:
    kind: str  # "causal" | "reward" | "pairs" | "embedder"
    source_field: str  # the ScoreConfig / CLI field that names its source
    help: str


ROLES: dict[str, Role] = {
    "policy": Role("causal", "model", "the policy θ being scored (in the TIF pipeline: the warm-up model)"),
    "reference": Role("causal", "reference", "the reference (SFT) model π_ref; defaults to the policy's source"),
    "validation": Role("causal", "validation", "θ_val: the policy trained further on the validation pairs"),
    "reward_model": Role("reward", "reward_model", "a sequence-classification reward model"),
    "validation_pairs": Role("pairs", "validation_data", "trusted validation pairs"),
    "embedder": Role("embedder", "embedder", "an embedding model (sentence-transformer or causal LM)"),
}
# TRL's column names for the policy and reference passes; the validation pass follows the same pattern.
LOGPS_COLUMNS = {"policy": ("chosen_logps", "rejected_logps"),
                 "reference": ("ref_chosen_logps", "ref_rejected_logps"),
                 "validation": ("val_chosen_logps", "val_rejected_logps")}
REWARD_COLUMNS = ("chosen_reward", "rejected_reward")  # a reward model's pass, stored beside its difference


def sources_of(config) -> dict[str, str | None]:
    """Each role's source as a `ScoreConfig` (or any config with the roles' source fields) names it."""
    return {role: getattr(config, spec.source_field) for role, spec in ROLES.items()}


def flag_of(role: str) -> str:
    return "--" + ROLES[role].source_field.replace("_", "-")


def require(needs: tuple[str, ...], sources: dict[str, object], method: str) -> None:
    """One line naming every missing role and its flag, before anything is loaded or computed. The reference
    defaults to the policy, so a missing policy is named once."""
    present = {role for role, source in sources.items() if source is not None}
    if "policy" in present:
        present.add("reference")
    missing = [r for r in needs if r not in present and not (r == "reference" and "policy" in needs)]
    if missing:
        wanted = "; ".join(f"{flag_of(r)} ({ROLES[r].help})" for r in missing)
        raise ConfigError(f"method '{method}' needs {wanted}")


@dataclass
class Resources:
    """The provider. `sources` maps a role to a source string (hub id, directory, .gguf, data file) or to an
    object already in memory (a LoadedModel, LoadedPairs, an embedder); `add` registers one later."""

    pairs: Any  # prefsift.data.LoadedPairs: the pairs being scored
    engine: EngineConfig = field(default_factory=EngineConfig)
    sources: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None  # where resumable shards go
    seed: int = 0
    trust_remote_code: bool = False
    allow_dropped: bool = False  # more than half of the pairs dropped by a log-prob pass goes on (score_pairs)
    seconds: dict[str, float] = field(default_factory=dict)  # role -> seconds of its log-prob pass, here
    # tag or role -> (wall, CPU) seconds a pass costs: as measured, or as measured when the cache kept it (a compute
    # column charges what the pass costs, not how warm the cache was)
    charged: dict[str, tuple[float, float]] = field(default_factory=dict)
    stages: dict[str, dict[str, float]] = field(default_factory=dict)  # role -> trainings that made it, seconds
    _loaded: dict[str, Any] = field(default_factory=dict)
    _by_source: dict[str, Any] = field(default_factory=dict)
    _logps: dict[tuple, np.ndarray] = field(default_factory=dict)
    _rewards: dict[tuple, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.sources.get("reference") is None and self.sources.get("policy") is not None:
            self.sources["reference"] = self.sources["policy"]

    # --- roles ---------------------------------------------------------------------------------------------
    def has(self, role: str) -> bool:
        return role in self._loaded or self.sources.get(role) is not None

    def require(self, needs: tuple[str, ...], method: str) -> None:
        require(needs, {role: role if self.has(role) else None for role in ROLES}, method)

    def add(self, role: str, resource: Any, *, stages: dict[str, float] | None = None) -> None:
        """Register a resource made in this process (e.g. a trained copy) and the trainings it cost."""
        self._loaded[role] = resource
        self.sources[role] = resource
        self.stages[role] = dict(stages or {})

    def get(self, role: str) -> Any:
        if role not in self._loaded:
            if not self.has(role):
                raise ConfigError(f"this method needs {ROLES[role].help} ({flag_of(role)})")
            self._loaded[role] = self._load(role, self.sources[role])
        return self._loaded[role]

    model = get  # a model role reads better as resources.model("policy")

    def _load(self, role: str, source: Any) -> Any:
        if not isinstance(source, str | Path):
            return source  # already in memory
        kind = ROLES[role].kind
        key = f"{kind}:{source}"
        if key not in self._by_source:
            self._by_source[key] = self._load_source(kind, str(source))
        return self._by_source[key]

    def _load_source(self, kind: str, source: str) -> Any:
        common = {"dtype": self.engine.dtype, "device": self.engine.device,
                  "trust_remote_code": self.trust_remote_code}
        if kind == "causal":
            from prefsift.models import load_model

            return load_model(source, **common)
        if kind == "reward":
            from prefsift.engine.reward import load_reward_model

            return load_reward_model(source, **common)
        if kind == "pairs":
            from prefsift.data import load_pairs

            return load_pairs(source)
        if kind == "embedder":
            from prefsift.engine.embeddings import load_embedder

            return load_embedder(source, **common)
        raise ValueError(f"unknown resource kind {kind}")

    # --- passes --------------------------------------------------------------------------------------------
    def logps(self, role: str, pairs: Any = None, tag: str | None = None) -> np.ndarray:
        """(n, 2) summed chosen/rejected log-probs under the model of `role`, computed once per distinct model,
        with resumable shards under out_dir. `pairs` (LoadedPairs) scores another table (e.g. the validation
        pairs) under its own `tag`."""
        from prefsift.engine import Engine, LogpsRun
        from prefsift.manifest import check_dropped, tokenizer_fingerprint
        from prefsift.reference import cached_logps

        loaded = self.model(role)
        data = self.pairs if pairs is None else pairs
        key = self._pass_key(loaded, data)
        if key not in self._logps:
            run = None
            if self.out_dir is not None:
                identity = {"fingerprint": loaded.fingerprint, "max_length": self.engine.max_length,
                            "batch_tokens": self.engine.batch_tokens,
                            "dtype": str(next(loaded.model.parameters()).dtype),
                            "tokenizer": tokenizer_fingerprint(loaded.tokenizer), "data": data.data_hash,
                            # --chat-template keeps the pair_ids (the data hash) and changes the text
                            "messages": data.conversational}
                run = LogpsRun(Path(self.out_dir), tag or role, identity)
            start = time.perf_counter()

            def check(n_dropped: int, n: int) -> None:  # before any forward pass: most pairs dropped stops here
                reason = [{"stage": "score", "reason": f"prompt fills max_length {self.engine.max_length}"}] * n_dropped
                check_dropped(n_dropped, n, self.allow_dropped or pairs is not None, reason)

            cost: dict = {}
            self._logps[key] = cached_logps(
                loaded, data.pairs, self.engine, check_dropped=check, cost=cost,
                compute=lambda: Engine(self.engine).logps(loaded.model, loaded.tokenizer, data.pairs, run=run,
                                                          desc=f"{tag or role} log-probs", check_dropped=check))
            self.charged[tag or role] = (cost["seconds"], cost["cpu_seconds"])
            if pairs is None:
                self.seconds[role] = time.perf_counter() - start
        return self._logps[key]

    def rewards(self, role: str = "reward_model", *, batch_size: int = 16) -> np.ndarray:
        """(n, 2) [chosen, rejected] rewards of the scored pairs under the reward model of `role`, once per model,
        batched, with resumable shards under out_dir like a log-prob pass (a failure after it loses nothing)."""
        from prefsift.engine import Engine, LogpsRun
        from prefsift.manifest import tokenizer_fingerprint

        loaded = self.model(role)
        key = self._pass_key(loaded, self.pairs)
        if key not in self._rewards:
            run = None
            if self.out_dir is not None:
                identity = {"fingerprint": loaded.fingerprint, "max_length": self.engine.max_length,
                            "batch_size": batch_size, "dtype": str(next(loaded.model.parameters()).dtype),
                            "tokenizer": tokenizer_fingerprint(loaded.tokenizer), "data": self.pairs.data_hash,
                            "messages": self.pairs.conversational, "pass": "reward"}
                run = LogpsRun(Path(self.out_dir), role, identity)
            start = time.perf_counter()
            self._rewards[key] = Engine(self.engine).rewards(loaded.model, loaded.tokenizer, self.pairs.pairs,
                                                             batch_size=batch_size, run=run, desc="reward model")
            self.seconds[role] = time.perf_counter() - start
        return self._rewards[key]

    @staticmethod
    def _pass_key(loaded: Any, data: Any) -> tuple:
        # The fingerprint as well as the object: a seed's trained copies are freed after it, and a later seed's copy
        # may be allocated at the same address (id), which alone would hand it the earlier seed's log-probs.
        return id(loaded.model), loaded.fingerprint, id(data), data.data_hash

    def has_logps(self, role: str) -> bool:
        return role in self._loaded and self._pass_key(self._loaded[role], self.pairs) in self._logps

    def logps_columns(self) -> dict[str, np.ndarray]:
        """Every computed pass over the scored pairs under its TRL column names, for scores.parquet."""
        out = {}
        for role, (chosen, rejected) in LOGPS_COLUMNS.items():
            if self.has_logps(role):
                values = self.logps(role)
                out[chosen], out[rejected] = values[:, 0], values[:, 1]
        loaded = self._loaded.get("reward_model")
        if loaded is not None and self._pass_key(loaded, self.pairs) in self._rewards:
            values = self._rewards[self._pass_key(loaded, self.pairs)]
            out[REWARD_COLUMNS[0]], out[REWARD_COLUMNS[1]] = values[:, 0], values[:, 1]
        return out

    def for_seed(self, seed: int) -> Resources:
        """A provider for another seed: the same loaded sources and finished passes (the reference's) with what they
        cost, none of the models trained for this one."""
        base = {r: v for r, v in self._loaded.items() if r not in self.stages}
        sources = {r: v for r, v in self.sources.items() if r not in self.stages}
        return Resources(self.pairs, self.engine, {**sources, **base}, out_dir=self.out_dir, seed=seed,
                         trust_remote_code=self.trust_remote_code, allow_dropped=self.allow_dropped,
                         seconds=dict(self.seconds), charged=self.charged, _loaded=base,
                         _by_source=self._by_source, _logps=self._logps,
                         _rewards=self._rewards)

    def over(self, pairs: Any, rows: np.ndarray | None = None) -> Resources:
        """A provider of the same roles over other pairs (`run`'s candidate pool: a subset of these): the models
        this one loaded or has registered, and those it registers later, are shared; its passes run over `pairs`
        alone, under their own data hash (shards, log-prob cache), timed and charged apart. With `rows` (pairs'
        rows in this provider's pairs), a log-prob pass this one already finished is taken for those rows rather
        than run again, at no charge."""
        view = Resources(pairs, self.engine, self.sources, out_dir=self.out_dir, seed=self.seed,
                         trust_remote_code=self.trust_remote_code, allow_dropped=self.allow_dropped,
                         stages=self.stages, _loaded=self._loaded, _by_source=self._by_source, _logps=self._logps,
                         _rewards=self._rewards)
        if rows is not None:
            for role in LOGPS_COLUMNS:
                if self.has_logps(role):
                    self._logps[self._pass_key(self._loaded[role], pairs)] = self.logps(role)[rows]
        return view

    def cost(self, needs: tuple[str, ...]) -> float:
        """Seconds a method's roles cost: their log-prob passes and the trainings that made them (once each)."""
        stages: dict[str, float] = {}
        for role in needs:
            stages.update(self.stages.get(role, {}))
        passes = {id(getattr(self._loaded[r], "model", self._loaded[r])): self.seconds[r] for r in needs
                  if r in self.seconds and r in self._loaded}
        return sum(passes.values()) + sum(stages.values())

    def describe(self) -> dict[str, dict]:
        """The manifest's record of every loaded role: source, content fingerprint and tokenizer hash."""
        from prefsift.manifest import tokenizer_fingerprint

        out = {}
        for role, resource in self._loaded.items():
            entry: dict[str, Any] = {"source": str(getattr(resource, "source", ""))}
            if hasattr(resource, "fingerprint"):
                entry["fingerprint"] = resource.fingerprint
            if hasattr(resource, "tokenizer"):
                entry["tokenizer"] = tokenizer_fingerprint(resource.tokenizer)
            if hasattr(resource, "data_hash"):
                entry["data_hash"] = resource.data_hash
            out[role] = entry
        return out
