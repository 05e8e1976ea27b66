"""Read a preference dataset from wherever it lives into a `datasets.Dataset` in the input's own columns.

(Over 400 lines: one reader a source kind, each with the bounded-memory and bad-input handling its format needs.)

Sources: local JSONL / JSON / Parquet / CSV files (optionally `.gz`), a directory written by
`save_to_disk`, an in-memory `Dataset`, or a hub dataset name (`name` or `name:split`).
Nothing here knows about preference pairs; that is `normalize.py`'s job.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import datasets
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from datasets.fingerprint import generate_random_fingerprint

from prefsift.errors import DataError

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SUPPORTED = ".jsonl, .json, .parquet, .csv (each optionally .gz), or a directory saved by datasets"
# Data-file suffixes we do not read: a missing file with one of these is "file not found", not a hub name.
_OTHER_FILE_SUFFIXES = {".txt", ".tsv", ".arrow", ".feather", ".xlsx", ".xls", ".zip", ".bz2", ".xz", ".zst"}
_HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")
# The longest line (a JSON-lines row) or JSON-array record read, in bytes: a longer one is refused by its line number
# before it is held whole (a 2 MB gzip can hold a 2 GiB line). docs/data.md says it.
MAX_LINE_BYTES = 64 << 20
# json.loads refuses an integer of more digits than this (sys.get_int_max_str_digits(), 4300 by default)
_TOO_MANY_DIGITS = f"an integer of more than {sys.get_int_max_str_digits()} digits, too large to read"
_BLOCK = 1 << 20  # bytes read at a time from a line-oriented file
_BLANKS = re.compile(rb"[ \t\r\n]*")  # a run of blank lines is skipped in one step


@dataclass
class RawTable:
    """The rows as read: `table` in the input's own columns, `rows[k]` the 1-based number users see."""

    table: datasets.Dataset
    rows: list[int]
    where: str  # how error messages name the source
    row_word: str  # "line" for line-oriented files, "row" otherwise
    # For JSON sources, the parsed values column by column. `table` stores a column that mixes value types
    # as datasets' Json feature, which reads a string that is itself valid JSON back decoded ("true" -> True),
    # so validation uses these instead.
    values: dict[str, list[Any]] | None = None
    note: str = ""  # said once in the summary (e.g. which split of a DatasetDict was taken)


def read_source(
    source: str | os.PathLike | datasets.Dataset | datasets.DatasetDict,
    *,
    split: str | None,
    text_columns: Iterable[str] = (),
) -> RawTable:
    """Read `source` into a `RawTable`. `text_columns` are read as strings from CSV (no type guessing)."""
    if isinstance(source, datasets.DatasetDict):
        return _from_dataset(_pick_split(source, split, "dataset"), "dataset", _split_note(source, split))
    if isinstance(source, datasets.Dataset):
        return _from_dataset(source, "dataset")
    if not isinstance(source, (str, os.PathLike)):
        kind = type(source).__name__
        raise DataError(f"cannot read a {kind}: pass a path, a hub name or a datasets.Dataset")

    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return _read_saved(path, text, split)
    if path.is_file():
        return _read_file(path, text, tuple(text_columns))
    if _looks_like_path(text):
        raise DataError(f"file not found: {text}")
    return _read_hub(text, split)


def streamable(source: Any) -> Path | None:
    """The local JSON file (.jsonl / .ndjson / .json, optionally .gz: JSON lines, or a JSON array of records)
    `source` names, which `iter_jsonl_chunks` reads chunk by chunk; None for anything else."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = Path(os.fspath(source)).expanduser()
    if not path.is_file():
        return None
    try:
        fmt, _ = _file_format(path)
    except DataError:
        return None
    return path if fmt in ("jsonl", "json") else None


def iter_jsonl_chunks(path: Path, where: str, size: int, block: int = 1 << 20) -> Iterator[RawTable]:
    """A JSON-lines file, or a .json file holding a JSON array of records, as RawTables of at most `size` records
    each, read as a stream: only one chunk's Python objects (and `block` bytes of text) are alive at a time. Errors
    name the line, as the whole-file reader's do."""
    fmt, compressed = _file_format(path)
    try:
        with _open_binary(path, compressed) as f:
            if fmt == "json" and _starts_array(f):
                records, word = _json_array_records(f, where, block), "row"
            else:
                records, word = _jsonl_records(_numbered_lines(f, where), where), "line"
            while True:
                chunk = list(itertools.islice(records, size))
                if not chunk:
                    return
                yield _from_records(chunk, where, word)
    except (gzip.BadGzipFile, EOFError, OSError) as e:
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise DataError(f"cannot open {where}: {e.strerror}") from e
        raise DataError(f"{where}: cannot decompress ({_short(e)})") from e


def table_chunks(raw: RawTable, size: int) -> Iterator[RawTable]:
    """An Arrow-backed RawTable as zero-copy slices of at most `size` rows, with their own row numbers."""
    table = raw.table.with_format("arrow")
    for start in range(0, len(raw.rows), size):
        part = arrow_dataset(table[start:start + size], raw.table.features)
        yield RawTable(part, raw.rows[start:start + size], raw.where, raw.row_word, note=raw.note)


def _looks_like_path(text: str) -> bool:
    suffixes = [s.lower() for s in Path(text).suffixes]
    if suffixes and suffixes[-1] == ".gz":
        return True
    if suffixes and (suffixes[-1] in FORMATS or suffixes[-1] in _OTHER_FILE_SUFFIXES):
        return True
    name = text.partition(":")[0]
    # Hub ids are `name` or `org/name`; anything else with a separator is a path.
    return not _HUB_NAME.fullmatch(name) or name.startswith(".")


def _file_format(path: Path) -> tuple[str, bool]:
    suffixes = [s.lower() for s in path.suffixes]
    compressed = bool(suffixes) and suffixes[-1] == ".gz"
    if compressed:
        suffixes = suffixes[:-1]
    fmt = FORMATS.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        shown = "".join(path.suffixes[-2:]) or "(none)"
        raise DataError(f"{path}: unsupported file type {shown}; supported: {SUPPORTED}")
    return fmt, compressed


def _read_file(path: Path, where: str, text_columns: tuple[str, ...]) -> RawTable:
    fmt, compressed = _file_format(path)
    try:
        if fmt == "jsonl":
            with _open_binary(path, compressed) as f:
                raw = _from_records(_jsonl_records(_numbered_lines(f, where), where), where, "line")
        elif fmt == "json":
            with _open_binary(path, compressed) as f:
                raw = _read_json(io.StringIO("".join(_decoded_lines(f, where))), where)
        elif fmt == "parquet":
            raw = _read_parquet(path, where, compressed)
        else:
            raw = _read_csv(path, where, text_columns)
    except (gzip.BadGzipFile, EOFError, OSError) as e:
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise DataError(f"cannot open {where}: {e.strerror}") from e
        raise DataError(f"{where}: cannot decompress ({_short(e)})") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text ({_short(e)})") from e
    if not raw.rows:
        raise DataError(f"{where}: no rows")
    return raw


def _open_binary(path: Path, compressed: bool) -> IO[bytes]:
    return gzip.open(path, "rb") if compressed else open(path, "rb")  # noqa: SIM115 - the caller closes it


def _decoded_lines(f: IO[bytes], where: str) -> Iterator[str]:
    """Every line of the file as text (blank ones too: a JSON document's positions count them)."""
    for _, line in _numbered_lines(f, where, skip_blank=False):
        yield line


def _numbered_lines(f: IO[bytes], where: str, skip_blank: bool = True) -> Iterator[tuple[int, str]]:
    """(line number, text) of the file's lines, decoded one by one so that invalid UTF-8 is reported with its line.
    Read in blocks: a line over MAX_LINE_BYTES is refused by its number before it is held whole, and a run of blank
    lines (`skip_blank`) is skipped in one regular-expression step, however many lines it spans."""
    buffer, pos, number, first = b"", 0, 0, True  # `number`: the lines before `pos`
    eof = False
    while True:
        if skip_blank:  # the blank lines from `pos` on: up to the last newline of the run of whitespace there
            cut = buffer.rfind(b"\n", pos, _BLANKS.match(buffer, pos).end()) + 1  # type: ignore[union-attr]
            if cut:
                number += buffer.count(b"\n", pos, cut)
                pos = cut
        end = buffer.find(b"\n", pos)
        if end < 0 and not eof:
            if len(buffer) - pos > MAX_LINE_BYTES:
                raise DataError(f"{where} line {number + 1}: longer than {_limit()} (the limit of a "
                                f"line); split the record or shorten its text")
            data = f.read(_BLOCK)
            if first:
                data, first = data.removeprefix(b"\xef\xbb\xbf"), False  # a UTF-8 byte-order mark
            eof = not data
            buffer, pos = buffer[pos:] + data, 0
            continue
        if end < 0:  # the last line, without a newline
            if pos >= len(buffer):
                return
            end = len(buffer) - 1
        line = buffer[pos:end + 1]
        if len(line) > MAX_LINE_BYTES + 1:
            raise DataError(f"{where} line {number + 1}: longer than {_limit()} (the limit of a "
                            f"line); split the record or shorten its text")
        pos = end + 1
        number += 1
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where} line {number}: not UTF-8 text (byte 0x{line[e.start]:02x} at column "
                            f"{e.start + 1})") from None
        yield number, text


def _jsonl_records(lines: Iterable[tuple[int, str]], where: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line.rstrip("\r\n"))  # the newline would move the error to "line 2"
        except json.JSONDecodeError as e:
            raise DataError(f"{where} line {number}, column {e.colno}: invalid JSON ({e.msg})") from None
        except RecursionError:
            raise DataError(f"{where} line {number}: JSON nested too deeply") from None
        except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
            raise DataError(f"{where} line {number}: {_TOO_MANY_DIGITS}") from None
        if not isinstance(record, dict):
            raise DataError(f"{where} line {number}: expected a JSON object, got {_json_type(record)}")
        yield number, record


def _starts_array(f: IO[bytes]) -> bool:
    """Whether the file's first non-blank character (after a byte-order mark) is `[`; the stream is rewound."""
    head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    while not head:
        more = f.read(4096)
        if not more:
            break
        head = more.lstrip()
    f.seek(0)
    return head[:1] == b"["


class _ArrayText:
    """A JSON array's text decoded block by block, kept from the next unread character on; the lines (and the
    columns of the current line) already dropped turn a position in the buffer into the file's line and column."""

    def __init__(self, f: IO[bytes], where: str, block: int) -> None:
        import codecs

        self.f, self.where, self.block = f, where, block
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text, self.pos = "", 0  # buffer, next unread index
        self.line, self.column = 0, 0  # lines dropped before the buffer; columns of its first line dropped
        self.eof, self.read_lines, self.first = False, 0, True

    def more(self, at_least: int = 0) -> bool:
        """Append at least one block (or `at_least` characters' worth) of text; False at the end of the file."""
        if self.eof:
            return False
        cut, newline = self.pos, self.text.rfind("\n", 0, self.pos)
        self.line += self.text.count("\n", 0, cut)
        self.column = cut - newline - 1 if newline >= 0 else self.column + cut
        self.text, self.pos = self.text[cut:], 0
        data = self.f.read(max(self.block, at_least))
        if self.first:
            data, self.first = data.removeprefix(b"\xef\xbb\xbf"), False
        try:
            chunk = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as e:
            line = self.read_lines + data[:e.start].count(b"\n") + 1
            raise DataError(f"{self.where} line {line}: not UTF-8 text (byte 0x{data[e.start]:02x})") from None
        self.read_lines += data.count(b"\n")
        self.eof = not data
        self.text += chunk
        return bool(data)

    def skip_blank(self) -> str:
        """The next non-blank character ('' at the end of the file), not consumed."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.text) or not self.more():
                return self.text[self.pos:self.pos + 1]

    def fail(self, message: str, lineno: int | None = None, colno: int | None = None) -> DataError:
        """The error at the next unread character, or at (lineno, colno) of the buffer (a JSONDecodeError's)."""
        if lineno is None:
            lineno = self.text.count("\n", 0, self.pos) + 1
            colno = self.pos - self.text.rfind("\n", 0, self.pos)
        column = colno + (self.column if lineno == 1 else 0)
        return DataError(f"{self.where} line {self.line + lineno}, column {column}: invalid JSON ({message})")


def _json_array_records(f: IO[bytes], where: str, block: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """The records of a JSON array, one at a time, decoded with `json.JSONDecoder.raw_decode` over a buffer that
    grows only to hold the record being read: a large array never sits in memory whole."""
    decoder = json.JSONDecoder()
    text = _ArrayText(f, where, block)
    text.skip_blank()
    text.pos += 1  # the `[` that `_starts_array` saw
    number = 0
    while True:
        char = text.skip_blank()
        if char == "]" and number == 0:
            text.pos += 1
            break
        if not char:
            raise text.fail("Expecting value")
        while True:
            try:
                record, end = decoder.raw_decode(text.text, text.pos)
            except json.JSONDecodeError:
                # the value may run past the buffer: read as much again (doubling keeps a long record linear)
                if len(text.text) - text.pos > MAX_LINE_BYTES:
                    raise _record_too_long(text, number + 1) from None
                if text.more(at_least=len(text.text) - text.pos):
                    continue
                try:  # at the end of the file: the error again, at the buffer's final position
                    decoder.raw_decode(text.text, text.pos)
                except json.JSONDecodeError as e:
                    raise text.fail(e.msg, e.lineno, e.colno) from None
            except RecursionError:
                raise DataError(f"{where}: JSON nested too deeply") from None
            except ValueError:  # an integer of more digits than Python converts
                line = text.line + text.text.count("\n", 0, text.pos) + 1
                raise DataError(f"{where} record {number + 1} (line {line}): {_TOO_MANY_DIGITS}") from None
            if end - text.pos > MAX_LINE_BYTES:
                raise _record_too_long(text, number + 1)
            if end == len(text.text) and not text.eof and not isinstance(record, (dict, list, str)):
                text.more()  # a number or literal cut at the buffer's end may go on: decode it whole
                continue
            break
        number += 1
        if not isinstance(record, dict):
            raise DataError(f"{where} record {number}: expected a JSON object, got {_json_type(record)}")
        text.pos = end
        yield number, record
        char = text.skip_blank()
        if char == "]":
            text.pos += 1
            break
        if char != ",":
            raise text.fail("Expecting ',' delimiter")
        text.pos += 1
    if text.skip_blank():
        raise text.fail("Extra data")


def _record_too_long(text: _ArrayText, number: int) -> DataError:
    line = text.line + text.text.count("\n", 0, text.pos) + 1
    return DataError(f"{text.where} record {number} (line {line}): longer than {_limit()} (the limit of a record); "
                     f"split it or shorten its text")


def _read_json(f: IO[str], where: str) -> RawTable:
    """A JSON array of records, or (anything else) one record per line."""
    text = f.read()
    if not text.lstrip().startswith("["):
        return _from_records(_jsonl_records(enumerate(io.StringIO(text), start=1), where), where, "line")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where} line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply") from None
    except ValueError:  # an integer of more digits than Python converts
        raise DataError(f"{where}: {_TOO_MANY_DIGITS}") from None
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise DataError(f"{where} record {number}: expected a JSON object, got {_json_type(record)}")
    return _from_records(enumerate(records, start=1), where, "row")


def _from_records(numbered: Iterable[tuple[int, dict[str, Any]]], where: str, row_word: str) -> RawTable:
    rows: list[int] = []
    columns: dict[str, list[Any]] = {}
    for k, (number, record) in enumerate(numbered):
        rows.append(number)
        for key, value in record.items():
            if key not in columns:
                columns[key] = [None] * k  # a column first seen late is missing in the rows before
            columns[key].append(value)
        for values in columns.values():
            if len(values) == k:  # this record lacks the column
                values.append(None)
    try:
        table = arrow_dataset(pa.Table.from_pydict(columns))
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        try:  # a column mixes value types (1 and "1", strings and lists): datasets stores it as Json
            table = datasets.Dataset.from_dict(columns, on_mixed_types="use_json")
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as e:
            raise _bad_value(columns, rows, where, row_word) or \
                DataError(f"{where}: cannot build a table from the records ({_short(e)})") from e
    return RawTable(table, rows, where, row_word, columns)


def _bad_value(columns: dict[str, list[Any]], rows: list[int], where: str, row_word: str) -> DataError | None:
    """The error naming the first row (and its column) holding a value no table can store, whether or not the
    column is used: a lone surrogate in a string, an integer beyond 64 bits; None when there is none (the values
    conflict only together). Run on the error path only."""
    first: tuple[int, str, str] | None = None
    for name, values in columns.items():
        for k, value in enumerate(values[:first[0]] if first is not None else values):
            try:
                why = _unstorable(value)
            except RecursionError:
                why = None
            if why is not None:
                first = (k, name, why)
                break
    if first is None:
        return None
    k, name, why = first
    return DataError(f"{where} {row_word} {rows[k]}: column '{_short(name, 40)}' holds a value no table can store "
                     f"({why})")


def _unstorable(value: Any) -> str | None:
    """Why Arrow (and datasets' Json) cannot store `value`, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "a lone surrogate, not valid Unicode"
    elif isinstance(value, int) and not isinstance(value, bool):
        if not -(1 << 63) <= value < 1 << 64:
            return "an integer beyond 64 bits"
    elif isinstance(value, list):
        return next((why for v in value if (why := _unstorable(v)) is not None), None)
    elif isinstance(value, dict):
        return next((why for kv in value.items() for v in kv if (why := _unstorable(v)) is not None), None)
    return None


def _limit() -> str:
    """MAX_LINE_BYTES as people read it."""
    return f"{MAX_LINE_BYTES >> 20} MiB" if MAX_LINE_BYTES >= 1 << 20 and not MAX_LINE_BYTES % (1 << 20) \
        else f"{MAX_LINE_BYTES} bytes"


def arrow_dataset(
    table: pa.Table, features: datasets.Features | None = None, fingerprint: str | None = None
) -> datasets.Dataset:
    """Wrap an Arrow table as an in-memory Dataset without hashing its contents (datasets' default
    fingerprint pickles the whole table, seconds for a large one)."""
    info = datasets.DatasetInfo(features=features) if features is not None else None
    return datasets.Dataset(table, info=info, fingerprint=fingerprint or generate_random_fingerprint())


def _read_parquet(path: Path, where: str, compressed: bool) -> RawTable:
    try:
        if compressed:
            with gzip.open(path, "rb") as f:
                table = pq.read_table(pa.BufferReader(f.read()))
        else:
            table = pq.read_table(path)
    except pa.ArrowException as e:
        raise DataError(f"{where}: cannot read Parquet ({_short(e)})") from e
    return _from_dataset(arrow_dataset(table), where)


def _read_csv(path: Path, where: str, text_columns: tuple[str, ...]) -> RawTable:
    # Text columns stay strings ("42" is a prompt, not a number); other columns (scores, labels) are typed.
    options = pa_csv.ConvertOptions(column_types={name: pa.string() for name in text_columns})
    try:
        # Transcripts hold newlines inside quoted values; .gz is decompressed by pyarrow itself.
        parse = pa_csv.ParseOptions(newlines_in_values=True)
        table = pa_csv.read_csv(path, parse_options=parse, convert_options=options)
    except pa.ArrowException as e:
        raise DataError(f"{where}: cannot read CSV ({_short(e)})") from e
    return _from_dataset(arrow_dataset(table), where)


def _read_saved(path: Path, where: str, split: str | None) -> RawTable:
    if not any((path / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json")):
        raise DataError(f"{where}: a directory, but not one written by datasets' save_to_disk")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises many types for a damaged directory
        raise DataError(f"{where}: cannot load saved dataset ({_short(e)})") from e
    note = ""
    if isinstance(loaded, datasets.DatasetDict):
        note = _split_note(loaded, split)
        loaded = _pick_split(loaded, split, where)
    return _from_dataset(loaded, where, note)


def _split_note(dd: datasets.DatasetDict, split: str | None) -> str:
    if split is not None or len(dd) < 2:
        return ""
    return f"split 'train' of {', '.join(dd)}; --split picks another"


def _pick_split(dd: datasets.DatasetDict, split: str | None, where: str) -> datasets.Dataset:
    name = split or "train"
    if name not in dd:
        raise DataError(f"{where}: no split '{name}' (splits: {', '.join(dd)}); choose one with --split")
    return dd[name]


def _read_hub(text: str, split: str | None) -> RawTable:
    from prefsift.models import go_offline_unless_reachable

    name, _, name_split = text.partition(":")
    chosen_split = split or name_split or "train"
    online = go_offline_unless_reachable()  # offline: the cache at once, not half a minute of retries
    if not online:
        datasets.config.HF_HUB_OFFLINE = True
    try:
        loaded = datasets.load_dataset(name, split=chosen_split)
    except Exception as e:  # offline, unknown name, gated, bad split: all one line for the user
        why = "" if online else " (the hub is unreachable: offline, and it is not in the local cache)"
        raise DataError(f"cannot load hub dataset '{name}'{why}: {_short(e)}") from e
    if not isinstance(loaded, datasets.Dataset):
        raise DataError(f"cannot load hub dataset '{name}': split '{chosen_split}' is not a plain dataset")
    return _from_dataset(loaded, text)


def _from_dataset(ds: datasets.Dataset, where: str, note: str = "") -> RawTable:
    if len(ds) == 0:
        raise DataError(f"{where}: no rows")
    return RawTable(ds.with_format(None), list(range(1, len(ds) + 1)), where, "row", note=note)


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _short(e: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message, cut to `limit` characters."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
