"""The Python API (`prefsift.score`, `select`, ...): the functions the CLI calls, so the same input and seed give the
same files through either; a `datasets.Dataset` or a list of dicts in place of a file; one-line errors for bad
keywords; and docs/python-api.md run as written on a tiny model."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import Dataset
from helpers import hh_rows, invoke, make_pairs, naive, saved_tiny_llama, write_jsonl

import prefsift

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def ws(tmp_path_factory, bpe_tokenizer):
    """Two tiny models (an SFT reference and a policy apart from it) and 24 pairs as a file and as rows."""
    root = tmp_path_factory.mktemp("api")
    sft = saved_tiny_llama(root / "sft", bpe_tokenizer, seed=0)
    policy = saved_tiny_llama(root / "policy", bpe_tokenizer, seed=1)
    rows = make_pairs(24, seed=7)
    return root, sft, policy, rows, write_jsonl(root / "pairs.jsonl", rows)


def table(path: Path) -> dict:
    return pq.read_table(path).to_pydict()


def manifest(directory: Path) -> dict:
    """manifest.json without what differs between two runs of one input: when it ran and how long it took."""
    def timeless(value):
        if isinstance(value, dict):
            return {k: timeless(v) for k, v in value.items()
                    if k not in ("created", "timing") and not k.endswith("seconds")}
        return value

    return timeless(json.loads((directory / "manifest.json").read_text()))


def test_the_entry_points_are_the_api_and_the_modules_stay_modules():
    from prefsift import api

    for name in prefsift.API:
        assert inspect.signature(getattr(prefsift, name)) == inspect.signature(getattr(api, name)), name
    assert "policy" in inspect.signature(prefsift.score).parameters
    import prefsift.train as train_module  # the submodule named as an entry point keeps its own attributes

    assert train_module.DPOTrainer is not None and train_module.training_pairs.__module__ == "prefsift.train"


def test_score_through_the_api_writes_what_the_cli_writes(ws, tmp_path, one_thread):
    root, sft, policy, rows, data = ws
    cli_out, api_out = tmp_path / "cli", tmp_path / "api"
    result = invoke("score", "--data", data, "--method", "irm,random", "--model", policy, "--reference", sft,
                    "--seed", 3, "--param", "irm.band_low=0.2", "--out", cli_out)
    assert result.exit_code == 0, result.output
    said = []
    scores = prefsift.score(data, policy=policy, reference=sft, methods=["irm", "random"], seed=3,
                            params={"irm": {"band_low": 0.2}}, out=api_out, log=said.append)
    for name in ("scores.parquet", "pairs.parquet"):
        assert table(api_out / name) == table(cli_out / name), name
    assert (api_out / "dropped.jsonl").read_text() == (cli_out / "dropped.jsonl").read_text()
    assert manifest(api_out) == manifest(cli_out)
    summary = "scored 24 pairs with irm,random in "  # the same summary line, through log and on the terminal
    assert said[-1].startswith(summary) and summary in " ".join(result.output.split())
    assert "(passes, once each: policy " in said[-1]  # the times add up: each shared pass once
    # the returned Dataset is scores.parquet; its log-probs are the textbook ones of each model
    assert scores.to_dict() == table(api_out / "scores.parquet")
    from prefsift.models import load_model

    for role, column in (("policy", "chosen_logps"), ("sft", "ref_chosen_logps")):  # rows in the file's order
        loaded = load_model(str(root / role), device="cpu")
        expected = naive(loaded.model, loaded.tokenizer, rows[:4])[:, 0]
        assert np.allclose(scores[column][:4], expected, atol=1e-4), role


def test_a_dataset_or_rows_score_as_their_file_does(ws, tmp_path, one_thread):
    _, _, _, rows, data = ws
    from_file = prefsift.score(data, methods="random", seed=5, out=tmp_path / "file", log=lambda line: None)
    from_dataset = prefsift.score(Dataset.from_list(rows), methods="random", seed=5, out=tmp_path / "ds",
                                  log=lambda line: None)
    from_rows = prefsift.score(rows, methods="random", seed=5, out=tmp_path / "rows", log=lambda line: None)
    in_memory = prefsift.score(rows, methods="random", seed=5, log=lambda line: None)  # no out: nothing written
    assert from_dataset.to_dict() == from_file.to_dict() == from_rows.to_dict() == in_memory.to_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "file", "rows"]
    assert len(from_file) == 24 and len(set(from_file["random"])) == 24


def test_select_weigh_and_export_through_the_api_write_what_the_cli_writes(ws, tmp_path):
    _, _, _, _, data = ws
    scored = tmp_path / "scores"
    prefsift.score(data, methods="random", seed=2, out=scored, log=lambda line: None)
    assert invoke("select", "--scores", scored, "--out", tmp_path / "sel-cli", "--fraction", 0.5, "--rule", "top",
                  "--column", "random").exit_code == 0
    subset = prefsift.select(scored, out=tmp_path / "sel-api", fraction=0.5, rule="top", column="random",
                             log=lambda line: None)
    jsonl = (tmp_path / "sel-cli" / "selected.jsonl").read_text()
    assert (tmp_path / "sel-api" / "selected.jsonl").read_text() == jsonl
    assert subset.to_list() == [json.loads(line) for line in jsonl.splitlines()] and len(subset) == 12
    # the top half by score, from the scores themselves
    values = table(scored / "scores.parquet")
    top = {p for p, v in zip(values["pair_id"], values["random"], strict=True) if v >= np.median(values["random"])}
    assert set(subset["pair_id"]) == top

    assert invoke("weigh", "--scores", scored, "--out", tmp_path / "w-cli", "--column", "random", "--transform",
                  "softmax", "--temperature", 0.5).exit_code == 0
    weighted = prefsift.weigh(scored, out=tmp_path / "w-api", column="random", transform="softmax", temperature=0.5,
                              log=lambda line: None)
    assert (tmp_path / "w-api" / "selected.jsonl").read_text() == (tmp_path / "w-cli" / "selected.jsonl").read_text()
    assert np.mean(weighted["weight"]) == pytest.approx(1.0)  # softmax weights keep a batch's loss scale

    assert invoke("export", "--selected", tmp_path / "sel-cli", "--format", "trl", "--out",
                  tmp_path / "cli.jsonl").exit_code == 0
    exported = prefsift.export(tmp_path / "sel-api", tmp_path / "api.jsonl", format="trl", log=lambda line: None)
    assert exported.paths == [tmp_path / "api.jsonl"] and exported.n_pairs == 12
    assert (tmp_path / "api.jsonl").read_text() == (tmp_path / "cli.jsonl").read_text()


@pytest.mark.parametrize(("call", "message"), [
    (lambda d, o: prefsift.score(d, methods="random", out=o, learning_rate=1e-3), "unknown option 'learning_rate'"),
    (lambda d, o: prefsift.score(d, methods="random", out=o, max_length=1), "max_length must be >= 2"),
    (lambda d, o: prefsift.score(d, methods="random", out=o, beta="0.1"), "beta must be a number"),
    (lambda d, o: prefsift.score(d, methods="irm", out=o, reference=Dataset.from_list(make_pairs(2))),
     "reference must be a string"),
    (lambda d, o: prefsift.score(d, methods="nope", out=o), "unknown method 'nope'"),
    (lambda d, o: prefsift.score(d, methods="irm", policy="a", model="b", out=o), "give the policy once"),
    (lambda d, o: prefsift.score(42, methods="random", out=o), "data must be a path, a datasets.Dataset or a list"),
    (lambda d, o: prefsift.score([], methods="random", out=o), "an empty list holds no pairs"),
    (lambda d, o: prefsift.select(o, out=o / "s", fraction="half"), "fraction must be a number"),
    (lambda d, o: prefsift.select(o, out=o / "s", count=2.5), "count must be an integer"),
    (lambda d, o: prefsift.weigh(o, out=o / "w", column="irm", transform="rank", reverse="yes"),
     "reverse must be true or false"),
    (lambda d, o: prefsift.train(d, "m", out=o, epochs=0), "epochs must be > 0"),
    (lambda d, o: prefsift.train(d, "m", out=o, lora_rank=4), "unknown option 'lora_rank'"),
    (lambda d, o: prefsift.evaluate("m", d, out=o, max_new_tokens=0), "max_new_tokens must be >= 1"),
    (lambda d, o: prefsift.export(d, o / "x.jsonl", format="csv"), "format must be one of"),
    (lambda d, o: prefsift.compare(Dataset.from_list(make_pairs(2)), "m", out=o), "from a path"),
    (lambda d, o: prefsift.run(data=str(d), model="m", out=str(o), seeds=0), "seeds must be >= 1"),
])
def test_a_bad_keyword_is_one_config_error_line_before_any_work(ws, tmp_path, call, message):
    _, _, _, _, data = ws
    out = tmp_path / "out"
    with pytest.raises(prefsift.PrefsiftError) as caught:
        call(data, out)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not out.exists()  # refused before anything was written


@pytest.mark.e2e
def test_train_and_evaluate_through_the_api_write_what_the_cli_writes(ws, tmp_path, one_thread):
    """The same seed trains the same weights either way (from a Dataset here, from its file there), and the same
    model evaluates to the same record."""
    from safetensors.numpy import load_file

    _, sft, _, rows, data = ws
    options = ("--max-length", 64, "--learning-rate", 1e-3, "--batch-size", 4, "--no-gradient-checkpointing",
               "--seed", 4)
    result = invoke("train", "--data", data, "--model", sft, "--out", tmp_path / "cli", *options)
    assert result.exit_code == 0, result.output
    trained = prefsift.train(Dataset.from_list(rows), sft, out=tmp_path / "api", max_length=64, learning_rate=1e-3,
                             batch_size=4, gradient_checkpointing=False, seed=4, log=lambda line: None)
    assert (trained.n_pairs, trained.algo, trained.out) == (24, "dpo", tmp_path / "api")
    cli_weights, api_weights = (load_file(tmp_path / d / "model.safetensors") for d in ("cli", "api"))
    assert cli_weights.keys() == api_weights.keys()
    assert all(np.array_equal(cli_weights[k], api_weights[k]) for k in cli_weights)
    assert not all(np.array_equal(cli_weights[k], v) for k, v in load_file(sft / "model.safetensors").items())

    result = invoke("eval", "--model", tmp_path / "cli", "--reference", sft, "--data", data, "--out",
                    tmp_path / "eval-cli", "--max-length", 64)
    assert result.exit_code == 0, result.output
    record = prefsift.evaluate(tmp_path / "api", data, reference=sft, out=tmp_path / "eval-api", max_length=64,
                               log=lambda line: None)
    untimed = {k: v for k, v in json.loads((tmp_path / "eval-cli" / "eval.json").read_text()).items()
               if not k.endswith("seconds")}
    assert {k: v for k, v in record.items() if not k.endswith("seconds")} == untimed and "pref_accuracy" in untimed
    assert (tmp_path / "eval-api" / "eval_pairs.jsonl").read_text() == (
        tmp_path / "eval-cli" / "eval_pairs.jsonl").read_text()


def _assigned(code: str) -> set[str]:
    import ast

    return {t.id for node in ast.parse(code).body if isinstance(node, ast.Assign) for target in node.targets
            for t in (target.elts if isinstance(target, ast.Tuple) else [target])}


@pytest.mark.e2e
def test_the_python_api_page_runs_as_written(tmp_path, bpe_tokenizer, monkeypatch, one_thread, capsys):
    """docs/python-api.md's code blocks, in order, in one namespace. Only its settings block is replaced (a tiny
    SFT model, 120 HH-style transcripts, short trainings): every other line runs as the page shows it."""
    import datasets

    page = (ROOT / "docs" / "python-api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    settings = re.search(r"<!-- settings -->\n```python\n(.*?)```", page, re.S).group(1)
    assert blocks[0] == settings and len(blocks) >= 8
    sft = saved_tiny_llama(tmp_path / "sft", bpe_tokenizer)
    data = write_jsonl(tmp_path / "pairs.jsonl", hh_rows(60) + [
        {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in make_pairs(60, 35)])
    tiny = (f"from pathlib import Path\nMODEL = {str(sft)!r}\nDATA = {str(data)!r}\n"
            f"WORK = Path({str(tmp_path / 'work')!r})\nN_PAIRS, MAX_LENGTH = 120, 128\n"
            "TRAINING = {'learning_rate': 1e-3, 'batch_size': 8, 'gradient_checkpointing': False}\n"
            "COMPARE = {'seeds': 1, 'test_fraction': 0.25, 'rule_share': False}\n")
    assert _assigned(tiny) == _assigned(settings)  # the same names, other values
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # load_dataset's cache
    namespace: dict = {}
    for code in [tiny, *blocks[1:]]:
        exec(compile(code, str(ROOT / "docs" / "python-api.md"), "exec"), namespace)  # noqa: S102 - the page's code
    work = tmp_path / "work"
    assert (work / "aligned" / "model.safetensors").is_file()
    assert len(namespace["subset"]) == 48  # half of the 96 training pairs
    exported = [json.loads(line) for line in (work / "subset-trl.jsonl").read_text().splitlines()]
    assert exported == namespace["subset"].to_list()
    rows = {(r["method"], r["budget"]) for r in namespace["comparison"].summary}
    assert {("irm", "0.25"), ("irm", "0.5"), ("random", "0.25"), ("full", "full")} <= rows, rows
    said = capsys.readouterr().out
    assert "unknown option 'learning_rte'" in said and "preference accuracy" in said
