"""The score stage, the one path `prefsift score`, `run` and `demo` share: check what every scorer needs, run them
over one provider (shared passes run once), and write scores.parquet + pairs.parquet + manifest.json."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prefsift.config import EngineConfig, ScoreConfig  # noqa: F401 (ScoreConfig: re-exported)
from prefsift.data import LoadedPairs
from prefsift.errors import ConfigError, PrefsiftError
from prefsift.manifest import read_manifest, tokenizer_fingerprint, write_manifest
from prefsift.resources import LOGPS_COLUMNS, Resources
from prefsift.scorers import Scorer


@dataclass
class ScoreResult:
    scores: dict[str, np.ndarray]  # pair_id + score columns + TRL-named log-prob columns
    seconds: dict[str, float]  # method -> its cost: own time, its passes, the trainings its models needed
    n_dropped: int  # pairs TRL would drop (prompt fills max_length): NaN in every score column


def score_pairs(data: LoadedPairs, scorers: list[Scorer], resources: Resources, out_dir: Path | None = None
                ) -> ScoreResult:
    """Score every pair of `data` with each scorer; with `out_dir`, write the files other stages read."""
    if data.kind == "unpaired":
        raise ConfigError("scoring needs preference pairs (prompt, chosen, rejected); this data is unpaired (KTO)")
    for scorer in scorers:  # every missing model is named before any model is loaded
        resources.require(scorer.needs, scorer.name)
    scores: dict[str, np.ndarray] = {"pair_id": np.asarray(data.pairs["pair_id"], dtype=object)}
    seconds: dict[str, float] = {}
    for scorer in scorers:
        for role in scorer.needs:
            if role in LOGPS_COLUMNS:
                resources.logps(role)  # once per model, shared by every scorer that needs it; timed apart
        if "embedder" in scorer.needs and hasattr(scorer.params, "item"):
            from prefsift.embeddings import embed_items

            start = time.perf_counter()  # the embedding pass, shared like a log-prob pass, charged to each user
            embed_items(resources, scorer.params.item, batch_size=getattr(scorer.params, "batch_size", 32))
            resources.seconds["embedder"] = resources.seconds.get("embedder", 0.0) + time.perf_counter() - start
        start = time.perf_counter()
        columns = scorer.score(resources)
        if set(columns) != set(scorer.columns):
            raise RuntimeError(f"scorer {scorer.name} wrote {sorted(columns)}, declared {list(scorer.columns)}")
        seconds[scorer.name] = time.perf_counter() - start + resources.cost(scorer.needs)
        for name, values in columns.items():
            values = np.asarray(values, dtype=float)
            if len(values) != len(data.pairs):
                raise RuntimeError(f"scorer {scorer.name} wrote {len(values)} values for {len(data.pairs)} pairs")
            scores[name] = values
    logps = resources.logps_columns()
    dropped = np.zeros(len(data.pairs), dtype=bool)
    for values in logps.values():
        dropped |= np.isnan(values)
    for name in [c for c in scores if c != "pair_id"]:
        scores[name] = np.where(dropped, np.nan, scores[name])  # a pair TRL drops is never selected
    scores.update(logps)
    result = ScoreResult(scores, seconds, int(dropped.sum()))
    if out_dir is not None:
        record = {
            "methods": {s.name: {**s.describe(), "seconds": seconds[s.name]} for s in scorers},
            "default_rule": scorers[0].selection_rule() if len(scorers) == 1 else None,
            "engine": dataclasses.asdict(resources.engine), "seed": resources.seed,
            "data": {"source": data.source, "kind": data.kind, "hash": data.data_hash, "n_pairs": len(data.pairs),
                     "n_invalid": len(data.invalid)},
            "models": resources.describe(), "n_dropped_too_long": result.n_dropped,
        }
        write_scores(Path(out_dir), scores, data, record)
    return result


def _replace(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    tmp.replace(path)  # atomic: a reader never sees half a file


def write_scores(out_dir: Path, scores: dict[str, np.ndarray], data: LoadedPairs, record: dict) -> None:
    """scores.parquet (pair_id + scores + TRL-named log-probs), pairs.parquet (the input's own rows), and the
    manifest last, so a directory with a manifest is complete."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pa.table({k: list(v) if k == "pair_id" else v for k, v in scores.items()})
    _replace(out_dir / "scores.parquet", lambda p: pq.write_table(table, p))
    _replace(out_dir / "pairs.parquet", lambda p: pq.write_table(data.raw.with_format("arrow")[:], p))
    write_manifest(out_dir, "score", record)


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
    resources = Resources(data, engine, config.sources(), out_dir=out_dir, seed=config.seed,
                          trust_remote_code=config.trust_remote_code)
    return score_pairs(data, scorers, resources, out_dir)


def reference_logps_from_scores(scores_dir: Path, data: LoadedPairs, reference, engine: EngineConfig
                                ) -> np.ndarray:
    """The (n, 2) reference log-probs of `data`'s pairs from a score directory, matched by pair_id.

    Refuses (one line, naming the flag that fixes it) when that directory's reference model (weights
    fingerprint, tokenizer) or max_length differ from training's, or a pair is missing: log-probs of another
    model would silently train against the wrong reference."""
    manifest = read_manifest(Path(scores_dir))
    if "ref_chosen_logps" not in pq.read_schema(Path(scores_dir) / "scores.parquet").names:
        raise PrefsiftError(f"{scores_dir}/scores.parquet has no reference log-probs (score with irm or lossdiff)")
    scored = manifest.get("models", {}).get("reference", {})
    scored_length = manifest.get("engine", {}).get("max_length")
    if scored.get("fingerprint") != reference.fingerprint or \
            scored.get("tokenizer") != tokenizer_fingerprint(reference.tokenizer):
        raise PrefsiftError(f"{scores_dir} was scored against reference {scored.get('source')!r}, not "
                            f"{reference.source!r}: pass that model as --reference, or drop --scores")
    if scored_length != engine.max_length:
        raise PrefsiftError(f"{scores_dir} was scored at max_length {scored_length}, training uses "
                            f"{engine.max_length}: pass --max-length {scored_length}, or drop --scores")
    table = pq.read_table(Path(scores_dir) / "scores.parquet").to_pydict()
    index = {pid: i for i, pid in enumerate(table["pair_id"])}
    missing = [pid for pid in data.pairs["pair_id"] if pid not in index]
    if missing:
        raise PrefsiftError(f"{len(missing)} training pairs are not in {scores_dir} (e.g. {missing[0]})")
    rows = [index[pid] for pid in data.pairs["pair_id"]]
    return np.stack([np.asarray(table["ref_chosen_logps"], dtype=float)[rows],
                     np.asarray(table["ref_rejected_logps"], dtype=float)[rows]], axis=1)
