"""What a user reads while prefsift works: a cost line before a long pass (from its measured rate), times that add
up (each shared pass once), and each method's true needs."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from datasets import Dataset
from helpers import make_pairs, make_tiny_llama

from prefsift import output
from prefsift.data import load_pairs
from prefsift.engine import Engine
from prefsift.errors import PrefsiftError
from prefsift.models import LoadedModel
from prefsift.resources import Resources
from prefsift.score import score_pairs
from prefsift.scorers import SCORERS, get_scorer


@pytest.fixture
def clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(output.progress, "clock", staticmethod(lambda: now[0]))
    return now


def run_bar(clock, total: int, steps: list[tuple[float, int]], **kwargs) -> str:
    """Drive a bar: at each (time, items) step, `items` more are done; returns what it wrote."""
    out = io.StringIO()
    with output.progress(total=total, desc="reference log-probs", unit="pair", file=out, **kwargs) as bar:
        for at, items in steps:
            clock[0] = at
            bar.update(items)
    return "\n".join(line.split("\r")[-1] for line in out.getvalue().splitlines() if "about" in line)


def test_a_long_pass_says_its_cost_once_from_its_measured_rate(clock):
    # 10 pairs in the first 5 s: 2 pairs/s, 990 left → 495 s (8 min) more, 500 s in all
    said = run_bar(clock, 1000, [(1.0, 4), (5.0, 6), (9.0, 8), (30.0, 50)], cheaper="fewer pairs")
    assert said == ("reference log-probs: about 8 min more for 990 of 1,000 pairs (8 min in all, at 2 pair/s "
                    "measured over the first 10); cheaper: fewer pairs")


def test_a_short_pass_or_a_hidden_bar_says_nothing(clock):
    assert run_bar(clock, 100, [(5.0, 10), (9.0, 10)]) == ""  # 100 pairs at 2/s: 50 s in all, under a minute
    assert run_bar(clock, 1000, [(1.0, 1), (4.9, 1)]) == ""  # the rate is not measured long enough yet
    assert run_bar(clock, 1000, [(6.0, 10)], disable=True) == ""


def test_cheaper_names_the_settings_that_cut_a_pass():
    assert output.cheaper(1024, None) == ("a sample of the pairs, a lower --max-length (now 1024) or a GPU "
                                          "(--device cuda)")
    assert output.cheaper(512, "cuda:0") == "a sample of the pairs or a lower --max-length (now 512)"


def test_the_score_summary_counts_each_shared_pass_once(bpe_tokenizer, one_thread, monkeypatch):
    """Two methods reading the same policy and reference passes: each method's cost charges both passes (what it
    costs alone), and the summary's parts (each pass once, each method's own work) add up to the wall clock."""
    original = Engine.logps

    def slow(self, *args, **kwargs):  # passes long enough to dwarf the methods' own arithmetic
        time.sleep(0.4)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "logps", slow)
    data = load_pairs(Dataset.from_list(make_pairs(8, seed=1)))
    models = {"policy": LoadedModel(make_tiny_llama(bpe_tokenizer, seed=1), bpe_tokenizer, "warm", "w"),
              "reference": LoadedModel(make_tiny_llama(bpe_tokenizer, seed=2), bpe_tokenizer, "sft", "s")}
    result = score_pairs(data, [get_scorer("irm"), get_scorer("large-margin")], Resources(data, sources=models))
    assert list(result.pass_seconds) == ["policy", "reference"] and list(result.own_seconds) == ["irm", "large-margin"]
    parts = sum(result.pass_seconds.values()) + sum(result.own_seconds.values())
    assert parts <= result.wall_seconds < parts + 0.3
    assert sum(result.seconds.values()) > 1.5 * result.wall_seconds  # the old summary's sum: each pass twice
    line = result.timing()
    assert line.startswith(f"in {result.wall_seconds:.1f}s (passes, once each: policy ") and "methods: irm " in line
    rest = float(line.rsplit("files: ", 1)[1].rstrip("s)"))
    assert rest == pytest.approx(result.wall_seconds - parts, abs=0.06)  # the parts add up to the wall clock


def test_methods_say_what_they_truly_need(bpe_tokenizer):
    """A method said to need nothing scores bare pairs (no model, no rating columns); every other one refuses
    them: the listing is checked against what scoring does."""
    assert get_scorer("margin").requirements() == get_scorer("reward-margin").requirements() == (
        "--reward-model, or the data's columns score_chosen and score_rejected")
    assert get_scorer("irm").requirements() == "--model, --reference (default: --model)"
    assert "score_chosen" in get_scorer("alignment-potential").requirements()
    data = load_pairs(Dataset.from_list(make_pairs(6, seed=2)))
    for name in sorted(SCORERS):
        scorer = get_scorer(name)
        if scorer.requirements() == "nothing":
            result = score_pairs(data, [scorer], Resources(data))
            assert np.isfinite(result.scores[scorer.columns[0]]).all(), name
        else:
            with pytest.raises(PrefsiftError):
                score_pairs(data, [scorer], Resources(data))
