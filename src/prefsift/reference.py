"""Where a training's reference log-probs come from: one function, `reference_logps`, for every training.

DPO trains against log π_ref of each pair's completions. They are computed once, before training, by the engine
(TRL's own reference pass is never run: `precompute_ref_log_probs` with the values handed in), or read back from a
score directory that already holds them for the same reference model, tokenizer and max_length. The scoring
provider (`Resources.logps("reference")`) is the third source, for trainings inside `run` and the selective scorer:
it is the same engine pass, kept in the run's shards, and handed to `train` as an array.

Every one of these passes, and every other log-prob pass of a model loaded from its files (score's policy and
validation passes, eval's), goes through `cached_logps`: one pass per (model, data, max_length, precision) across
commands, found again by content fingerprint in the cache directory ($PREFSIFT_CACHE, default ~/.cache/prefsift).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prefsift.config import EngineConfig
from prefsift.data import check_chat_template
from prefsift.engine import Engine, LogpsRun
from prefsift.engine.tokenize import non_finite_logps
from prefsift.errors import PrefsiftError
from prefsift.manifest import read_manifest, tokenizer_fingerprint
from prefsift.output import temp_sibling


def reference_logps(reference, pairs, engine: EngineConfig, *, scores_dir: Path | None = None,
                    run: LogpsRun | None = None, desc: str = "reference log-probs") -> np.ndarray:
    """(n, 2) reference log-probs of `pairs` (a table with prompt/chosen/rejected and pair_id) under `reference` (a
    LoadedModel), NaN where TRL drops the pair: from `scores_dir` when given (checked: same reference, tokenizer
    and max_length, every pair present), else the engine's pass at `engine`'s settings, on its executor."""
    if scores_dir is not None:
        return from_scores(scores_dir, list(pairs["pair_id"]), reference, engine)
    return cached_logps(reference, pairs, engine,
                        lambda: Engine(engine).logps(reference.model, reference.tokenizer, pairs, run=run, desc=desc))


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


# --- the log-prob cache across commands -------------------------------------------------------------------------
# A log-prob pass depends only on the weights, the tokenizer, the pairs' text, max_length, precision and device
# (and the code): `train`, `score`, `eval` and `run` over the same pairs and model compute the same (n, 2) array.
# It is kept once, content-addressed, under the cache directory, so a later command reads it instead of repeating
# the pass (a 135M model's reference pass over 2,312 HH pairs takes minutes on a CPU).

CACHE_ENV = "PREFSIFT_CACHE"  # a directory, or off / 0 / false / no / none to disable the cache
_DISABLED = {"off", "0", "false", "no", "none"}
_METADATA_KEY = b"prefsift.logps"


def cache_dir() -> Path | None:
    """Where passes are cached: $PREFSIFT_CACHE, else $XDG_CACHE_HOME/prefsift, else ~/.cache/prefsift (as the
    Hugging Face libraries keep theirs); None when $PREFSIFT_CACHE disables it."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() in _DISABLED:
        return None
    if value:
        return Path(value).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "prefsift"


def content_addressed(loaded) -> bool:
    """Whether a loaded model's fingerprint names its content: a hash of its weight files (`models.fingerprint_files`)
    or a hub revision. A copy trained in memory (fingerprinted by its recipe, or not at all) is never cached: two
    trainings of one recipe need not give the same weights."""
    fingerprint = str(getattr(loaded, "fingerprint", "") or "")
    if not fingerprint:
        return False
    if fingerprint.startswith("hub:"):
        return "@" in fingerprint and not fingerprint.endswith("@None")
    return Path(str(loaded.source)).exists()


_SIGNATURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (its tensors' versions, signature)


def weights_signature(model) -> str:
    """A hash of the weights as they are in memory (each tensor's shape, sum and 64 strided values): a model trained
    or edited in place after loading keeps its files' fingerprint, and this tells it from the files. Computed again
    only when a tensor changed since (torch counts every in-place write in its `_version`)."""
    import torch

    tensors = model.state_dict()
    versions = tuple((t.data_ptr(), t._version) for t in tensors.values())
    known = _SIGNATURES.get(model)
    if known is not None and known[0] == versions:
        return known[1]
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in tensors.items():
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 64)
            sample = flat[::step][:64].double().cpu().numpy()
            total = flat.float().sum().item() if flat.dtype != torch.float32 else flat.sum().item()
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{total!r}".encode())
            digest.update(np.ascontiguousarray(sample).tobytes())
    _SIGNATURES[model] = (versions, digest.hexdigest()[:16])
    return _SIGNATURES[model][1]


def pairs_digest(pairs) -> str:
    """sha256 of the pairs' text in row order (prompt, chosen, rejected: strings or messages), as a pass reads it:
    the pair_ids alone would not tell a table whose prompts a chat template wrapped from the plain one."""
    digest = hashlib.sha256()
    table = pairs.select_columns(["prompt", "chosen", "rejected"]).with_format("arrow")
    for start in range(0, len(pairs), 4096):
        batch = table[start:start + 4096].to_pydict()
        digest.update(json.dumps(batch, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()


@functools.cache
def engine_code_digest() -> str:
    """A digest of the code that computes a pass (prefsift.engine's and the data normalisation's sources): a fix to
    the engine between two commits of the same version misses every entry the old code made, instead of serving its
    numbers from the cache."""
    import prefsift.data
    import prefsift.engine

    digest = hashlib.sha256()
    for package in (prefsift.engine, prefsift.data):
        for path in sorted(Path(package.__file__).parent.glob("*.py")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def pass_identity(loaded, pairs, engine: EngineConfig) -> dict | None:
    """Everything that changes a log-prob pass's numbers, or None when the model has no content fingerprint."""
    if not content_addressed(loaded):
        return None
    import torch
    import transformers
    import trl

    from prefsift import __version__

    parameter = next(loaded.model.parameters())
    tokenizer = loaded.tokenizer
    return {"pass": "logps", "model": loaded.fingerprint, "weights": weights_signature(loaded.model),
            "tokenizer": tokenizer_fingerprint(tokenizer), "tokenizer_class": type(tokenizer).__name__,
            "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
            "add_bos": str(getattr(tokenizer, "add_bos_token", None)),
            "dtype": str(parameter.dtype), "device": parameter.device.type,
            "max_length": engine.max_length, "batch_tokens": engine.batch_tokens, "layout": engine.layout,
            "data": pairs_digest(pairs), "n_pairs": len(pairs), "engine_code": engine_code_digest(),
            "versions": {"prefsift": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "trl": trl.__version__}}


def _entry_path(root: Path, identity: dict) -> Path:
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
    return root / "logps" / f"{key}.parquet"


def _values_digest(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.float64).tobytes()).hexdigest()


def read_cached(path: Path, identity: dict) -> tuple[np.ndarray, tuple[float | None, float | None]] | None:
    """The (n, 2) pass stored at `path` when it is whole and made under `identity`, with the wall and CPU seconds
    it took when it was computed (each None if the entry does not say); a missing entry is None, and an unreadable,
    truncated, altered or foreign one is None with a warning: it is recomputed, never trusted."""
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
        record = json.loads((table.schema.metadata or {})[_METADATA_KEY])
        values = np.stack([np.asarray(table["chosen_logps"], dtype=np.float64),
                           np.asarray(table["rejected_logps"], dtype=np.float64)], axis=1)
    except Exception as e:  # noqa: BLE001 - any unreadable entry is recomputed, never trusted
        warnings.warn(f"ignoring the unreadable log-prob cache entry {path} ({type(e).__name__}); recomputing",
                      stacklevel=3)
        return None
    if record.get("identity") != identity:
        warnings.warn(f"ignoring the log-prob cache entry {path}: it was made for another model, data or setting; "
                      f"recomputing", stacklevel=3)
        return None
    if values.shape != (identity["n_pairs"], 2) or record.get("sha256") != _values_digest(values):
        warnings.warn(f"ignoring the damaged log-prob cache entry {path} (its values do not match their checksum); "
                      f"recomputing", stacklevel=3)
        return None
    costs = tuple(float(record[k]) if isinstance(record.get(k), (int, float)) and record[k] >= 0 else None
                  for k in ("seconds", "cpu_seconds"))
    return values, costs


def write_cached(path: Path, identity: dict, values: np.ndarray, seconds: float | None = None,
                 cpu_seconds: float | None = None) -> None:
    """Store a pass atomically (a temporary file renamed over the entry: a reader never sees half of one), with the
    seconds it took to compute. A cache that cannot be written (read-only, full) costs the reuse, never the
    command: one warning."""
    record = {"identity": identity, "sha256": _values_digest(values), "seconds": seconds,
              "cpu_seconds": cpu_seconds}
    table = pa.table({"chosen_logps": values[:, 0], "rejected_logps": values[:, 1]})
    table = table.replace_schema_metadata({_METADATA_KEY: json.dumps(record, sort_keys=True).encode()})
    tmp = temp_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # its directory could not be made: there is no temporary file
        warnings.warn(f"could not write the log-prob cache under {path.parent} ({e.strerror or e}); the pass is not "
                      f"kept for later commands (set {CACHE_ENV} to another directory, or to off)", stacklevel=3)


def cached_logps(loaded, pairs, engine: EngineConfig, compute: Callable[[], np.ndarray], *,
                 check_dropped: Callable[[int, int], None] | None = None, cost: dict | None = None) -> np.ndarray:
    """`compute()` (a log-prob pass of `loaded` over `pairs` at `engine`'s settings), or the same pass a command
    already computed, read from the cache. A read pass meets the same check as a computed one (`check_dropped`:
    too many pairs whose prompt fills max_length). A pass that holds a NaN or inf for a pair that fits (a broken
    model) is returned but never stored. `cost`, when given, is filled with the pass's `seconds` (measured, or as
    measured when it was cached: a compute column charges what the pass costs, not how warm the cache was) and
    whether it was `cached`."""
    check_chat_template(loaded.tokenizer, pairs, f"the model {loaded.source}")
    root = cache_dir()
    identity = pass_identity(loaded, pairs, engine) if root is not None else None
    cost = {} if cost is None else cost
    start, start_cpu = time.perf_counter(), time.process_time()

    def spent(cached: bool) -> None:
        cost.update(seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - start_cpu, cached=cached)

    if identity is None:
        values = compute()
        spent(False)
        return values
    path = _entry_path(root, identity)
    entry = read_cached(path, identity)
    if entry is not None:
        values, (seconds, cpu_seconds) = entry
        if check_dropped is not None:
            too_long, _ = non_finite_logps(values, loaded.tokenizer, pairs, engine.max_length)
            check_dropped(int(too_long.sum()), len(values))
        spent(True)  # what reading took, unless the entry says what computing took
        cost.update({k: v for k, v in (("seconds", seconds), ("cpu_seconds", cpu_seconds)) if v is not None})
        return values
    values = np.asarray(compute(), dtype=np.float64)
    spent(False)
    _, failed = non_finite_logps(values, loaded.tokenizer, pairs, engine.max_length)
    if not failed.any():
        write_cached(path, identity, values, seconds=cost["seconds"], cpu_seconds=cost["cpu_seconds"])
    return values
