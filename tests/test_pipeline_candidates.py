"""`prefsift run` scoring a random candidate pool (RunConfig.score_share): the scored methods select from a seeded
draw of the training pairs, the passes run over it alone, and each row is charged what a run of it alone computes."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from prefsift.config import EngineConfig, RunConfig, TrainConfig
from prefsift.errors import ConfigError
from prefsift.evaluate import EvalConfig

N_TRAIN, N_VALIDATION = 120, 24


@pytest.fixture(scope="module")
def task_and_model():
    from datasets import Dataset

    from prefsift.data import load_pairs
    from prefsift.models import LoadedModel
    from prefsift.pipeline import Splits
    from prefsift.synthetic import sft_model
    from prefsift.synthetic.task import TaskConfig, make_task

    task = make_task(TaskConfig(n_train=N_TRAIN, n_validation=N_VALIDATION, n_test=30, n_eval_prompts=1, n_sft=300))
    model, tokenizer = sft_model(task, seed=0)
    splits = Splits(*(load_pairs(Dataset.from_list(rows)) for rows in (task.train, task.validation, task.test)),
                    eval_prompts=[])
    return splits, LoadedModel(model, tokenizer, "sft", "sft")


def run(task_and_model, out, **overrides) -> dict:
    from prefsift.pipeline import run_pipeline

    splits, base = task_and_model
    values = {"out": str(out), "methods": ["random", "irm", "lossdiff-irm"], "fractions": [0.25],
              "rule_share": False, "start_from": "reference",
              "engine": EngineConfig(beta=0.5, max_length=32, dtype="float32", threads=1),
              "train": TrainConfig(learning_rate=2e-4, epochs=1.0, batch_size=16, gradient_checkpointing=False),
              "eval": EvalConfig(max_new_tokens=2, batch_size=64)}
    return run_pipeline(RunConfig(**{**values, **overrides}), splits=splits, base=base, log=lambda _: None,
                        quiet=True)


def selected(out, seed: int, slug: str) -> list[str]:
    path = out / f"seed-{seed}" / "selected" / slug / "selected.jsonl"
    return [json.loads(x)["pair_id"] for x in path.read_text().splitlines()]


def scored_ids(out, seed: int) -> list[str]:
    return pq.read_table(out / f"seed-{seed}" / "scores" / "scores.parquet").to_pydict()["pair_id"]


def count_passes(monkeypatch) -> list[tuple[str, list[str]]]:
    """Every log-prob pass the engine is asked for from now on: (what it is, the pair_ids it covers)."""
    import prefsift.engine

    asked: list[tuple[str, list[str]]] = []
    logps = prefsift.engine.Engine.logps

    def counted(self, model, tokenizer, pairs, **kwargs):
        asked.append((kwargs.get("desc", ""), list(pairs["pair_id"])))
        return logps(self, model, tokenizer, pairs, **kwargs)

    monkeypatch.setattr(prefsift.engine.Engine, "logps", counted)
    return asked


@pytest.fixture
def passes(monkeypatch):
    """Every log-prob pass the engine is asked for; none from a cache."""
    monkeypatch.setenv("PREFSIFT_CACHE", "off")
    return count_passes(monkeypatch)


def test_a_share_of_one_scores_every_pair(task_and_model, tmp_path, one_thread):
    """score_share 1 (the default) is the pipeline without a pool: every training pair scored and selectable, and
    each row's pair passes the closed form over all n = 120 (a score's reference pass and its θ / θ_val passes over
    every pair, the warm-up on warmup_fraction · n, θ_val on the validation pairs)."""
    splits, _ = task_and_model
    out = tmp_path / "one"
    records = {r["method"]: r for r in run(task_and_model, out, score_share=1.0)["records"]}
    train_ids = list(splits.train.pairs["pair_id"])
    assert scored_ids(out, 0) == train_ids
    n, k, n_warmup = N_TRAIN, round(0.25 * N_TRAIN), round(0.1 * N_TRAIN)
    validation = 3 * N_VALIDATION + N_VALIDATION
    expected = {"full": {"reference": n, "train": 3 * n, "scoring": 0},
                "random": {"reference": k, "train": 3 * k, "scoring": 0},
                "irm": {"reference": n, "train": 3 * k, "warmup": 3 * n_warmup, "scoring": n},
                "lossdiff-irm": {"reference": n, "train": 3 * k, "warmup": 3 * n_warmup, "validation": validation,
                                 "scoring": 2 * n}}
    assert set(records) == set(expected)
    for method, parts in expected.items():
        record = records[method]
        assert record["pair_pass_parts"] == parts, method
        assert (record["n_usable"], record["n_pairs"]) == (n, n if method == "full" else k)
        assert "n_scored" not in record and "score_share" not in record
    from prefsift.select import select_indices

    scores = pq.read_table(out / "seed-0" / "scores" / "scores.parquet").to_pydict()
    # irm's band of k around its middle, over every pair's scores
    rows = select_indices({"pair_id": scores["pair_id"], "irm": np.asarray(scores["irm"])}, "band", column="irm",
                          count=k)
    assert set(selected(out, 0, "irm-0.25")) == {scores["pair_id"][i] for i in rows}


def test_scored_methods_select_from_a_seeded_pool_scored_alone(task_and_model, tmp_path, passes, monkeypatch,
                                                               one_thread):
    import prefsift.pipeline.run
    from prefsift.pipeline.run import candidate_pool

    splits, _ = task_and_model
    train_ids = list(splits.train.pairs["pair_id"])
    warmups: list[list[str]] = []  # the pairs each warm-up trained on
    trained_copy = prefsift.pipeline.run.trained_copy

    def recorded(parent, tag, pairs, *args, **kwargs):
        if tag == "warmup":
            warmups.append(list(pairs["pair_id"]))
        return trained_copy(parent, tag, pairs, *args, **kwargs)

    monkeypatch.setattr(prefsift.pipeline.run, "trained_copy", recorded)
    out = tmp_path / "pool"
    results = run(task_and_model, out, score_share=0.5, seeds=2)
    pools = [scored_ids(out, seed) for seed in (0, 1)]
    assert [len(p) for p in pools] == [60, 60] and set(pools[0]) != set(pools[1])  # another seed, another pool
    assert pools[0] == [train_ids[i] for i in candidate_pool(train_ids, 0.5, 0)]
    for seed, pool in enumerate(pools):
        for slug in ("irm-0.25", "lossdiff-irm-0.25"):  # the same pool for every scored method
            rows = selected(out, seed, slug)
            assert len(rows) == 30 and set(rows) <= set(pool)  # 0.25 of all 120 training pairs, from the pool
        assert len(selected(out, seed, "random-0.25")) == 30  # random draws from every pair
        assert set(warmups[seed]) <= set(pool) and len(warmups[seed]) == 12  # warmup_fraction 0.1 of 120
        # θ's and θ_val's passes over the pool's pairs, exactly; the reference pass over every pair (full, random)
        policy = [ids for desc, ids in passes if desc in ("policy log-probs", "validation log-probs")]
        assert policy[2 * seed: 2 * seed + 2] == [pool, pool]
    assert [ids for desc, ids in passes if desc == "reference log-probs"] == [train_ids]  # once, for every seed
    records = {(r["seed"], r["method"]): r for r in results["records"]}
    assert records[(0, "irm")]["n_scored"] == 60 and records[(0, "irm")]["score_share"] == 0.5
    assert "n_scored" not in records[(0, "random")] and "n_scored" not in records[(0, "full")]
    # the reference pass covered every pair: a pooled row is charged the pool's share of it, random its subset's
    full = records[(0, "full")]["compute_parts"]["reference"]
    assert records[(0, "irm")]["compute_parts"]["reference"] == pytest.approx(full * 60 / 120, abs=2e-3)
    assert records[(0, "random")]["compute_parts"]["reference"] == pytest.approx(full * 30 / 120, abs=2e-3)
    assert records[(0, "irm")]["pair_pass_parts"]["reference"] == 60
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["score_share"] == 0.5 and manifest["n_scored"] == 60

    # the same seed draws the same pool; with scored methods alone, the reference pass covers the pool alone
    from prefsift.resources import Resources

    views: list[Resources] = []  # the pool's providers: the one whose reference pass covers the pool alone
    over = Resources.over

    def recorded_over(self, pairs, rows=None):
        views.append(over(self, pairs, rows))
        return views[-1]

    monkeypatch.setattr(Resources, "over", recorded_over)
    again, before = tmp_path / "again", len(passes)
    (record,) = run(task_and_model, again, score_share=0.5, methods=["irm"], full=False)["records"]
    assert scored_ids(again, 0) == pools[0] and set(selected(again, 0, "irm-0.25")) <= set(pools[0])
    assert [ids for desc, ids in passes[before:] if desc in ("reference log-probs", "policy log-probs")] == [
        pools[0], pools[0]]
    assert record["n_pairs"] == 30 and record["n_usable"] == 120  # still 0.25 of every training pair
    assert record["pair_pass_parts"]["reference"] == 60
    # the row is charged the seconds the pool's own pass measured: all of them, neither prorated again nor zero
    (view,) = views
    pool_seconds = view.charged["reference"][0]
    assert pool_seconds > 0 and record["compute_parts"]["reference"] == round(pool_seconds, 3)


@pytest.mark.parametrize("full", [False, True])
def test_a_pooled_row_is_charged_the_pool_alone(task_and_model, tmp_path, one_thread, full):
    """LossDiff-IRM at score_share 0.3: reference 0.3·n, θ's and θ_val's passes over the pool, the warm-up, the
    validation model and its training, in pair passes; whether or not a full row made the reference pass cover every
    pair (then the pooled row is charged the pool's share of it). A validation-only baseline beside it needs no
    training pair outside the pool."""
    from prefsift.pipeline.run import artifact_name

    out = tmp_path / "run"
    results = run(task_and_model, out, score_share=0.3, methods=["lossdiff-irm"], full=full, start_from="warmup",
                  rule_share=True, baselines="validation-only")
    records = {r["budget"]: r for r in results["records"]}
    n_pool = round(0.3 * N_TRAIN)
    n_warmup = round(0.1 * N_TRAIN)  # warmup_fraction, 1 warm-up epoch
    pool = set(scored_ids(out, 0))
    assert len(pool) == n_pool
    scores = pq.read_table(out / "seed-0" / "scores" / "scores.parquet").to_pydict()
    kept = sum(v == 1.0 for v in scores["lossdiff_irm"])  # the band rule's share is a share of the pool
    assert records["lossdiff-irm rule"]["n_pairs"] == kept and 0 < kept < n_pool
    assert records["lossdiff-irm rule"]["fraction"] == round(kept / N_TRAIN, 3)
    for budget, n_subset in (("0.25", round(0.25 * N_TRAIN)), ("lossdiff-irm rule", kept)):
        record = records[budget]
        assert set(selected(out, 0, artifact_name("lossdiff-irm", budget))) <= pool
        expected = {"reference": n_pool, "train": 3 * n_subset, "warmup": 3 * n_warmup,
                    "validation": 3 * N_VALIDATION + N_VALIDATION, "scoring": 2 * n_pool}
        assert record["pair_pass_parts"] == expected and record["pair_passes"] == sum(expected.values())
        assert record["n_scored"] == n_pool and record["n_usable"] == N_TRAIN
    # validation-only continues from the warm-up: the reference pass it needs is the pool's when no row reads the
    # other pairs, the whole split's (as before) when one does
    assert records["validation"]["pair_pass_parts"]["reference"] == (N_TRAIN if full else n_pool) + N_VALIDATION
    assert "n_scored" not in records["validation"]
    if full:
        whole = records["full"]
        assert whole["pair_pass_parts"]["reference"] == N_TRAIN
        assert records["0.25"]["compute_parts"]["reference"] == pytest.approx(
            whole["compute_parts"]["reference"] * n_pool / N_TRAIN, abs=2e-3)


@pytest.mark.parametrize(("values", "says"), [
    ({"score_share": 0}, "score_share must be > 0"),
    ({"score_share": 1.5}, "score_share must be <= 1"),
])
def test_a_share_out_of_range_is_refused_in_one_line(tmp_path, values, says):
    from prefsift.pipeline import load_run_config

    with pytest.raises(ConfigError) as error:
        load_run_config({"data": "d", "model": "m", **values}, "run.yaml")
    assert says in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=says):
        RunConfig(data="d", model="m", **values)


@pytest.mark.parametrize(("values", "says"), [
    ({"score_share": 0.3, "fractions": [0.1, 0.5]}, "fractions: 0.5 of the training pairs cannot be selected from a "
                                                    "candidate pool of 0.3"),
    ({"score_share": 0.3, "fractions": [0.5], "methods": ["random", "density"], "start_from": "reference"},
     "fractions: 0.5 of the training pairs cannot be selected"),  # density selects from the pool
    ({"score_share": 0.05, "fractions": [0.05]}, "warmup_fraction 0.1 exceeds score_share 0.05"),  # irm needs θ
    ({"score_share": 0.05, "fractions": [0.05], "methods": ["density"]},  # its rows start from the warm-up
     "warmup_fraction 0.1 exceeds score_share 0.05"),
    ({"score_share": 0.05, "fractions": [0.05], "methods": ["density"], "start_from": "both"},
     "warmup_fraction 0.1 exceeds score_share 0.05"),
])
def test_a_pool_its_methods_cannot_use_is_refused_in_one_line(tmp_path, values, says):
    """A pooled method's fraction beyond the pool, or a warm-up trained on more pairs than it holds: refused where
    the methods are parsed (the YAML's load, and run_pipeline before anything loads), in one line."""
    from prefsift.pipeline import load_run_config, run_pipeline

    with pytest.raises(ConfigError) as error:
        load_run_config({"data": "d", "model": "m", **values}, "run.yaml")
    assert says in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=says.split(":")[0]):
        run_pipeline(RunConfig(data="d", model="m", out=str(tmp_path / "run"), **values), log=lambda _: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("values", [
    # no warm-up is trained (no row starts from it, density needs no θ): the pool need not hold its pairs
    {"score_share": 0.05, "fractions": [0.05], "methods": ["density"], "start_from": "reference"},
    # random draws from every pair, whatever the pool: its fraction may exceed score_share
    {"score_share": 0.3, "fractions": [0.5], "methods": ["random"]},
    {"score_share": 0.3, "fractions": [0.5], "methods": ["random"], "start_from": "reference"},
])
def test_a_pool_its_methods_can_use_is_accepted(values):
    from prefsift.pipeline import load_run_config
    from prefsift.pipeline.run import check_pool_config
    from prefsift.scorers import parse_methods

    config = load_run_config({"data": "d", "model": "m", **values}, "run.yaml")
    assert config.score_share == values["score_share"]
    check_pool_config(RunConfig(data="d", model="m", **values), parse_methods(values["methods"]))


@pytest.mark.parametrize("full", [True, False])
def test_a_budget_beyond_the_pools_usable_pairs_is_refused(task_and_model, tmp_path, monkeypatch, one_thread, full):
    """max_length 11 drops the 27 training pairs whose prompt fills it (93 usable); seed 1's pool of 36 holds 27
    usable pairs, fewer than 0.3 of the 93. Whether or not a full row makes the reference pass cover every pair, a
    budget is a share of the 93 (the tokenizer counts them when no pass covers every pair), and that budget is
    refused in one line: with seeds 0 and 1, before seed 0 trains anything. A budget the pool fits is trained."""
    import prefsift.pipeline.run

    trainings: list[str] = []
    trained_copy = prefsift.pipeline.run.trained_copy

    def recorded(parent, tag, *args, **kwargs):
        trainings.append(tag)
        return trained_copy(parent, tag, *args, **kwargs)

    monkeypatch.setattr(prefsift.pipeline.run, "trained_copy", recorded)
    engine = EngineConfig(beta=0.5, max_length=11, dtype="float32", threads=1)
    with pytest.raises(ConfigError) as error:
        run(task_and_model, tmp_path / "refused", score_share=0.3, fractions=[0.2, 0.3], methods=["irm"], seeds=2,
            engine=engine, full=full)
    assert str(error.value) == ("the budget 0.3 selects 28 pairs, more than the 27 usable pairs of seed 1's candidate "
                                "pool (36 of 120 training pairs, score_share 0.3): raise score_share or lower the "
                                "fraction")
    assert trainings == []  # refused before any warm-up, of either seed
    records = {r["method"]: r for r in run(task_and_model, tmp_path / "fits", score_share=0.3, fractions=[0.25],
                                           methods=["irm"], seed=1, engine=engine, full=full)["records"]}
    assert (records["irm"]["n_usable"], records["irm"]["n_pairs"], records["irm"]["n_scored"]) == (93, 23, 36)
    if full:
        assert records["full"]["n_pairs"] == 93


@pytest.mark.parametrize("full", [True, False])
def test_isa_with_kto_selects_a_share_of_every_usable_pair_from_the_pool(task_and_model, tmp_path, one_thread,
                                                                         full):
    """ISA trained with KTO keeps completions of the pool: at a budget of 0.25, twice 0.25 of all 120 training pairs
    (as many as random-kto draws from every pair), not twice 0.25 of the pool's 36, whether or not a row reads every
    pair."""
    out = tmp_path / "run"
    results = run(task_and_model, out, score_share=0.3, methods=[{"name": "isa", "train_with": "kto"}], full=full,
                  baselines="random-kto" if full else "")
    records = {r["method"]: r for r in results["records"]}
    k = round(0.25 * N_TRAIN)
    isa = records["isa"]
    assert (isa["algo"], isa["n_completions"], isa["n_pairs"]) == ("kto", 2 * k, k)
    assert (isa["n_usable"], isa["n_scored"]) == (N_TRAIN, round(0.3 * N_TRAIN))
    pool = set(scored_ids(out, 0))
    assert len(pool) == round(0.3 * N_TRAIN)
    kept = {pid.rsplit(":", 1)[0] for pid in selected(out, 0, "isa-0.25")}
    assert kept <= pool
    if full:
        assert records["random-kto"]["n_completions"] == isa["n_completions"]


def test_each_pool_has_its_own_reference_pass(task_and_model, tmp_path, monkeypatch, one_thread):
    """Two seeds' pools: two reference passes, each over its pool's pairs alone, kept under their own resumable
    shards (keyed by the pool's data hash, as the log-prob cache keys a pass by its pairs)."""
    asked = count_passes(monkeypatch)
    out = tmp_path / "run"
    run(task_and_model, out, score_share=0.3, methods=["irm"], full=False, seeds=2)
    pools = [scored_ids(out, seed) for seed in (0, 1)]
    assert pools[0] != pools[1]
    assert [ids for desc, ids in asked if desc == "reference log-probs"] == pools
    assert len(list((out / "shards").glob("reference-*"))) == 2
