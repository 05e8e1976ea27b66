"""`--backend ray`: the log-prob, reward-model and embedding passes on a local 2-worker Ray Data actor pool give the
single process's shards, caches and scores, value for value. Skipped where Ray is not installed
(`pip install 'prefsift[ray]'`)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import Dataset
from helpers import make_pairs, make_tiny_llama, saved_tiny_llama, tiny_reward_model, write_jsonl
from typer.testing import CliRunner

ray = pytest.importorskip("ray")

from prefsift.cli import app  # noqa: E402
from prefsift.config import EngineConfig  # noqa: E402
from prefsift.data import load_pairs  # noqa: E402
from prefsift.engine.embeddings import CausalEmbedder, EmbeddingCache, embed_items, embed_texts  # noqa: E402
from prefsift.engine.executors import RayExecutor  # noqa: E402
from prefsift.engine.logps import compute_logps  # noqa: E402
from prefsift.engine.reward import pair_rewards  # noqa: E402
from prefsift.engine.shards import LogpsRun  # noqa: E402
from prefsift.models import LoadedModel  # noqa: E402
from prefsift.resources import Resources  # noqa: E402

RAY_ENGINE = EngineConfig(backend="ray", workers=2, threads=1)


@pytest.fixture(scope="module")
def local_ray():
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as error:  # a sandbox without shared memory or local ports: say so rather than fail CI
        pytest.skip(f"Ray cannot start a local cluster here: {str(error).splitlines()[0]}")
    yield
    ray.shutdown()


class CountingPool(RayExecutor):
    """The Ray executor, recording how many batches each pass sends to the pool."""

    def __init__(self, engine: EngineConfig) -> None:
        super().__init__(engine)
        self.sent: list[int] = []

    def map(self, function, replica, items):
        items = list(items)
        self.sent.append(len(items))
        return super().map(function, replica, items)


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


def test_ray_pool_writes_the_single_process_reward_shards(local_ray, bpe_tokenizer, tmp_path, one_thread):
    model = tiny_reward_model(bpe_tokenizer)
    data = Dataset.from_list(make_pairs(14, seed=43))
    kwargs = {"batch_size": 4, "max_length": 64, "flush_rows": 4}
    local_run = LogpsRun(tmp_path / "local", "reward_model", {"model": "tiny-rm"})
    local = pair_rewards(model, bpe_tokenizer, data, run=local_run, **kwargs)
    assert np.isfinite(local).all()
    ray_run = LogpsRun(tmp_path / "ray", "reward_model", {"model": "tiny-rm"})
    pool = CountingPool(RAY_ENGINE)
    np.testing.assert_array_equal(pair_rewards(model, bpe_tokenizer, data, run=ray_run, executor=pool, **kwargs),
                                  local)
    assert shards(ray_run) == shards(local_run)
    assert len(list(ray_run.shard_dir.glob("*.parquet"))) == 4 and pool.sent == [4]
    # a resumed Ray run sends only the batches whose shards are gone
    for path in sorted(ray_run.shard_dir.glob("*.parquet"))[1:3]:
        path.unlink()
    np.testing.assert_array_equal(pair_rewards(model, bpe_tokenizer, data, run=ray_run, executor=pool, **kwargs),
                                  local)
    assert pool.sent == [4, 2] and shards(ray_run) == shards(local_run)


def cache_tables(cache: EmbeddingCache) -> dict:
    return {path.name: pq.read_table(path).to_pydict() for path in sorted(cache.shard_dir.glob("*.parquet"))}


def test_ray_pool_gives_the_single_process_embeddings(local_ray, bpe_tokenizer, tmp_path, one_thread):
    embedder = CausalEmbedder.of(LoadedModel(make_tiny_llama(bpe_tokenizer), bpe_tokenizer, "tiny", "fp"))
    texts = [r["prompt"] + r["chosen"] for r in make_pairs(20, seed=44)]
    local = embed_texts(embedder, texts, cache_dir=tmp_path / "local", batch_size=4, chunk=6)
    pool = CountingPool(RAY_ENGINE)
    distributed = embed_texts(embedder, texts, cache_dir=tmp_path / "ray", batch_size=4, chunk=6, executor=pool)
    assert distributed.dtype == local.dtype == np.float32
    np.testing.assert_array_equal(distributed, local)
    local_cache, ray_cache = (EmbeddingCache(tmp_path / name, embedder.identity) for name in ("local", "ray"))
    assert cache_tables(ray_cache) == cache_tables(local_cache) and len(cache_tables(ray_cache)) == 4
    assert pool.sent == [4]
    for path in sorted(ray_cache.shard_dir.glob("*.parquet"))[:2]:
        path.unlink()
    resumed = embed_texts(embedder, texts, cache_dir=tmp_path / "ray", batch_size=4, chunk=6, executor=pool)
    np.testing.assert_array_equal(resumed, local)
    assert pool.sent == [4, 2] and cache_tables(ray_cache) == cache_tables(local_cache)


def test_the_provider_sends_rewards_and_embeddings_to_the_pool(bpe_tokenizer, tmp_path, one_thread, monkeypatch):
    """`--backend ray` reaches the reward and embedding passes through the provider (`Resources`), as it reaches
    the log-prob passes. The pool's `map` runs the batch functions in this process here (the tests above run them
    on Ray), so this checks the wiring without starting another actor pool."""
    reward = LoadedModel(tiny_reward_model(bpe_tokenizer), bpe_tokenizer, "rm", "rm")
    causal = LoadedModel(make_tiny_llama(bpe_tokenizer), bpe_tokenizer, "tiny", "fp")
    data = load_pairs(Dataset.from_list(make_pairs(10, seed=45)))
    passes = []

    def in_process(self, function, replica, items):
        passes.append(function.__name__)
        return (function(replica, item) for item in items)

    monkeypatch.setattr(RayExecutor, "map", in_process)
    results = {}
    for name, engine in (("local", EngineConfig(max_length=64, threads=1)),
                         ("ray", EngineConfig(max_length=64, backend="ray", workers=2, threads=1))):
        # an embedder object per run: the embedding pass is memoized per embedder object
        sources = {"reward_model": reward, "embedder": CausalEmbedder.of(causal)}
        resources = Resources(data, engine, sources, out_dir=tmp_path / name)
        results[name] = resources.rewards(batch_size=4), embed_items(resources, "completion", batch_size=4)
    assert passes == ["_score_batch", "_embed_chunk", "_embed_chunk"]  # the ray run only; chosen, rejected sides
    np.testing.assert_array_equal(results["ray"][0], results["local"][0])
    assert results["ray"][1].keys() == results["local"][1].keys() == {"chosen", "rejected"}
    for side, vectors in results["local"][1].items():
        np.testing.assert_array_equal(results["ray"][1][side], vectors)


@pytest.mark.e2e
def test_train_and_eval_run_their_log_prob_passes_on_the_pool(local_ray, bpe_tokenizer, tmp_path, monkeypatch):
    """`prefsift train --backend ray` and `prefsift eval --backend ray` send their reference and evaluation passes to
    the Ray pool (they accepted the flag and ignored it once), and give the single process's numbers."""
    import json

    monkeypatch.setenv("PREFSIFT_CACHE", "off")  # a cached pass would be read, not sent: the pool's use is under test

    sent = []
    real_map = RayExecutor.map

    def counting(self, function, replica, items):
        items = list(items)
        sent.append((function.__name__, len(items)))
        return real_map(self, function, replica, items)

    monkeypatch.setattr(RayExecutor, "map", counting)
    sft = saved_tiny_llama(tmp_path / "sft", bpe_tokenizer, seed=3)
    policy = saved_tiny_llama(tmp_path / "policy", bpe_tokenizer, seed=4)
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(12, seed=47))
    runner = CliRunner()
    common = ["--max-length", "64", "--threads", "1"]
    trained = {}
    for name, extra in (("local", []), ("ray", ["--backend", "ray", "--workers", "2"])):
        before = len(sent)
        result = runner.invoke(app, [str(a) for a in ["train", "--data", data, "--model", policy, "--reference", sft,
                                                      "--out", tmp_path / f"train-{name}", "--epochs", "1",
                                                      "--batch-size", "4", "--seed", "0", *common, *extra]])
        assert result.exit_code == 0, result.output
        trained[name] = [s for s in sent[before:] if s[0] == "_logps_batch"]
        result = runner.invoke(app, [str(a) for a in ["eval", "--data", data, "--model", policy, "--reference", sft,
                                                      "--out", tmp_path / f"eval-{name}", *common, *extra]])
        assert result.exit_code == 0, result.output
    assert trained["local"] == [] and trained["ray"] and sum(n for _, n in trained["ray"]) >= 1
    assert [s[0] for s in sent] == ["_logps_batch"] * 3  # train's reference pass; eval's policy and reference passes
    local, distributed = (json.loads((tmp_path / f"eval-{n}" / "eval.json").read_text()) for n in ("local", "ray"))
    assert distributed["pref_accuracy"] == local["pref_accuracy"]
    margins = [(tmp_path / f"eval-{n}" / "eval_pairs.jsonl").read_text() for n in ("local", "ray")]
    assert margins[0] == margins[1] and margins[0]  # each pair's margin, value for value
