"""`prefsift compare`: every rule at the same budgets, through the run's statistics, with the cost of each."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import make_pairs, saved_tiny_llama, write_jsonl
from typer.testing import CliRunner

from prefsift.cli import app
from prefsift.compare import _legend, applicable_methods, resolve_methods
from prefsift.scorers import SCORERS
from prefsift.stats import claims, summarize


def test_all_means_what_the_data_and_models_allow():
    bare = applicable_methods(None, ["prompt", "chosen", "rejected"])
    rated = applicable_methods(None, ["prompt", "chosen", "rejected", "score_chosen", "score_rejected"])
    assert "oracle" not in bare and "oracle" in SCORERS  # a ceiling selects by hidden labels: never a method here
    assert "margin" not in bare and "margin" in rated  # the dataset's ratings make the reward margin possible
    assert {"random", "irm", "lossdiff", "lossdiff-irm"} <= set(bare)
    assert set(rated) - set(bare) == set(applicable_methods("some/reward-model", ["prompt"])) - set(bare)
    assert resolve_methods(["irm"], None, [])[0] == "random"  # the baseline every difference is taken against


@pytest.mark.e2e
def test_compare_cli(tmp_path, bpe_tokenizer):
    model_dir = saved_tiny_llama(tmp_path / "sft", bpe_tokenizer)
    rng = np.random.default_rng(0)
    rows = [{**r, "score_chosen": float(rng.integers(1, 10)), "score_rejected": float(rng.integers(1, 10))}
            for r in make_pairs(60, seed=5)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, [
        "compare", "--data", str(data), "--model", str(model_dir), "--out", str(out), "--methods", "irm,margin",
        "--fractions", "0.25", "--seeds", "2", "--start-from", "reference", "--no-rule-share", "--no-full",
        "--test-fraction", "0.3", "--max-length", "64", "--learning-rate", "1e-3", "--batch-size", "8",
        "--no-gradient-checkpointing", "--threads", "1", "--min-test-pairs", "0"])  # 18 test pairs: allowed here
    assert result.exit_code == 0, result.output
    table = (out / "compare.md").read_text()
    for method in ("random", "irm", "margin"):
        assert f"| reference | {method} | 0.25 |" in table
    assert "seconds" in table.splitlines()[2]
    # the table says which correction its marks survive, over how many tests, and names what survives (or not)
    assert "Holm's correction (family-wise error ≤ 5%)" in table and "▲ better, ▼ worse" in table
    assert "*" not in table.split("Δ random:")[0].replace("**", "") and "Significant against random" not in table
    assert "Holm's correction (family-wise error ≤ 5%) over the table's 2 tests" in table  # irm, margin vs random
    assert (out / "quality_vs_compute.png").stat().st_size > 0
    rows = {r["method"]: r for r in json.loads((out / "compare.json").read_text())}
    records = json.loads((out / "results.json").read_text())["records"]
    assert len(records) == 3 * 2  # three methods, two seeds
    for method in ("irm", "margin"):
        assert rows[method]["seconds"] > 0
        # the paired difference from random: same seeds, same test items, computed here from the raw outcomes
        mine = np.concatenate([r["pref_outcomes"] for r in sorted(records, key=lambda r: r["seed"])
                               if r["method"] == method])
        base = np.concatenate([r["pref_outcomes"] for r in sorted(records, key=lambda r: r["seed"])
                               if r["method"] == "random"])
        assert abs(rows[method]["pref_accuracy_vs_random"] - np.mean(mine - base)) < 1e-4  # rounded to 4 places
        assert rows[method]["pref_accuracy_vs_random_low"] <= rows[method]["pref_accuracy_vs_random"] \
            <= rows[method]["pref_accuracy_vs_random_high"]
        assert rows[method]["pref_accuracy_vs_random_verdict"] in (None, "better", "worse")
        assert 0 <= rows[method]["pref_accuracy_vs_random_p"] <= rows[method]["pref_accuracy_vs_random_p_adjusted"]


def test_the_legend_says_when_nothing_survives():
    rng = np.random.default_rng(0)
    records = [{"seed": s, "start_from": "reference", "method": m, "budget": b, "fraction": 0.1, "n_pairs": 10,
                "compute": 1.0, "win_outcomes": rng.integers(0, 2, 300).astype(float).tolist()} for s in range(3)
               for m, b in (("full", "full"), ("random", "0.1"), ("irm", "0.1"))]  # three rows, all alike
    rows = summarize(records)
    text = _legend(rows)
    assert "No difference survives Holm's correction (family-wise error ≤ 5%) over the table's 5 tests" in text
    assert "Benjamini-Hochberg (false discovery rate 10%)" in _legend(rows, claims(rows, correction="bh", alpha=0.1))


def test_compare_refuses_bad_methods(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(10)))
    result = CliRunner().invoke(app, ["compare", "--data", str(data), "--model", "x", "--methods", "nope",
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "unknown method 'nope'" in result.output and "Traceback" not in result.output


@pytest.mark.e2e
def test_compare_counts_what_max_length_leaves_and_what_each_budget_trained(tmp_path, bpe_tokenizer, one_thread):
    """Issue 22: the 20-pair minimum holds for the test pairs left after max_length drops some, and compare says
    what each budget trained out of the usable pairs, naming a training that took a single step."""
    import random

    from helpers import random_text

    from prefsift.data import load_pairs
    from prefsift.pipeline import split_pairs

    rng = random.Random(7)
    rows = []
    for i in range(100):  # every third-ish prompt far past max_length 64: TRL drops those pairs
        words = 200 if i % 10 < 3 else rng.randint(2, 6)
        rows.append({"prompt": "\n\nHuman: " + random_text(rng, words) + "\n\nAssistant:",
                     "chosen": " " + random_text(rng, 3), "rejected": " " + random_text(rng, 3)})
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    model_dir = saved_tiny_llama(tmp_path / "sft", bpe_tokenizer)
    train_rows, _, test_rows = split_pairs(load_pairs(str(data)), 0.05, 0.25, seed=0)
    long_rows = {i for i in range(100) if i % 10 < 3}
    test_dropped = len(set(test_rows.tolist()) & long_rows)
    usable = len(train_rows) - len(set(train_rows.tolist()) & long_rows)
    assert len(test_rows) == 25 and len(test_rows) - test_dropped < 20 <= len(test_rows)  # the case under test
    common = ["compare", "--data", str(data), "--model", str(model_dir), "--methods", "irm", "--fractions", "0.25",
              "--seeds", "1", "--start-from", "reference", "--no-rule-share", "--test-fraction", "0.25",
              "--validation-fraction", "0.05", "--max-length", "64", "--learning-rate", "1e-3",
              "--no-gradient-checkpointing", "--threads", "1"]
    result = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "refused"), "--batch-size", "8"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (f"of the test split's 25 pairs, {test_dropped} have a prompt that fills max_length=64 and are dropped: "
            f"{25 - test_dropped} remain (fewer than min_test_pairs=20)") in " ".join(result.output.split())

    out = tmp_path / "cmp"
    # a batch as large as the data: every training takes one optimizer step, which the table must say
    result = CliRunner().invoke(app, [*common, "--out", str(out), "--batch-size", "64", "--min-test-pairs", "0"])
    assert result.exit_code == 0, result.output
    text = (out / "compare.md").read_text()
    at_quarter = round(0.25 * usable)
    assert f"- budget 0.25 trained {at_quarter} of {usable} usable pairs (1 optimizer steps)" in text
    assert f"- budget full trained {usable} of {usable} usable pairs (1 optimizer steps)" in text
    assert "- SHORT: irm @ 0.25 (seed 0, from reference): 1 optimizer step reaching" in text
    records = json.loads((out / "results.json").read_text())["records"]
    assert {r["n_usable"] for r in records} == {usable}
    evaluated = (out / "seed-0" / "eval" / "reference-full" / "eval_pairs.jsonl").read_text().splitlines()
    assert sum(json.loads(x)["correct"] is not None for x in evaluated) == 25 - test_dropped  # accuracy over these
