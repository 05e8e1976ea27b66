"""Soft selection: any score column turned into per-pair training weights, written as a `weight` column that
`prefsift train` honours with a weighted DPO loss (Σ w·ℓ / Σ w a batch; see prefsift.train).

Transforms, each of the score s, or of −s with `reverse` (lower scores weigh more):
- `rank`: the percentile rank of s among the scored pairs, in [0, 1] (ties by pair_id, as selection breaks them):
  the lowest score weighs 0, the highest 1, evenly spaced between whatever the scores' scale.
- `softmax`: n·softmax(s / T) over the n scored pairs, so the mean weight is 1 and a batch's loss keeps its scale;
  a small temperature T concentrates the weight on the top, a large one tends to uniform weights.
- `band`: 1 where the percentile rank lies in [low, high], 0 outside: hard band selection written as weights.

A pair without a score (NaN: the log-prob engine dropped it, its prompt filling max_length) weighs 0 and is counted.
Weight 0 trains exactly as leaving the pair out (tests/test_train.py), so `weigh_scores` leaves those pairs out of
the file it writes instead of paying their forward passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from prefsift.errors import ConfigError, PrefsiftError
from prefsift.manifest import check_scores, dropped_record, read_manifest, write_dropped, write_manifest
from prefsift.maths import check_band, percentile_ranks
from prefsift.output import staged
from prefsift.select import COLUMN_MODES, score_columns, subset_source, write_subset

TRANSFORMS = ("rank", "softmax", "band")


def score_weights(values: Sequence[float], transform: str, *, temperature: float | None = None,
                  low: float | None = None, high: float | None = None, reverse: bool = False,
                  pair_ids: Sequence[str] | None = None) -> np.ndarray:
    """Per-pair weights of `transform` over `values`; NaN scores weigh 0. Options that the transform does not read
    are refused rather than ignored."""
    if transform not in TRANSFORMS:
        raise ConfigError(f"--transform must be one of {', '.join(TRANSFORMS)} (got {transform!r})")
    if temperature is not None and transform != "softmax":
        raise ConfigError("--temperature shapes the softmax transform only")
    if (low is not None or high is not None) and transform != "band":
        raise ConfigError("--low/--high cut the band transform only")
    scores = np.asarray(values, dtype=float)
    scored = ~np.isnan(scores)
    if not scored.any():
        raise PrefsiftError("every score is NaN: no pair to weigh")
    if reverse:
        scores = -scores
    weights = np.zeros(len(scores))
    if transform == "rank":
        weights[scored] = percentile_ranks(scores, pair_ids)[scored]
    elif transform == "softmax":
        temperature = 1.0 if temperature is None else temperature
        if not (np.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"--temperature must be a finite number > 0 (got {temperature})")
        logits = scores[scored] / temperature
        exp = np.exp(logits - logits.max())  # shifted by the max: no overflow, the same softmax
        weights[scored] = scored.sum() * exp / exp.sum()
    else:
        if low is None or high is None:
            raise ConfigError("the band transform needs --low and --high (percentiles in [0, 1])")
        check_band(low, high)
        ranks = percentile_ranks(scores, pair_ids)
        weights[scored] = ((ranks[scored] >= low) & (ranks[scored] <= high)).astype(float)
    return weights


def weigh_scores(scores_dir: str | Path, out_dir: str | Path, *, column: str, transform: str,
                 temperature: float | None = None, low: float | None = None, high: float | None = None,
                 reverse: bool = False, output_columns: str = "split") -> dict:
    """`prefsift weigh`: read a score directory, turn `column` into weights, write the pairs with weight > 0 and
    their `weight` as OUT/selected.jsonl and OUT/selected.parquet (the subset writer and layout of `prefsift
    select`, so `prefsift train --data OUT/selected.jsonl` reads them), the
    pairs left out with their reason in OUT/dropped.jsonl, and the manifest."""
    scores_dir, out_dir = Path(scores_dir), Path(out_dir)
    if output_columns not in COLUMN_MODES:
        raise ConfigError(f"--output-columns must be one of {', '.join(COLUMN_MODES)} (got {output_columns!r})")
    for name in ("scores.parquet", "pairs.parquet"):
        if not (scores_dir / name).is_file():
            raise PrefsiftError(f"{scores_dir} has no {name}: run `prefsift score` into it first")
    manifest = read_manifest(scores_dir)
    table = pq.read_table(scores_dir / "scores.parquet").to_pydict()
    if column not in table or column == "pair_id":
        raise ConfigError(f"no score column '{column}' in {scores_dir} (columns: {', '.join(score_columns(table))})")
    try:
        values = np.asarray(table[column], dtype=float)
    except (TypeError, ValueError):  # a text column has no order a weight could follow
        raise ConfigError(f"column '{column}' is not a numeric score (columns: "
                          f"{', '.join(score_columns(table))})") from None
    check_scores(scores_dir, table, [column])  # a null, an inf or an unexplained NaN: one line
    weights = score_weights(values, transform, temperature=temperature, low=low, high=high, reverse=reverse,
                            pair_ids=table["pair_id"])
    rows = np.flatnonzero(weights > 0)
    source = subset_source(scores_dir, table["pair_id"], output_columns, manifest.get("data", {}).get("keys") or {})
    no_score = np.isnan(values)
    dropped = [dropped_record("weigh", f"NaN {column}: weight 0" if no_score[r] else f"weight 0 under {transform}",
                              pair_id=table["pair_id"][r]) for r in np.flatnonzero(weights == 0)]
    kept = weights[rows]
    path = out_dir / "selected.jsonl"
    record = {"scores": str(scores_dir), "column": column, "transform": transform, "temperature": temperature,
              "low": low, "high": high, "reverse": reverse, "output_columns": output_columns,
              "n_pairs": len(values), "n_weighted": int(len(rows)), "n_nan": int(no_score.sum()),
              "n_zero": len(dropped), "weight_min": float(kept.min()), "weight_max": float(kept.max()),
              "weight_mean": float(kept.mean()), "selected": str(path),
              "data_hash": manifest.get("data", {}).get("hash")}
    # every file into a staging directory swapped in whole: a failure part-way keeps earlier weights intact
    with staged(out_dir, "weigh") as tmp:
        write_subset(tmp, source, rows, extra={"weight": weights})
        write_dropped(tmp, dropped)
        write_manifest(tmp, "weigh", record)
    return record
