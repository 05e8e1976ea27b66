"""Soft selection: score → weight transforms against hand computations, and `prefsift weigh` → `prefsift train`."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import invoke, make_pairs, make_tiny_llama

from prefsift.errors import ConfigError, PrefsiftError
from prefsift.weights import score_weights

SCORES = [3.0, 1.0, np.nan, 2.0, 5.0]


def test_rank_is_the_percentile_rank_and_nan_weighs_zero():
    # the four scored values sorted: 1, 2, 3, 5 → ranks 0, 1/3, 2/3, 1
    np.testing.assert_allclose(score_weights(SCORES, "rank"), [2 / 3, 0, 0, 1 / 3, 1])
    np.testing.assert_allclose(score_weights(SCORES, "rank", reverse=True), [1 / 3, 1, 0, 2 / 3, 0])


def test_softmax_has_mean_weight_one_over_the_scored_pairs():
    weights = score_weights(SCORES, "softmax", temperature=0.5)
    e = np.exp(np.array([3.0, 1.0, 2.0, 5.0]) / 0.5)
    np.testing.assert_allclose(weights[[0, 1, 3, 4]], 4 * e / e.sum())
    assert weights[2] == 0 and weights[[0, 1, 3, 4]].mean() == pytest.approx(1.0)
    np.testing.assert_allclose(score_weights(SCORES, "softmax"), score_weights(SCORES, "softmax", temperature=1.0))
    low_first = score_weights(SCORES, "softmax", reverse=True)
    e = np.exp(-np.array([3.0, 1.0, 2.0, 5.0]))
    np.testing.assert_allclose(low_first[[0, 1, 3, 4]], 4 * e / e.sum())
    huge = score_weights([1000.0, 999.0], "softmax")  # no overflow: e^1000 is inf, the shifted form is not
    np.testing.assert_allclose(huge, 2 * np.array([1, np.exp(-1)]) / (1 + np.exp(-1)))


def test_band_is_one_inside_the_percentile_band():
    values = [10.0, 40.0, 20.0, 50.0, 30.0, np.nan]  # ranks 0, .75, .25, 1, .5
    np.testing.assert_array_equal(score_weights(values, "band", low=0.25, high=0.75), [0, 1, 1, 0, 1, 0])
    # reversed, 50 ranks 0 and 40 ranks .25
    np.testing.assert_array_equal(score_weights(values, "band", low=0.0, high=0.25, reverse=True), [0, 1, 0, 1, 0, 0])


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"transform": "rank", "temperature": 2.0}, ConfigError, "softmax transform only"),
    ({"transform": "softmax", "low": 0.1}, ConfigError, "band transform only"),
    ({"transform": "softmax", "temperature": 0.0}, ConfigError, "must be a finite number > 0"),
    ({"transform": "band", "low": 0.1}, ConfigError, "needs --low and --high"),
    ({"transform": "band", "low": 0.8, "high": 0.2}, ConfigError, "0 <= low < high <= 1"),
    ({"transform": "sigmoid"}, ConfigError, "must be one of rank, softmax, band"),
    ({"transform": "rank", "values": [np.nan, np.nan]}, PrefsiftError, "every score is NaN")])
def test_bad_weight_options(kwargs, error, message):
    values = kwargs.pop("values", SCORES)
    with pytest.raises(error, match=message):
        score_weights(values, **kwargs)


@pytest.fixture(scope="module")
def scored(tmp_path_factory, bpe_tokenizer):
    """A tiny SFT model on disk and a score directory with a random column and reference log-probs."""
    root = tmp_path_factory.mktemp("weigh")
    make_tiny_llama(bpe_tokenizer).save_pretrained(root / "sft")
    bpe_tokenizer.save_pretrained(root / "sft")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(12, seed=40)))
    result = invoke("score", "--data", data, "--method", "irm,random", "--model", root / "sft", "--out",
                    root / "scores", "--max-length", 64, "--seed", 3)
    assert result.exit_code == 0, result.output
    return root


@pytest.mark.e2e
def test_weigh_writes_a_weight_column_train_reads(scored, monkeypatch):
    root = scored
    result = invoke("weigh", "--scores", root / "scores", "--out", root / "soft", "--column", "random",
                    "--transform", "softmax", "--temperature", 0.3)
    assert result.exit_code == 0, result.output
    table = pq.read_table(root / "scores" / "scores.parquet").to_pydict()
    e = np.exp(np.asarray(table["random"]) / 0.3)
    expected = dict(zip(table["pair_id"], 12 * e / e.sum(), strict=True))
    written = pq.read_table(root / "soft" / "selected.parquet").to_pydict()
    assert set(written) == {"prompt", "chosen", "rejected", "pair_id", "weight"}
    np.testing.assert_allclose(written["weight"], [expected[p] for p in written["pair_id"]])
    lines = [json.loads(line) for line in (root / "soft" / "selected.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["weight"] for r in lines], written["weight"])

    # `prefsift train` on the file: weighted DPO, in the order of the random score (from --scores)
    import prefsift.train as train_module

    seen = {}
    original = train_module.make_trainer

    def spy(loaded, pairs, config, engine, output_dir, ref_logps=None, quiet=False, order=None, reference=None):
        seen.update(weights=list(pairs["weight"]), order=order, ids=list(pairs["pair_id"]), name=config.order)
        return original(loaded, pairs, config, engine, output_dir, ref_logps, quiet, order, reference)

    monkeypatch.setattr(train_module, "make_trainer", spy)
    result = invoke("train", "--data", root / "soft" / "selected.jsonl", "--model", root / "sft", "--scores",
                    root / "scores", "--order", "random", "--out", root / "trained", "--batch-size", 4,
                    "--no-gradient-checkpointing", "--learning-rate", 1e-3)
    assert result.exit_code == 0, result.output
    random_of = dict(zip(table["pair_id"], table["random"], strict=True))
    assert seen["name"] == "random"
    np.testing.assert_allclose(seen["weights"], [expected[p] for p in seen["ids"]])
    np.testing.assert_allclose(seen["order"], [random_of[p] for p in seen["ids"]])
    assert json.loads((root / "trained" / "manifest.json").read_text())["config"]["order"] == "random"


def test_weigh_band_leaves_weight_zero_out_and_says_why(scored):
    root = scored
    result = invoke("weigh", "--scores", root / "scores", "--out", root / "band", "--column", "random",
                    "--transform", "band", "--low", 0.25, "--high", 0.75)
    assert result.exit_code == 0, result.output
    table = pq.read_table(root / "scores" / "scores.parquet").to_pydict()
    rank = np.empty(12)
    rank[np.argsort(table["random"])] = np.arange(12) / 11
    inside = {p for p, r in zip(table["pair_id"], rank, strict=True) if 0.25 <= r <= 0.75}
    written = pq.read_table(root / "band" / "selected.parquet").to_pydict()
    assert set(written["pair_id"]) == inside and set(written["weight"]) == {1.0}
    dropped = [json.loads(line) for line in (root / "band" / "dropped.jsonl").read_text().splitlines()]
    assert {d["pair_id"] for d in dropped} == set(table["pair_id"]) - inside
    assert all(d["reason"] == "weight 0 under band" for d in dropped)


@pytest.mark.parametrize(("args", "message"), [
    (["--column", "nope", "--transform", "rank"], "no score column 'nope'"),
    (["--column", "random", "--transform", "rank", "--temperature", "2"], "softmax transform only")])
def test_weigh_refuses_bad_input_in_one_line(scored, args, message):
    result = invoke("weigh", "--scores", scored / "scores", "--out", scored / "bad", *args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
