"""Where a training's reference log-probs come from: one function, `reference_logps`, for every training.

DPO trains against log π_ref of each pair's completions. They are computed once, before training, by the engine
(TRL's own reference pass is never run: `precompute_ref_log_probs` with the values handed in), or read back from a
score directory that already holds them for the same reference model, tokenizer and max_length. The scoring
provider (`Resources.logps("reference")`) is the third source, for trainings inside `run` and the selective scorer:
it is the same engine pass, kept in the run's shards, and handed to `train` as an array.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from prefsift.config import EngineConfig
from prefsift.engine import Engine, LogpsRun
from prefsift.errors import PrefsiftError
from prefsift.manifest import read_manifest, tokenizer_fingerprint


def reference_logps(reference, pairs, engine: EngineConfig, *, scores_dir: Path | None = None,
                    run: LogpsRun | None = None, desc: str = "reference log-probs") -> np.ndarray:
    """(n, 2) reference log-probs of `pairs` (a table with prompt/chosen/rejected and pair_id) under `reference` (a
    LoadedModel), NaN where TRL drops the pair: from `scores_dir` when given (checked: same reference, tokenizer
    and max_length, every pair present), else the engine's pass at `engine`'s settings, on its executor."""
    if scores_dir is not None:
        return from_scores(scores_dir, list(pairs["pair_id"]), reference, engine)
    return Engine(engine).logps(reference.model, reference.tokenizer, pairs, run=run, desc=desc)


def from_scores(scores_dir: Path, pair_ids: Sequence[str], reference, engine: EngineConfig) -> np.ndarray:
    """The (n, 2) reference log-probs of the pairs `pair_ids` from a score directory, matched by pair_id.

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
    missing = [pid for pid in pair_ids if pid not in index]
    if missing:
        raise PrefsiftError(f"{len(missing)} training pairs are not in {scores_dir} (e.g. {missing[0]})")
    rows = [index[pid] for pid in pair_ids]
    return np.stack([np.asarray(table["ref_chosen_logps"], dtype=float)[rows],
                     np.asarray(table["ref_rejected_logps"], dtype=float)[rows]], axis=1)
