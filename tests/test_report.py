"""The report's first screen: the verdict, a plain reading of the corrected table, on hand-built summaries whose
tests are known by construction (a difference of many standard errors survives any correction, one of a fraction
of a standard error none); the run's own name as the title, staging or not; and the score plot shading the pairs a
subset actually trained on, not its rule's nominal band."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefsift.report import run_name, verdict
from prefsift.run_report import score_panels, subset_dir_name, write_report
from prefsift.stats import claims

CLEAR, NOISE = 0.004, 0.03  # a difference's standard error: 0.1 is 25 of the first, a third of the second


def row(method: str, budget: str = "0.1", *, vs_random: float | None = None, vs_full: float | None = None,
        se: float = CLEAR, ratio: float | None = 0.3, seeds: int = 3, items: int = 400, start: str = "reference",
        metric: str = "pref_accuracy", mean: float = 0.6, **more) -> dict:
    """A summary row as `prefsift.stats.summarize` writes it: the metric's mean and interval, and each paired
    difference given with its variance parts (nearly all from the items, as in a table whose seeds agree)."""
    out = {"start_from": start, "method": method, "budget": budget, "ceiling": False, "n_seeds": seeds,
           "fraction": 1.0 if budget == "full" else 0.1, "n_pairs": 1000 if budget == "full" else 100,
           metric: mean, f"{metric}_low": mean - 0.05, f"{metric}_high": mean + 0.05}
    if ratio is not None:
        out |= {"compute": 1000 * ratio, "compute_ratio": ratio}
    for against, diff in (("random", vs_random), ("full", vs_full)):
        if diff is None:
            continue
        name = f"{metric}_vs_{against}"
        out |= {name: diff, f"{name}_low": diff - 2 * se, f"{name}_high": diff + 2 * se,
                f"{name}_var_seeds": (se / 10) ** 2 if seeds > 1 else 0.0, f"{name}_var_items": se ** 2,
                f"{name}_df_seeds": seeds - 1, f"{name}_df_items": items - 1}
    return out | more


def full(**kwargs) -> dict:
    return row("full", "full", ratio=1.0, **kwargs)


def decide(summary: list[dict], **settings):
    return verdict(summary, claims(summary, **settings))


def test_a_clear_winner_is_named_with_what_it_bought_and_its_cost():
    summary = [full(), row("random", vs_full=-0.08, ratio=0.1),
               row("m1", vs_random=0.09, vs_full=0.01, ratio=0.3),
               row("m2", vs_random=0.01, vs_full=-0.07, se=NOISE, ratio=0.2)]
    v = decide(summary)
    assert v.kind == "subset" and v.row["method"] == "m1"
    assert v.headline.startswith("Train on m1 @ 0.1 (100 pairs): better than random at the same budget and ")
    assert "at 0.30× full training's compute" in v.headline
    text = "\n".join(v.details)
    assert "vs random at the same budget +0.090 [+0.082, +0.098] ▲ better" in text
    assert "non-inferior within 0.02" in text and "400 test pairs" in text and "3 training seeds" in text
    assert "Holm's correction (family-wise error ≤ 5%)" in text and "Better than random: m1 @ 0.1." in text


def test_a_method_significantly_worse_is_named_and_never_chosen():
    # m1 beats random on preference accuracy but loses on the win rate: a method worse on any metric is not chosen
    m1 = row("m1", vs_random=0.09, vs_full=0.0, ratio=0.2)
    m1 |= row("m1", vs_random=-0.1, vs_full=-0.1, metric="win_rate", ratio=0.2)
    summary = [full() | full(metric="win_rate"), row("random", vs_full=-0.08) | row("random", vs_full=0.1,
                                                                                      metric="win_rate"),
               m1, row("m2", vs_random=0.0, vs_full=-0.08, se=NOISE) | row("m2", vs_random=0.0, vs_full=0.0,
                                                                             se=NOISE, metric="win_rate")]
    v = verdict(summary, claims(summary), "pref_accuracy")
    assert v.kind == "none" and v.row is None and "m1" not in v.headline
    assert v.headline == ("The evidence supports no subset: the rows that beat random on preference accuracy are "
                          "worse than it on another metric, and the rows non-inferior to the full data (within 0.02) "
                          "at less compute are worse than random, or than full beyond the margin, on another metric. "
                          "Keep the full data, or add seeds and test pairs to narrow the intervals.")
    assert "Worse than random: m1 @ 0.1 (win rate)." in v.details and "Better than random: m1 @ 0.1." in v.details


def test_only_non_inferior_to_full():
    summary = [full(), row("random", vs_full=-0.08, ratio=0.1),
               row("m1", vs_random=0.005, vs_full=-0.002, ratio=0.4, se=0.002),
               row("m2", vs_random=0.01, vs_full=0.0, se=NOISE, ratio=0.2)]
    v = decide(summary)
    assert v.kind == "non-inferior" and v.row["method"] == "m1"
    assert v.headline == ("None beats random on preference accuracy. Train on m1 @ 0.1 (100 pairs): non-inferior to "
                          "the full data (within 0.02) on preference accuracy, at 0.40× its compute; it is not shown "
                          "better than random at that budget.")
    # random's own subset within the margin of full, and cheaper: a random subset of that size suffices
    summary[1] = row("random", vs_full=-0.001, ratio=0.1, se=0.002)
    v = decide(summary)
    assert v.row["method"] == "random" and "a random subset of that size suffices" in v.headline


def test_nothing_significant_says_so():
    summary = [full(), row("random", vs_full=-0.01, se=NOISE, ratio=0.1),
               row("m1", vs_random=0.02, vs_full=0.01, se=NOISE), row("m2", vs_random=-0.02, vs_full=-0.03, se=NOISE)]
    v = decide(summary)
    assert v.kind == "none" and v.row is None
    assert v.headline == ("The evidence supports no subset: none beats random on preference accuracy, and nothing is "
                          "non-inferior to the full data (within 0.02). Keep the full data, or add seeds and test "
                          "pairs to narrow the intervals.")
    assert "0 survive" in "\n".join(v.details) and "±0.060" in v.details[0]


def test_one_seed_is_insufficient_evidence_whatever_survives():
    summary = [full(seeds=1), row("random", vs_full=-0.08, ratio=0.1, seeds=1),
               row("m1", vs_random=0.09, vs_full=0.01, seeds=1)]
    assert claims(summary).survivors("better")  # the items alone would mark m1
    v = decide(summary)
    assert v.kind == "insufficient" and v.row is None and "Train on" not in v.headline
    assert v.headline.startswith("The evidence is insufficient to choose a subset: one training seed")


def test_no_tests_is_insufficient():
    v = decide([full(), row("m1")])  # no paired differences at all
    assert v.kind == "insufficient" and "no tests" in v.headline


def test_benjamini_hochberg_is_named_with_its_rate():
    summary = [full(), row("random", vs_full=-0.08, ratio=0.1), row("m1", vs_random=0.09, vs_full=0.01)]
    text = decide(summary, correction="bh", alpha=0.1).markdown()
    assert "Benjamini-Hochberg (false discovery rate 10%)" in text and "Holm" not in text


def test_beating_random_without_matching_full_or_at_more_than_full_compute():
    # better than random, worse than full; the only non-inferior row costs more than full
    summary = [full(), row("random", vs_full=-0.08, ratio=0.1), row("m1", vs_random=0.05, vs_full=-0.05),
               row("m2", vs_random=0.0, vs_full=0.0, ratio=1.4, se=0.002)]
    v = decide(summary)
    assert v.kind == "beats-random" and v.row["method"] == "m1"
    assert "it beats random on preference accuracy and is worse than the full data" in v.headline
    assert "nothing cheaper than the full data is non-inferior to it (within 0.02)" in v.headline
    # no full row: non-inferiority was never tested, and the verdict says so rather than "nothing is non-inferior"
    summary = [row("random", ratio=None), row("m1", vs_random=0.05, ratio=None)]
    v = decide(summary)
    assert v.kind == "beats-random" and "the run trained no full-data row" in v.headline
    assert "an unknown share of full training's compute" in v.headline


def test_the_title_is_the_runs_name_inside_its_staging_directory(tmp_path, monkeypatch):
    from prefsift.output import _sibling

    assert run_name(_sibling(tmp_path / "my-run", "staging")) == "my-run"
    assert run_name(tmp_path / "my-run") == "my-run"
    monkeypatch.chdir(tmp_path)
    assert run_name(".") == tmp_path.name


@pytest.mark.parametrize("method,budget", [("irm", "0.1"), ("lossdiff-irm", "lossdiff-irm rule"), ("full", "full"),
                                           ("random", "0.25")])
def test_subset_folders_are_found_where_the_pipeline_writes_them(method, budget):
    from prefsift.pipeline.run import artifact_name

    assert subset_dir_name(method, budget) == artifact_name(method, budget)


def scores_run(tmp_path: Path, selected: list[str]) -> Path:
    """A run directory's first seed: irm scores of 50 pairs under a 10-90% band rule, and the subset trained at 0.1
    (its pair ids given)."""
    seed = tmp_path / "run" / "seed-0"
    (seed / "scores").mkdir(parents=True)
    ids = [f"p{k:02d}" for k in range(50)]
    pq.write_table(pa.table({"pair_id": ids, "irm": np.linspace(-1, 1, 50) ** 3}), seed / "scores" / "scores.parquet")
    (seed / "scores" / "manifest.json").write_text(json.dumps(
        {"stage": "score", "methods": {"irm": {"rule": {"rule": "band", "column": "irm", "low": 0.1, "high": 0.9}}}}))
    (seed / "selected" / "irm-0.1").mkdir(parents=True)
    pq.write_table(pa.table({"pair_id": selected}), seed / "selected" / "irm-0.1" / "selected.parquet")
    return tmp_path / "run"


def test_the_score_plot_shades_the_pairs_trained_not_the_band(tmp_path):
    trained = [f"p{k:02d}" for k in (0, 1, 48, 49, 25)]  # both tails and the middle: outside the 10-90% band
    summary = [row("irm", "0.1"), row("irm", "lossdiff-irm rule") | {"fraction": 0.6}]
    scores_dir, (panel,) = score_panels(scores_run(tmp_path, trained), summary)
    assert (panel.method, panel.column, panel.budget) == ("irm", "irm", "0.1")  # its smallest budget
    expected = sorted((np.linspace(-1, 1, 50) ** 3)[[0, 1, 48, 49, 25]])
    assert sorted(panel.kept) == pytest.approx(expected) and len(panel.values) == 50
    lo, hi = np.quantile(panel.values, [0.1, 0.9])
    assert sum((panel.kept < lo) | (panel.kept > hi)) == 4  # the nominal band would have shaded none of these


def test_kept_completions_shade_the_pairs_they_come_from(tmp_path):
    run = scores_run(tmp_path, ["p03:chosen", "p03:rejected", "p07:rejected"])
    _, (panel,) = score_panels(run, [row("irm", "0.1")])
    assert sorted(panel.kept) == pytest.approx(sorted((np.linspace(-1, 1, 50) ** 3)[[3, 7]]))
    # a budget with no subset on disk: nothing shaded rather than a guess
    _, (panel,) = score_panels(run, [row("irm", "0.5") | {"fraction": 0.5}], "0.5")
    assert panel.budget is None and len(panel.kept) == 0


def test_the_page_opens_with_the_verdict_and_escapes_user_text(tmp_path):
    # every row judged with the same draws (a pair's outcome moves only with the row's effect): m1 and full lie
    # 0.1 above random on about a tenth of the pairs, under every seed
    rng = np.random.default_rng(0)
    items, seeds = 400, 3
    draws, base = rng.random((seeds, items)), rng.uniform(0.3, 0.6, items)
    effects = {("full", "full"): 0.1, ("random", "0.1"): 0.0, ("<b>m1</b>", "0.1"): 0.1}
    records = [{"seed": s, "start_from": "reference", "method": m, "budget": b, "n_pairs": 1000 if b == "full" else 100,
                "fraction": 1.0 if b == "full" else 0.1, "compute": 10.0 if b == "full" else 3.0,
                "pref_outcomes": (draws[s] < base + effect).astype(float).tolist()}
               for (m, b), effect in effects.items() for s in range(seeds)]
    for r in records:
        r["pref_accuracy"] = float(np.mean(r["pref_outcomes"]))
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"records": records, "summary": []}))
    paths = write_report(run, tmp_path / "out")
    page = paths["html"].read_text()
    assert "<b>m1</b>" not in page and "&lt;b&gt;m1&lt;/b&gt;" in page
    assert re.search(r"<title>prefsift report: run</title>", page)
    assert page.index("Verdict") < page.index("<h2>Methods</h2>") < page.index("<h2>Per seed</h2>")
    assert "Train on &lt;b&gt;m1&lt;/b&gt; @ 0.1 (100 pairs): better than random" in page
    md = paths["markdown"].read_text()
    assert md.startswith("# prefsift report: run\n\n## Verdict\n\nTrain on <b>m1</b> @ 0.1")
    assert md.index("## Verdict") < md.index("## Methods") < md.index("## Per seed")


@pytest.mark.e2e
def test_a_demo_written_through_staging_reports_under_its_own_name(tmp_path):
    from prefsift.demo import DemoConfig, run_demo
    from prefsift.synthetic.task import TaskConfig

    task = TaskConfig(n_train=200, n_validation=40, n_test=40, n_eval_prompts=40, n_sft=400)
    out = tmp_path / "my-run"
    run_demo(out, seed=4, config=DemoConfig(task=task, seeds=2, start_from="reference", methods=["random", "irm"]),
             log=lambda _: None)
    page = (out / "report.html").read_text()
    assert "<title>prefsift report: my-run</title>" in page and "<h1>prefsift report: my-run</h1>" in page
    assert "staging" not in page and "staging" not in (out / "report.md").read_text()
    assert (out / "results.md").read_text().startswith("# prefsift results: my-run\n\n## Verdict\n\n")
    assert page.index("class='verdict'") < page.index("<h2>Methods</h2>")
    # the score plot's irm panel: the pairs irm @ 0.1 trained on, as the run wrote them
    summary = json.loads((out / "results.json").read_text())["summary"]
    _, panels = score_panels(out, summary, "0.1")
    irm = next(p for p in panels if p.method == "irm")
    scores = pq.read_table(out / "seed-4" / "scores" / "scores.parquet").to_pydict()
    trained = set(pq.read_table(out / "seed-4" / "selected" / "irm-0.1" / "selected.parquet")["pair_id"].to_pylist())
    expected = sorted(v for i, v in zip(scores["pair_id"], scores["irm"], strict=True) if i in trained)
    assert irm.budget == "0.1" and len(expected) == 20 and sorted(irm.kept) == pytest.approx(expected)


def test_the_verdict_decides_on_nominal_compute_where_the_run_recorded_it():
    """Measured seconds swing with a shared machine's load: a row measured at 1.05× full on a busy rerun, 0.5× in
    nominal pair passes, is the same verdict as on a quiet one (same seed, same verdict)."""
    quiet = [full(pair_pass_ratio=1.0), row("random", vs_full=-0.08, ratio=0.1, pair_pass_ratio=0.1),
             row("m1", vs_random=0.09, vs_full=0.01, ratio=0.45, pair_pass_ratio=0.5)]
    busy = [dict(r) for r in quiet]
    busy[2]["compute_ratio"] = 1.05
    assert decide(quiet).kind == decide(busy).kind == "subset"
    assert decide(busy).row["method"] == "m1"


def test_summarize_gives_the_nominal_ratio_beside_the_measured_one():
    from prefsift.stats import summarize

    records = [{"seed": s, "start_from": "reference", "method": m, "budget": b, "fraction": f, "n_pairs": n,
                "compute": c, "pair_passes": p}
               for s in (0, 1) for m, b, f, n, c, p in (("full", "full", 1.0, 100, 10.0 + s, 400.0),
                                                         ("random", "0.1", 0.1, 10, 3.0 * (s + 1), 100.0))]
    (row_random,) = [r for r in summarize(records) if r["method"] == "random"]
    assert row_random["pair_pass_ratio"] == 0.25  # 100 / 400 for both seeds, whatever the seconds did
    assert row_random["compute_ratio"] == round((3.0 / 10.0 + 6.0 / 11.0) / 2, 3)
