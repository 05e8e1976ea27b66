"""The "add a scorer" example of docs/scorers.md: one class with two parameters reaches the registry, the CLI
(--param) and YAML without any other file knowing it, and passes the conformance checks a scorer author runs. It is
registered for each test that uses it (conftest restores the registry after every test): no other test module sees
it."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import make_pairs, provider
from typer.testing import CliRunner

from prefsift.cli import app
from prefsift.config import RunConfig
from prefsift.scorers import SCORERS, Scorer, ScorerParams, get_scorer, parse_methods, register
from prefsift.scorers.check import check_scorer
from prefsift.settings import option


@dataclass
class LengthRatioParams(ScorerParams):
    power: float = option(1.0, "Exponent of the length ratio.", low=0, low_open=True)
    count_prompt: bool = option(False, "Add the prompt's length to both sides.")


class LengthRatioScorer(Scorer):
    """len(chosen) / len(rejected), raised to `power`: long chosen answers first."""

    name = "length-ratio"
    columns = ("length_ratio",)
    Params = LengthRatioParams

    def score(self, resources) -> dict[str, np.ndarray]:
        pairs = resources.pairs.pairs
        extra = [len(p) if self.params.count_prompt else 0 for p in pairs["prompt"]]
        ratio = [(len(c) + e) / (len(r) + e) for c, r, e in zip(pairs["chosen"], pairs["rejected"], extra,
                                                                 strict=True)]
        return {"length_ratio": np.asarray(ratio) ** self.params.power}


@pytest.fixture
def registered():
    """`@register` on the class, as docs/scorers.md writes it, for the length of one test."""
    return register(LengthRatioScorer)


def test_a_new_scorer_reaches_cli_and_yaml(tmp_path, registered):
    rows = make_pairs(20, seed=50)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runner = CliRunner()
    out = tmp_path / "scores"
    result = runner.invoke(app, ["score", "--data", str(data), "--method", "length-ratio", "--param", "power=2",
                                 "--param", "count_prompt=true", "--out", str(out)])
    assert result.exit_code == 0, result.output
    got = pq.read_table(out / "scores.parquet").column("length_ratio").to_numpy()
    expected = [((len(r["chosen"]) + len(r["prompt"])) / (len(r["rejected"]) + len(r["prompt"]))) ** 2 for r in rows]
    np.testing.assert_allclose(got, expected)
    assert "length-ratio" in runner.invoke(app, ["methods"]).output
    bad = runner.invoke(app, ["score", "--data", str(data), "--method", "length-ratio", "--param", "power=0",
                              "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "method 'length-ratio': power must be > 0" in bad.output
    config = RunConfig(data="d", model="m", methods=[{"name": "length-ratio", "power": 0.5}])
    assert parse_methods(config.methods)[0].params == LengthRatioParams(power=0.5)


def test_a_new_scorer_passes_the_conformance_checks(registered):
    check_scorer(registered)  # the static checks: no model, no data
    scorer = get_scorer("length-ratio", power=2.0, count_prompt=True)
    check_scorer(scorer, provider(make_pairs(12, seed=51)))  # and a tiny provider
    assert SCORERS["length-ratio"] is LengthRatioScorer
