"""The reproducibility record every stage writes beside its output: what ran, on what, with which versions."""

from __future__ import annotations

import json
import os
import platform
import secrets
import time
from pathlib import Path
from typing import Any

from prefsift.errors import ModelError, PrefsiftError
from prefsift.output import not_regular


def versions() -> dict[str, str | int]:
    import datasets
    import peft
    import torch
    import transformers
    import trl

    import prefsift

    return {"prefsift": prefsift.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "peft": peft.__version__, "datasets": datasets.__version__,
            "python": platform.python_version(),
            # without --threads the count follows the machine's load, and fp32 reductions split over another number
            # of threads can differ in the last bits: the count a run used is part of what reproduces it
            "torch_threads": torch.get_num_threads()}


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary and chat template: log-probs from another tokenizer are not comparable."""
    import hashlib

    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    digest.update(str(tokenizer.eos_token).encode())
    return digest.hexdigest()[:16]


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    tmp.write_text(text)
    tmp.replace(path)  # atomic: a reader never sees half a file


def write_manifest(out_dir: Path, stage: str, record: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "manifest.json"
    full = {"stage": stage, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record, "versions": versions()}
    _write_text(path, json.dumps(full, indent=2, default=str) + "\n")
    return path


DROPPED = "dropped.jsonl"


def dropped_record(stage: str, reason: str, *, pair_id: str | None = None, row: int | None = None) -> dict[str, Any]:
    """One left-out row: `{"pair_id" or "row", "stage", "reason"}` (pair_id once a row became a pair; `row` is the
    input's 1-based line or record number, given too where known)."""
    record: dict[str, Any] = {}
    if pair_id is not None:
        record["pair_id"] = pair_id
    if row is not None:
        record["row"] = row
    if not record:
        raise ValueError("a dropped record names a pair_id or a row")
    return {**record, "stage": stage, "reason": reason}


def write_dropped(out_dir: Path, records: list[dict[str, Any]]) -> Path:
    """`dropped.jsonl` in `out_dir`: every row a stage left out and why, one JSON object a line (see
    `dropped_record`); written even when empty, so its absence never reads as "nothing dropped"."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / DROPPED
    _write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def write_input_drops(out_dir: Path, invalid: list, stage: str = "data") -> Path:
    """dropped.jsonl gains the input rows a stage's data left out (`LoadedPairs.invalid`), after any record already
    there (a stage that writes its own first keeps them)."""
    return write_dropped(out_dir, read_dropped(out_dir) + [dropped_record(stage, r.reason, row=r.row) for r in invalid])


def _require_file(path: Path) -> None:
    """One line when a result file (scores.parquet, manifest.json, dropped.jsonl, ...) is a directory or a FIFO (a
    read would block on it)."""
    kind = not_regular(path)
    if kind is not None:
        raise PrefsiftError(f"the result file {path} is {kind}, not a regular file")


def read_dropped(directory: Path) -> list[dict[str, Any]]:
    path = Path(directory) / DROPPED
    _require_file(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_manifest(directory: Path) -> dict[str, Any]:
    from prefsift.errors import PrefsiftError

    if Path(directory).exists() and not Path(directory).is_dir():
        raise PrefsiftError(f"{directory} is {not_regular(directory) or 'a file'}, not a prefsift output directory "
                            f"(give the directory a stage wrote, not a file in it)")
    # every result file a stage reads from the directory next, whichever stage it is
    for entry in Path(directory).iterdir() if Path(directory).is_dir() else ():
        if entry.suffix in (".parquet", ".json", ".jsonl") and not entry.name.startswith("."):
            _require_file(entry)
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise PrefsiftError(f"no manifest.json in {directory}: is it a prefsift output directory?")
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise PrefsiftError(f"{path} is not valid JSON ({error}): rerun the stage that wrote it") from None
    if not isinstance(record, dict):
        raise PrefsiftError(f"{path} is not a prefsift manifest (not a JSON object)")
    return record


def check_dropped(n_dropped: int, n: int, allow: bool, records: list[dict] | None = None) -> None:
    """One line instead of a run of NaN: every pair left out always stops; more than half stops unless allowed."""
    if n_dropped == 0 or (n_dropped * 2 <= n and n_dropped < n) or (allow and n_dropped < n):
        return
    reasons: dict[str, int] = {}
    for record in records or []:
        if record["stage"] == "score":
            key = record["reason"].split("=")[0]
            reasons[key] = reasons.get(key, 0) + 1
    why = ", ".join(f"{k}: {v} pairs" for k, v in reasons.items()) or "NaN scores"
    if n_dropped == n:
        raise PrefsiftError(f"every one of the {n} pairs would be dropped ({why}): nothing to score; for a long "
                            f"prompt raise --max-length")
    raise PrefsiftError(f"{n_dropped} of {n} pairs would be dropped ({why}): raise --max-length, or pass "
                        f"--allow-dropped (allow_dropped: true in a config) to keep the rest")


def model_failure(what: str, failed, pair_ids, fix: str, *, max_length: int | None = None,
                  tokenized: bool = True, unit: str = "pairs") -> PrefsiftError:
    """The one line of a model pass that gave NaN or inf for pairs that fit (`tokenized`: the tokenizer says they
    fit; a reward model truncates and never drops): who, the count, one pair, the fix. Never "too long": a pair is
    too long only when the tokenizer says its prompt fills max_length."""
    import numpy as np

    n_bad, n, first = int(failed.sum()), len(failed), int(np.flatnonzero(failed)[0])
    example = f"pair {pair_ids[first]}" if pair_ids is not None else f"row {first + 1}"
    fits = "" if not tokenized else " that fit" if max_length is None else f" that fit max_length {max_length}"
    return ModelError(f"{what} gave NaN or inf for {n_bad} of {n} {unit}{fits} (e.g. {example}): a broken model (NaN "
                      f"or inf weights, an overflowing --dtype), not {unit} too long; {fix}")


def check_scores(directory: Path, table: dict[str, list], names) -> None:
    """One line when a column a stage reads from DIRECTORY/scores.parquet (`table`, as `to_pydict` gives it) holds a
    null, a ±inf, or a NaN for a pair the score stage did not leave out. `prefsift score` writes a finite number for
    every pair it scored and NaN only for the pairs it left out, which the directory itself records: its
    dropped.jsonl lists them, and a pair whose prompt fills max_length has NaN in every log-prob column. Anything
    else is a hand-edited or damaged file: a +inf would rank first, a null would read as a pair left out. Columns
    that are absent or not numeric are the caller's to refuse."""
    import numpy as np

    pair_ids = table.get("pair_id") or [None] * len(next(iter(table.values()), []))
    left_out = _left_out(Path(directory), pair_ids)
    for name in names:
        raw = table.get(name)
        if raw is None or name == "pair_id":
            continue
        null = np.array([v is None for v in raw], dtype=bool)
        try:
            values = np.asarray([np.nan if v is None else v for v in raw], dtype=float)
        except (TypeError, ValueError):
            continue
        kinds = {"null": null, "+inf": values == np.inf, "-inf": values == -np.inf,
                 "NaN": np.isnan(values) & ~null & ~left_out}
        found = [(kind, mask) for kind, mask in kinds.items() if mask.any()]
        if not found:
            continue
        what = ", ".join(f"{kind} for {int(mask.sum())}" for kind, mask in found)
        bad = np.flatnonzero(np.any([mask for _, mask in found], axis=0))
        example = f"pair {pair_ids[bad[0]]}" if pair_ids[bad[0]] is not None else f"row {bad[0] + 1}"
        unlisted = " it did not leave out" if any(kind == "NaN" for kind, _ in found) else ""
        raise PrefsiftError(f"{Path(directory) / 'scores.parquet'}: column '{name}' holds {what} of its {len(raw)} "
                            f"pairs{unlisted} (e.g. {example}): prefsift score writes a finite number for every pair "
                            f"it scored; the file was edited or damaged: score again")


def _left_out(directory: Path, pair_ids: list):
    """Which pairs the score stage left out, as its directory records it: listed in dropped.jsonl (stage score), or
    NaN in every log-prob column of scores.parquet (the engine's mark of a prompt that fills max_length)."""
    import numpy as np
    import pyarrow.parquet as pq

    try:
        listed = {r.get("pair_id") for r in read_dropped(directory)
                  if isinstance(r, dict) and r.get("stage") == "score"}
    except (OSError, ValueError):
        listed = set()
    out = np.array([pid in listed for pid in pair_ids], dtype=bool)
    path = directory / "scores.parquet"
    try:
        logps = [n for n in pq.read_schema(path).names if n.endswith("_logps")]
        if logps:
            table = pq.read_table(path, columns=logps).to_pydict()
            if len(table[logps[0]]) == len(out):
                out |= np.all([[v is not None and v != v for v in table[n]] for n in logps], axis=0)
    except (OSError, ValueError):
        pass
    return out
