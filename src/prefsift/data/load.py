"""`load_pairs`: any supported source → the normalized, validated pairs table keyed by `pair_id`."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import datasets
import pyarrow as pa

from prefsift.data.normalize import (
    Invalid,
    as_chat,
    data_hash_of,
    normalize_conversation_pair,
    normalize_text_pair,
    normalize_unpaired,
    pair_id_of,
)
from prefsift.data.read import RawTable, arrow_dataset, iter_jsonl_chunks, read_source, streamable, table_chunks
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
    # the input's column names (prompt_key, chosen_key, rejected_key): a score manifest records them so `select`
    # rebuilds the same split from pairs.parquet
    keys: dict[str, str] = field(default_factory=dict)

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
    chat_template: bool = False,
) -> LoadedPairs:
    """Read a preference dataset from `source`, detect its kind, normalize and validate every row.

    `source` is a local .jsonl/.json/.parquet/.csv file (optionally .gz), a directory written by
    `save_to_disk` (a `DatasetDict` picks `split`, default "train"), an in-memory `Dataset`, or a hub
    dataset name (`name` or `name:split`). The `*_key` arguments name the input's columns.
    Invalid rows are skipped and listed (`on_invalid="skip"`) or raise `DataError` (`"fail"`).
    `chat_template`: plain-text prompts and completions become user / assistant messages (`with_chat_template`).
    """
    loaded = _load_pairs(source, split, prompt_key, chosen_key, rejected_key, completion_key, label_key, on_invalid,
                         assistant_marker)
    return with_chat_template(loaded) if chat_template else loaded


def _load_pairs(source, split, prompt_key, chosen_key, rejected_key, completion_key, label_key, on_invalid,
                assistant_marker) -> LoadedPairs:
    if on_invalid not in ("skip", "fail"):
        raise DataError(f"on_invalid must be 'skip' or 'fail', not {on_invalid!r}")
    text_keys = (prompt_key, chosen_key, rejected_key, completion_key)
    keys = _Keys(prompt_key, chosen_key, rejected_key, completion_key, label_key, assistant_marker, on_invalid)
    names = {"prompt_key": prompt_key, "chosen_key": chosen_key, "rejected_key": rejected_key}
    path = streamable(source)
    if path is not None:
        try:
            return replace(_load_chunks(iter_jsonl_chunks(path, os.fspath(source), CHUNK_ROWS), os.fspath(source),
                                        keys), keys=names)
        except _NotStreamable:
            pass  # a column whose type changes between chunks: the whole-file reader settles it (datasets' Json)
    raw = read_source(source, split=split, text_columns=text_keys)
    if raw.values is None and isinstance(source, (str, os.PathLike)):
        # an Arrow-backed table (Parquet, CSV, a saved or hub dataset, memory-mapped where datasets maps it):
        # normalized chunk by chunk, so only one chunk's rows are ever Python objects
        try:
            return replace(_load_chunks(table_chunks(raw, CHUNK_ROWS), os.fspath(source), keys, note=raw.note),
                           keys=names)
        except _NotStreamable:
            pass
    plan = _plan(raw, keys)
    out, kept, invalid = _normalize(raw, plan, keys, {})
    if not kept:
        raise DataError(f"{raw.where}: no valid rows (read {len(raw.rows)}: {_reason_counts(invalid)})")
    data_hash = data_hash_of(out["pair_id"])
    kind, features = plan.kind, plan.features
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
        keys=names,
    )


def with_chat_template(loaded: LoadedPairs) -> LoadedPairs:
    """Plain-text pairs (or KTO rows) as chat messages, so TRL's tokenization, and prefsift's, applies the model's
    chat template: the prompt is the user's turn (an HH transcript, its turns), each completion the assistant's
    answer. Conversational data is already messages and stays as it is. The pair_ids are the input's: the same
    pairs, formatted for the model (a pass's cache tells the two apart by their text)."""
    if loaded.conversational:
        return loaded
    answers = ("completion",) if loaded.kind == "unpaired" else ("chosen", "rejected")

    def wrap(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"prompt": [], **{name: [] for name in answers}}
        for i, prompt in enumerate(batch["prompt"]):
            turns, completions = as_chat(prompt, [batch[name][i] for name in answers])
            out["prompt"].append(turns)
            for name, messages in zip(answers, completions, strict=True):
                out[name].append(messages)
        return out

    features = loaded.pairs.features.copy()
    for name in ("prompt", *answers):
        features[name] = _MESSAGES
    pairs = loaded.pairs.map(wrap, batched=True, batch_size=1024, features=features, load_from_cache_file=False,
                             desc="chat template")
    kind = loaded.kind if loaded.kind == "unpaired" else "conversational"
    return replace(loaded, pairs=pairs, kind=kind)


def check_chat_template(tokenizer, pairs: datasets.Dataset, who: str) -> None:
    """Messages are tokenized through the tokenizer's chat template: a tokenizer without one is one line naming
    `who` (the model and its flag), before any pass, not transformers' traceback halfway through it."""
    column = "completion" if "completion" in pairs.column_names else "chosen"
    if not isinstance(pairs.features[column], datasets.Value) and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{who} has no chat template, and these pairs are chat messages (conversational data, or "
                        f"--chat-template): give a model whose tokenizer has one (an instruct model), or plain-text "
                        f"pairs without --chat-template")


@dataclass
class _Keys:
    prompt: str
    chosen: str
    rejected: str
    completion: str
    label: str
    assistant_marker: str
    on_invalid: str


@dataclass
class _Plan:
    """What the first rows say about the whole file: its kind, the input columns read, and how rows normalize."""

    kind: Kind
    columns: tuple[str, str, str]  # input column names, in the order `names` gives
    names: tuple[str, str, str]  # normalized column names
    normalize: Callable[[Any, Any, Any], tuple]
    features: datasets.Features


def _plan(raw: RawTable, keys: _Keys) -> _Plan:
    columns = raw.table.column_names
    if keys.chosen in columns or keys.rejected in columns or keys.completion not in columns:
        kind = _paired_kind(raw, keys.prompt, keys.chosen, keys.rejected)
        used, names = (keys.prompt, keys.chosen, keys.rejected), ("prompt", "chosen", "rejected")
    else:
        kind = "unpaired"
        used, names = (keys.prompt, keys.completion, keys.label), ("prompt", "completion", "label")
        _require_columns(columns, used, "--prompt-key/--completion-key/--label-key")
    if keys.prompt != "prompt" and keys.prompt not in columns:  # a typo'd --prompt-key is not an implicit prompt
        _require_columns(columns, (keys.prompt,), "--prompt-key")
    unpaired_messages = kind == "unpaired" and _value_type(raw.table, keys.completion) == "messages"
    messages = kind == "conversational" or unpaired_messages
    normalize = _row_normalizer(kind, keys.assistant_marker, unpaired_messages=unpaired_messages)
    return _Plan(kind, used, names, normalize, _features(kind, messages))  # type: ignore[arg-type]


def _normalize(raw: RawTable, plan: _Plan, keys: _Keys, seen: dict[str, int]
               ) -> tuple[dict[str, list[Any]], list[int], list[InvalidRow]]:
    """Every row of `raw` normalized: (the kept pairs' columns, the kept rows' indices, the rows left out). `seen`
    maps the pair_ids met so far (earlier chunks too) to their row, for duplicates."""
    columns = raw.table.column_names
    present = raw.values if raw.values is not None else \
        raw.table.select_columns([k for k in plan.columns if k in columns])[:]
    inputs = zip(*(present.get(k, [None] * len(raw.rows)) for k in plan.columns), strict=True)
    out: dict[str, list[Any]] = {"pair_id": [], **{name: [] for name in plan.names}}
    kept: list[int] = []
    invalid: list[InvalidRow] = []
    for index, (row, values) in enumerate(zip(raw.rows, inputs, strict=True)):
        try:
            normalized = plan.normalize(*values)
            pair_id = pair_id_of(*normalized)
            if pair_id in seen:
                raise Invalid(f"duplicate of row {seen[pair_id]}")
        except Invalid as e:
            if keys.on_invalid == "fail":
                raise DataError(f"{raw.where} {raw.row_word} {row}: {e}") from None
            invalid.append(InvalidRow(row, str(e)))
            continue
        seen[pair_id] = row
        kept.append(index)
        out["pair_id"].append(pair_id)
        for name, value in zip(plan.names, normalized, strict=True):
            out[name].append(value)
    return out, kept, invalid


class _NotStreamable(Exception):
    """The file cannot be read chunk by chunk into one schema; the whole-file reader takes it."""


CHUNK_ROWS = 2048  # rows held as Python objects at once while streaming a file


def _load_chunks(chunks: Iterable[RawTable], source: str, keys: _Keys, note: str = "") -> LoadedPairs:
    """Rows read CHUNK_ROWS at a time (a JSON-lines stream, or slices of an Arrow table): each chunk is normalized
    and appended to two Arrow files (the pairs, the input's own kept rows) that are then memory-mapped, so memory
    stays flat in the data's size (the whole-file reader held ~5 bytes of Python objects per input byte)."""
    directory = Path(tempfile.mkdtemp(prefix="prefsift-pairs-"))
    atexit.register(shutil.rmtree, directory, True)
    plan: _Plan | None = None
    seen: dict[str, int] = {}
    invalid: list[InvalidRow] = []
    pair_ids: list[str] = []
    rows: list[int] = []
    n_read = 0
    pairs_writer = None
    raw_parts: list[Path] = []
    where = source
    try:
        for chunk in chunks:
            where = chunk.where
            if plan is None:
                plan = _plan(chunk, keys)
                pairs_writer = pa.ipc.new_stream(pa.OSFile(str(directory / "pairs.arrow"), "wb"),
                                                 plan.features.arrow_schema)
            elif _plan_signature(_plan(chunk, keys)) != _plan_signature(plan):
                raise _NotStreamable
            out, kept, left_out = _normalize(chunk, plan, keys, seen)
            n_read += len(chunk.rows)
            invalid += left_out
            if not kept:
                continue
            pair_ids += out["pair_id"]
            rows += [chunk.rows[i] for i in kept]
            pairs_writer.write_table(pa.Table.from_pydict(out, schema=plan.features.arrow_schema))  # type: ignore
            table, indices = _kept_table(chunk, kept)
            if _has_json(table):
                raise _NotStreamable
            part = directory / f"raw-{len(raw_parts):06d}.arrow"
            kept_rows = _raw_rows(table, indices, out["pair_id"]).with_format("arrow")[:]
            with pa.ipc.new_stream(pa.OSFile(str(part), "wb"), kept_rows.schema) as writer:
                writer.write_table(kept_rows)
            raw_parts.append(part)
    finally:
        if pairs_writer is not None:
            pairs_writer.close()
    if plan is None:
        raise DataError(f"{where}: no rows")
    if not pair_ids:
        raise DataError(f"{where}: no valid rows (read {n_read}: {_reason_counts(invalid)})")
    raw = _concatenate_parts(raw_parts, directory / "raw.arrow")
    data_hash = data_hash_of(pair_ids)
    pairs = datasets.Dataset.from_file(str(directory / "pairs.arrow"),
                                       info=datasets.DatasetInfo(features=plan.features))
    return LoadedPairs(pairs=pairs, raw=raw, kind=plan.kind, invalid=invalid, n_read=n_read, source=source,
                       data_hash=data_hash, rows=rows, note=note)


def _plan_signature(plan: _Plan) -> tuple:
    return plan.kind, plan.columns, plan.features


def _concatenate_parts(parts: list[Path], target: Path) -> datasets.Dataset:
    """The kept-row chunks as one memory-mapped dataset, their schemas unified (a column null in one chunk and a
    string in the next is a string); chunks whose types truly differ are not streamable."""
    schemas = [pa.ipc.open_stream(pa.OSFile(str(p))).schema for p in parts]
    try:
        schema = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowException, TypeError, ValueError):
        raise _NotStreamable from None
    schema = pa.schema([schema.field(n) for n in dict.fromkeys(n for s in schemas for n in s.names)])
    features = datasets.Features.from_arrow_schema(schema)
    features["pair_id"] = _STRING
    # written in exactly the features' schema: datasets would otherwise cast the mapped table into memory
    schema = features.arrow_schema
    with pa.ipc.new_stream(pa.OSFile(str(target), "wb"), schema) as writer:
        for part in parts:
            table = pa.ipc.open_stream(pa.OSFile(str(part))).read_all()
            for name in schema.names:
                if name not in table.column_names:
                    table = table.append_column(name, pa.nulls(table.num_rows, schema.field(name).type))
            try:
                writer.write_table(table.select(schema.names).cast(schema))
            except (pa.ArrowException, TypeError, ValueError):
                raise _NotStreamable from None
            part.unlink()
    return datasets.Dataset.from_file(str(target), info=datasets.DatasetInfo(features=features))


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
    rows = rows.combine_chunks()  # datasets' gather leaves one chunk a row: 1.6 KB of overhead each, written and read
    return arrow_dataset(rows, features)


def _reason_counts(invalid: list[InvalidRow]) -> str:
    """'5 chosen == rejected, 7 empty rejected response' in order of first appearance."""
    counts = Counter(re.sub(r" of row \d+$", "", row.reason) for row in invalid)
    return ", ".join(f"{n} {reason}" for reason, n in counts.items())
