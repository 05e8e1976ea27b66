"""`prefsift demo` end to end on a shrunken task: the records and summary DESIGN.md promises, and same seed → the
same results.json, byte for byte."""

from __future__ import annotations

import base64
import json
import re

import pytest
from typer.testing import CliRunner

from prefsift.cli import app
from prefsift.demo import DemoConfig, run_demo
from prefsift.errors import PrefsiftError
from prefsift.synthetic.task import TaskConfig


def small(n_train: int, **kwargs) -> DemoConfig:
    task = TaskConfig(n_train=n_train, n_validation=60, n_test=100, n_eval_prompts=100, n_sft=800)
    return DemoConfig(task=task, **kwargs)


@pytest.mark.e2e
def test_demo_end_to_end(tmp_path):
    # the demo's own task and first seed, continuing from the warm-up only
    results = run_demo(tmp_path, seed=0, config=DemoConfig(seeds=1, start_from="warmup"), log=lambda _: None)
    records, summary = results["records"], results["summary"]
    assert {r["method"] for r in records} == {"full", "random", "irm", "lossdiff", "lossdiff-irm", "oracle",
                                              "validation-only", "random+validation"}  # the baselines beside them
    assert {r["budget"] for r in records} == {"full", "0.1", "lossdiff-irm rule", "validation"}
    at_10 = {r["method"]: r for r in records if r["budget"] == "0.1"}
    for method in ("irm", "lossdiff", "lossdiff-irm"):  # the model sees the flipped labels as surprising
        assert at_10[method]["flipped_kept"] < at_10["random"]["flipped_kept"], method
    assert at_10["oracle"]["flipped_kept"] == 0.0
    for record in records:
        assert record["win_rate"] == (record["wins"] + 0.5 * record["ties"]) / 500
        assert record["win_rate"] == sum(record["win_outcomes"]) / 500
    full = next(r for r in records if r["method"] == "full")
    assert full["n_pairs"] == 2000 and full["flipped_kept"] == 1.0
    rows = {(r["method"], r["budget"]): r for r in summary}
    assert rows[("oracle", "0.1")]["ceiling"] and not rows[("irm", "0.1")]["ceiling"]
    assert rows[("random", "0.1")]["compute_ratio"] < rows[("irm", "0.1")]["compute_ratio"] < 1
    table = (tmp_path / "results.md").read_text()
    assert "oracle (ceiling)" in table and "Δ random" in table
    assert (tmp_path / "quality_vs_compute.png").is_file() and (tmp_path / "sft-model" / "model.safetensors").is_file()


@pytest.mark.e2e
def test_same_seed_same_results_json(tmp_path, monkeypatch):
    import prefsift.report

    # the commit a run records is the tree's: one committed between the two runs (other work goes on in this tree)
    # would differ, which is no difference in the results
    monkeypatch.setattr(prefsift.report, "provenance", lambda: {"prefsift": "x", "commit": "abc1234", "dirty": False})
    config = small(200, seeds=2, start_from="both", methods=["random", "lossdiff-irm", "oracle"])
    first = run_demo(tmp_path / "a", seed=4, config=config, log=lambda _: None)
    run_demo(tmp_path / "b", seed=4, config=config, log=lambda _: None)
    # compute is measured in seconds since the pipeline charges each row what its parts took (issue 23, 4): those
    # columns (compute, compute_parts, compute_cpu..., compute_ratio, seconds) are the only fields two runs of one
    # seed may differ in; everything else, the nominal pair passes included, is equal
    def reproducible(value):
        if isinstance(value, dict):
            return {k: reproducible(v) for k, v in value.items() if not (k.startswith("compute") or k == "seconds")}
        return [reproducible(v) for v in value] if isinstance(value, list) else value

    runs = [json.loads((tmp_path / run / "results.json").read_text()) for run in ("a", "b")]
    assert reproducible(runs[0]) == reproducible(runs[1])
    assert all(r["compute"] > 0 and r["pair_passes"] > 0 for r in runs[0]["records"])
    written = runs[0]
    assert written["provenance"]["commit"] == "abc1234"  # the code it ran on (test_significance: the real one)
    assert written["significance"]["correction"] == "holm" and written["significance"]["tests"] > 0
    assert {r["seed"] for r in first["records"]} == {4, 5} and {r["start_from"] for r in first["records"]} == {
        "warmup", "reference"}
    assert all(row["n_seeds"] == 2 for row in first["summary"])

    # a rerun that fails part-way leaves the earlier demo whole: no mix, no staging left behind
    import prefsift.demo

    before = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prefsift.demo, "run_pipeline", fail)
    with pytest.raises((OSError, PrefsiftError)):
        run_demo(tmp_path / "a", seed=4, config=config, log=lambda _: None)
    after = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    assert after == before and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    monkeypatch.undo()

    # `prefsift report` over the demo directory: one self-contained page and its Markdown version
    result = CliRunner().invoke(app, ["report", str(tmp_path / "a"), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "report" / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3  # quality against compute, the scaling curve, the score distributions
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    for row in first["summary"]:  # every summary row, with its mean, is in the page's table
        assert f"<td>{row['method']}" in page and f"{row['win_rate']:.3f}" in page
    md = (tmp_path / "report" / "report.md").read_text()
    for name in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert (tmp_path / "report" / name).is_file()
    # the reference start's scaling fit: random at 10%, the rule's share and the full data over 2 seeds, plus the
    # reference against itself at share 0
    assert "R² =" in md and "points" in md and "7 points" in page
    assert "Holm's correction" in md and "▲ better, ▼ worse" in md  # the methods table says what its marks mean


def test_demo_all_runs_every_registered_method():
    """`prefsift demo --all` is documented as every method prefsift has: each registered scorer runs under its own
    name or a label of it, ceilings (the oracle) in the default set, aliases named in NOT_IN_ALL only."""
    from prefsift.demo import ALL_METHODS, NOT_IN_ALL
    from prefsift.scorers import SCORERS

    names = {m if isinstance(m, str) else m["name"] for m in ALL_METHODS}
    missing = sorted(set(SCORERS) - names - set(NOT_IN_ALL))
    assert not missing, f"registered but not in ALL_METHODS (add it, or to NOT_IN_ALL if it is an alias): {missing}"
    assert NOT_IN_ALL == ("margin",) and issubclass(SCORERS["reward-margin"], SCORERS["margin"])  # the same score
