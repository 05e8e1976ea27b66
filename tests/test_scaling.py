"""The plateau fit and the planner against known curves."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

import prefsift.scaling
from prefsift.errors import PrefsiftError
from prefsift.scaling import (
    fit_plateau,
    plan_share,
    plateau,
    read_points,
    share_for,
    summary_markdown,
    write_scaling_report,
)

TRUE = {"r": 0.82, "a": 0.50, "b": 6.0}
SHARES = np.repeat([0.0, 0.1, 0.25, 0.5, 0.75, 1.0], 3)  # the paper's protocol, 3 seeds


def noisy_points(seed: int, sigma: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return SHARES, plateau(SHARES, **TRUE) + rng.normal(0, sigma, len(SHARES))


def test_the_fit_recovers_known_parameters_from_noisy_points():
    x, y = noisy_points(0)
    fit = fit_plateau(x, y, level=0.997)  # ± 3 standard errors: one draw, so not the nominal 95%
    for name, value in TRUE.items():
        low, high = fit.intervals[name]
        assert low <= value <= high, (name, value, fit.intervals[name])
    assert fit.r2 > 0.95


@pytest.mark.parametrize("interval,runs,boot", [("covariance", 200, 0), ("bootstrap", 20, 100)])
def test_intervals_cover_the_truth_about_as_often_as_they_claim(interval, runs, boot):
    hits = {k: 0 for k in TRUE}
    for seed in range(runs):
        x, y = noisy_points(seed + 1)
        fit = fit_plateau(x, y, interval=interval, n_boot=boot or 1000, seed=seed)
        for k, v in TRUE.items():
            hits[k] += fit.intervals[k][0] <= v <= fit.intervals[k][1]
    for k in TRUE:  # nominal 95%; a binomial of `runs` draws and the bootstrap's known undercoverage at n = 18
        assert hits[k] / runs >= (0.89 if interval == "covariance" else 0.75), (k, hits[k] / runs)


def test_noiseless_points_give_the_exact_curve_and_r2_one():
    fit = fit_plateau(SHARES, plateau(SHARES, **TRUE))
    for k, v in TRUE.items():
        assert fit.params[k] == pytest.approx(v, rel=1e-6)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)


def test_the_planner_share_on_a_known_curve():
    fit = fit_plateau(SHARES, plateau(SHARES, **TRUE))
    plan = plan_share(fit, part=0.95, full_cost=10.0)
    expected = math.log(20) / TRUE["b"]  # −ln(1 − 0.95)/b
    assert plan.share == pytest.approx(expected, rel=1e-6)
    # by definition of x*: the curve there has gained 95% of r − a
    gained = (plateau(expected, **TRUE) - TRUE["a"]) / (TRUE["r"] - TRUE["a"])
    assert gained == pytest.approx(0.95, abs=1e-9)
    assert plan.saved == pytest.approx(1 - expected)
    assert plan.saved_cost == pytest.approx(10 * (1 - expected))
    assert plan.reached_within_data and not plan.extrapolated
    # the paper's HH rate, 0.3 per percent = 30 per unit share: 95% of the gain at 10% of the data
    assert share_for(0.95, 30.0) == pytest.approx(0.09986, abs=1e-4)


def test_a_slow_curve_is_not_reached_within_the_data():
    slow = {"r": 0.9, "a": 0.4, "b": 1.2}
    x = SHARES
    fit = fit_plateau(x, plateau(x, **slow))
    plan = plan_share(fit, 0.95)
    assert plan.share > 1 and not plan.reached_within_data and plan.saved == 0


def test_csv_in_percent_and_the_report(tmp_path):
    x, y = noisy_points(3)
    path = tmp_path / "points.csv"
    path.write_text("percent,score\n" + "".join(f"{100 * s:g},{v}\n" for s, v in zip(x, y, strict=True)))
    points = read_points(path)
    np.testing.assert_allclose(points.share, x)
    fit = fit_plateau(points.share, points.score)
    files = write_scaling_report(fit, plan_share(fit), tmp_path / "out")
    record = json.loads(files["json"].read_text())
    assert record["plan"]["share"] == pytest.approx(math.log(20) / fit.params["b"])
    assert files["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "of the plateau gain is reached" in files["markdown"].read_text()


def test_failed_bootstrap_refits_are_counted_and_printed(monkeypatch):
    x, y = noisy_points(4)
    real, calls = prefsift.scaling._curve_fit, {"n": 0}

    def every_fifth_refit_fails(xs, ys, p0=None):
        if p0 is not None:  # a refit (the first fit has no start)
            calls["n"] += 1
            if calls["n"] % 5 == 0:
                raise RuntimeError("Optimal parameters not found: maxfev reached")
        return real(xs, ys, p0)

    monkeypatch.setattr(prefsift.scaling, "_curve_fit", every_fifth_refit_fails)
    fit = fit_plateau(x, y, interval="bootstrap", n_boot=50, seed=0)
    assert (fit.n_boot, fit.failed_refits, len(fit.boot_b)) == (50, 10, 40)
    text = summary_markdown(fit, plan_share(fit))
    assert "bootstrap (50 refits, 10 failed to converge and are left out of the percentiles)" in text
    monkeypatch.setattr(prefsift.scaling, "_curve_fit", lambda xs, ys, p0=None: (
        real(xs, ys) if p0 is None else (_ for _ in ()).throw(RuntimeError("no"))))
    with pytest.raises(PrefsiftError, match="50 of 50 refits"):
        fit_plateau(x, y, interval="bootstrap", n_boot=50)
    monkeypatch.undo()
    clean = fit_plateau(x, y, interval="bootstrap", n_boot=30, seed=0)
    assert clean.failed_refits == 0 and "none failed to converge" in summary_markdown(clean, plan_share(clean))
    assert fit_plateau(x, y).n_boot == 0  # covariance intervals: no refits


def test_the_plan_prints_its_interval_and_says_when_it_is_uninformative():
    fit = fit_plateau(SHARES, plateau(SHARES, **TRUE) + np.random.default_rng(5).normal(0, 0.005, len(SHARES)))
    plan = plan_share(fit)
    text = summary_markdown(fit, plan)
    assert plan.informative and "uninformative" not in text
    assert f"of the data (95% interval {plan.interval[0]:.1%} to {plan.interval[1]:.1%})**" in text
    # a curve the points barely bend: b's interval reaches 0, x*'s runs to infinity
    flat_y = 0.5 + 0.02 * SHARES + np.random.default_rng(6).normal(0, 0.02, len(SHARES))
    flat = fit_plateau(SHARES, flat_y)
    vague = plan_share(flat)
    assert not vague.informative
    text = summary_markdown(flat, vague)
    assert "The plan is uninformative: its interval runs past all of the data" in text
    assert "95% interval" in text.split("**")[1]  # beside the planned share, in the same bold sentence


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(PrefsiftError, match="at least 4 points"):
        fit_plateau([0, 1], [0.1, 0.2])
    bad = tmp_path / "bad.csv"
    bad.write_text("share,value\n0.1,2\n")
    with pytest.raises(PrefsiftError, match="score"):
        read_points(bad)


@pytest.mark.e2e
def test_checkpoints_of_one_run_are_the_shorter_runs(tmp_path, bpe_tokenizer, one_thread):
    """`checkpoint_shares` evaluates the full run on the way: at half its steps, the model is the one a run of half an
    epoch trains (constant learning rate, same seed, same order), evaluated independently here."""
    import copy

    from helpers import make_pairs, saved_tiny_llama, write_jsonl
    from typer.testing import CliRunner

    from prefsift.cli import app
    from prefsift.config import EngineConfig, EvalConfig, RunConfig, TrainConfig
    from prefsift.engine.logps import compute_logps
    from prefsift.evaluate import evaluate
    from prefsift.models import LoadedModel, load_model
    from prefsift.pipeline import make_splits, run_pipeline
    from prefsift.train import train

    model_dir = saved_tiny_llama(tmp_path / "sft", bpe_tokenizer)
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(80, seed=12))
    recipe = TrainConfig(learning_rate=3e-3, batch_size=8, epochs=1.0, lr_scheduler_type="constant",
                         gradient_checkpointing=False)
    engine = EngineConfig(max_length=64)
    config = RunConfig(data=str(data), model=str(model_dir), out=str(tmp_path / "run"), methods=["random"],
                       fractions=[0.5], rule_share=False, start_from="reference", validation_fraction=0.2,
                       test_fraction=0.2, min_test_pairs=0, checkpoint_shares=[0.25, 0.5, 0.75], train=recipe,
                       engine=engine, eval=EvalConfig(eval_prompts=1, max_new_tokens=2))
    records = run_pipeline(config, log=lambda _: None)["records"]
    point = next(r for r in records if r["budget"] == "checkpoint 0.5")
    end = next(r for r in records if r["budget"] == "full")
    assert point["method"] == "full" and point["fraction"] == 0.5 and point["n_pairs"] == end["n_pairs"] // 2 == 24
    # compute_parts are measured seconds now; the nominal pair passes of half the steps are exactly half
    assert point["pair_pass_parts"]["train"] == end["pair_pass_parts"]["train"] / 2

    splits = make_splits(config)
    base = load_model(str(model_dir), dtype="float32")
    ref_train = compute_logps(base.model, base.tokenizer, splits.train.pairs, max_length=64)
    ref_test = compute_logps(base.model, base.tokenizer, splits.test.pairs, max_length=64)
    half = LoadedModel(copy.deepcopy(base.model), base.tokenizer, "half", "")
    train(half, splits.train.pairs, dataclasses.replace(recipe, epochs=0.5, seed=0), engine, ref_logps=ref_train,
          quiet=True)  # 48 pairs, 6 steps an epoch: half an epoch is the first 3 steps of the full run
    alone = evaluate(half, base, test_pairs=splits.test.pairs, config=config.eval, engine=engine,
                     reference_logps=ref_test)
    assert point["pref_outcomes"] == alone["pref_outcomes"]
    assert abs(point["pref_accuracy"] - alone["pref_accuracy"]) < 1e-12
    assert point["pref_outcomes"] != end["pref_outcomes"]  # the end of the run is another model

    # `prefsift scale --results` fits the checkpoints and the end of the run: 4 points of one training run
    result = CliRunner().invoke(app, ["scale", "--results", str(tmp_path / "run"), "--metric", "pref_accuracy",
                                      "--out", str(tmp_path / "scale")])
    assert result.exit_code == 0, result.output
    fitted = json.loads((tmp_path / "scale" / "scaling.json").read_text())["points"]
    assert sorted(fitted["share"]) == [0.25, 0.5, 0.75, 1.0]
    assert fitted["score"][fitted["share"].index(0.5)] == point["pref_accuracy"]


def test_scale_writes_whole_or_not_at_all(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import prefsift.scaling
    from prefsift.cli import app

    x, y = noisy_points(3)
    csv = tmp_path / "points.csv"
    csv.write_text("share,score\n" + "".join(f"{a},{b}\n" for a, b in zip(x, y, strict=True)))
    out = tmp_path / "scale"
    assert CliRunner().invoke(app, ["scale", "--points", str(csv), "--out", str(out)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"scaling.json", "scaling.md", "scaling.png", "manifest.json"} <= set(before)

    def full_disk(path, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prefsift.scaling, "summary_markdown", full_disk)  # part-way through the second write
    result = CliRunner().invoke(app, ["scale", "--points", str(csv), "--out", str(out), "--part", "0.9"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier fit, whole
    result = CliRunner().invoke(app, ["scale", "--points", str(csv), "--out", str(csv)])
    assert result.exit_code == 2 and "is a file" in result.output
