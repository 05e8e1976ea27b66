"""Selection rules over score columns: top, bottom, middle band, intersection of bands, all; by fraction or count.

Everything works on ranks with ties broken by pair_id, so the same scores always give the same subset whatever
the row order. Pairs with a NaN score (dropped by the log-prob engine: prompt longer than max_length) are never
selected, by any rule (`all` included): `prefsift select` lists them in dropped.jsonl with the reason.

`write_subset` is the one writer of a subset (selected.jsonl + selected.parquet): `select`, `run` and `weigh` use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq

from prefsift.errors import ConfigError, PrefsiftError
from prefsift.manifest import check_scores, dropped_record, read_manifest, write_dropped, write_manifest
from prefsift.maths import band_mask, percentile_ranks, tie_keys
from prefsift.output import require_file, staged, temp_sibling

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


def score_columns(scores: Mapping[str, Sequence]) -> list[str]:
    """The columns a rule can read: every column but pair_id and the TRL-named log-probs."""
    return [c for c in scores if c != "pair_id" and not c.endswith("_logps")]


def nan_mask(scores: Mapping[str, Sequence], names: Sequence[str] | None = None) -> np.ndarray:
    """True for the pairs a rule over `names` (default: every score column) cannot consider: a NaN in any."""
    names = list(names or score_columns(scores))
    n = len(next(iter(scores.values())))
    mask = np.zeros(n, dtype=bool)
    for name in names:
        mask |= np.isnan(np.asarray(scores[name], dtype=float))
    return mask


def _numeric(values: Sequence) -> bool:
    try:
        np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        return False
    return True


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
        if name == "pair_id" or not _numeric(scores[name]):  # a text column has no order a rule could mean
            known = ", ".join(c for c in scores if c != "pair_id" and _numeric(scores[c]))
            raise ConfigError(f"column '{name}' is not a numeric score (score columns: {known})")
    n = len(pair_ids) if pair_ids is not None else len(next(iter(scores.values())))
    if rule == "all":  # every pair that has its score(s): NaN pairs are never selected, here either
        return np.flatnonzero(~nan_mask(scores, names))
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


COLUMN_MODES = ("split", "original")
SPLIT_COLUMNS = ("prompt", "chosen", "rejected", "pair_id")


def write_jsonl(path: Path, rows) -> Path:
    """JSON lines, NaN written as null (JSON has no NaN), replaced atomically: a reader never sees half a file."""
    import json
    import math

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(clean(row), ensure_ascii=False, allow_nan=False) + "\n")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves the earlier file, and no temporary beside it
        raise
    return path


def write_subset(out_dir: str | Path, table: datasets.Dataset, rows: Sequence[int], *,
                 extra: Mapping[str, Sequence] | None = None, name: str = "selected") -> Path:
    """Write rows `rows` of `table` as OUT/selected.jsonl and OUT/selected.parquet, with `extra` columns (score
    columns, a `weight`), each indexed like `table`'s rows. `table` is prefsift's normalized pairs (explicit prompt /
    chosen / rejected: what TRL, LLaMA-Factory, OpenRLHF and Axolotl read without guessing where the prompt ends) or
    the input's own rows (`subset_source`). Returns the JSONL path."""
    import os

    import pyarrow as pa

    out_dir = Path(out_dir)
    rows = [int(r) for r in rows]
    subset = table.select(rows)
    arrow = subset.with_format("arrow")[:]
    for column, values in (extra or {}).items():
        if column in arrow.column_names:
            raise ConfigError(f"the subset already has a '{column}' column; it cannot also carry the score of "
                              "that name (use --output-columns split)")
        values = np.asarray(values, dtype=float)[rows] if len(rows) else np.zeros(0)
        arrow = arrow.append_column(column, pa.array(values, pa.float64()))
    out_dir.mkdir(parents=True, exist_ok=True)
    parquet = out_dir / f"{name}.parquet"
    tmp = parquet.with_name(f".{parquet.name}.{os.getpid()}.tmp")
    pq.write_table(arrow.replace_schema_metadata(None), tmp)
    tmp.replace(parquet)
    return write_jsonl(out_dir / f"{name}.jsonl", arrow.to_pylist())


def subset_source(scores_dir: Path, pair_ids: Sequence[str], columns: str, data_keys: Mapping[str, str]
                  ) -> datasets.Dataset:
    """The rows a subset is cut from, in `pair_ids` order: prefsift's split of pairs.parquet (`split`: prompt,
    chosen, rejected, pair_id) or the input's own columns (`original`)."""
    from prefsift.data import load_pairs

    if columns not in COLUMN_MODES:
        raise ConfigError(f"--output-columns must be one of {', '.join(COLUMN_MODES)} (got {columns!r})")
    path = scores_dir / "pairs.parquet"
    if columns == "original":
        raw = datasets.Dataset(pq.read_table(path).replace_schema_metadata(None))
        stored = raw["pair_id"]
    else:
        try:  # the same normalization as `prefsift score`; the pair_ids (content hashes) prove it
            raw = load_pairs(str(path), **dict(data_keys)).pairs.select_columns(list(SPLIT_COLUMNS))
        except PrefsiftError as error:
            raise PrefsiftError(f"cannot rebuild the prompt/chosen/rejected split of {path} ({error}); "
                                "write the input's own columns with --output-columns original") from None
        stored = raw["pair_id"]
    if list(stored) != list(pair_ids):
        raise PrefsiftError(f"{scores_dir}: pairs.parquet and scores.parquet disagree (rewritten by hand, or scored "
                            "with other --prompt-key/--chosen-key/--rejected-key?)")
    return raw


def _dropped_reason(scores: Mapping[str, Sequence], row: int, names: Sequence[str], max_length) -> str:
    for column in ("ref_chosen_logps", "chosen_logps"):
        if column in scores and np.isnan(float(scores[column][row])):
            return f"NaN score: prompt fills max_length={max_length}"
    missing = [n for n in names if np.isnan(float(scores[n][row]))]
    return f"NaN score in {', '.join(missing)}"


def _constant_advice(name: str, manifest: dict) -> str:
    models = manifest.get("models", {})

    def same(a: str, b: str) -> bool:
        fa, fb = models.get(a, {}).get("fingerprint"), models.get(b, {}).get("fingerprint")
        return fa is not None and fa == fb

    if (name in ("irm", "lossdiff_irm") and same("policy", "reference")) or (name == "irm" and "policy" not in models):
        return ("the policy equals the reference, so every implicit reward margin is 0. Score with a warm-up policy: "
                "`prefsift train --data PAIRS --model SFT --out warmup/`, then `prefsift score --model warmup/ "
                "--reference SFT ...`")
    if name.startswith("lossdiff") and same("policy", "validation"):
        return ("the validation model equals the policy, so every loss difference is 0. Train it on trusted pairs "
                "from the warm-up: `prefsift train --data VALIDATION --model warmup/ --reference SFT --out "
                "validation/`, then `prefsift score --validation validation/ ...`")
    return ("every pair ties, so the rule picks by pair_id alone: a random subset. Check the models and data it was "
            "scored with (manifest.json)")


def score_warnings(scores: Mapping[str, Sequence], names: Sequence[str], manifest: dict, rule: str,
                   kept: np.ndarray | None = None) -> list[str]:
    """One line for each degenerate score column the rule reads: constant, mostly NaN, or without the spread to rank
    (a handful of distinct values, or a tie straddling a top/bottom cut); each says what it means and what to do."""
    warnings: list[str] = []
    max_length = manifest.get("engine", {}).get("max_length")
    for name in names:
        values = np.asarray(scores[name], dtype=float)
        valid = values[~np.isnan(values)]
        n, n_nan = len(values), int(np.isnan(values).sum())
        if n_nan > n / 2:
            warnings.append(f"{name} is NaN for {n_nan} of {n} pairs (a prompt that fills max_length={max_length} "
                            "leaves a pair unscored): the rule ranks the rest only; score again with a larger "
                            "--max-length")
        if len(valid) == 0:
            continue
        scale = max(1.0, float(np.abs(valid).max()))
        if float(np.ptp(valid)) <= 1e-9 * scale:
            warnings.append(f"{name} is constant ({valid[0]:.6g}) over {len(valid)} pairs: "
                            + _constant_advice(name, manifest))
            continue
        distinct = np.unique(valid)
        if len(distinct) < 5 and len(valid) >= 20:
            warnings.append(f"{name} takes only {len(distinct)} distinct values over {len(valid)} pairs: most of the "
                            "ranking is ties, decided by pair_id rather than by the score; a finer score (a reward "
                            "model, or the log-prob methods) separates them")
        elif rule in ("top", "bottom") and kept is not None and 0 < len(kept) < len(valid):
            cut = values[kept].min() if rule == "top" else values[kept].max()
            tied = int((valid == cut).sum())
            tied_in = int((values[kept] == cut).sum())
            if tied > tied_in and tied_in >= max(2, 0.1 * len(kept)):
                warnings.append(f"{name}: {tied} pairs share the score {cut:.6g} at the cut and {tied_in} of them are "
                                f"kept by pair_id order, not by the score; a budget that ends between distinct values "
                                "(or a finer score) avoids it")
    return warnings


def select_from_scores(scores_dir: str | Path, out_dir: str | Path, *, rule: str | None = None,
                       fraction: float | None = None, count: int | None = None, column: str | None = None,
                       columns: Sequence[str] | None = None, low: float | None = None,
                       high: float | None = None, method: str | None = None, output_columns: str = "split",
                       with_scores: bool = False) -> dict:
    """`prefsift select`: read a score directory, apply a rule, write selected.jsonl / .parquet, dropped.jsonl and
    the manifest.

    Without `rule`, the scoring method's own rule applies (e.g. the intersection of the lossdiff and irm bands at
    the cut-offs it was scored with); a fraction or count replaces those cut-offs. `output_columns`: `split`
    (prefsift's explicit prompt / chosen / rejected, the default) or `original` (the input's own columns); both
    keep pair_id, and `with_scores` adds the score columns. The record's `warnings` flag degenerate scores."""
    scores_dir, out_dir = Path(scores_dir), Path(out_dir)
    if output_columns not in COLUMN_MODES:
        raise ConfigError(f"--output-columns must be one of {', '.join(COLUMN_MODES)} (got {output_columns!r})")
    manifest = read_manifest(scores_dir)
    for name in ("scores.parquet", "pairs.parquet"):
        require_file(scores_dir / name, f"the {name.partition('.')[0]} file")
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
        candidates = score_columns(table)
        column = candidates[0] if len(candidates) == 1 else None
    if fraction is None and count is None and low is None and high is None and rule != "all":
        raise ConfigError(f"rule '{rule}' needs --fraction or --count")
    # a null, an inf or an unexplained NaN in a column the rule reads: one line, not a +inf ranked first
    check_scores(scores_dir, table, list(columns or ([column] if column else score_columns(table))))
    rows = select_indices(table, rule, column=column, columns=columns, fraction=fraction, count=count, low=low,
                          high=high)
    names = list(columns or ([column] if column else score_columns(table)))
    source = subset_source(scores_dir, table["pair_id"], output_columns, manifest.get("data", {}).get("keys") or {})
    extra = {name: table[name] for name in score_columns(table)} if with_scores else {}
    # the pairs the rule could not consider (NaN in a column it reads), each with its reason
    max_length = manifest.get("engine", {}).get("max_length")
    dropped = [dropped_record("select", _dropped_reason(table, r, names, max_length), pair_id=table["pair_id"][r])
               for r in np.flatnonzero(nan_mask(table, names))]
    warnings = score_warnings(table, names, manifest, rule, rows)
    record = {"scores": str(scores_dir), "method": method, "rule": rule, "column": column, "columns": columns,
              "fraction": fraction, "count": count, "low": low, "high": high, "n_pairs": len(table["pair_id"]),
              "n_selected": len(rows), "n_dropped": len(dropped), "output_columns": output_columns,
              "with_scores": with_scores, "warnings": warnings, "selected": str(out_dir / "selected.jsonl"),
              "data_hash": manifest.get("data", {}).get("hash")}
    # every file into a staging directory swapped in whole: a failure part-way keeps an earlier subset intact
    with staged(out_dir, "select") as tmp:
        write_subset(tmp, source, rows, extra=extra)
        write_dropped(tmp, dropped)  # the record shape every stage writes (manifest.py)
        write_manifest(tmp, "select", record)
    return record
