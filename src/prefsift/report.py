"""What a run bought: results.json (one record per method, budget and seed, a summary per method and budget with
intervals and paired differences, the table's tests corrected together, and the commit it ran on), timings.json
(the seconds, which no two machines share), a Markdown table and a plot of quality against the compute each row
used."""

from __future__ import annotations

import json
import math
from pathlib import Path

from prefsift.stats import claims

TIMING_FIELDS = ("seconds",)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.0f}" if value.is_integer() and abs(value) >= 10 else f"{value:.3f}"
    return str(value)


def one_line(record: dict) -> str:
    """`key=value, ...` with floats to three decimals: the CLI's summary of a record."""
    return ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                     if not isinstance(v, list | dict))


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


def plot_quality_against_compute(summary: list[dict], path: Path, metric: str | None = None) -> Path | None:
    """Each (start, method, budget): its metric's mean with the 95% interval as a bar, against the compute it used
    (pair passes, all of it: warm-up, validation model, scoring, training)."""
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
    ax.set_xlabel("compute used (pair passes: warm-up + validation model + scoring + training)")
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


def write_results(records: list[dict], summary: list[dict], out_dir: Path, title: str = "prefsift results", *,
                  correction: str | None = None, alpha: float | None = None, margin: float | None = None
                  ) -> dict[str, Path]:
    """results.json holds only what the same seed reproduces exactly, with the code it ran on (`provenance`) and
    the table's tests corrected together (`significance`: `prefsift.stats.claims` under `correction`, `alpha` and
    `margin`, by default prefsift.stats's); the seconds go to timings.json."""
    settings = {"correction": correction, "alpha": alpha, "margin": margin}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "timings": out_dir / "timings.json",
             "markdown": out_dir / "results.md"}
    exact = [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]
    results = {"provenance": provenance(), "significance": claims(summary, **settings).as_dict(), "records": exact,
               "summary": summary}
    paths["json"].write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    keys = ("seed", "start_from", "method", "budget", *TIMING_FIELDS)
    paths["timings"].write_text(json.dumps([{k: r.get(k) for k in keys} for r in records], indent=1) + "\n")
    paths["markdown"].write_text(f"# {title}\n\n" + markdown_table(summary, **settings))
    plot = plot_quality_against_compute(summary, out_dir / "quality_vs_compute.png")
    if plot is not None:
        paths["plot"] = plot
    if any("win_rate" in r for r in summary):  # preference accuracy against compute as well, judge or not
        accuracy = plot_quality_against_compute(summary, out_dir / "pref_accuracy_vs_compute.png", "pref_accuracy")
        if accuracy is not None:
            paths["pref_accuracy_plot"] = accuracy
    return paths
