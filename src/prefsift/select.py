"""Selection rules over score columns: top, bottom, middle band, intersection of bands; by fraction or count.

Everything works on ranks with ties broken by pair_id, so the same scores always give the same subset whatever
the row order. Pairs with a NaN score (dropped by the log-prob engine: prompt longer than max_length) are never
selected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq

from prefsift.errors import ConfigError, PrefsiftError
from prefsift.manifest import read_manifest, write_manifest
from prefsift.maths import band_mask, percentile_ranks, tie_keys

RULES = ("top", "bottom", "band", "intersection", "all")


def target_count(n: int, fraction: float | None, count: int | None) -> int:
    if (fraction is None) == (count is None):
        raise ConfigError("give exactly one of --fraction or --count")
    if fraction is not None:
        if not (0.0 < fraction <= 1.0):
            raise ConfigError(f"--fraction must be in (0, 1] (got {fraction})")
        return max(1, round(fraction * n))
    if count is None or count < 1:
        raise ConfigError(f"--count must be a positive integer (got {count})")
    return min(count, n)


def _smallest(keys: np.ndarray, pair_ids: Sequence[str] | None, k: int) -> np.ndarray:
    """Indices of the k smallest non-NaN keys, ties by pair_id."""
    valid = np.flatnonzero(~np.isnan(keys))
    ties = tie_keys(pair_ids, len(keys))[valid].astype(str)
    order = valid[np.lexsort((ties, keys[valid]))]
    return order[:k]


def select_indices(scores: Mapping[str, Sequence], rule: str, *, column: str | None = None,
                   columns: Sequence[str] | None = None, fraction: float | None = None,
                   count: int | None = None, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Row indices (ascending) that `rule` keeps. `scores` maps column names to equal-length sequences and
    should hold `pair_id` (the tie-breaker)."""
    if rule not in RULES:
        raise ConfigError(f"unknown rule '{rule}' (known: {', '.join(RULES)})")
    pair_ids = scores.get("pair_id")
    names = list(columns or ([column] if column else []))
    for name in names:
        if name not in scores:
            known = ", ".join(c for c in scores if c != "pair_id")
            raise ConfigError(f"no score column '{name}' (columns: {known})")
    n = len(pair_ids) if pair_ids is not None else len(next(iter(scores.values())))
    if rule == "all":
        return np.arange(n)
    if not names:
        raise ConfigError(f"rule '{rule}' needs a score column (--column, or --columns for intersection)")
    if rule != "intersection" and len(names) > 1:
        raise ConfigError(f"rule '{rule}' takes one column (got {', '.join(names)})")
    if rule == "intersection" and len(names) < 2:
        raise ConfigError("rule 'intersection' needs at least two columns (--columns a,b)")
    values = [np.asarray(scores[name], dtype=float) for name in names]
    by_cutoffs = low is not None or high is not None
    if by_cutoffs and rule in ("band", "intersection") and fraction is None and count is None:
        low, high = (0.0 if low is None else low), (1.0 if high is None else high)
        keep = np.ones(n, dtype=bool)
        for v in values:
            keep &= band_mask(v, low, high, pair_ids)
        return np.flatnonzero(keep)
    if by_cutoffs:
        raise ConfigError("--low/--high cut a band or intersection; they do not combine with --fraction/--count "
                          "or with other rules")
    k = target_count(n, fraction, count)
    if rule == "top":
        chosen = _smallest(-values[0], pair_ids, k)
    elif rule == "bottom":
        chosen = _smallest(values[0], pair_ids, k)
    else:
        # A symmetric band [t, 1 − t] on every column keeps the pairs whose most extreme rank is within 0.5 − t,
        # so the k pairs with the smallest "extremeness" are exactly the widest-trim intersection of size k.
        ranks = np.stack([percentile_ranks(v, pair_ids) for v in values])
        extremeness = np.abs(ranks - 0.5).max(axis=0)
        chosen = _smallest(extremeness, pair_ids, k)
    return np.sort(chosen)


def method_rule(manifest: dict, method: str | None, where: Path) -> dict:
    """The selection rule a score directory's method declared; `method` picks one when it holds several."""
    methods = manifest.get("methods") or {}
    if method is not None:
        if method not in methods:
            raise ConfigError(f"{where} holds no '{method}' scores (methods: {', '.join(methods) or 'none'})")
        return dict(methods[method]["rule"])
    if manifest.get("default_rule"):
        return dict(manifest["default_rule"])
    return {}


def select_from_scores(scores_dir: str | Path, out_dir: str | Path, *, rule: str | None = None,
                       fraction: float | None = None, count: int | None = None, column: str | None = None,
                       columns: Sequence[str] | None = None, low: float | None = None,
                       high: float | None = None, method: str | None = None) -> dict:
    """`prefsift select`: read a score directory, apply a rule, write selected.jsonl / .parquet + manifest.

    Without `rule`, the scoring method's own rule applies (e.g. the intersection of the lossdiff and irm bands at
    the cut-offs it was scored with); a fraction or count replaces those cut-offs."""
    scores_dir, out_dir = Path(scores_dir), Path(out_dir)
    manifest = read_manifest(scores_dir)
    for name in ("scores.parquet", "pairs.parquet"):
        if not (scores_dir / name).is_file():
            raise PrefsiftError(f"{scores_dir} has no {name}: run `prefsift score` into it first")
    table = pq.read_table(scores_dir / "scores.parquet").to_pydict()
    default = method_rule(manifest, method, scores_dir)
    if rule is None:
        if not default:
            raise ConfigError(f"{scores_dir} holds several methods' scores: choose --method, or --rule and "
                              "--column/--columns")
        rule = default["rule"]
    if rule == default.get("rule"):
        column = column or default.get("column")
        columns = columns or default.get("columns")
        if fraction is None and count is None and low is None and high is None:
            low, high = default.get("low"), default.get("high")
    if rule not in ("intersection", "all") and column is None:
        score_columns = [c for c in table if c != "pair_id" and not c.endswith("_logps")]
        column = score_columns[0] if len(score_columns) == 1 else None
    if fraction is None and count is None and low is None and high is None and rule != "all":
        raise ConfigError(f"rule '{rule}' needs --fraction or --count")
    rows = select_indices(table, rule, column=column, columns=columns, fraction=fraction, count=count, low=low,
                          high=high)
    raw = datasets.Dataset.from_parquet(str(scores_dir / "pairs.parquet"))
    if list(raw["pair_id"]) != list(table["pair_id"]):
        raise PrefsiftError(f"{scores_dir}: pairs.parquet and scores.parquet disagree (rewritten by hand?)")
    selected = raw.select(rows.tolist())
    out_dir.mkdir(parents=True, exist_ok=True)
    selected.to_json(str(out_dir / "selected.jsonl"), lines=True, force_ascii=False)
    pq.write_table(selected.with_format("arrow")[:], out_dir / "selected.parquet")
    record = {"scores": str(scores_dir), "method": method, "rule": rule, "column": column, "columns": columns,
              "fraction": fraction, "count": count, "low": low, "high": high, "n_pairs": len(raw),
              "n_selected": len(selected), "data_hash": manifest.get("data", {}).get("hash")}
    write_manifest(out_dir, "select", record)
    return record
