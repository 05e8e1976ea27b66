"""Where a pass's forward batches run: in this process (`in_process`), or beyond it on a Ray Data actor pool, one
model replica a worker (`RayExecutor`).

Three passes use it: log-probs (`compute_logps`), reward-model scores (`prefsift.engine.reward.pair_rewards`) and
embeddings (`prefsift.engine.embeddings.embed_texts`). The driver does everything but the forward passes, exactly as a
single process does: it prepares the inputs, makes the batch plan, skips the batches whose shards are on disk, and
writes the shards and the scores. Only the remaining batches travel, as rows of a `ray.data` dataset, through
`map_batches` to a pool of actors; each actor holds one copy of the model (sent once through Ray's object store)
and runs the pass's module-level batch function on it. Rows come back in plan order, so the shards and the scores
file are those of a single-process run (bit for bit at the same torch thread count: a matmul's summation order can
change with the number of threads).

Ray starts locally (`ray.init(num_cpus=workers)`) when no address is given; `ray_address` joins a running cluster
(`ray start --head` on one machine, `ray start --address=HEAD:6379` on the others; then `--ray-address HEAD:6379`
or `auto` on the head).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from prefsift.config import EngineConfig
from prefsift.engine import paths
from prefsift.engine.tokenize import TokenizedPair
from prefsift.errors import ConfigError


def default_threads() -> int:
    """torch CPU threads when none are asked for: the cores other processes leave idle (by the 1-minute load
    average), at least one. A thread waiting for a busy core stalls every op of the others (bench/threads.py: 2
    threads ran 1.1-1.8x slower than 1 on a busy 2-core box with OMP_WAIT_POLICY=PASSIVE, 7-21x without)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        idle = cores - os.getloadavg()[0]
    except OSError:  # no load average on this platform
        return cores
    return max(1, min(cores, round(idle)))


def in_process(model, batches: Iterable[list[TokenizedPair]], pad_id: int, packed: bool | None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The default executor of `compute_logps`: each batch's forward pass here, one after another."""
    for pairs in batches:
        yield paths.forward_batch(model, pairs, pad_id, packed)



def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray needs Ray: pip install 'prefsift[ray]'") from None
    return ray


RAY_CONNECT_TIMEOUT = 5.0  # seconds to wait for a cluster's head to answer before saying it does not


def check_ray_address(address: str, timeout: float = RAY_CONNECT_TIMEOUT) -> None:
    """One line, at once, when --ray-address names a host:port (or ray://host:port) that does not answer: Ray's
    own join retries for a minute or more, then raises from deep inside. `auto` and `local` are Ray's to resolve."""
    import socket
    import threading

    text = address.strip()
    if text in ("auto", "local"):
        return
    hostport = text.split("://", 1)[1] if "://" in text else text
    host, sep, port_text = hostport.rstrip("/").rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"--ray-address {address}: expected host:port (e.g. head:6379), ray://host:10001 or auto")
    host = host.strip("[]")
    answer: list[str] = []

    def connect() -> None:
        try:
            socket.create_connection((host, int(port_text)), timeout=timeout).close()
            answer.append("")
        except OSError as error:
            answer.append(error.strerror or str(error) or type(error).__name__)

    # in a thread: a name lookup that hangs is not covered by the socket's timeout
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    if answer and not answer[0]:
        return
    reason = answer[0] if answer else f"no answer in {timeout:.0f} s"
    raise ConfigError(f"--ray-address {address}: no Ray cluster answers there ({reason}); start one with `ray start "
                      f"--head`, or leave --ray-address out to start Ray on this machine")


class _Worker:
    """One Ray actor: a replica (a model, with whatever else its batch function needs) and that function."""

    def __init__(self, replica_box: list, function: Callable[[Any, Any], Any], threads: int) -> None:
        torch.set_num_threads(threads)
        self.replica = _ray().get(replica_box[0])  # boxed: else Ray resolves the reference for us, once a call
        self.function = function

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # pickled both ways: arrays and float64 tensors round-trip exactly, and Ray Data never converts them
        values = [pickle.dumps(self.function(self.replica, pickle.loads(item))) for item in batch["item"]]
        return {"number": batch["number"], "value": np.asarray(values, dtype=object)}


def _logps_batch(replica: tuple, pairs: list[TokenizedPair]) -> tuple[torch.Tensor, torch.Tensor]:
    model, pad_id, packed, cached_ok = replica
    if cached_ok is not None:  # the driver's verdict, so every batch takes the path a single process gives it
        paths.VERDICTS.cached[model] = cached_ok
    return paths.forward_batch(model, pairs, pad_id, packed)


class RayExecutor:
    """The forward passes of the batches still to compute, on a Ray Data actor pool of `engine.workers` model
    replicas, yielded in order. `map` is the one mechanism; calling the executor is `compute_logps`'s interface
    (`compute_logps(..., executor=RayExecutor(engine))`)."""

    def __init__(self, engine: EngineConfig) -> None:
        self.engine = engine
        if engine.ray_address:
            check_ray_address(engine.ray_address)

    def map(self, function: Callable[[Any, Any], Any], replica: Any, items: Iterable) -> Iterator:
        """`function(replica, item)` of every item, in the order of `items`. `replica` (a model, a model and its
        tokenizer, an embedder) goes once to each actor; `function` must be a module-level function, which Ray
        sends by name."""
        ray = _ray()
        if not ray.is_initialized():
            try:
                if self.engine.ray_address:
                    ray.init(address=self.engine.ray_address, log_to_driver=False)
                else:
                    ray.init(num_cpus=self.engine.workers, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, TimeoutError, RuntimeError, ValueError) as error:  # no cluster, a bad address
                where = f"the Ray cluster at {self.engine.ray_address}" if self.engine.ray_address else "Ray here"
                reason = (str(error) or type(error).__name__).splitlines()[0]
                raise ConfigError(f"cannot start or join {where}: {reason}") from None
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # shards are written in plan order, as by one process
        context.enable_progress_bars = False
        rows = [{"number": k, "item": pickle.dumps(item)} for k, item in enumerate(items)]
        data = ray.data.from_items(rows).map_batches(
            _Worker, batch_size=1, batch_format="numpy", num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=min(self.engine.workers, len(rows))),  # no idle replicas
            fn_constructor_kwargs={"replica_box": [ray.put(replica)], "function": function,
                                   "threads": self.engine.threads or default_threads()})
        for expected, row in enumerate(data.iter_rows()):
            assert int(row["number"]) == expected, "Ray returned batches out of order"
            yield pickle.loads(row["value"])

    def __call__(self, model, batches: Iterable[list[TokenizedPair]], pad_id: int, packed: bool | None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # read when the first batch is wanted, after compute_logps has checked the model's path on this process
        yield from self.map(_logps_batch, (model, pad_id, bool(packed), paths.VERDICTS.cached.get(model)), batches)


def executor_for(engine: EngineConfig) -> RayExecutor | None:
    """None (this process) for the local backend, else the Ray executor."""
    return RayExecutor(engine) if engine.backend == "ray" else None
