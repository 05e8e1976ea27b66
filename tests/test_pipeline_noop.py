"""`prefsift run` when one row's training moves nothing (prefsift.errors.TrainingMovedNothing): that row is kept,
marked not trained with the reason and no metrics, and the run goes on with the others; every row so: one error."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import make_pairs, saved_tiny_llama, write_jsonl
from typer.testing import CliRunner

from prefsift.cli import app
from prefsift.run_report import summarizable, write_report
from prefsift.stats import summarize


@pytest.mark.e2e
def test_a_row_inside_the_warmup_is_marked_not_trained_and_the_run_goes_on(tmp_path, bpe_tokenizer, one_thread):
    model_dir = saved_tiny_llama(tmp_path / "sft", bpe_tokenizer)
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(80, seed=36))
    # 0.1 of the training pairs is under one batch: one optimizer step, inside the 1-step warm-up (learning rate 0)
    config = {"data": str(data), "model": str(model_dir), "out": str(tmp_path / "run"), "methods": ["random"],
              "fractions": [0.1, 0.5], "rule_share": False, "full": False, "start_from": "reference",
              "test_fraction": 0.2, "min_test_pairs": 0, "engine": {"max_length": 64},
              "train": {"learning_rate": 1e-3, "batch_size": 8, "warmup_steps": 1, "gradient_checkpointing": False}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["run", "--config", str(path)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    (record,) = results["records"]  # the trained row, with its numbers
    assert record["budget"] == "0.5" and record["trained"]["steps"] > 1
    assert 0 <= record["pref_accuracy"] <= 1
    (skipped,) = results["not_trained"]  # the other, kept and marked, with the reason and nothing measured
    assert (skipped["method"], skipped["budget"], skipped["seed"]) == ("random", "0.1", 0)
    assert skipped["status"] == "not trained" and "warm-up" in skipped["note"] and "\n" not in skipped["note"]
    assert not {"pref_accuracy", "win_rate", "pref_outcomes", "compute", "trained"} & set(skipped)
    assert [(r["method"], r["budget"]) for r in results["summary"]] == [("random", "0.5")]
    assert not (run / "seed-0" / "eval" / "reference-random-0.1").exists()  # the start model was not evaluated
    line = f"seed 0, from reference: random @ 0.1 ({skipped['n_pairs']} pairs): not trained: {skipped['note']}"
    assert line in " ".join(result.output.split())  # the printed output names it (rich wraps it on a terminal)
    markdown = (run / "results.md").read_text()
    assert "## Not trained" in markdown and f"- {line}" in markdown
    report = write_report(run, tmp_path / "report")
    assert f"- {line}" in report["markdown"].read_text() and "<li>seed 0, from reference: random @ 0.1" in (
        report["html"].read_text())

    # every row so: one error line, no empty success
    path.write_text(yaml.safe_dump({**config, "fractions": [0.1], "out": str(tmp_path / "none")}))
    result = CliRunner().invoke(app, ["run", "--config", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert ("no row was trained: the training of every row (1 of 1) moved nothing; first: seed 0, from "
            "reference: random @ 0.1"
            in " ".join(result.output.split()))
    assert not (tmp_path / "none" / "results.json").exists()


def test_a_full_row_trained_under_some_seeds_only_is_left_out_of_the_summary():
    def record(seed: int, method: str, budget: str) -> dict:
        return {"seed": seed, "start_from": "reference", "method": method, "budget": budget, "fraction": 0.5,
                "n_pairs": 4, "compute": 1.0 + seed, "pref_outcomes": [1.0, 0.0, 1.0], "pref_accuracy": 2 / 3}

    records = [record(0, "full", "full"), record(0, "random", "0.5"), record(1, "random", "0.5")]
    said: list[str] = []
    kept = summarizable(records, said.append)
    assert kept == records[1:] and said == ["full from reference was trained under seed 0 only: left out of the "
                                            "summary, which pairs every row with full under the same seed"]
    (row,) = summarize(kept)  # with full under seed 0 alone, every ratio to full would look up seed 1's
    assert row["n_seeds"] == 2 and "compute_ratio" not in row
    assert summarizable(records[:2]) == records[:2]
