"""Selection rules against hand-built expectations; `prefsift select` on a score directory: explicit columns,
dropped.jsonl, degenerate-score warnings."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import Dataset
from helpers import hh_rows, score_dir
from typer.testing import CliRunner

from prefsift.cli import app
from prefsift.data import load_pairs
from prefsift.errors import ConfigError
from prefsift.score import write_scores
from prefsift.select import percentile_ranks, score_warnings, select_from_scores, select_indices


def table(values, ids=None):
    ids = ids or [f"p{i:02d}" for i in range(len(values))]
    return {"pair_id": ids, "s": np.asarray(values, dtype=float)}


def test_top_and_bottom_break_ties_by_pair_id():
    scores = table([1.0, 3.0, 3.0, 2.0, 3.0], ["e", "c", "a", "d", "b"])
    assert select_indices(scores, "top", column="s", count=2).tolist() == [2, 4]  # pair_ids a and b of the 3.0s
    assert select_indices(scores, "bottom", column="s", count=2).tolist() == [0, 3]
    assert select_indices(scores, "top", column="s", fraction=0.6).tolist() == [1, 2, 4]


def test_band_by_fraction_is_the_middle_of_the_ranking():
    scores = table(np.arange(10.0))
    assert select_indices(scores, "band", column="s", fraction=0.4).tolist() == [3, 4, 5, 6]


def test_band_by_cutoffs_uses_percentile_ranks():
    values = np.random.default_rng(0).normal(size=101)
    scores = table(values)
    rows = select_indices(scores, "band", column="s", low=0.1, high=0.9)
    lo, hi = np.sort(values)[10], np.sort(values)[90]
    assert set(rows) == set(np.flatnonzero((values >= lo) & (values <= hi)))
    assert len(rows) == 81


def test_intersection_by_cutoffs_is_the_and_of_bands():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=200), rng.normal(size=200)
    scores = {"pair_id": [f"{i:03d}" for i in range(200)], "a": a, "b": b}
    rows = select_indices(scores, "intersection", columns=["a", "b"], low=0.1, high=0.9)
    # continuous scores have no ties: rank r/199 in [0.1, 0.9] is r in 20..179 of each sorted column
    inside = [(v >= np.sort(v)[20]) & (v <= np.sort(v)[179]) for v in (a, b)]
    assert rows.tolist() == np.flatnonzero(inside[0] & inside[1]).tolist()
    assert 0.55 < len(rows) / 200 < 0.75  # independent scores: ~0.8 × 0.8


def test_intersection_by_count_is_a_symmetric_trim():
    rng = np.random.default_rng(2)
    scores = {"pair_id": [f"{i:03d}" for i in range(300)], "a": rng.normal(size=300), "b": rng.normal(size=300)}
    rows = select_indices(scores, "intersection", columns=["a", "b"], count=120)
    assert len(rows) == 120
    ranks = np.stack([percentile_ranks(scores["a"]), percentile_ranks(scores["b"])])
    extremeness = np.abs(ranks - 0.5).max(axis=0)
    outside = np.setdiff1d(np.arange(300), rows)
    assert extremeness[rows].max() <= extremeness[outside].min()


def test_nan_scores_are_never_selected():
    scores = table([np.nan, 5.0, 1.0, np.nan, 3.0])
    assert select_indices(scores, "top", column="s", count=10).tolist() == [1, 2, 4]
    assert 0 not in select_indices(scores, "band", column="s", low=0.0, high=1.0)


def test_same_scores_in_another_order_give_the_same_subset():
    rng = np.random.default_rng(3)
    values = rng.integers(0, 5, size=50).astype(float)  # many ties
    ids = [f"id{i}" for i in range(50)]
    perm = rng.permutation(50)
    first = {ids[i] for i in select_indices(table(values, ids), "band", column="s", fraction=0.3)}
    shuffled = table(values[perm], [ids[i] for i in perm])
    second = {shuffled["pair_id"][i] for i in select_indices(shuffled, "band", column="s", fraction=0.3)}
    assert first == second


@pytest.mark.parametrize("kwargs, message", [
    ({"rule": "top", "column": "s", "fraction": 0.0}, "fraction must be in"),
    ({"rule": "top", "column": "s", "fraction": 1.5}, "fraction must be in"),
    ({"rule": "top", "column": "s"}, "exactly one of"),
    ({"rule": "nope", "column": "s", "count": 1}, "unknown rule 'nope'"),
    ({"rule": "top", "column": "zz", "count": 1}, "no score column 'zz' \\(columns: s\\)"),
    ({"rule": "band", "column": "s", "low": 0.9, "high": 0.1}, "0 <= low < high <= 1"),
    ({"rule": "intersection", "columns": ["s"], "count": 1}, "at least two columns"),
])
def test_bad_selection_options(kwargs, message):
    rule = kwargs.pop("rule")
    with pytest.raises(ConfigError, match=message):
        select_indices(table([1.0, 2.0]), rule, **kwargs)


# ---- prefsift select on a score directory: explicit columns, dropped.jsonl, degenerate-score warnings ----------


def test_select_writes_explicit_prompt_columns_for_implicit_input(tmp_path):
    from trl.data_utils import extract_prompt, maybe_extract_prompt

    rows = hh_rows(12)
    scores, _ = score_dir(tmp_path, rows, np.arange(12.0))
    select_from_scores(scores, tmp_path / "sel", rule="all")
    lines = [json.loads(x) for x in (tmp_path / "sel" / "selected.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and set(lines[0]) == {"prompt", "chosen", "rejected", "pair_id"}
    by_source = {r["chosen"]: r for r in rows}
    for line in lines:
        original = by_source[line["prompt"] + line["chosen"]]  # the transcript back, exactly
        assert line["prompt"] + line["rejected"] == original["rejected"]
        assert line["prompt"].endswith("\n\nAssistant:")
        assert maybe_extract_prompt(dict(line)) == line  # TRL keeps an explicit prompt as it is
    # the input's own columns, kept on request, are what TRL splits inside the answer (" D" | "uck 0 says ...")
    select_from_scores(scores, tmp_path / "orig", rule="all", output_columns="original")
    original = [json.loads(x) for x in (tmp_path / "orig" / "selected.jsonl").read_text().splitlines()]
    assert set(original[0]) == {"chosen", "rejected", "source", "pair_id"}
    assert all(not extract_prompt(dict(r))["prompt"].endswith("Assistant:") for r in original)
    assert pq.read_table(tmp_path / "sel" / "selected.parquet").to_pylist() == lines


def test_rule_all_keeps_no_nan_pair_and_dropped_jsonl_says_why(tmp_path):
    rows = hh_rows(10)
    scores, data = score_dir(tmp_path, rows, np.linspace(-1, 1, 10), nan_rows=(2, 7))
    result = CliRunner().invoke(app, ["select", "--scores", str(scores), "--rule", "all", "--out",
                                      str(tmp_path / "sel")])
    assert result.exit_code == 0, result.output
    assert "kept 8 of 10 pairs (all); 2 not considered (NaN score)" in result.output
    kept = {json.loads(x)["pair_id"] for x in (tmp_path / "sel" / "selected.jsonl").read_text().splitlines()}
    ids = data.pairs["pair_id"]
    assert kept == set(ids) - {ids[2], ids[7]}
    dropped = [json.loads(x) for x in (tmp_path / "sel" / "dropped.jsonl").read_text().splitlines()]
    assert dropped == [{"pair_id": ids[r], "stage": "select", "reason": "NaN score: prompt fills max_length=64"}
                       for r in (2, 7)]
    assert json.loads((tmp_path / "sel" / "manifest.json").read_text())["n_dropped"] == 2


def test_select_with_scores_carries_the_score_columns(tmp_path):
    rows = hh_rows(10)
    irm = np.random.default_rng(0).normal(size=10)
    scores, data = score_dir(tmp_path, rows, irm)
    select_from_scores(scores, tmp_path / "sel", rule="top", column="irm", count=4, with_scores=True)
    table = pq.read_table(tmp_path / "sel" / "selected.parquet").to_pydict()
    by_id = dict(zip(data.pairs["pair_id"], irm, strict=True))
    assert table["irm"] == [by_id[p] for p in table["pair_id"]]
    assert sorted(table["irm"]) == sorted(np.sort(irm)[-4:])


def test_degenerate_scores_get_one_clear_warning(tmp_path):
    rows = hh_rows(30)
    # IRM scored with the policy equal to the reference: 0 for every pair
    scores, _ = score_dir(tmp_path, rows, np.zeros(30), policy="same", reference="same")
    result = CliRunner().invoke(app, ["select", "--scores", str(scores), "--fraction", "0.5", "--out",
                                      str(tmp_path / "sel")])
    assert result.exit_code == 0, result.output
    assert result.output.count("warning:") == 1
    assert "irm is constant" in result.output and "policy equals the reference" in result.output
    assert "prefsift train" in result.output

    pair_ids = [f"p{i:02d}" for i in range(40)]
    mostly_nan = {"pair_id": pair_ids, "s": np.r_[np.full(25, np.nan), np.arange(15.0)]}
    (warning,) = score_warnings(mostly_nan, ["s"], {"engine": {"max_length": 64}}, "top")
    assert "NaN for 25 of 40 pairs" in warning and "--max-length" in warning
    few = {"pair_id": pair_ids, "s": np.arange(40.0) % 3}
    (warning,) = score_warnings(few, ["s"], {}, "band")
    assert "only 3 distinct values" in warning
    # a tie straddling the cut of a top rule: 10 pairs score 5.0, the top 8 keeps 4 of them by pair_id
    tied = {"pair_id": pair_ids, "s": np.r_[np.arange(30.0) / 10, np.full(10, 5.0)]}
    tied["s"][:4] = 9.0 + np.arange(4)
    rows_kept = select_indices(tied, "top", column="s", count=8)
    (warning,) = score_warnings(tied, ["s"], {}, "top", rows_kept)
    assert "10 pairs share the score 5 at the cut and 4 of them are kept" in warning
    spread = {"pair_id": pair_ids, "s": np.random.default_rng(1).normal(size=40)}
    assert score_warnings(spread, ["s"], {}, "top", select_indices(spread, "top", column="s", count=8)) == []


def test_select_output_refusals_are_one_line(tmp_path):
    scores, _ = score_dir(tmp_path, hh_rows(6), np.arange(6.0))
    result = CliRunner().invoke(app, ["select", "--scores", str(scores), "--rule", "all", "--output-columns", "both",
                                      "--out", str(tmp_path / "sel")])
    assert result.exit_code == 2 and "--output-columns must be one of split, original (got 'both')" in result.output
    # pairs scored from other column names (--chosen-key ...) cannot be re-split with the defaults: say what works
    renamed = [{"good": r["chosen"], "bad": r["rejected"]} for r in hh_rows(6)]
    data = load_pairs(Dataset.from_list(renamed), chosen_key="good", rejected_key="bad")
    scores = {"pair_id": np.asarray(data.pairs["pair_id"], dtype=object), "irm": np.arange(6.0)}
    write_scores(tmp_path / "renamed", scores, data, {"default_rule": {"rule": "all"}, "data": {}})
    result = CliRunner().invoke(app, ["select", "--scores", str(tmp_path / "renamed"), "--out", str(tmp_path / "s2")])
    assert result.exit_code == 2 and "--output-columns original" in result.output
    assert select_from_scores(tmp_path / "renamed", tmp_path / "s3", output_columns="original")["n_selected"] == 6


def test_data_scored_with_renamed_columns_is_selected_with_the_explicit_split(tmp_path):
    """score records --prompt-key/--chosen-key/--rejected-key in its manifest; select re-splits pairs.parquet with
    them and writes explicit prompt / chosen / rejected."""
    rows = [{"question": f"Q{i}?", "good": f"yes {i}", "bad": f"no {i}"} for i in range(8)]
    data = tmp_path / "renamed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runner = CliRunner()
    result = runner.invoke(app, ["score", "--data", str(data), "--method", "random", "--out", str(tmp_path / "s"),
                                 "--prompt-key", "question", "--chosen-key", "good", "--rejected-key", "bad"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["data"]["keys"] == {"prompt_key": "question", "chosen_key": "good", "rejected_key": "bad"}
    result = runner.invoke(app, ["select", "--scores", str(tmp_path / "s"), "--out", str(tmp_path / "sel"),
                                 "--rule", "all"])
    assert result.exit_code == 0, result.output
    selected = [json.loads(line) for line in (tmp_path / "sel" / "selected.jsonl").read_text().splitlines()]
    assert len(selected) == 8 and all(set(r) == {"prompt", "chosen", "rejected", "pair_id"} for r in selected)
    assert sorted((r["prompt"], r["chosen"], r["rejected"]) for r in selected) == sorted(
        (r["question"], r["good"], r["bad"]) for r in rows)
