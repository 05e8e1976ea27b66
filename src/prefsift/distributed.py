"""The log-prob pass beyond one process: a Ray Data actor pool, one model replica a worker.

The driver does everything but the forward passes, exactly as a single process does: it tokenizes, makes the batch
plan, checks which exact path the model takes (`packed_path_ok`), skips the batches whose shards are on disk, and
writes the shards and the scores. Only the remaining batches travel, as rows of a `ray.data` dataset, through
`map_batches` to a pool of actors; each actor holds one copy of the model (sent once through Ray's object store)
and runs `forward_batch` with the driver's path decisions. Rows come back in plan order, so the shards and the
scores file are those of a single-process run (bit for bit at the same torch thread count: a matmul's summation
order can change with the number of threads).

Ray starts locally (`ray.init(num_cpus=workers)`) when no address is given; `ray_address` joins a running cluster
(`ray start --head` on one machine, `ray start --address=HEAD:6379` on the others; then `--ray-address HEAD:6379`
or `auto` on the head).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import torch

from prefsift.config import EngineConfig
from prefsift.errors import ConfigError
from prefsift.logps import TokenizedPair, default_threads


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray needs Ray: pip install 'prefsift[ray]'") from None
    return ray


class _Worker:
    """One Ray actor: a model replica and the driver's path decisions."""

    def __init__(self, model_box: list, pad_id: int, packed: bool, cached_ok: bool | None, threads: int) -> None:
        import prefsift.logps as engine

        torch.set_num_threads(threads)
        self.model = _ray().get(model_box[0])  # boxed: Ray would otherwise resolve the reference for us, once a call
        self.pad_id, self.packed = pad_id, packed
        if cached_ok is not None:  # the driver's verdict, so every batch takes the path a single process gives it
            engine._CACHED_OK[self.model] = cached_ok

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from prefsift.logps import forward_batch

        values = []
        for text in batch["pairs"]:
            pairs = [TokenizedPair(*ids) for ids in json.loads(text)]
            chosen, rejected = forward_batch(self.model, pairs, self.pad_id, self.packed)
            values.append(json.dumps([chosen.tolist(), rejected.tolist()]))  # float64 repr: exact round trip
        return {"number": batch["number"], "values": np.asarray(values, dtype=object)}


class RayExecutor:
    """`compute_logps(..., executor=RayExecutor(engine))`: the forward passes of the batches still to compute, on a
    Ray Data actor pool of `engine.workers` model replicas, yielded in order."""

    def __init__(self, engine: EngineConfig) -> None:
        self.engine = engine

    def __call__(self, model, batches: list[list[TokenizedPair]], pad_id: int, packed: bool | None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        import prefsift.logps as engine_module

        ray = _ray()
        if not ray.is_initialized():
            if self.engine.ray_address:
                ray.init(address=self.engine.ray_address, log_to_driver=False)
            else:
                ray.init(num_cpus=self.engine.workers, include_dashboard=False, log_to_driver=False)
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # shards are written in plan order, as by one process
        context.enable_progress_bars = False
        rows = [{"number": k, "pairs": json.dumps([[p.prompt_ids, p.chosen_ids, p.rejected_ids] for p in batch])}
                for k, batch in enumerate(batches)]
        was_training = model.training
        model.eval()
        model_box = [ray.put(model)]
        model.train(was_training)
        threads = self.engine.threads or default_threads()
        data = ray.data.from_items(rows).map_batches(
            _Worker, batch_size=1, batch_format="numpy", num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=self.engine.workers),
            fn_constructor_kwargs={"model_box": model_box, "pad_id": pad_id, "packed": bool(packed),
                                   "cached_ok": engine_module._CACHED_OK.get(model), "threads": threads})
        expected = 0
        for row in data.iter_rows():
            assert int(row["number"]) == expected, "Ray returned batches out of order"
            chosen, rejected = json.loads(row["values"])
            expected += 1
            yield torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64)


def executor_for(engine: EngineConfig):
    """None (this process) for the local backend, else the Ray executor."""
    return RayExecutor(engine) if engine.backend == "ray" else None
