"""`prefsift run`: the TIF pipeline end to end on a tiny model, from one YAML config."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import make_pairs, make_tiny_llama, saved_tiny_llama, write_jsonl
from transformers import LlamaConfig, LlamaForSequenceClassification
from typer.testing import CliRunner

from prefsift.cli import app
from prefsift.data import load_pairs
from prefsift.pipeline import split_pairs


@pytest.mark.e2e
def test_run_from_yaml(tmp_path, bpe_tokenizer, monkeypatch, one_thread):
    model_dir, judge_dir = tmp_path / "sft", tmp_path / "judge"
    make_tiny_llama(bpe_tokenizer).save_pretrained(model_dir)
    bpe_tokenizer.save_pretrained(model_dir)
    torch.manual_seed(0)
    judge = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(bpe_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=bpe_tokenizer.pad_token_id))
    judge.save_pretrained(judge_dir)
    bpe_tokenizer.save_pretrained(judge_dir)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(80, seed=31)))
    config = {"data": str(data), "model": str(model_dir), "out": str(tmp_path / "run"), "fractions": [0.25],
              "validation_fraction": 0.1, "test_fraction": 0.1, "warmup_fraction": 0.5, "judge_model": str(judge_dir),
              "eval": {"max_new_tokens": 4, "eval_prompts": 4}, "engine": {"max_length": 64},
              "train": {"learning_rate": 1e-3, "batch_size": 8, "epochs": 1.0, "gradient_checkpointing": False},
              "min_test_pairs": 0}  # 8 test pairs: allowed on request
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(config))
    import prefsift.pipeline.run
    import prefsift.train

    trained_seconds: list[float] = []  # what each training measured, as train() returned it

    def timed_train(*args, **kwargs):
        result = prefsift.train.train(*args, **kwargs)
        trained_seconds.append(result.seconds)
        return result

    monkeypatch.setattr(prefsift.pipeline.run, "train", timed_train)
    result = CliRunner().invoke(app, ["run", "--config", str(config_path)])
    assert result.exit_code == 0, result.output
    monkeypatch.undo()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    records = results["records"]
    methods = {"full", "random", "irm", "lossdiff", "lossdiff-irm"}
    assert {r["method"] for r in records} == methods
    for record in records:
        assert set(record) >= {"method", "budget", "fraction", "n_pairs", "win_rate", "pref_accuracy", "compute",
                               "seed", "start_from"}
        assert record["win_rate"] == (record["wins"] + 0.5 * record["ties"]) / 4  # 4 prompts judged
    n_train = next(r["n_pairs"] for r in records if r["method"] == "full")
    assert n_train == 64
    at_quarter = [r for r in records if r["fraction"] == 0.25]
    assert {r["n_pairs"] for r in at_quarter} == {16}
    rule = [r for r in records if r["method"] != "full" and r["fraction"] != 0.25]
    assert len({r["n_pairs"] for r in rule}) == 1 and 0.4 < rule[0]["fraction"] < 0.9  # the band rule's share
    # compute, all of it, measured: each part at the seconds the run's own trainings and passes took (the trainings
    # recorded here as TRL ran them: warm-up, validation model, then each row in order), charged to every row that
    # used it; the nominal pair passes beside: 64 training pairs, 32 in the warm-up (warmup_fraction 0.5), 8 validation
    warmup_s, validation_s, *rows_s = trained_seconds
    assert len(rows_s) == len(records)
    for record, seconds in zip(records, rows_s, strict=True):
        parts = record["compute_parts"]
        assert parts["train"] == round(seconds, 3) and parts["warmup"] == round(warmup_s, 3)  # every row starts there
        assert record["compute"] == pytest.approx(sum(parts.values()), abs=1e-3)
        cpu = record["compute_cpu_parts"]  # the same parts in this process's CPU seconds
        assert set(cpu) == set(parts) and cpu["train"] > 0
        assert record["compute_cpu"] == pytest.approx(sum(cpu.values()), abs=1e-3)
        assert ("validation" in parts) == (record["method"] in ("lossdiff", "lossdiff-irm"))
        if "validation" in parts:
            assert parts["validation"] >= round(validation_s, 3)  # + the validation pairs' reference pass
    measured = {r["method"]: r["compute_parts"] for r in at_quarter}
    assert measured["irm"]["scoring"] > measured["random"]["scoring"]  # the policy's pass over 64 pairs
    passes = {r["method"]: r["pair_passes"] for r in at_quarter}
    trained = 3 * 16  # 16 pairs, one epoch, three passes a step
    warmup = 3 * 32
    assert passes["random"] == 64 + warmup + trained  # reference pass + the warm-up it starts from + training
    assert passes["irm"] == passes["random"] + 64  # + the policy's scoring pass
    assert passes["lossdiff"] == passes["irm"] + 3 * 8 + 8 + 64  # + validation training, its reference, its pass
    summary = {(r["method"], r["budget"]): r for r in results["summary"]}
    full = next(r for r in records if r["method"] == "full")
    assert summary[("random", "0.25")]["compute_ratio"] == round(
        next(r["compute"] for r in at_quarter if r["method"] == "random") / full["compute"], 3)
    timings = json.loads((tmp_path / "run" / "timings.json").read_text())
    assert len(timings) == len(records) and all(t["seconds"] > 0 for t in timings)
    run_scores = tmp_path / "run" / "seed-0" / "scores"
    scores = pq.read_table(run_scores / "scores.parquet").to_pydict()
    assert {"irm", "lossdiff", "lossdiff_irm", "ref_chosen_logps", "val_chosen_logps"} <= set(scores)
    assert (tmp_path / "run" / "results.md").read_text().count("\n|") >= 1 + len(results["summary"])
    assert (tmp_path / "run" / "quality_vs_compute.png").stat().st_size > 1000
    assert (tmp_path / "run" / "pref_accuracy_vs_compute.png").stat().st_size > 1000

    # what a user takes away from each row: its subset, what its evaluation saw, item by item
    seed_dir = tmp_path / "run" / "seed-0"
    scored = dict(zip(scores["pair_id"], scores["irm"], strict=True))
    test_ids = [json.loads(x)["pair_id"] for x in (seed_dir / "eval" / "warmup-full" / "eval_pairs.jsonl")
                .read_text().splitlines()]
    assert len(test_ids) == 8 and not set(test_ids) & set(scores["pair_id"])  # held-out pairs only
    for record in records:
        slug = record["method"] if record["method"] == "full" else (
            f"{record['method']}-{record['budget']}".replace(" ", "-"))
        subset = [json.loads(x) for x in (seed_dir / "selected" / slug / "selected.jsonl").read_text().splitlines()]
        assert len(subset) == record["n_pairs"]
        assert {"prompt", "chosen", "rejected", "pair_id"} <= set(subset[0])
        if record["method"] == "irm":  # the method's score column travels with its subset
            assert all(row["irm"] == scored[row["pair_id"]] for row in subset)
        evaluated = seed_dir / "eval" / f"warmup-{slug}"
        pairs = [json.loads(x) for x in (evaluated / "eval_pairs.jsonl").read_text().splitlines()]
        assert [p["correct"] for p in pairs] == record["pref_outcomes"]
        assert all((p["margin"] > 0) == (p["correct"] == 1.0) for p in pairs)
        answers = [json.loads(x) for x in (evaluated / "answers.jsonl").read_text().splitlines()]
        assert [a["outcome"] for a in answers] == record["win_outcomes"] and len(answers) == 4
        assert all(isinstance(a["answer"], str) and isinstance(a["score"], float) for a in answers)
    assert not list((seed_dir / "models").glob("warmup-*"))  # subset models are dropped unless asked for
    # score once, select many: the run's scores directory feeds `prefsift select`
    result = CliRunner().invoke(app, ["select", "--scores", str(run_scores), "--rule", "band",
                                      "--column", "irm", "--fraction", "0.5", "--out", str(tmp_path / "sel")])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "sel" / "selected.jsonl").read_text().splitlines()) == 32

    # ... and `prefsift train` continues from the run's warm-up model against the SFT reference, reusing the run's
    # reference log-probs: neither prefsift nor TRL runs a reference pass.
    import prefsift.engine

    monkeypatch.setattr(prefsift.engine, "compute_logps", lambda *a, **k: pytest.fail("reference pass recomputed"))
    monkeypatch.setattr(prefsift.train.DPOTrainer, "_precompute_ref_logps",
                        lambda *a, **k: pytest.fail("TRL ran its reference pass"))
    result = CliRunner().invoke(app, ["select", "--scores", str(run_scores), "--method",
                                      "lossdiff-irm", "--out", str(tmp_path / "ldirm")])
    assert result.exit_code == 0, result.output
    assert "intersection" in result.output
    result = CliRunner().invoke(app, [
        "train", "--data", str(tmp_path / "ldirm" / "selected.jsonl"),
        "--model", str(tmp_path / "run" / "seed-0" / "models" / "warmup"),
        "--reference", str(model_dir), "--scores", str(run_scores), "--out", str(tmp_path / "cont"),
        "--learning-rate", "1e-3", "--no-gradient-checkpointing"])
    assert result.exit_code == 0, result.output
    assert "reusing reference log-probs" in result.output
    manifest = json.loads((tmp_path / "cont" / "manifest.json").read_text())
    assert manifest["engine"]["max_length"] == 64  # taken from the scores' manifest
    # a different reference is refused, naming the flag that fixes it
    result = CliRunner().invoke(app, [
        "train", "--data", str(tmp_path / "ldirm" / "selected.jsonl"), "--model", str(model_dir), "--reference",
        str(tmp_path / "run" / "seed-0" / "models" / "warmup"), "--scores", str(run_scores),
        "--out", str(tmp_path / "cont2")])
    assert result.exit_code == 2 and "pass that model as --reference" in result.output


def test_splits_are_disjoint_and_seeded(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(100, seed=32)))
    loaded = load_pairs(str(data))
    train, val, test = split_pairs(loaded, 0.1, 0.2, seed=0)
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    assert len(np.unique(np.concatenate([train, val, test]))) == 100
    again = split_pairs(loaded, 0.1, 0.2, seed=0)
    assert all((a == b).all() for a, b in zip((train, val, test), again, strict=True))
    assert not (split_pairs(loaded, 0.1, 0.2, seed=1)[2] == test).all()


def test_user_given_test_file_prompts_are_not_trained_on(tmp_path):
    from prefsift.config import RunConfig
    from prefsift.pipeline import make_splits

    rows = make_pairs(60, seed=33)
    test_rows = [{**rows[k], "chosen": rows[k]["chosen"] + " again"} for k in (3, 7)]  # same prompts, other pairs
    data, test = tmp_path / "pairs.jsonl", tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    test.write_text("".join(json.dumps(r) + "\n" for r in test_rows))
    splits = make_splits(RunConfig(data=str(data), model="m", test_data=str(test), validation_fraction=0.1))
    held_out = {rows[3]["prompt"], rows[7]["prompt"]}
    assert not held_out & set(splits.train.pairs["prompt"])
    prompts = [r["prompt"] for r in rows]
    in_validation = set(splits.validation.pairs["prompt"])
    expected_removed = sum(1 for p in prompts if p in held_out and p not in in_validation)
    assert splits.n_held_out_prompts_removed == expected_removed >= 1


@pytest.mark.e2e
def test_run_without_a_judge_keeps_models_on_request_and_refuses_a_tiny_test_split(tmp_path, bpe_tokenizer,
                                                                                   one_thread):
    model_dir = saved_tiny_llama(tmp_path / "sft", bpe_tokenizer)
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(60, seed=34))
    config = {"data": str(data), "model": str(model_dir), "out": str(tmp_path / "run"), "methods": ["random"],
              "fractions": [0.5], "rule_share": False, "full": False, "start_from": "reference",
              "test_fraction": 0.2, "engine": {"max_length": 64},
              "train": {"learning_rate": 1e-3, "batch_size": 8, "gradient_checkpointing": False}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["run", "--config", str(path)])
    assert result.exit_code == 2
    assert "the test split holds 12 pairs (fewer than min_test_pairs=20)" in result.output
    assert f"±{1.96 * (0.25 / 12) ** 0.5:.2f}" in result.output and "Traceback" not in result.output

    path.write_text(yaml.safe_dump({**config, "test_fraction": 0.4, "save_subset_models": True}))
    result = CliRunner().invoke(app, ["run", "--config", str(path)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    (record,) = json.loads((run / "results.json").read_text())["records"]
    assert record["win_rate"] is None and record["pref_accuracy"] is not None
    assert (run / "quality_vs_compute.png").stat().st_size > 1000  # preference accuracy: no judge needed
    evaluated = run / "seed-0" / "eval" / "reference-random-0.5"
    assert len((evaluated / "eval_pairs.jsonl").read_text().splitlines()) == 24
    assert not (evaluated / "answers.jsonl").exists()  # no judge, no answers
    from prefsift.models import load_model

    saved = load_model(str(run / "seed-0" / "models" / "reference-random-0.5"), device="cpu")
    assert sum(p.numel() for p in saved.model.parameters()) == sum(
        p.numel() for p in make_tiny_llama(bpe_tokenizer).parameters())


@pytest.mark.e2e
def test_readme_walkthrough_runs_as_written(tmp_path, bpe_tokenizer, monkeypatch, one_thread):
    """The README's "From an SFT model to a trained subset model" block, line by line, on a tiny SFT model and
    HH-style transcripts (implicit prompt): shell lines through the shell, prefsift lines through the CLI."""
    import re
    import shlex
    import subprocess
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"<!-- walkthrough -->\n```bash\n(.*?)```\n<!-- /walkthrough -->", readme, re.S).group(1)
    make_tiny_llama(bpe_tokenizer).save_pretrained(tmp_path / "sft")
    bpe_tokenizer.save_pretrained(tmp_path / "sft")
    rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
            for r in make_pairs(420, seed=35)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    commands = [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    assert sum(c.startswith("prefsift ") for c in commands) == 7
    for command in commands:
        if command.startswith("prefsift "):
            result = CliRunner().invoke(app, shlex.split(command)[1:])
            assert result.exit_code == 0, f"{command}\n{result.output}"
            assert "warning:" not in result.output, f"{command}\n{result.output}"
        else:
            subprocess.run(command, shell=True, check=True, cwd=tmp_path)
    assert [len((tmp_path / f).read_text().splitlines()) for f in ("test.jsonl", "validation.jsonl", "train.jsonl")
            ] == [200, 100, 120]
    assert (tmp_path / "aligned" / "model.safetensors").is_file()
    assert 0 <= json.loads((tmp_path / "eval" / "eval.json").read_text())["pref_accuracy"] <= 1
    subset = [json.loads(x) for x in (tmp_path / "subset" / "selected.jsonl").read_text().splitlines()]
    exported = [json.loads(x) for x in (tmp_path / "subset-trl.jsonl").read_text().splitlines()]
    assert exported == subset and 0 < len(subset) < 120
    transcripts = {r["chosen"]: r["rejected"] for r in rows}
    assert all(transcripts[x["prompt"] + x["chosen"]] == x["prompt"] + x["rejected"] for x in exported)


@pytest.mark.e2e
def test_baseline_arms_on_the_synthetic_task(tmp_path, one_thread):
    """validation-only, random+validation and random-kto beside the methods (issue 20): each trains what it says,
    checked against the subsets the run wrote and the task's own splits, and each is charged its compute."""
    from datasets import Dataset

    from prefsift.config import EngineConfig, RunConfig, TrainConfig
    from prefsift.evaluate import EvalConfig
    from prefsift.models import LoadedModel
    from prefsift.pipeline import Splits, run_pipeline
    from prefsift.synthetic import sft_model
    from prefsift.synthetic.task import TaskConfig, make_task

    task = make_task(TaskConfig(n_train=120, n_validation=24, n_test=30, n_eval_prompts=1, n_sft=300))
    model, tokenizer = sft_model(task, seed=0)
    splits = Splits(*(load_pairs(Dataset.from_list(rows)) for rows in (task.train, task.validation, task.test)),
                    eval_prompts=[])
    config = RunConfig(out=str(tmp_path / "run"), methods=["random"], fractions=[0.25], rule_share=False,
                       start_from="reference", baselines="validation-only,random+validation,random-kto",
                       engine=EngineConfig(beta=0.5, max_length=32, dtype="float32", threads=1),
                       train=TrainConfig(learning_rate=2e-4, epochs=1.0, batch_size=16, gradient_checkpointing=False),
                       eval=EvalConfig(max_new_tokens=2, batch_size=64))
    records = run_pipeline(config, splits=splits, base=LoadedModel(model, tokenizer, "sft", "sft"),
                           log=lambda _: None, quiet=True)["records"]
    rows = {r["method"]: r for r in records}
    assert set(rows) == {"full", "random", "validation-only", "random+validation", "random-kto"}
    selected = tmp_path / "run" / "seed-0" / "selected"

    def ids(slug: str) -> list[str]:
        return [json.loads(x)["pair_id"] for x in (selected / slug / "selected.jsonl").read_text().splitlines()]

    validation_ids = list(splits.validation.pairs["pair_id"])
    assert sorted(ids("validation-only")) == sorted(validation_ids)  # every validation pair fits max_length 32
    assert rows["validation-only"]["n_pairs"] == 24 and rows["validation-only"]["budget"] == "validation"
    # random + validation: the random arm's own subset plus the validation pairs, nothing else
    assert sorted(ids("random+validation-0.25")) == sorted(ids("random-0.25") + validation_ids)
    assert rows["random+validation"]["n_pairs"] == rows["random"]["n_pairs"] + 24 == 30 + 24
    # random with KTO: as many completions as ISA's KTO keeps at the budget, from the training pairs, both labels
    kto = [json.loads(x) for x in (selected / "random-kto-0.25" / "selected.jsonl").read_text().splitlines()]
    assert rows["random-kto"]["algo"] == "kto" and rows["random-kto"]["n_completions"] == len(kto) == 60
    train_ids = set(splits.train.pairs["pair_id"])
    assert {row["pair_id"].rsplit(":", 1)[0] for row in kto} <= train_ids
    assert {row["label"] for row in kto} == {True, False}
    # each charged its own: the validation pairs' reference pass and training; KTO's five passes a completion pair
    assert rows["validation-only"]["pair_passes"] == 24 + 3 * 24
    assert rows["random+validation"]["pair_passes"] == 30 + 24 + 3 * 54
    assert rows["random-kto"]["pair_passes"] == 5 * 30 and rows["random-kto"]["compute_parts"]["reference"] == 0
    assert rows["validation-only"]["compute_parts"]["reference"] > 0  # measured: the validation pairs' pass
    for record in records:  # what each training saw, said
        assert record["trained"]["rows_seen"] == record["trained"]["rows"] > 0 and record["trained"]["steps"] >= 1
    import gc

    assert gc.get_freeze_count() == 0  # the objects frozen during each training are back with the collector
