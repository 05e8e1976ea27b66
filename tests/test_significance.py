"""Whole tables under the null and with planted effects, at the sizes the demo uses (3 seeds, 500 prompts and 500
test pairs, 8 methods beside random at 2 budgets, win rate and preference accuracy, plus full): through
`summarize` and `claims` as `run`, `compare`, `demo` and `report` build them. Holm keeps the family-wise error
within 5% where uncorrected p-values do not; Benjamini-Hochberg keeps its false discovery rate; a planted better and
a planted worse method are marked so; non-inferiority to full is shown where it holds and not where it does not."""

from __future__ import annotations

import json

import numpy as np

from prefsift.compare import _legend
from prefsift.report import markdown_table, write_results
from prefsift.run_report import write_report
from prefsift.stats import claims, settings_of, summarize

TIES = {"win_outcomes": 0.4, "pref_outcomes": 0.05}  # share of tied items: judged ties are common, zero margins rare


def table_records(rng, *, seeds: int = 3, items: int = 500, methods: int = 8, budgets=("0.1", "0.5"),
                  effects: dict | None = None, seed_sd=(0.005, 0.08)) -> list[dict]:
    """Records of one table: full, random and `methods` methods at each budget, every seed judged on the same items.
    An item's success probability is its difficulty (shared by every row) + the row's seed shift (its sd drawn per
    row, log-uniform over `seed_sd`: from item-dominated to seed-dominated rows, as the demo's contrasts range) +
    the row's own item effect + the method's planted effect (`effects`, by name; none: the null). Ties score ½."""
    effects = effects or {}
    names = ["random", *(f"m{k}" for k in range(methods))]
    rows = [("full", "full"), *((m, b) for b in budgets for m in names)]
    out = {(m, b, s): {"seed": s, "start_from": "reference", "method": m, "budget": b, "n_pairs": 100,
                       "fraction": 1.0 if b == "full" else float(b), "compute": 1.0}
           for m, b in rows for s in range(seeds)}
    for field, tie in TIES.items():
        difficulty = rng.uniform(0.25, 0.75, items)
        for m, b in rows:
            shift = np.clip(rng.normal(0, np.exp(rng.uniform(*np.log(seed_sd))), (seeds, 1)), -0.12, 0.12)
            p = np.clip(difficulty + shift + rng.uniform(-0.1, 0.1, items) + effects.get(m, 0.0), 0, 1)
            outcomes = np.where(rng.random((seeds, items)) < tie, 0.5, (rng.random((seeds, items)) < p) * 1.0)
            for s in range(seeds):
                out[(m, b, s)][field] = outcomes[s]
    return list(out.values())


def as_lists(records: list[dict]) -> list[dict]:
    """The records as a run writes them to results.json: outcomes as lists."""
    return [{**r, **{field: r[field].tolist() for field in TIES}} for r in records]


def test_holm_keeps_the_familywise_error_where_uncorrected_stars_do_not():
    rng = np.random.default_rng(0)
    tables = 150
    any_holm, any_raw, tests = 0, 0, set()
    for _ in range(tables):
        family = claims(summarize(table_records(rng)))
        tests.add((len(family.differences), len(family.noninferiority)))
        any_holm += any(c.verdict in ("better", "worse") for c in family.claims)  # every difference's null is true
        any_raw += any(c.p < 0.05 for c in family.differences)
    # 8 methods × 2 budgets × 2 metrics against random, and those and random's against full, two-sided; and the
    # 36 non-inferiority tests
    assert tests == {(68, 36)}
    margin = 2 * np.sqrt(0.05 * 0.95 / tables)  # Monte Carlo
    assert any_holm / tables <= 0.05 + margin
    assert any_raw / tables >= 0.2  # uncorrected "stars": one table in five or more claims a difference


def test_benjamini_hochberg_keeps_its_false_discovery_rate():
    """Four of the eight methods truly differ from random and full; the share of BH's claims about differences that
    are false stays near or under 5% on average."""
    rng = np.random.default_rng(1)
    tables, proportions, found = 100, [], 0
    effects = {"m0": 0.08, "m1": -0.08, "m2": 0.12, "m3": -0.12}
    for _ in range(tables):
        family = claims(summarize(table_records(rng, effects=effects, seed_sd=(0.005, 0.03))), correction="bh")
        made = [c for c in family.differences if c.verdict]
        false = [c for c in made if c.method not in effects]  # a null method against random or full
        proportions.append(len(false) / max(1, len(made)))
        found += len(made) - len(false)
    assert np.mean(proportions) <= 0.05 + 2 * np.std(proportions) / np.sqrt(tables)
    assert found > 0  # and it finds some of the planted ones


def test_direction_of_a_planted_better_and_a_planted_worse_method():
    """Planted ±0.2 with 5 seeds, so that they clear the 52 tests by a wide margin (with 3 seeds the seeds' part has 2
    degrees of freedom and even the items' cell noise it carries puts effects this size near the bar)."""
    rng = np.random.default_rng(2)
    records = table_records(rng, seeds=5, methods=3, items=2000, effects={"m0": 0.2, "m1": -0.2},
                            seed_sd=(0.002, 0.01))
    summary = summarize(records)
    family = claims(summary)
    verdicts = {(c.method, c.budget, c.metric, c.against): c.verdict for c in family.differences}
    for budget in ("0.1", "0.5"):
        for metric in ("win_rate", "pref_accuracy"):
            assert verdicts[("m0", budget, metric, "random")] == "better"
            assert verdicts[("m1", budget, metric, "random")] == "worse"
            assert verdicts[("m2", budget, metric, "random")] is None
    table = markdown_table(summary)
    line = {(row.split(" | ")[1], row.split(" | ")[2]): row for row in table.splitlines() if row.startswith("| ref")}
    assert "▲" in line[("m0", "0.1")] and "▼" not in line[("m0", "0.1")]
    assert "▼" in line[("m1", "0.5")] and "▲" not in line[("m1", "0.5")]
    assert "▲" not in line[("m2", "0.1")] and "▼" not in line[("m2", "0.1")]
    assert "*" not in table
    assert "Holm's correction (family-wise error ≤ 5%)" in table  # the legend says which correction
    bh = markdown_table(summary, correction="bh", alpha=0.1)
    assert "Benjamini-Hochberg (false discovery rate 10%)" in bh  # and its rate
    legend = _legend(summary, family)
    better = legend[legend.index("Better than random"):legend.index("Worse than random")]
    worse = legend[legend.index("Worse than random"):]
    assert "m0 @ 0.1" in better and "m1" not in better and "m1 @ 0.1" in worse and "Significant" not in legend


def test_non_inferiority_to_full_on_planted_cases():
    """A method as good as full is shown non-inferior; one well below full is not; at the margin itself the false
    non-inferiority claims stay within the level. With 3 seeds a margin of 0.02 is beyond what these tables can show
    (the seeds' part, 2 degrees of freedom, is wider alone), so the planted cases use a margin of 0.1, one budget."""
    rng = np.random.default_rng(3)
    records = table_records(rng, methods=2, budgets=("0.1",), items=2000, effects={"m1": -0.25},
                            seed_sd=(0.002, 0.006))
    summary = summarize(records)
    shown = {(c.method, c.budget, c.metric) for c in claims(summary, margin=0.1).survivors("non-inferior")}
    assert {("m0", "0.1", m) for m in ("win_rate", "pref_accuracy")} <= shown
    assert not any(m == "m1" for m, _, _ in shown)
    table = markdown_table(summary, margin=0.1)
    assert "≥ full − 0.1" in table.splitlines()[0] and "| yes |" in table and "not shown" in table
    assert "≥ full − 0.02" in markdown_table(summary).splitlines()[0]  # the default margin, printed

    false_claims, n = 0, 0
    for _ in range(40):  # at the boundary: every method 0.1 below full
        summary = summarize(table_records(rng, methods=2, effects={"m0": -0.1, "m1": -0.1, "random": -0.1}))
        for c in claims(summary, margin=0.1).noninferiority:
            n += 1
            false_claims += c.verdict is not None
    assert false_claims / n <= 0.05


def test_results_json_records_the_family_and_the_code(tmp_path):
    rng = np.random.default_rng(4)
    records = as_lists(table_records(rng, seeds=5, methods=2, budgets=("0.1",), items=1000, effects={"m0": 0.2}))
    summary = summarize(records)
    write_results(records, summary, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["significance"]["correction"] == "holm" and results["significance"]["alpha"] == 0.05
    assert results["significance"]["margin"] == 0.02 and results["significance"]["tests"] == 16
    assert {(c["method"], c["verdict"]) for c in results["significance"]["survivors"]} >= {("m0", "better")}
    code = results["provenance"]
    assert set(code) == {"prefsift", "commit", "dirty"} and (code["commit"] is None) == (code["dirty"] is None)
    assert "Holm's correction" in (tmp_path / "results.md").read_text()


def test_report_recomputes_an_older_summary_from_the_records(tmp_path):
    """A results.json written before the tests were corrected (uncorrected `_significant` flags, no variance parts):
    `prefsift report` rebuilds the summary from the per-item outcomes and marks what survives."""
    rng = np.random.default_rng(5)
    records = table_records(rng, seeds=5, methods=2, budgets=("0.1",), items=1000, effects={"m0": 0.2})
    old = [{k: v for k, v in row.items() if not k.endswith(("_var_seeds", "_var_items", "_df_seeds", "_df_items",
                                                            "_p", "_p_adjusted", "_verdict", "_noninferior"))}
           | {"win_rate_vs_random_significant": True} for row in summarize(records)]
    (tmp_path / "results.json").write_text(json.dumps({"records": as_lists(records), "summary": old}))
    paths = write_report(tmp_path, tmp_path / "report")
    md = paths["markdown"].read_text()
    m0 = next(line for line in md.splitlines() if line.startswith("| reference | m0 |"))
    assert "▲" in m0 and "*" not in md and "Holm's correction" in md
    assert "Holm&#x27;s correction" in paths["html"].read_text()  # escaped in the page


def test_a_run_configuration_carries_the_family_settings():
    class Configured:
        correction, alpha, noninferiority_margin = "bh", 0.1, 0.05

    assert settings_of(Configured()) == {"correction": "bh", "alpha": 0.1, "margin": 0.05}
    assert settings_of(object()) == {"correction": None, "alpha": None, "margin": None}  # prefsift.stats's defaults
    rng = np.random.default_rng(6)
    summary = summarize(table_records(rng, methods=1, budgets=("0.1",), items=100), **settings_of(Configured()))
    assert "≥ full − 0.05" in markdown_table(summary, **settings_of(Configured())).splitlines()[0]


def test_a_report_marks_the_table_as_the_run_did(tmp_path):
    """A run corrected by Benjamini-Hochberg at 10%: `prefsift report` without flags says what its results.md says,
    and a flag still wins."""
    rng = np.random.default_rng(7)
    records = as_lists(table_records(rng, seeds=5, methods=2, budgets=("0.1",), items=1000, effects={"m0": 0.2}))
    summary = summarize(records)
    write_results(records, summary, tmp_path, correction="bh", alpha=0.1)
    assert "Benjamini-Hochberg (false discovery rate 10%)" in (tmp_path / "results.md").read_text()
    md = write_report(tmp_path, tmp_path / "report")["markdown"].read_text()
    assert "Benjamini-Hochberg (false discovery rate 10%)" in md and "Holm" not in md
    md = write_report(tmp_path, tmp_path / "holm", correction="holm")["markdown"].read_text()
    assert "Holm's correction (family-wise error ≤ 10%)" in md
