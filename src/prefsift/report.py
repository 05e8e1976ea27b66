"""What a run bought: results.json (one record per method, budget and seed, a summary per method and budget with
intervals and paired differences, the table's tests corrected together, and the commit it ran on), timings.json
(the seconds, which no two machines share), results.md (the verdict, then the table) and a plot of quality against
the compute each row used. `verdict`: the subset a corrected table supports, read from it and nothing else."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from prefsift.stats import CONFIDENCE, Family, claims

TIMING_FIELDS = ("seconds",)

# a row whose training moved nothing (prefsift.errors.TrainingMovedNothing): kept in results.json's `not_trained`
# with this `status` and the error's line as its `note`, never among the records a summary reads
NOT_TRAINED = "not trained"


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.0f}" if value.is_integer() and abs(value) >= 10 else f"{value:.3f}"
    return str(value)


# A stage writes into a staging sibling of its output, `.NAME.staging-PID-HEX` (`prefsift.output.staged`), and swaps
# it in as NAME when done: a report written inside (the demo's) is named for where it will live.
STAGING_NAME = re.compile(r"^\.(?P<name>.+)\.staging-\d+-[0-9a-f]+$")


def run_name(run_dir: str | Path) -> str:
    """A run's own name: its directory's final name (of the absolute path, so `.` names the directory it is),
    or, for a staging directory a stage is still writing, the name the stage will swap it in as."""
    name = Path(os.path.abspath(run_dir)).name
    match = STAGING_NAME.match(name)
    return match["name"] if match else name


def one_line(record: dict) -> str:
    """`key=value, ...` with floats to three decimals: the CLI's summary of a record."""
    return ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                     if not isinstance(v, list | dict))


def not_trained_line(row: dict) -> str:
    """One line for a row that was not trained: which (seed, start, method, budget) and why."""
    return (f"seed {row['seed']}, from {row['start_from']}: {row['method']} @ {row['budget']} ({row['n_pairs']} "
            f"pairs): {row.get('status', NOT_TRAINED)}: {row.get('note', '')}")


def not_trained_markdown(rows: list[dict]) -> str:
    """The results' section on rows left out: one line each, or "" when every row was trained."""
    if not rows:
        return ""
    many = len(rows) != 1
    return (f"{len(rows)} row{'s' if many else ''} whose training moved nothing {'are' if many else 'is'} left out "
            "of every table, plot and test: no metrics, the start model was not evaluated in "
            f"{'their' if many else 'its'} name:\n\n" + "".join(f"- {not_trained_line(r)}\n" for r in rows))


MARKS = {"better": " ▲", "worse": " ▼"}


def _interval(row: dict, name: str, signed: bool = False, verdict: str | None = None) -> str:
    if name not in row:
        return "–"
    sign = "+" if signed else ""
    if name + "_low" not in row:  # a mean without an interval (fewer than 2 items)
        return f"{row[name]:{sign}.3f}"
    text = f"{row[name]:{sign}.3f} [{row[name + '_low']:{sign}.3f}, {row[name + '_high']:{sign}.3f}]"
    return text + MARKS.get(verdict or "", "")


def markdown_table(summary: list[dict], *, correction: str | None = None, alpha: float | None = None,
                   margin: float | None = None, legend: bool = True) -> str:
    """The summary as a table: mean [95% interval] of each metric; Δ: paired difference from random at the same
    budget, and from the full data; ▲ / ▼ mark a difference that survives the correction (`prefsift.stats.claims`,
    Holm by default) over every test the table shows; `≥ full − margin`: non-inferiority to the full data, in the
    same family. With `legend`, a paragraph under the table says what the marks mean and how many survive."""
    family = claims(summary, correction=correction, alpha=alpha, margin=margin)
    metrics = [m for m in ("win_rate", "pref_accuracy") if any(m in r for r in summary)]
    extra = [c for c in ("flipped_kept", "seconds") if any(c in r for r in summary)]
    versus_full = {m: any(f"{m}_vs_full" in r for r in summary) for m in metrics}
    header = ["start", "method", "budget", "pairs"]
    for metric in metrics:
        header += [metric, "Δ random", "Δ full"] + ([f"≥ full − {family.margin:g}"] if versus_full[metric] else [])
    header += ["compute × full", *extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, row in enumerate(summary):
        name = row["method"] + (" (ceiling)" if row.get("ceiling") else "")
        cells = [row["start_from"], name, row["budget"], f"{row['n_pairs']:.0f}"]  # a mean over seeds
        for metric in metrics:
            cells += [_interval(row, metric),
                      _interval(row, f"{metric}_vs_random", True, family.verdict(i, metric, "random")),
                      _interval(row, f"{metric}_vs_full", True, family.verdict(i, metric, "full"))]
            if versus_full[metric]:
                tested = family.tested(i, metric, "full", "noninferior")
                shown = family.verdict(i, metric, "full", "noninferior")
                cells.append(("yes" if shown else "not shown") if tested else "–")
        cells += [_cell(row.get("compute_ratio")), *(_cell(row.get(c)) for c in extra)]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    return table + ("\n" + family.legend() + "\n" if legend else "")


METRIC_WORDS = {"win_rate": ("win rate", "eval prompts"), "pref_accuracy": ("preference accuracy", "test pairs")}


@dataclass(frozen=True)
class Verdict:
    """What a table lets a user do, in a headline and the lines behind it. `kind`: "subset" (train on `row`: better
    than random and non-inferior to full at less compute), "non-inferior" (`row` is non-inferior to full at less
    compute, not shown better than random), "beats-random" (`row` is better than random, nothing cheaper than full
    is shown non-inferior to it), "none" (no subset is supported) or "insufficient" (one seed, or no tests)."""

    kind: str
    headline: str
    details: tuple[str, ...]
    row: dict | None = None

    def markdown(self) -> str:
        return f"{self.headline}\n\n" + "".join(f"- {line}\n" for line in self.details)


def _signed(row: dict, name: str) -> str:
    if name + "_low" not in row:
        return f"{row[name]:+.3f}" if name in row else "–"
    return f"{row[name]:+.3f} [{row[name + '_low']:+.3f}, {row[name + '_high']:+.3f}]"


def _ratio(row: dict) -> float:
    """The row's compute against full's, as the verdict decides on it: the nominal pair passes' ratio where the run
    recorded them (measured seconds swing with a shared machine's load, and the same seed must give the same
    verdict), else `compute_ratio`; infinite when the run has no full row to divide by."""
    ratio = row.get("pair_pass_ratio", row.get("compute_ratio"))
    return float("inf") if ratio is None else float(ratio)


def _share(row: dict) -> str:
    return "an unknown share of" if row.get("compute_ratio") is None else f"{row['compute_ratio']:.2f}×"


def verdict(summary: list[dict], family: Family, metric: str | None = None) -> Verdict:
    """The subset a corrected table supports, and why: a plain reading of `family` (`prefsift.stats.claims` over
    `summary`), never more. On `metric` (default: the win rate when the table has one, else preference accuracy):

    1. a row better than random at its budget and non-inferior to (or better than) full, at less compute than full
       (`compute_ratio` < 1), the cheapest such: "subset";
    2. else the cheapest row non-inferior to full at less compute (random's own rows included: then a random subset
       of that size suffices): "non-inferior";
    3. else the row furthest above random among those better than it: "beats-random";
    4. else "none". A row worse than random on any metric is never chosen, nor, in 1 and 2, one worse than full
       (beyond the margin) on any metric.

    With one training seed, or no tests at all, the evidence is "insufficient" whatever survives: the intervals
    cover the test items only, not training noise. Every line quotes the intervals and verdicts of the table."""
    if metric is None:
        metric = "win_rate" if any("win_rate" in r for r in summary) else "pref_accuracy"
    words, items = METRIC_WORDS[metric]
    rule = f"{family.rule()} over the table's {len(family.claims)} tests"
    starts = {r["start_from"] for r in summary}

    def label(row: dict) -> str:
        start = f", from the {'warm-up' if row['start_from'] == 'warmup' else row['start_from']} model"
        return f"{row['method']} @ {row['budget']} ({row['n_pairs']:.0f} pairs{start if len(starts) > 1 else ''})"

    tested = [i for i, r in enumerate(summary) if not r.get("ceiling")
              and (family.tested(i, metric, "random") or family.tested(i, metric, "full"))]
    if not tested:
        return Verdict("insufficient", "The evidence is insufficient to choose a subset: the table has no tests "
                       f"on {words} (no random or full row beside the methods, or records without per-item "
                       "outcomes).", ())
    seeds = min(int(summary[i].get("n_seeds", 1)) for i in tested)
    if seeds < 2:
        found = (f" Items alone, {len(family.survivors())} of the {len(family.claims)} tests survive {family.rule()}."
                 if family.claims else "")
        return Verdict("insufficient", "The evidence is insufficient to choose a subset: one training seed, so the "
                       "intervals and tests cover the test items only, not training noise; rerun with seeds: 3 or "
                       "more.", (f"Held-out {words} over {_items(summary, tested[0], metric)} {items}.{found}",))

    def worse(i: int, against: str, metric: str) -> bool:  # worse, and (against full) not even within the margin
        return family.verdict(i, metric, against) == "worse" and not (
            against == "full" and family.verdict(i, metric, "full", "noninferior") == "non-inferior")

    # a row worse than random on any metric is never chosen; one worse than full may still beat random at its budget
    candidates = [i for i in tested if summary[i]["method"] != "full" and not any(worse(i, "random", m)
                                                                                  for m in METRIC_WORDS)]
    better = [i for i in candidates if family.verdict(i, metric, "random") == "better"]
    def reaches_full(i: int) -> bool:  # on the verdict's metric: non-inferior to full, or better than it
        return (family.verdict(i, metric, "full", "noninferior") == "non-inferior"
                or family.verdict(i, metric, "full") == "better")

    matches_full = [i for i in candidates if reaches_full(i) and not any(worse(i, "full", m) for m in METRIC_WORDS)]
    cheaper = [i for i in matches_full if _ratio(summary[i]) < 1.0]

    def cheapest(rows: list[int]) -> int:
        return min(rows, key=lambda i: (_ratio(summary[i]), -summary[i][metric]))

    # what the table says against full when no row qualifies, of every row (not only the candidates)
    near_full = [i for i in tested if summary[i]["method"] != "full" and reaches_full(i)]
    if not any(family.verdict(i, metric, "random") == "better" for i in tested):
        none_random = f"none beats random on {words}"
    else:  # only rows that lose to random on another metric
        none_random = f"the rows that beat random on {words} are worse than it on another metric"
    if not any(family.tested(i, metric, "full") for i in tested):
        none_full = "the run trained no full-data row, so nothing is tested against it"
    elif not near_full:
        none_full = f"nothing is non-inferior to the full data (within {family.margin:g})"
    elif not any(_ratio(summary[i]) < 1.0 for i in near_full):
        none_full = f"nothing cheaper than the full data is non-inferior to it (within {family.margin:g})"
    else:
        none_full = (f"the rows non-inferior to the full data (within {family.margin:g}) at less compute are worse "
                     "than random, or than full beyond the margin, on another metric")
    if set(cheaper) & set(better):
        pick = cheapest(sorted(set(cheaper) & set(better)))
        kind = "subset"
        versus = "better than" if family.verdict(pick, metric, "full") == "better" else "non-inferior to"
        headline = (f"Train on {label(summary[pick])}: better than random at the same budget and {versus} the full "
                    f"data on {words}, at {_share(summary[pick])} full training's compute.")
    elif cheaper:
        pick = cheapest(cheaper)
        kind = "non-inferior"
        lead = "" if better else f"{none_random[0].upper()}{none_random[1:]}. "
        what = ("a random subset of that size suffices" if summary[pick]["method"] == "random"
                else "it is not shown better than random at that budget")
        versus = ("better than the full data" if family.verdict(pick, metric, "full") == "better"
                  else f"non-inferior to the full data (within {family.margin:g})")
        headline = (f"{lead}Train on {label(summary[pick])}: {versus} on {words}, at {_share(summary[pick])} its "
                    f"compute; {what}.")
    elif better:
        pick = max(better, key=lambda i: summary[i][f"{metric}_vs_random"])
        kind = "beats-random"
        below = (" and is worse than the full data" if family.verdict(pick, metric, "full") == "worse" else "")
        headline = (f"Train on {label(summary[pick])} rather than random at that budget: it beats random on "
                    f"{words}{below}, at {_share(summary[pick])} full training's compute; {none_full}.")
    else:
        pick = None
        kind = "none"
        headline = (f"The evidence supports no subset: {none_random}, and {none_full}. Keep the "
                    "full data, or add seeds and test pairs to narrow the intervals.")
    details = _evidence(summary, family, pick, metric) if pick is not None else [_resolution(summary, tested, metric)]
    details.append(f"Corrected together: {rule}; {len(family.survivors())} survive.")
    for verdict_name, against, picked in family.grouped():
        names = ", ".join(f"{c.method} @ {c.budget}" + (f" from {c.start_from}" if len(starts) > 1 else "")
                          + (f" ({METRIC_WORDS[c.metric][0]})" if c.metric != metric else "") for c in picked)
        title = ("Non-inferior to full" if verdict_name == "non-inferior"
                 else f"{verdict_name.capitalize()} than {against}")
        details.append(f"{title}: {names}.")
    return Verdict(kind, headline, tuple(details), None if pick is None else summary[pick])


def _items(summary: list[dict], i: int, metric: str) -> str:
    """How many items every seed evaluated, from the row's paired test (its item degrees of freedom + 1)."""
    for against in ("random", "full"):
        df = summary[i].get(f"{metric}_vs_{against}_df_items")
        if df is not None:
            return f"{int(df) + 1}"
    return "?"


def _resolution(summary: list[dict], tested: list[int], metric: str) -> str:
    """How fine the table can see when it supports nothing: seeds, items, and the half-widths of its differences."""
    widths = [(summary[i][f"{metric}_vs_{against}_high"] - summary[i][f"{metric}_vs_{against}_low"]) / 2
              for i in tested for against in ("random", "full") if f"{metric}_vs_{against}_low" in summary[i]]
    seeds = min(int(summary[i].get("n_seeds", 1)) for i in tested)
    span = f"; the differences' {CONFIDENCE:.0%} half-widths run from ±{min(widths):.3f} to ±{max(widths):.3f}"
    return (f"How sure: {seeds} training seeds × {_items(summary, tested[0], metric)} {METRIC_WORDS[metric][1]}"
            + (span if widths else "") + ".")


def _evidence(summary: list[dict], family: Family, i: int, metric: str) -> list[str]:
    """The chosen row's case, one line a comparison: each metric against random and full, its compute, how sure."""
    row = summary[i]
    lines = []
    for m, (words, _) in METRIC_WORDS.items():
        if m not in row:
            continue
        parts = []
        for against in ("random", "full"):
            if f"{m}_vs_{against}" not in row:
                continue
            shown = family.verdict(i, m, against)
            mark = {"better": " ▲ better", "worse": " ▼ worse"}.get(shown or "", " (no difference shown)")
            where = " at the same budget" if against == "random" else ""
            text = f"vs {against}{where} {_signed(row, f'{m}_vs_{against}')}{mark}"
            if against == "full" and family.tested(i, m, "full", "noninferior"):
                inferior = family.verdict(i, m, "full", "noninferior")
                text += (f", non-inferior within {family.margin:g}" if inferior
                         else f", non-inferiority within {family.margin:g} not shown")
            parts.append(text)
        mean = _interval(row, m)
        lines.append(f"{words.capitalize()}: {mean}" + (f"; {'; '.join(parts)}" if parts else "") + ".")
    full = next((r for r in summary if r["method"] == "full" and r["start_from"] == row["start_from"]), None)
    lines.append(f"Compute: {_share(row)} full training's, by the run's own accounting (every part the row used, "
                 "shared ones in full)"
                 + (f": {_cell(row['compute'])} against {_cell(full['compute'])}" if full and "compute" in row else "")
                 + ".")
    lines.append(f"How sure: {int(row.get('n_seeds', 1))} training seeds × {_items(summary, i, metric)} "
                 f"{METRIC_WORDS[metric][1]}; each interval is the comparison's own {CONFIDENCE:.0%} interval over "
                 "seeds and items, the ▲/▼ and non-inferiority verdicts those of the corrected family.")
    return lines


def plot_quality_against_compute(summary: list[dict], path: Path, metric: str | None = None) -> Path | None:
    """Each (start, method, budget): its metric's mean with the 95% interval as a bar, against the compute it used
    (measured seconds, all of it: reference passes, warm-up, validation model, scoring, training)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if metric is None:  # the win rate when a judge gave one, else preference accuracy (no judge needed)
        metric = "win_rate" if any("win_rate" in r for r in summary) else "pref_accuracy"
    rows = [r for r in summary if metric in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r["method"] for r in rows))}
    for row in rows:
        label = row["method"] + (" (ceiling)" if row.get("ceiling") else "")
        marker = "o" if row["start_from"] == "warmup" else "s"
        ax.errorbar(row["compute"], row[metric], yerr=[[row[metric] - row[metric + "_low"]],
                                                         [row[metric + "_high"] - row[metric]]],
                    fmt=marker, color=colors[row["method"]], capsize=3,
                    label=label if row is next(r for r in rows if r["method"] == row["method"]) else None)
    if metric == "win_rate":
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xscale("log")
    ax.set_xlabel("compute used (measured s: warm-up + validation model + scoring + training)")
    ax.set_ylabel(f"{metric.replace('_', ' ')} (95% interval)")
    ax.set_title("o: continues from the warm-up model   □: trains from the reference", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def provenance() -> dict:
    """The code a result came from: prefsift's version, the git commit of its source tree when it runs from a
    checkout, and whether that tree had uncommitted changes to tracked files (`dirty`); commit and dirty are None
    outside a checkout (an installed wheel)."""
    import subprocess

    import prefsift

    source = Path(prefsift.__file__).resolve().parent
    record: dict = {"prefsift": prefsift.__version__, "commit": None, "dirty": None}
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=source, timeout=30).stdout.strip()
        changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, check=True, cwd=source, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return record
    return {**record, "commit": head or None, "dirty": bool(changes)}


def records_table(records: list[dict]) -> str:
    """One line a record (seed, start, method, budget): what each seed's training gave, before any averaging."""
    metrics = [m for m in METRIC_WORDS if any(r.get(m) is not None for r in records)]
    header = ["seed", "start", "method", "budget", "pairs", *metrics, "compute"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(records, key=lambda r: (r["start_from"], r.get("fraction", 1.0), r["method"], r["seed"])):
        cells = [r["seed"], r["start_from"], r["method"], r["budget"], r.get("n_pairs"),
                 *(r.get(m) for m in metrics), r.get("compute")]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(records: list[dict], summary: list[dict], out_dir: Path, title: str | None = None, *,
                  correction: str | None = None, alpha: float | None = None, margin: float | None = None,
                  not_trained: list[dict] | None = None) -> dict[str, Path]:
    """results.json holds only what the same seed reproduces exactly, with the code it ran on (`provenance`) and
    the table's tests corrected together (`significance`: `prefsift.stats.claims` under `correction`, `alpha` and
    `margin`, by default prefsift.stats's); the seconds go to timings.json. `not_trained`: rows whose training
    moved nothing, each marked with its `status` and `note`: under results.json's `not_trained` and one line each in
    results.md, after the verdict."""
    settings = {"correction": correction, "alpha": alpha, "margin": margin}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "timings": out_dir / "timings.json",
             "markdown": out_dir / "results.md"}
    exact = [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]
    results = {"provenance": provenance(), "significance": claims(summary, **settings).as_dict(), "records": exact,
               "summary": summary, **({"not_trained": not_trained} if not_trained else {})}
    paths["json"].write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    keys = ("seed", "start_from", "method", "budget", *TIMING_FIELDS)
    paths["timings"].write_text(json.dumps([{k: r.get(k) for k in keys} for r in records], indent=1) + "\n")
    title = title or f"prefsift results: {run_name(out_dir)}"
    opening = verdict(summary, claims(summary, **settings)).markdown()  # the verdict first, then the table
    skipped = not_trained_markdown(not_trained or [])
    paths["markdown"].write_text(f"# {title}\n\n## Verdict\n\n{opening}\n"
                                 + (f"## Not trained\n\n{skipped}\n" if skipped else "") + "## Methods\n\n"
                                 + markdown_table(summary, **settings))
    plot = plot_quality_against_compute(summary, out_dir / "quality_vs_compute.png")
    if plot is not None:
        paths["plot"] = plot
    if any("win_rate" in r for r in summary):  # preference accuracy against compute as well, judge or not
        accuracy = plot_quality_against_compute(summary, out_dir / "pref_accuracy_vs_compute.png", "pref_accuracy")
        if accuracy is not None:
            paths["pref_accuracy_plot"] = accuracy
    return paths
