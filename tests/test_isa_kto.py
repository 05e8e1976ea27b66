"""ISA as its paper ran it inside `prefsift run`: completions selected by their entropy change and trained with KTO,
under both sort orders in one run (a method label), and KTO's loss weights balanced for what a selection keeps."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import Dataset
from helpers import make_pairs, saved_tiny_llama, write_jsonl

from prefsift.config import EngineConfig, EvalConfig, RunConfig, TrainConfig
from prefsift.models import LoadedModel
from prefsift.pipeline import run_pipeline
from prefsift.train import make_trainer


@pytest.mark.e2e
def test_isa_selects_completions_and_trains_kto_under_both_orders(tmp_path, bpe_tokenizer, one_thread):
    model_dir = saved_tiny_llama(tmp_path / "sft", bpe_tokenizer)
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(60, seed=8))
    config = RunConfig(
        data=str(data), model=str(model_dir), out=str(tmp_path / "run"), fractions=[0.25], rule_share=False,
        full=False, start_from="reference", validation_fraction=0.1, test_fraction=0.3, min_test_pairs=0,
        methods=["random", {"name": "isa", "train_with": "kto", "order": "atypical"},
                 {"name": "isa", "label": "isa-typical", "train_with": "kto", "order": "typical"}],
        engine=EngineConfig(max_length=64), eval=EvalConfig(eval_prompts=1, max_new_tokens=2),
        train=TrainConfig(learning_rate=1e-3, batch_size=8, gradient_checkpointing=False))
    records = {r["method"]: r for r in run_pipeline(config, log=lambda _: None)["records"]}
    n_train = records["random"]["n_pairs"] * 4  # 25% of the training pairs
    scores = pq.read_table(tmp_path / "run" / "seed-0" / "scores" / "scores.parquet").to_pydict()
    assert len(scores["pair_id"]) == n_train
    # one Δ whatever the order: the label keeps the second run's columns apart, with the same values
    np.testing.assert_array_equal(scores["isa_chosen"], scores["isa_typical_chosen"])
    stacked = np.concatenate([scores["isa_chosen"], scores["isa_rejected"]])
    ids = [f"{p}:{side}" for side in ("chosen", "rejected") for p in scores["pair_id"]]
    picked = {}
    for method, descending in (("isa", True), ("isa-typical", False)):
        record = records[method]
        assert record["algo"] == "kto" and record["n_completions"] == 2 * record["n_pairs"] == n_train // 2
        rows = [json.loads(line) for line in
                (tmp_path / "run" / "seed-0" / "selected" / f"{method}-0.25" / "selected.jsonl").read_text().split(
                    "\n") if line]
        # the subset is the k completions with the largest (atypical) or smallest (typical) Δ, by numpy here
        order = np.argsort(-stacked if descending else stacked, kind="stable")[: record["n_completions"]]
        assert {r["pair_id"] for r in rows} == {ids[i] for i in order}
        for r in rows:  # a chosen completion is desirable, a rejected one is not, and each is the pair's own text
            pair = next(p for p in make_pairs(60, seed=8) if p["prompt"] == r["prompt"] and r["completion"] in (
                p["chosen"], p["rejected"]))
            assert r["label"] == (r["pair_id"].endswith(":chosen")) == (r["completion"] == pair["chosen"])
        picked[method] = {r["pair_id"] for r in rows}
        assert 0.0 <= record["pref_accuracy"] <= 1.0
    assert not picked["isa"] & picked["isa-typical"]  # the two readings keep opposite ends


def test_kto_balances_desirable_and_undesirable_losses(tmp_path, bpe_tokenizer, tiny_llama):
    rows = make_pairs(8, seed=2)
    unpaired = Dataset.from_list([{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in rows[:2]]
                                 + [{"prompt": r["prompt"], "completion": r["rejected"], "label": False}
                                    for r in rows[2:]])
    loaded = LoadedModel(tiny_llama, bpe_tokenizer, "tiny", "")
    trainer, _ = make_trainer(loaded, unpaired, TrainConfig(algo="kto", batch_size=4, gradient_checkpointing=False),
                              EngineConfig(max_length=64), str(tmp_path))
    # the KTO paper's rule, λ_D·n_D / (λ_U·n_U) ≥ 1, at its lower end: 2 desirable against 6 undesirable
    assert trainer.args.desirable_weight == 3.0 and trainer.args.undesirable_weight == 1.0


@pytest.mark.e2e
def test_isa_with_kto_trains_on_the_embedded_task(tmp_path):
    """The demo's task and SFT model, ISA the paper's way: the KTO-trained policy answers differently from the SFT
    model (training moved it), and its subset is the completions ISA ranks atypical."""
    from prefsift.demo import DemoConfig, run_demo
    from prefsift.synthetic.task import TaskConfig

    task = TaskConfig(n_train=200, n_validation=60, n_test=100, n_eval_prompts=100, n_sft=800)
    config = DemoConfig(task=task, seeds=1, start_from="reference", fractions=[0.25],
                        methods=["random", {"name": "isa", "train_with": "kto", "order": "atypical"}])
    records = {r["method"]: r for r in run_demo(tmp_path, seed=1, config=config, log=lambda _: None)["records"]
               if r["budget"] == "0.25"}
    kto = records["isa"]
    assert kto["algo"] == "kto" and kto["n_completions"] == 100 and kto["n_pairs"] == 50
    assert kto["ties"] < 100  # the policy's answers are no longer the SFT model's on every prompt
    assert 0.0 <= kto["pref_accuracy"] <= 1.0 and "algo" not in records["random"]
