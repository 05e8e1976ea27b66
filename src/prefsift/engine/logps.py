"""The log-prob pass: per-pair summed completion log-probs of a whole table, exactly as TRL's DPOTrainer computes
them, batched by length to a token budget, on the path `paths.py` verifies, resumable from its shards.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from prefsift.config import EngineConfig
from prefsift.engine.executors import in_process
from prefsift.engine.paths import chosen_layout, forward_batch, packed_path_ok
from prefsift.engine.shards import LogpsRun, ShardBuffer
from prefsift.engine.tokenize import BatchPlan, CompactPairs, pad_id, path_check_pair, tokenize_pairs
from prefsift.errors import PrefsiftError
from prefsift.output import cheaper
from prefsift.output import progress as progress_bar


def compute_logps(model, tokenizer, pairs, *, max_length: int | None, batch_tokens: int = EngineConfig.batch_tokens,
                  run: LogpsRun | None = None, desc: str = "log-probs", flush_rows: int = 512,
                  flush_seconds: float = 60.0, check_dropped: Callable[[int, int], None] | None = None,
                  executor: Callable | None = None, layout: str = "padded") -> np.ndarray:
    """Summed completion log-probs of every pair of `pairs` (a table with prompt/chosen/rejected columns).

    Returns an (n, 2) array [chosen_logps, rejected_logps] in row order, NaN where TRL would drop the pair.
    With `run`, finished batches are written to a shard every `flush_rows` pairs or `flush_seconds`, whichever
    comes first, so a kill loses at most about a minute of work; a rerun skips them and gives identical values.

    Before any forward pass, `check_dropped(n_dropped, n)` may refuse the plan (one line); without it, a plan that
    drops every pair is refused: a table of NaN is never a result.

    `executor(model, batches, pad_id, packed)` runs the forward passes of the batches still to compute and yields
    their (chosen, rejected) in order: this process by default, `prefsift.engine.executors.RayExecutor` on a Ray pool.
    `layout` (EngineConfig.layout): padded rows, or one flat sequence a batch (flex or jagged attention) where its
    check passes on the model (`paths.chosen_layout`).
    """
    n = len(pairs)
    out = np.full((n, 2), np.nan)
    pad = pad_id(tokenizer)
    tokenized = CompactPairs(tokenize_pairs(tokenizer, rows["prompt"], rows["chosen"], rows["rejected"], max_length)
                             for rows in (pairs[lo:lo + 1024] for lo in range(0, n, 1024)))
    plan = BatchPlan.of(tokenized, batch_tokens)
    if check_dropped is not None:
        check_dropped(n - plan.n_kept, n)
    elif n and not plan.n_kept:
        raise PrefsiftError(f"max_length {max_length} drops all {n} pairs (each prompt alone fills it): raise "
                            f"--max-length")
    done: dict[int, np.ndarray] = {}
    if run is not None:
        run.shard_dir.mkdir(parents=True, exist_ok=True)
        done = run.finished()
    was_training = model.training
    model.eval()
    shards = ShardBuffer(run, flush_rows, flush_seconds)
    checked = path_check_pair(plan, tokenized)  # the path is chosen once, on one pair fixed by the plan
    packed = packed_path_ok(model, checked, pad) if checked is not None else None

    def on_disk(number: int, batch: list[int]) -> bool:
        return number in done and sorted(done[number][:, 0].astype(int)) == sorted(batch)

    todo = ([tokenized[i] for i in batch] for number, batch in enumerate(plan.batches) if not on_disk(number, batch))
    layout = chosen_layout(model, plan, tokenized, pad, layout, executor)
    if layout == "padded":
        results = (executor or in_process)(model, todo, pad, packed)
    else:
        results = (forward_batch(model, pairs, pad, packed, batch_tokens=batch_tokens, layout=layout)
                   for pairs in todo)
    # the cost line (output.progress) before a pass of minutes: what it will take and how to cut it
    with progress_bar(total=n, desc=desc, unit="pair", disable=n == 0,
             cheaper=cheaper(max_length, next(model.parameters()).device.type)) as progress:
        progress.update(n - plan.n_kept)
        for number, batch in enumerate(plan.batches):
            if on_disk(number, batch):
                values = done[number]
                out[values[:, 0].astype(int)] = values[:, 1:]
            else:
                chosen, rejected = next(results)
                values = np.stack([chosen.numpy(), rejected.numpy()], axis=1)
                out[batch] = values
                shards.add(number, batch, values)
            progress.update(len(batch))
        shards.flush()
    model.train(was_training)
    return out
