"""`--backend ray`: the log-prob pass on a local 2-worker Ray Data actor pool gives the single process's shards and
scores, value for value. Skipped where Ray is not installed (`pip install 'prefsift[ray]'`)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import make_pairs, make_tiny_llama, saved_tiny_llama, write_jsonl
from datasets import Dataset
from typer.testing import CliRunner

ray = pytest.importorskip("ray")

from prefsift.cli import app  # noqa: E402
from prefsift.config import EngineConfig  # noqa: E402
from prefsift.distributed import RayExecutor  # noqa: E402
from prefsift.logps import LogpsRun, compute_logps  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as error:  # a sandbox without shared memory or local ports: say so rather than fail CI
        pytest.skip(f"Ray cannot start a local cluster here: {str(error).splitlines()[0]}")
    yield
    ray.shutdown()


def shards(run: LogpsRun) -> dict:
    tables = [pq.read_table(p).to_pydict() for p in sorted(run.shard_dir.glob("*.parquet"))]
    return {key: sum((t[key] for t in tables), []) for key in ("batch", "row", "chosen_logps", "rejected_logps")}


def test_ray_pool_writes_the_single_process_shards(local_ray, bpe_tokenizer, tmp_path, one_thread):
    model = make_tiny_llama(bpe_tokenizer)
    data = Dataset.from_list(make_pairs(30, seed=41))
    kwargs = {"max_length": 64, "batch_tokens": 200, "flush_rows": 8}
    local_run = LogpsRun(tmp_path / "local", "policy", {"model": "tiny"})
    local = compute_logps(model, bpe_tokenizer, data, run=local_run, **kwargs)
    ray_run = LogpsRun(tmp_path / "ray", "policy", {"model": "tiny"})
    pool = RayExecutor(EngineConfig(backend="ray", workers=2, threads=1))
    distributed = compute_logps(model, bpe_tokenizer, data, run=ray_run, executor=pool, **kwargs)
    np.testing.assert_array_equal(distributed, local)  # identical, not close: same batches, same paths
    assert shards(ray_run) == shards(local_run)
    assert len(list(ray_run.shard_dir.glob("*.parquet"))) >= 3
    # a resumed Ray run computes only what is missing, and still agrees
    for path in sorted(ray_run.shard_dir.glob("*.parquet"))[2:]:
        path.unlink()
    np.testing.assert_array_equal(compute_logps(model, bpe_tokenizer, data, run=ray_run, executor=pool, **kwargs),
                                  local)


def test_score_with_backend_ray_matches_the_single_process(local_ray, bpe_tokenizer, tmp_path):
    model_dir = saved_tiny_llama(tmp_path / "sft", bpe_tokenizer)
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(24, seed=42))
    common = ["score", "--data", data, "--method", "irm", "--model", model_dir, "--threads", "1", "--batch-tokens",
              "256", "--device", "cpu"]
    runner = CliRunner()
    for name, extra in (("local", []), ("ray", ["--backend", "ray", "--workers", "2"])):
        result = runner.invoke(app, [str(a) for a in common + ["--out", tmp_path / name] + extra])
        assert result.exit_code == 0, result.output
    local = pq.read_table(tmp_path / "local" / "scores.parquet").to_pydict()
    distributed = pq.read_table(tmp_path / "ray" / "scores.parquet").to_pydict()
    assert distributed == local
