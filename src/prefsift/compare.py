"""`prefsift compare`: every selection rule prefsift has (or a chosen list) on the user's own model and data, at the
same budgets, through the pipeline and the statistics of `prefsift run` (seeds, 95% intervals, paired differences
from random at the same budget and from the full data, corrected together: `prefsift.stats`), with each method's
measured cost beside its quality.

The published rules disagree on which pairs help (the smallest implicit margins, the largest, the easiest first,
the middle band of influence, an external reward margin, ...); this is where a user finds out which wins on theirs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from prefsift.config import RunConfig
from prefsift.errors import ConfigError
from prefsift.report import markdown_table
from prefsift.scorers import SCORERS, get_scorer, parse_methods
from prefsift.stats import Family, annotate, claims, settings_of

# Roles a run provides whatever the user gives: the SFT model as reference, the warm-up policy and validation model
# it trains, the validation split, and an embedder (the SFT model's last-token state unless one is named).
_RUN_ROLES = {"reference", "policy", "validation", "validation_pairs", "embedder"}


def applicable_methods(reward_model: str | None, columns: list[str]) -> list[str]:
    """Every registered method a run on this data can score, ceilings aside (they select by hidden labels): a
    method needing a reward model only with one, a method reading the data's ratings only when they are there."""
    roles = _RUN_ROLES | ({"reward_model"} if reward_model else set())
    names = []
    for name in sorted(SCORERS):
        scorer = get_scorer(name)
        if scorer.ceiling or not set(scorer.needs) <= roles:
            continue
        if scorer.missing_input(reward_model is not None, columns) is not None:
            continue
        names.append(name)
    return names


def resolve_methods(methods: list[str | dict], reward_model: str | None, columns: list[str]) -> list:
    """`all`, or the user's list with `random` put first (every paired difference is taken against it)."""
    if methods == ["all"]:
        methods = applicable_methods(reward_model, columns)
    methods = list(methods)
    names = [m if isinstance(m, str) else m.get("name") for m in methods]
    if "random" not in names:
        methods.insert(0, "random")
    return methods


def mean_seconds(records: list[dict]) -> dict[tuple, float]:
    """Measured seconds of each (start, method, budget), averaged over seeds: the method's scoring passes, the
    trainings its scores needed, and the subset's training."""
    groups: dict[tuple, list[float]] = {}
    for r in records:
        groups.setdefault((r["start_from"], r["method"], r["budget"]), []).append(r["seconds"])
    return {k: float(np.mean(v)) for k, v in groups.items()}


def compare(config: RunConfig, *, log=print) -> dict:
    """Run every method of `config` through `run_pipeline` and write compare.md: the summary table with a measured
    `seconds` column. Returns {"records", "summary", "markdown"}."""
    from prefsift.pipeline import run_staged

    if len(parse_methods(config.methods)) < 2:
        raise ConfigError("compare needs at least one method besides random")
    if config.seeds < 2:
        log("one seed: intervals cover the test items only, not training noise (--seeds 3 or more to compare)")
    table: dict = {}

    def write_table(out: Path, results: dict) -> None:  # into the run's staging directory, swapped in with it
        seconds = mean_seconds(results["records"])
        rows = [{**row, "seconds": round(seconds[(row["start_from"], row["method"], row["budget"])], 1)}
                for row in results["summary"]]
        settings = settings_of(config)  # the table's tests, corrected together (Holm unless configured else)
        family = claims(rows, **settings)
        rows = annotate(rows, family)
        trained = what_trained(results["records"])
        table.update(rows=rows, markdown=markdown_table(rows, **settings))
        (out / "compare.md").write_text("# prefsift compare\n\n" + table["markdown"] + "\n" + _legend(rows, family)
                                        + "\n" + trained + "\n")
        log(trained)
        (out / "compare.json").write_text(json.dumps(rows, indent=1, allow_nan=False) + "\n")

    results = run_staged(config, log=log, finish=write_table)
    return {**results, "summary": table["rows"], "markdown": table["markdown"]}


def what_trained(records: list[dict]) -> str:
    """What each budget actually trained, from the records (TRL's own count of rows and steps): 'budget 0.5 trained
    24 of 29 usable pairs' (usable: the training split's pairs whose prompt fits max_length), and every training
    that ended before its steps reached all its pairs, or took a single optimizer step, named rather than hidden."""
    by_budget: dict[str, list[dict]] = {}
    for r in records:
        if "trained" in r:  # checkpoint rows are shares of the full run's steps, said by their label
            by_budget.setdefault(r["budget"], []).append(r)
    usable = sorted({r["n_usable"] for r in records if "n_usable" in r})
    lines = ["What each budget trained (training split: "
             + (f"{usable[0]} usable pairs" if len(usable) == 1 else f"{usable} usable pairs") + "):"]
    for budget, group in by_budget.items():
        pairs = sorted({r["n_pairs"] for r in group})
        steps = sorted({r["trained"]["steps"] for r in group})
        counted = f"{pairs[0]}" if len(pairs) == 1 else f"{pairs[0]}-{pairs[-1]}"
        lines.append(f"- budget {budget} trained {counted} of {group[0]['n_usable']} usable pairs "
                     f"({steps[0] if len(steps) == 1 else f'{steps[0]}-{steps[-1]}'} optimizer steps)")
    short = [r for g in by_budget.values() for r in g
             if r["trained"]["rows_seen"] < r["trained"]["rows"] or r["trained"]["steps"] <= 1]
    for r in short:
        t = r["trained"]
        lines.append(f"- SHORT: {r['method']} @ {r['budget']} (seed {r['seed']}, from {r['start_from']}): "
                     f"{t['steps']} optimizer step{'s' if t['steps'] != 1 else ''} reaching {t['rows_seen']} of its "
                     f"{t['rows']} rows: its row says little about the method")
    return "\n".join(lines)


def _named(claims: list) -> str:
    """`method @ budget (start: metric, metric)`, one entry a (start, method, budget)."""
    groups: dict[tuple, list[str]] = {}
    for c in claims:
        groups.setdefault((c.method, c.budget, c.start_from), []).append(c.metric)
    return ", ".join(f"{m} @ {b} ({s}: {', '.join(metrics)})" for (m, b, s), metrics in sorted(groups.items()))


def _legend(rows: list[dict], family: Family | None = None) -> str:
    """What the columns are, then each surviving claim by name: better or worse than random, better or worse than
    full, non-inferior to full; or that none survives the correction."""
    family = family or claims(rows)
    lines = ["Δ random: paired difference from random at the same budget (same seeds, same test items); Δ full: "
             "from the full data. `seconds`: measured, mean over seeds: every part the row used (the reference pass, "
             "the warm-up and validation model its score or start needs, its scoring passes, its own training); "
             "`compute × full`: those seconds against training on all pairs.", ""]
    found = [f"Non-inferior to full (margin {family.margin:g}): {_named(picked)}." if verdict == "non-inferior"
             else f"{verdict.capitalize()} than {against}: {_named(picked)}." for verdict, against, picked
             in family.grouped()]
    rule = f"{family.rule()} over the table's {len(family.claims)} tests"
    if found:
        lines.append(f"Surviving {rule}: " + " ".join(found))
    elif family.claims:
        lines.append(f"No difference survives {rule}: no method here is shown better or worse than random or full.")
    return "\n".join(lines) + "\n"
