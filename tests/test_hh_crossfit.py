"""bench/hh_crossfit.py: the cross-fitted real-data protocol's folds and splits, its aggregation over finished
(fold, seed) cells (Holm over the contrasts, the n reported), and one whole cell on a tiny model that resumes from
its finished arms. The real run (SmolLM2, HH-RLHF) is the script's, not the suite's."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset
from helpers import make_pairs, make_tiny_llama
from scipy import stats as scipy_stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import hh_crossfit  # noqa: E402

from prefsift.data import load_pairs  # noqa: E402


def prompts_with_repeats(n: int) -> list[str]:
    """n prompts where about a third repeat an earlier one: pairs sharing a prompt must stay together."""
    rng = np.random.default_rng(0)
    out: list[str] = []
    for i in range(n):
        out.append(out[int(rng.integers(len(out)))] if out and rng.random() < 0.3 else f"prompt {i}")
    return out


def test_folds_disjoint_by_prompt_every_pair_tested_once_validation_apart():
    prompts = prompts_with_repeats(600)
    parts = [hh_crossfit.cell_rows(prompts, fold, 3, n_validation=40) for fold in range(3)]
    tested = np.concatenate([p["test"] for p in parts])
    assert sorted(tested.tolist()) == list(range(len(prompts)))  # every pair tested exactly once
    test_prompts = [{prompts[r] for r in p["test"]} for p in parts]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not test_prompts[a] & test_prompts[b]  # folds disjoint by prompt
    for p in parts:
        pool, validation, test = (set(p[k].tolist()) for k in ("pool", "validation", "test"))
        assert pool | validation | test == set(range(len(prompts)))
        assert not pool & validation and not pool & test and not validation & test
        by_part = [{prompts[r] for r in rows} for rows in (pool, validation, test)]
        assert not by_part[0] & by_part[1] and not by_part[0] & by_part[2] and not by_part[1] & by_part[2]
        # whole prompt groups until at least 40: the last group may overshoot by its own size
        largest_group = max(prompts.count(q) for q in by_part[1])
        assert 40 <= len(validation) < 40 + largest_group
    # a fold depends on the prompt alone: a smaller file (the first 300 pairs) puts each pair in the same fold
    small = [hh_crossfit.cell_rows(prompts[:300], fold, 3, n_validation=40)["test"] for fold in range(3)]
    for fold in range(3):
        assert small[fold].tolist() == [r for r in parts[fold]["test"] if r < 300]


def cell(fold: int, seed: int, outcomes: dict[str, np.ndarray], losses: dict[str, np.ndarray]) -> dict:
    n = len(next(iter(outcomes.values())))
    arms = [{"arm": arm, "n_pairs": 100 if arm == "full" else 20, "pair_passes": 300.0 if arm == "full" else 90.0,
             "seconds": 10.0 if arm == "full" else 4.0, "pref_outcomes": outcomes[arm].tolist(),
             "dpo_losses": losses[arm].tolist()}
            for arm in outcomes]
    return {"fold": fold, "seed": seed, "protocol": asdict(hh_crossfit.Protocol()), "commit": "abc", "dirty": False,
            "test_pair_ids": [f"f{fold}-{i}" for i in range(n)],
            "sft": {"pref_outcomes": [0.5] * n, "dpo_losses": [hh_crossfit.LOG2] * n}, "arms": arms}


def test_aggregation_applies_holm_and_reports_n():
    rng = np.random.default_rng(1)
    n = 60
    names = ["full", "random@0.2", "if@0.2", "tif@0.2"]
    shift = {"full": 0.25, "random@0.2": 0.1, "if@0.2": 0.4, "tif@0.2": 0.12}
    cells = []
    truth = {}
    for fold in range(3):
        outcomes = {a: (rng.random(n) < 0.5 + shift[a]).astype(float) for a in names}
        losses = {a: 0.69 - shift[a] + 0.2 * rng.standard_normal(n) for a in names}
        truth[fold] = (outcomes, losses)
        cells.append(cell(fold, 0, outcomes, losses))
    cells.append(cell(0, 1, *truth[0]))  # seed 1 finished on fold 0 only: the largest full block is seed 0's 3 folds
    summary = hh_crossfit.aggregate(cells)
    assert summary["folds"] == [0, 1, 2] and summary["seeds"] == [0] and summary["n_cells"] == 3
    assert summary["n_test_pairs"] == 3 * n and summary["n_items"] == 3 * n
    # one seed: Banerjee's test is the paired t test over the test pairs; Holm by hand over the whole family
    tests = summary["tests"]
    expected = []
    for t in tests:
        field = "pref_outcomes" if t["metric"] == "pref_accuracy" else "dpo_losses"
        other = "random@0.2" if t["against"] == "random" else "full"
        which = 0 if field == "pref_outcomes" else 1
        mine = np.concatenate([truth[f][which][t["arm"]] for f in range(3)])
        theirs = np.concatenate([truth[f][which][other] for f in range(3)])
        if t["kind"] == "difference":
            expected.append(scipy_stats.ttest_rel(mine, theirs).pvalue)
        elif (mine - theirs).mean() + 0.02 <= 0:  # on the null's side: prefsift.stats reports p = 1 there
            expected.append(1.0)
        else:
            expected.append(scipy_stats.ttest_1samp(mine - theirs + 0.02, 0.0, alternative="greater").pvalue)
    assert [t["p"] for t in tests] == pytest.approx(expected, rel=1e-3, abs=1e-12)
    m = len(expected)
    order = np.argsort(expected)
    holm = np.maximum.accumulate([min(1.0, (m - k) * expected[i]) for k, i in enumerate(order)])
    by_hand = np.empty(m)
    by_hand[order] = holm
    assert [t["p_adjusted"] for t in tests] == pytest.approx(by_hand.tolist(), rel=1e-3, abs=1e-12)
    kinds = {(t["arm"], t["metric"], t["kind"]) for t in tests}
    assert ("if@0.2", "dpo_loss", "difference") in kinds and ("random@0.2", "pref_accuracy", "noninferior") in kinds
    assert not any(t["arm"] in ("full", "random@0.2") and t["against"] == "random" for t in tests)
    for t in tests:
        assert (t["verdict"] is not None) == (t["p_adjusted"] <= 0.05)
    assert summary["gate"]["passed"]  # full's accuracy of ~0.75 against SFT's ½
    text = hh_crossfit.table_of(summary, "`cmd`")
    assert "3 (fold, seed) cell(s) pooled" in text and f"{3 * n} test pairs" in text and "Holm" in text


def test_a_finished_cell_shows_its_measured_cost_not_the_extrapolation(tmp_path):
    """Once a whole cell has finished, the table states what it measured (hours, cores, threads, load) and what the
    cells still to run would take at that rate; the smoke cell's extrapolation is shown only while none has."""
    rng = np.random.default_rng(2)
    names = ["full", "random@0.2"]
    finished = cell(0, 0, {a: (rng.random(40) < 0.6).astype(float) for a in names},
                    {a: 0.6 + 0.1 * rng.standard_normal(40) for a in names})
    finished |= {"wall_seconds": 7200.0, "machine": {"cores": 2, "threads": 1, "gpu": None,
                                                      "load_average_1min": 1.5}}
    cost = tmp_path / "cost.json"
    cost.write_text(json.dumps({"machine": {"cores": 2, "load_average_1min": 10.8}, "measured_on": {"n_pool": 46},
                                "extrapolated": {"cell_hours": 19.5, "train_hours": 8.6, "selection_hours": 7.5,
                                                 "eval_hours": 3.3}}))
    text = hh_crossfit.table_of(hh_crossfit.aggregate([finished]), "`cmd`", cost)
    assert "EXTRAPOLATED" not in text
    assert "fold 0, seed 0: 2.0 h on 2 CPU cores, 1 thread(s), load average 1.5" in text
    assert "The 5 cell(s) of 3 folds × 2 seeds still to run: about 10 hours" in text  # 5 × 2 h
    # a cell of a third seed adds that seed's folds to what is left: 3 × 3 − 2 finished = 7, at the mean 1.5 h
    other = dict(finished, seed=2, wall_seconds=3600.0, machine={"gpu": "NVIDIA H200", "load_average_1min": 0.5})
    text = hh_crossfit.table_of(hh_crossfit.aggregate([finished, other]), "`cmd`", cost)
    assert "fold 0, seed 2: 1.0 h on a NVIDIA H200, load average 0.5" in text
    assert "The 7 cell(s) of 3 folds × 3 seeds still to run: about 10 hours" in text
    limited = hh_crossfit.aggregate([finished | {"protocol": finished["protocol"] | {"limit": 96}}])
    assert "MEASURED" not in hh_crossfit.table_of(limited, "`cmd`", cost)  # a smoke cell's time: no whole cell's
    assert "EXTRAPOLATED" in hh_crossfit.table(tmp_path / "lora", cost)  # no finished cell: the extrapolation


def test_aggregation_with_no_cell_says_n_0(tmp_path):
    text = hh_crossfit.table(tmp_path / "lora")
    assert text.startswith("n = 0: no (fold, seed) cell")


def test_an_unfinished_cell_shows_its_finished_arms_and_the_gate(tmp_path):
    """A killed or running cell's finished arms render beside n = 0: each arm's accuracy with the interval over its
    test pairs (a closed form: mean ± t·sd/√n of the outcomes), and the gate once `full` is done; a cell that has
    finished is shown by the table only."""
    rng = np.random.default_rng(4)
    full = (rng.random(400) < 0.65).astype(float)
    arm = (rng.random(400) < 0.6).astype(float)
    partial = tmp_path / "lora" / "partial" / "fold1-seed0"
    partial.mkdir(parents=True)

    def record(name, outcomes, seconds):
        return {"arm": name, "n_pairs": 100, "pref_outcomes": [None, *outcomes.tolist()], "dpo_loss": 0.6,
                "seconds": seconds, "train_seconds": 50.0}

    (partial / "full.json").write_text(json.dumps(record("full", full, 200.0)))
    (partial / "random.json").write_text(json.dumps(record("random", arm, 50.0)))
    (partial / "stages.json").write_text("{}")
    text = hh_crossfit.table(tmp_path / "lora")
    assert text.startswith("n = 0") and "Unfinished cell fold 1, seed 0: 2 of 7 arms" in text
    half = scipy_stats.t.ppf(0.975, 399) * arm.std(ddof=1) / np.sqrt(400)
    assert f"| random | 100 | {arm.mean():.3f} [{arm.mean() - half:.3f}, {arm.mean() + half:.3f}] | 0.6000 | 0.250 |" \
        in text
    one_sided = scipy_stats.ttest_1samp(full, 0.5, alternative="greater")
    assert f"Gate: full − SFT held-out accuracy {full.mean() - 0.5:+.3f}" in text and "over 400 test pairs" in text
    assert one_sided.pvalue < 0.001 and "full beats SFT." in text
    # the cell finished: its partial arms are not shown
    (tmp_path / "lora" / "fold1-seed0.json").write_text(json.dumps({"fold": 1, "seed": 0}))
    assert "Unfinished" not in hh_crossfit.partial_cells(tmp_path / "lora")


def test_bad_options_exit_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        hh_crossfit.main(["--folds", "0,3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --folds")


@pytest.mark.e2e
def test_one_cell_on_a_tiny_model_resumes_from_its_finished_arms(tmp_path, bpe_tokenizer, one_thread):
    from prefsift.engine.embeddings import CausalEmbedder
    from prefsift.models import LoadedModel

    rows = make_pairs(90, seed=3)
    data = load_pairs(Dataset.from_list(rows))
    base = LoadedModel(make_tiny_llama(bpe_tokenizer), bpe_tokenizer, "tiny", "tiny-fp")
    protocol = hh_crossfit.Protocol(n_validation=10, max_length=None, learning_rate=1e-3, batch_size=4,
                                    model="tiny", embedder="tiny")
    out, work = tmp_path / "out", tmp_path / "work"
    partial = out / "lora" / "partial" / "fold1-seed0"
    # a killed cell: one arm already written (its numbers made up, so reading it back is visible)
    partial.mkdir(parents=True)
    parts = hh_crossfit.cell_rows(list(data.pairs["prompt"]), 1, 3, 10)
    n_test = len(parts["test"])
    fake = {"arm": "small-margin@0.2", "method": "small-margin", "budget": "0.2", "fraction": 0.2, "n_pairs": 7,
            "pref_accuracy": 1.0, "dpo_loss": 0.1, "pref_outcomes": [1.0] * n_test, "dpo_losses": [0.1] * n_test,
            "pair_passes": 1.0, "seconds": 1.0, "train_seconds": 1.0, "eval_seconds": 0.0}
    (partial / "small-margin@0.2.json").write_text(json.dumps(fake))
    record = hh_crossfit.run_cell(data, 1, 0, protocol, base, CausalEmbedder.of(base), out, work, device="cpu",
                                  gate="report", log=lambda *_: None)
    assert (out / "lora" / "fold1-seed0.json").is_file() and not partial.exists()
    assert [a["arm"] for a in record["arms"]] == hh_crossfit.arm_names(protocol)
    arms = {a["arm"]: a for a in record["arms"]}
    assert arms["small-margin@0.2"]["pref_accuracy"] == 1.0  # taken from the partial file, not retrained
    assert record["n_pool"] + record["n_validation"] + record["n_test"] == len(rows) == 90
    assert record["n_test"] == n_test and len(arms["full"]["pref_outcomes"]) == n_test
    # the DPO loss of each test pair is −log σ(margin) of the margin the evaluation wrote
    margins = [json.loads(line)["margin"] for line in (work / "lora" / "fold1-seed0" / "eval" / "reference-full"
                                                     / "eval_pairs.jsonl").read_text().splitlines()]
    assert arms["full"]["dpo_losses"] == pytest.approx([np.log1p(np.exp(-m)) for m in margins], rel=1e-5)
    assert arms["full"]["n_pairs"] == record["n_pool"]
    # selection is charged: a warm-up-scored arm costs its warm-up and scoring passes beyond its own training
    for parts in ("seconds_parts", "pair_pass_parts"):
        assert arms["if@0.2"][parts]["warmup"] > 0 and arms["if@0.2"][parts]["scoring"] > 0
        assert "warmup" not in arms["random@0.2"][parts]
    assert record["commit"] is not None and "dirty" in record and record["gate"] is not None
