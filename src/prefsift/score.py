"""The score stage, the one path `prefsift score`, `run` and `demo` share: check what every scorer needs, run them
over one provider (shared passes run once), and write scores.parquet + pairs.parquet + manifest.json."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prefsift.config import EngineConfig, ScoreConfig  # noqa: F401 (ScoreConfig: re-exported)
from prefsift.data import LoadedPairs
from prefsift.engine.tokenize import non_finite_logps
from prefsift.errors import ConfigError
from prefsift.manifest import check_dropped, dropped_record, model_failure, write_dropped, write_manifest
from prefsift.resources import LOGPS_COLUMNS, REWARD_COLUMNS, Resources, flag_of, sources_of
from prefsift.scorers import Scorer


@dataclass
class ScoreResult:
    scores: dict[str, np.ndarray]  # pair_id + score columns + TRL-named log-prob columns
    seconds: dict[str, float]  # method -> its cost: own time, its passes, the trainings its models needed
    n_dropped: int  # pairs left out here (prompt fills max_length, a non-finite score): NaN in every score column
    dropped: list[dict] = dataclasses.field(default_factory=list)  # dropped.jsonl's records, input rows included
    wall_seconds: float = 0.0  # the stage's own clock, start to end: what the user waited
    pass_seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # each pass run here, once: role -> s
    own_seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # method -> its work beyond the passes

    def timing(self) -> str:
        """Times that add up: the wall clock, then each shared pass once and each method's own work. (`seconds`
        charges a shared pass to every method that reads it, the cost of each method alone: their sum counts a
        pass as often as methods share it.)"""
        passes = ", ".join(f"{role} {s:.1f}s" for role, s in self.pass_seconds.items())
        own = ", ".join(f"{method} {s:.1f}s" for method, s in self.own_seconds.items())
        rest = self.wall_seconds - sum(self.pass_seconds.values()) - sum(self.own_seconds.values())
        return (f"in {self.wall_seconds:.1f}s ({f'passes, once each: {passes}; ' if passes else ''}methods: {own}; "
                f"loading models, checks and files: {max(rest, 0.0):.1f}s)")


def _check_pass(resources: Resources, role: str, pair_ids) -> np.ndarray:
    """The too-long mask of `role`'s log-prob pass over the scored pairs; a NaN or inf of a pair that fits stops
    with one line naming the role's model."""
    loaded = resources.model(role)
    too_long, failed = non_finite_logps(resources.logps(role), loaded.tokenizer, resources.pairs.pairs,
                                        resources.engine.max_length)
    if failed.any():
        raise model_failure(f"the {role} model {loaded.source} ({flag_of(role)})", failed, pair_ids,
                            f"check it, or pass another {flag_of(role)}", max_length=resources.engine.max_length)
    return too_long


def _check_embeddings(resources: Resources, sides: dict[str, np.ndarray], pair_ids) -> None:
    """An embedding with a NaN or inf (a broken embedder: NaN weights, an overflowing dtype) stops with one line
    naming the embedder, before a scorer turns it into distances every pair would share."""
    failed = np.zeros(len(pair_ids), dtype=bool)
    for vectors in sides.values():
        failed |= ~np.isfinite(np.asarray(vectors, dtype=float)).all(axis=1)
    if failed.any():
        embedder = resources.get("embedder")
        raise model_failure(f"the embedder {getattr(embedder, 'source', '')} (--embedder)", failed, pair_ids,
                            "check it, or pass another --embedder", tokenized=False)


def score_pairs(data: LoadedPairs, scorers: list[Scorer], resources: Resources, out_dir: Path | None = None
                ) -> ScoreResult:
    """Score every pair of `data` with each scorer; with `out_dir`, write the files other stages read.

    A pair whose prompt fills max_length, or whose score is not finite (NaN, ±inf: a dataset's rating column, a
    diverged model), is left out: NaN in every score column, a record in dropped.jsonl. A run that would leave out
    every pair, or more than half without `resources.allow_dropped`, stops with one line instead of writing them."""
    if data.kind == "unpaired":
        raise ConfigError("scoring needs preference pairs (prompt, chosen, rejected); this data is unpaired (KTO)")
    for scorer in scorers:  # every missing model is named before any model is loaded
        resources.require(scorer.needs, scorer.name)
    began, passes_before = time.perf_counter(), dict(resources.seconds)
    scores: dict[str, np.ndarray] = {"pair_id": np.asarray(data.pairs["pair_id"], dtype=object)}
    seconds: dict[str, float] = {}
    own: dict[str, float] = {}
    checked: dict[str, np.ndarray] = {}  # role -> its pass's too-long mask, checked once
    for scorer in scorers:
        for role in scorer.needs:
            if role in LOGPS_COLUMNS:
                resources.logps(role)  # once per model, shared by every scorer that needs it; timed apart
                if role not in checked:  # a model's NaN stops here, before a scorer turns it into scores
                    checked[role] = _check_pass(resources, role, scores["pair_id"])
        if "embedder" in scorer.needs and hasattr(scorer.params, "item"):
            from prefsift.engine.embeddings import embed_items

            start = time.perf_counter()  # the embedding pass, shared like a log-prob pass, charged to each user
            sides = embed_items(resources, scorer.params.item, batch_size=getattr(scorer.params, "batch_size", 32))
            resources.seconds["embedder"] = resources.seconds.get("embedder", 0.0) + time.perf_counter() - start
            _check_embeddings(resources, sides, scores["pair_id"])
        start, in_passes = time.perf_counter(), sum(resources.seconds.values())
        columns = scorer.score(resources)
        if set(columns) != set(scorer.columns):
            raise RuntimeError(f"scorer {scorer.name} wrote {sorted(columns)}, declared {list(scorer.columns)}")
        seconds[scorer.name] = time.perf_counter() - start + resources.cost(scorer.needs)
        # a pass the scorer ran itself (a reward model's) is a pass, timed once with the others, not its own work
        own[scorer.name] = time.perf_counter() - start - (sum(resources.seconds.values()) - in_passes)
        for name, values in columns.items():
            values = np.asarray(values, dtype=float)
            if len(values) != len(data.pairs):
                raise RuntimeError(f"scorer {scorer.name} wrote {len(values)} values for {len(data.pairs)} pairs")
            scores[name] = values
    logps = resources.logps_columns()
    # a pair is too long only when a pass's tokenizer says so; a NaN or inf of a pair that fits is the model's
    too_long = np.zeros(len(data.pairs), dtype=bool)
    for role in LOGPS_COLUMNS:
        if resources.has_logps(role):
            too_long |= checked[role] if role in checked else _check_pass(resources, role, scores["pair_id"])
    if REWARD_COLUMNS[0] in logps:  # a reward model truncates, never drops: every non-finite reward is its failure
        failed = ~(np.isfinite(logps[REWARD_COLUMNS[0]]) & np.isfinite(logps[REWARD_COLUMNS[1]]))
        if failed.any():
            source = resources.model("reward_model").source
            raise model_failure(f"the reward model {source} (--reward-model)", failed, scores["pair_id"],
                                "check it, or pass another --reward-model", tokenized=False)
    records = [dropped_record("data", row.reason, row=row.row) for row in data.invalid]
    records += _score_drops(data, scores, too_long, resources.engine.max_length)
    dropped = too_long.copy()
    for name in [c for c in scores if c != "pair_id"]:
        dropped |= ~np.isfinite(scores[name])
    for name in [c for c in scores if c != "pair_id"]:
        # a pair TRL drops, or with an inf score (which would rank first), is never selected
        scores[name] = np.where(dropped, np.nan, scores[name])
    check_dropped(int(dropped.sum()), len(data.pairs), resources.allow_dropped, records)
    scores.update(logps)
    ran = {role: t for role, t in resources.seconds.items() if passes_before.get(role) != t}
    result = ScoreResult(scores, seconds, int(dropped.sum()), records, time.perf_counter() - began, ran, own)
    if out_dir is not None:
        record = {
            "methods": {s.name: {**s.describe(), "seconds": seconds[s.name]} for s in scorers},
            "default_rule": scorers[0].selection_rule() if len(scorers) == 1 else None,
            "engine": dataclasses.asdict(resources.engine), "seed": resources.seed,
            "data": {"source": data.source, "kind": data.kind, "hash": data.data_hash, "n_pairs": len(data.pairs),
                     "n_invalid": len(data.invalid), "keys": data.keys},  # `select` re-splits with these
            "models": resources.describe(), "n_dropped_too_long": int(too_long.sum()),
            "n_dropped": result.n_dropped,
            # what the user waited, each shared pass once and each method's own work: these add up, `seconds` not
            "timing": {"wall_seconds": result.wall_seconds, "passes": ran, "methods_own": own},
        }
        write_scores(Path(out_dir), scores, data, record, records)
        result.wall_seconds = time.perf_counter() - began  # the files written too
    return result


def _score_drops(data: LoadedPairs, scores: dict[str, np.ndarray], too_long: np.ndarray,
                 max_length: int | None) -> list[dict]:
    """dropped.jsonl's score-stage records: one a pair, the first reason found, with its input row."""
    rows = data.rows or [None] * len(data.pairs)
    names = [c for c in scores if c != "pair_id"]
    out = []
    for i in np.flatnonzero(too_long | np.any([~np.isfinite(scores[c]) for c in names], axis=0)
                            if names else too_long):
        if too_long[i]:
            reason = f"prompt fills max_length {max_length}"
        else:
            name = next(c for c in names if not np.isfinite(scores[c][i]))
            reason = f"non-finite score {name}={scores[name][i]}"
        out.append(dropped_record("score", reason, pair_id=str(scores["pair_id"][i]), row=rows[i]))
    return out


def write_scores(out_dir: Path, scores: dict[str, np.ndarray], data: LoadedPairs, record: dict,
                 dropped: list[dict] | None = None) -> None:
    """scores.parquet (pair_id + scores + TRL-named log-probs), pairs.parquet (the input's own rows),
    dropped.jsonl and the manifest, all into a staging directory swapped in whole: a failure part-way leaves the
    earlier results untouched (prefsift.output). Only the old directory's caches (resumable shards, embeddings,
    influence) come along: whatever else it held was derived from the old scores (`prefsift analyze`'s
    analysis.json, analysis.md and scatter plot) and would sit beside scores of other data."""
    from prefsift.output import CACHE_ENTRIES, staged

    table = pa.table({k: list(v) if k == "pair_id" else v for k, v in scores.items()})
    with staged(Path(out_dir), "score", carry=CACHE_ENTRIES) as tmp:
        pq.write_table(table, tmp / "scores.parquet")
        write_pairs_parquet(data, tmp / "pairs.parquet")
        write_dropped(tmp, dropped or [])
        write_manifest(tmp, "score", record)


def write_pairs_parquet(data: LoadedPairs, path: Path) -> None:
    """The input's own rows, batch by batch: never gathered into memory whole. A table backed by one Arrow file (a
    streamed input) is read from that file batch by batch rather than through its memory map, whose touched pages
    would stay resident."""
    files = data.raw.cache_files
    if len(files) == 1 and data.raw._indices is None:
        with pa.ipc.open_stream(pa.OSFile(files[0]["filename"])) as reader, \
                pq.ParquetWriter(path, data.raw.features.arrow_schema) as writer:
            for batch in reader:
                writer.write_batch(batch)
        return
    table = data.raw.with_format("arrow")
    first = table[0:8192]
    with pq.ParquetWriter(path, first.schema) as writer:
        writer.write_table(first)
        for start in range(8192, len(data.raw), 8192):
            writer.write_table(table[start:start + 8192])


def method_params(methods: list[str], params: dict) -> dict[str, dict]:
    """`--param` values by method: `key=v` belongs to the one method given, `method.key=v` to that method."""
    out: dict[str, dict] = {name: {} for name in methods}
    for key, value in params.items():
        name, dot, field = key.rpartition(".")
        if not dot:
            if len(methods) > 1:
                raise ConfigError(f"--param {key}: with several methods, name one ({methods[0]}.{key}=...)")
            name, field = methods[0], key
        if name not in out:
            raise ConfigError(f"--param {key}: '{name}' is not one of the methods ({', '.join(methods)})")
        out[name][field] = value
    return out


def score(data: LoadedPairs, config: ScoreConfig, engine: EngineConfig, out_dir: Path | None = None,
          params: dict[str, dict] | None = None) -> ScoreResult:
    """`prefsift score`: one method or several over one provider, models from the config's sources. `params`:
    {method: {parameter: value}}."""
    from prefsift.scorers import get_scorer

    scorers = [get_scorer(name, **(params or {}).get(name, {})) for name in config.methods()]
    resources = Resources(data, engine, sources_of(config), out_dir=out_dir, seed=config.seed,
                          trust_remote_code=config.trust_remote_code, allow_dropped=config.allow_dropped)
    return score_pairs(data, scorers, resources, out_dir)
