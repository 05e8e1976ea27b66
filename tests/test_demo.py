"""`prefsift demo` end to end on a shrunken task: the records DESIGN.md promises, and same seed → same numbers."""

from __future__ import annotations

import json

from prefsift.bench.task import TaskConfig
from prefsift.demo import DemoConfig, run_demo

TIMING = ("score_seconds", "train_seconds", "warmup_seconds")


def small() -> DemoConfig:
    return DemoConfig(task=TaskConfig(n_train=1000, n_validation=60, n_test=100, n_eval_prompts=100, n_sft=800))


def test_demo_end_to_end_and_reproducible(tmp_path):
    records = run_demo(tmp_path / "a", seed=3, config=small(), log=lambda _: None)
    methods = {"full", "random", "irm", "lossdiff", "lossdiff-irm"}
    assert {r["method"] for r in records} == methods
    fractions = {r["fraction"] for r in records if r["method"] != "full"}
    assert 0.1 in fractions and len(fractions) == 2  # 10% and the LossDiff-IRM rule's own share
    at_10 = {r["method"]: r for r in records if r["fraction"] == 0.1}
    for method in ("irm", "lossdiff", "lossdiff-irm"):  # the model sees the flipped labels as surprising
        assert at_10[method]["flipped_kept"] < at_10["random"]["flipped_kept"], method
    for record in records:
        assert record["win_rate"] == (record["wins"] + 0.5 * record["ties"]) / 100
    full = next(r for r in records if r["method"] == "full")
    assert full["n_pairs"] == 1000 and full["flipped_kept"] == 1.0
    out = tmp_path / "a"
    assert json.loads((out / "results.json").read_text()) == records
    assert "flipped_kept" in (out / "results.md").read_text()
    assert (out / "win_rate.png").is_file() and (out / "sft-model" / "model.safetensors").is_file()

    again = run_demo(tmp_path / "b", seed=3, config=small(), log=lambda _: None)
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in records]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING} for r in again]
