"""Resumable passes: each finished batch of a pass is kept in a Parquet shard under the run's identity, so a
killed run resumes from its finished shards and gives identical values."""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prefsift.output import temp_sibling


@dataclass
class LogpsRun:
    """Where and under which identity a log-prob pass keeps its finished shards, so a killed run resumes."""

    directory: Path
    tag: str  # "policy", "reference", "validation", ...
    identity: dict  # model fingerprint, tokenizer, max_length, batch_tokens, data hash: other shards are stale

    @property
    def shard_dir(self) -> Path:
        key = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:12]
        return self.directory / "shards" / f"{self.tag}-{key}"

    def finished(self) -> dict[int, np.ndarray]:
        """{batch number: its rows' [row, chosen, rejected]} from the shards on disk; a corrupt shard (a kill
        mid-write on a filesystem without atomic rename, a 0-byte file) is deleted and its batches recomputed."""
        done: dict[int, np.ndarray] = {}
        for path in sorted(self.shard_dir.glob("*.parquet")):
            try:
                table = pq.read_table(path).to_pydict()
                batch, rows = np.asarray(table["batch"]), np.asarray(table["row"])
                values = np.stack([rows, table["chosen_logps"], table["rejected_logps"]], axis=1)
            except Exception:  # noqa: BLE001 - any unreadable shard is recomputed, never trusted
                warnings.warn(f"unreadable shard {path} is recomputed", stacklevel=2)
                path.unlink(missing_ok=True)
                continue
            for number in np.unique(batch):
                done[int(number)] = values[batch == number]
        return done

    def write(self, batches: list[int], rows: list[int], values: np.ndarray) -> None:
        table = pa.table({"batch": batches, "row": rows, "chosen_logps": values[:, 0],
                          "rejected_logps": values[:, 1]})
        path = self.shard_dir / f"{batches[0]:06d}-{batches[-1]:06d}.parquet"
        tmp = temp_sibling(path)  # unique per process and call
        pq.write_table(table, tmp)
        tmp.replace(path)  # atomic: a killed run never leaves a half-written shard behind


class ShardBuffer:
    """Finished batches of one pass, kept in `run`'s shards every `flush_rows` rows or `flush_seconds`, whichever
    comes first (the log-prob and reward passes share it); without a run, nothing is written."""

    def __init__(self, run: LogpsRun | None, flush_rows: int, flush_seconds: float) -> None:
        self.run, self.flush_rows, self.flush_seconds = run, flush_rows, flush_seconds
        self.batches: list[int] = []
        self.rows: list[int] = []
        self.values: list[np.ndarray] = []
        self.last_flush = time.monotonic()

    def add(self, number: int, rows: list[int], values: np.ndarray) -> None:
        self.batches.extend([number] * len(rows))
        self.rows.extend(rows)
        self.values.append(values)
        if len(self.rows) >= self.flush_rows or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self.run is not None and self.rows:
            self.run.write(self.batches, self.rows, np.concatenate(self.values))
        self.batches, self.rows, self.values, self.last_flush = [], [], [], time.monotonic()
