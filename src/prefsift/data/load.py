"""`load_pairs`: any supported source → the normalized, validated pairs table keyed by `pair_id`."""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import datasets
import pyarrow as pa

from prefsift.data.normalize import (
    Invalid,
    data_hash_of,
    normalize_conversation_pair,
    normalize_text_pair,
    normalize_unpaired,
    pair_id_of,
)
from prefsift.data.read import RawTable, arrow_dataset, read_source
from prefsift.errors import DataError

Kind = Literal["standard", "implicit", "conversational", "unpaired"]

_STRING = datasets.Value("string")
_MESSAGES = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})


@dataclass
class InvalidRow:
    """A row left out: `row` is the 1-based line (JSONL) or record number, `reason` says why."""

    row: int
    reason: str


@dataclass
class LoadedPairs:
    """The normalized pairs, the input's own rows that produced them, and what was left out."""

    pairs: datasets.Dataset
    raw: datasets.Dataset
    kind: str
    invalid: list[InvalidRow] = field(default_factory=list)
    n_read: int = 0
    source: str = ""
    data_hash: str = ""
    rows: list[int] = field(default_factory=list)  # each pair's 1-based input line / record number
    note: str = ""  # e.g. which split of a DatasetDict was taken

    @property
    def conversational(self) -> bool:
        """True when prompts and responses are message lists rather than strings."""
        column = "completion" if self.kind == "unpaired" else "chosen"
        return not isinstance(self.pairs.features[column], datasets.Value)

    def summary(self) -> str:
        """One line: `read 2312 rows, kept 2300, skipped 12 (5 chosen == rejected, 7 empty ...)`."""
        line = f"read {self.n_read} rows, kept {len(self.pairs)}, skipped {len(self.invalid)}"
        line += f" ({_reason_counts(self.invalid)})" if self.invalid else ""
        return line + (f"; {self.note}" if self.note else "")


def load_pairs(
    source: str | os.PathLike | datasets.Dataset,
    *,
    split: str | None = None,
    prompt_key: str = "prompt",
    chosen_key: str = "chosen",
    rejected_key: str = "rejected",
    completion_key: str = "completion",
    label_key: str = "label",
    on_invalid: Literal["skip", "fail"] = "skip",
    assistant_marker: str = "\n\nAssistant:",
) -> LoadedPairs:
    """Read a preference dataset from `source`, detect its kind, normalize and validate every row.

    `source` is a local .jsonl/.json/.parquet/.csv file (optionally .gz), a directory written by
    `save_to_disk` (a `DatasetDict` picks `split`, default "train"), an in-memory `Dataset`, or a hub
    dataset name (`name` or `name:split`). The `*_key` arguments name the input's columns.
    Invalid rows are skipped and listed (`on_invalid="skip"`) or raise `DataError` (`"fail"`).
    """
    if on_invalid not in ("skip", "fail"):
        raise DataError(f"on_invalid must be 'skip' or 'fail', not {on_invalid!r}")
    text_keys = (prompt_key, chosen_key, rejected_key, completion_key)
    raw = read_source(source, split=split, text_columns=text_keys)
    columns = raw.table.column_names
    if chosen_key in columns or rejected_key in columns or completion_key not in columns:
        kind = _paired_kind(raw, prompt_key, chosen_key, rejected_key)
        keys, names = (prompt_key, chosen_key, rejected_key), ("prompt", "chosen", "rejected")
    else:
        kind = "unpaired"
        keys, names = (prompt_key, completion_key, label_key), ("prompt", "completion", "label")
        _require_columns(columns, keys, "--prompt-key/--completion-key/--label-key")
    unpaired_messages = kind == "unpaired" and _value_type(raw.table, completion_key) == "messages"
    messages = kind == "conversational" or unpaired_messages
    normalize = _row_normalizer(kind, assistant_marker, unpaired_messages=unpaired_messages)

    if prompt_key != "prompt" and prompt_key not in columns:  # a typo'd --prompt-key is not an implicit prompt
        _require_columns(columns, (prompt_key,), "--prompt-key")
    present = raw.values if raw.values is not None else raw.table.select_columns([k for k in keys if k in columns])[:]
    inputs = zip(*(present.get(k, [None] * len(raw.rows)) for k in keys), strict=True)
    out: dict[str, list[Any]] = {"pair_id": [], **{name: [] for name in names}}
    kept: list[int] = []
    invalid: list[InvalidRow] = []
    seen: dict[str, int] = {}
    for index, (row, values) in enumerate(zip(raw.rows, inputs, strict=True)):
        try:
            normalized = normalize(*values)
            pair_id = pair_id_of(*normalized)
            if pair_id in seen:
                raise Invalid(f"duplicate of row {seen[pair_id]}")
        except Invalid as e:
            if on_invalid == "fail":
                raise DataError(f"{raw.where} {raw.row_word} {row}: {e}") from None
            invalid.append(InvalidRow(row, str(e)))
            continue
        seen[pair_id] = row
        kept.append(index)
        out["pair_id"].append(pair_id)
        for name, value in zip(names, normalized, strict=True):
            out[name].append(value)

    if not kept:
        raise DataError(f"{raw.where}: no valid rows (read {len(raw.rows)}: {_reason_counts(invalid)})")
    data_hash = data_hash_of(out["pair_id"])
    features = _features(kind, messages)
    return LoadedPairs(
        pairs=arrow_dataset(pa.Table.from_pydict(out, schema=features.arrow_schema), features, data_hash[:16]),
        raw=_raw_rows(*_kept_table(raw, kept), out["pair_id"]),
        kind=kind,
        invalid=invalid,
        n_read=len(raw.rows),
        source=os.fspath(source) if isinstance(source, (str, os.PathLike)) else raw.where,
        data_hash=data_hash,
        rows=[raw.rows[i] for i in kept],
        note=raw.note,
    )


def _paired_kind(raw: RawTable, prompt_key: str, chosen_key: str, rejected_key: str) -> Kind:
    columns = raw.table.column_names
    _require_columns(columns, (chosen_key, rejected_key), "--chosen-key/--rejected-key/--prompt-key")
    if _value_type(raw.table, chosen_key, rejected_key) == "messages":
        return "conversational"
    return "standard" if prompt_key in columns else "implicit"


def _value_type(table: datasets.Dataset, *keys: str) -> str:
    """'messages' if the first non-null value in the `keys` columns is a list, else 'text'."""
    for key in keys:
        feature = table.features[key]
        if isinstance(feature, (datasets.List, datasets.LargeList)):
            return "messages"
        if isinstance(feature, datasets.Value) and feature.dtype != "null":
            return "text"
        if not isinstance(feature, datasets.Value):  # Json (mixed types): look at the values
            for value in table[key]:
                if value is not None:
                    return "messages" if isinstance(value, list) else "text"
    return "text"


def _require_columns(columns: list[str], needed: tuple[str, ...], flags: str) -> None:
    for name in needed:
        if name not in columns:
            listed = ", ".join(columns)
            raise DataError(f"missing column '{name}' (columns: {listed}); map yours with {flags}")


def _row_normalizer(kind: Kind, marker: str, unpaired_messages: bool) -> Callable[[Any, Any, Any], tuple]:
    if kind == "conversational":
        return normalize_conversation_pair
    if kind == "unpaired":
        return lambda p, c, label: normalize_unpaired(p, c, label, conversational=unpaired_messages)
    implicit = kind == "implicit"
    return lambda p, c, r: normalize_text_pair(p, c, r, implicit=implicit, assistant_marker=marker)


def _features(kind: str, messages: bool) -> datasets.Features:
    text = _MESSAGES if messages else _STRING
    if kind == "unpaired":
        return datasets.Features(
            {"pair_id": _STRING, "prompt": text, "completion": text, "label": datasets.Value("bool")}
        )
    return datasets.Features({"pair_id": _STRING, "prompt": text, "chosen": text, "rejected": text})


def _has_json(table: datasets.Dataset) -> bool:
    return any(type(f).__name__ == "Json" for f in table.features.values())


def _kept_table(raw: RawTable, kept: list[int]) -> tuple[datasets.Dataset, list[int] | None]:
    """The kept rows' table. When an invalid row made a column mix types (messages in good rows, a string in a
    bad one), datasets stored the whole column as Json; rebuilt from the kept rows alone, the good rows' messages
    keep their real type instead of turning into JSON strings in pairs.parquet and the subsets."""
    if raw.values is None or not _has_json(raw.table):
        return raw.table, kept
    try:
        return arrow_dataset(pa.Table.from_pydict({k: [v[i] for i in kept] for k, v in raw.values.items()})), None
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return raw.table, kept  # the kept rows mix types too: Json is their honest type


def _raw_rows(table: datasets.Dataset, kept: list[int] | None, pair_ids: list[str]) -> datasets.Dataset:
    """The kept rows (all of `table` when `kept` is None) in the input's own columns plus `pair_id` (ours replaces
    any stored one).

    Built in Arrow, in memory: no cache files written next to the user's data, no progress bars.
    """
    rows: pa.Table = table.with_format("arrow")[kept] if kept is not None else table.with_format("arrow")[:]
    features = table.features.copy()
    if "pair_id" in features:
        rows = rows.drop_columns(["pair_id"])
        del features["pair_id"]
    features["pair_id"] = _STRING
    rows = rows.replace_schema_metadata(None).append_column("pair_id", pa.array(pair_ids, pa.string()))
    return arrow_dataset(rows, features)


def _reason_counts(invalid: list[InvalidRow]) -> str:
    """'5 chosen == rejected, 7 empty rejected response' in order of first appearance."""
    counts = Counter(re.sub(r" of row \d+$", "", row.reason) for row in invalid)
    return ", ".join(f"{n} {reason}" for reason, n in counts.items())
