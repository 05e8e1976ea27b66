"""`prefsift report RUN_DIR`: one self-contained HTML page (plots inline) and a Markdown version over a run, demo or
compare directory, titled with the run's own name. First the verdict (`prefsift.report.verdict`: which subset to
train on, what it bought against random and full, at what compute, how sure); then the evidence: the methods table
with intervals and its tests corrected together, quality against compute, the data-scaling curve when the run
measured enough budgets, each method's score distribution with the pairs its subset trained on shaded, and each
seed's records."""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prefsift.errors import ConfigError, PrefsiftError
from prefsift.manifest import write_manifest
from prefsift.output import check_output, locked, stage_of, staged, temp_sibling
from prefsift.report import markdown_table, not_trained_markdown, records_table, run_name, verdict
from prefsift.scaling import fit_plateau, plan_share, plot_fit, scaling_points, summary_markdown
from prefsift.stats import METRICS, claims, summarize


def _score_dir(run_dir: Path) -> Path | None:
    """The scores a report draws distributions from: the directory itself, or the first seed's."""
    for candidate in (run_dir, *sorted(run_dir.glob("seed-*/scores"))):
        if (candidate / "scores.parquet").is_file() and (candidate / "manifest.json").is_file():
            return candidate
    return None


def subset_dir_name(method: str, budget: str) -> str:
    """Where a run keeps a row's subset, seed-S/selected/<this>/: `prefsift.pipeline.run.artifact_name`'s rule (the
    pipeline sits above this module; tests/test_report.py keeps the two in step)."""
    return method if method == budget else f"{method}-{budget}".replace(" rule", "-rule").replace(" ", "-")


@dataclass(frozen=True)
class ScorePanel:
    """One histogram of the report: a method's score column over every scored pair (`values`, finite ones) and the
    scores of the pairs its subset at `budget` actually trained on (`kept`; for a method that keeps completions, the
    pairs a kept completion comes from). `budget` is None and `kept` empty when the run kept no subset of it."""

    method: str
    column: str
    budget: str | None
    values: np.ndarray
    kept: np.ndarray


def _budget_of(summary: list[dict], method: str, budget: str | None) -> str | None:
    """`budget` when `method` has a row there, else its smallest budget (full and checkpoints aside)."""
    rows = [r for r in summary if r["method"] == method and r["budget"] != "full"
            and not str(r["budget"]).startswith("checkpoint")]
    if any(r["budget"] == budget for r in rows):
        return budget
    return min(rows, key=lambda r: r.get("fraction", 1.0))["budget"] if rows else None


def score_panels(run_dir: Path, summary: list[dict], budget: str | None = None
                 ) -> tuple[Path, list[ScorePanel]] | None:
    """The data of the score-distribution plot: for each method of the first seed's scores and each column its rule
    reads, every pair's score and those of the pairs its subset trained on at `budget` (default, or where the
    method has none there: its smallest), read from seed-S/selected/<method>-<budget>/selected.parquet: what was
    trained, not the rule's nominal band (a band rule at a budget keeps a band of that width, not its own cut-offs).
    None when the run kept no scores."""
    import pyarrow.parquet as pq

    scores_dir = _score_dir(run_dir)
    if scores_dir is None:
        return None
    manifest = json.loads((scores_dir / "manifest.json").read_text())
    table = pq.read_table(scores_dir / "scores.parquet").to_pydict()
    position = {pair_id: k for k, pair_id in enumerate(table["pair_id"])}
    panels = []
    for name, method in (manifest.get("methods") or {}).items():
        rule = method.get("rule", {})
        shown = _budget_of(summary, name, budget)
        subset = scores_dir.parent / "selected" / subset_dir_name(name, shown or "") / "selected.parquet"
        rows = np.zeros(0, dtype=int)
        if shown is not None and subset.is_file():
            # a completion's id is `<pair_id>:chosen` or `:rejected`: the pair it comes from, once
            ids = {str(i).removesuffix(":chosen").removesuffix(":rejected")
                   for i in pq.read_table(subset, columns=["pair_id"]).column("pair_id").to_pylist()}
            rows = np.array(sorted(position[i] for i in ids if i in position), dtype=int)
        for column in rule.get("columns") or [rule.get("column")]:
            if column not in table:
                continue
            values = np.asarray(table[column], dtype=float)
            kept = values[rows]
            values, kept = values[np.isfinite(values)], kept[np.isfinite(kept)]
            if len(values) and np.ptp(values) > 0:
                panels.append(ScorePanel(name, column, shown if subset.is_file() else None, values, kept))
    return scores_dir, panels


def plot_score_distributions(panels: list[ScorePanel], path: Path) -> Path | None:
    """A histogram per panel: every scored pair in grey, the pairs its subset trained on in blue, on the same bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        bins = np.histogram_bin_edges(panel.values, bins=40)
        ax.hist(panel.values, bins=bins, color="0.75", label=f"all {len(panel.values)} scored")
        if panel.budget is not None:
            ax.hist(panel.kept, bins=bins, color="tab:blue", label=f"trained @ {panel.budget}: {len(panel.kept)}")
        ax.legend(fontsize=7)
        ax.set_title(f"{panel.method}: {panel.column}", fontsize=9)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    tmp = temp_sibling(path)
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def _inline(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _html_table(markdown: str) -> str:
    lines = [line.strip().strip("|").split("|") for line in markdown.strip().splitlines()]
    head, body = lines[0], lines[2:]
    cells = "".join(f"<th>{html.escape(c.strip())}</th>" for c in head)
    out = [f"<table><thead><tr>{cells}</tr></thead><tbody>"]
    for row in body:
        out.append("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in row) + "</tr>")
    return "\n".join(out) + "</tbody></table>"


def summarizable(records: list[dict], log=None) -> list[dict]:
    """The records a summary can pair with the full row: all of them, unless a start's full row was trained under
    some seeds only (its training moved nothing under another: `prefsift.pipeline.run.train_and_evaluate`). Every
    row's compute ratio and difference from full pairs it with full under the same seed, so that full row is left
    out of the summary (its records stay in the results) and `log` says so."""
    seeds: dict[str, set] = {}
    full: dict[str, set] = {}
    for r in records:
        seeds.setdefault(r["start_from"], set()).add(r.get("seed"))
        if r["method"] == "full" and r["budget"] == "full":
            full.setdefault(r["start_from"], set()).add(r.get("seed"))
    partial = {start for start, trained in full.items() if trained != seeds[start]}
    for start in sorted(partial):
        if log is not None:
            log(f"full from {start} was trained under seed{'s' if len(full[start]) != 1 else ''} "
                f"{', '.join(map(str, sorted(full[start])))} only: left out of the summary, which pairs every row "
                "with full under the same seed")
    return [r for r in records if not (r["start_from"] in partial and r["method"] == "full" and r["budget"] == "full")]


def resummarize(records: list[dict], summary: list[dict]) -> list[dict]:
    """The summary recomputed from the records' per-item outcomes with this prefsift's statistics (ceilings as the
    stored summary marks them), so a report over an older run has the same intervals and tests as a new one; the
    stored summary when the records carry no outcomes."""
    if not records or not all(any(f in r for f in METRICS.values()) for r in records):
        return summary
    return summarize(summarizable(records), ceilings={r["method"] for r in summary if r.get("ceiling")})


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, *, method: str = "random",
                 metric: str | None = None, start_from: str | None = None, correction: str | None = None,
                 alpha: float | None = None, margin: float | None = None) -> dict[str, Path]:
    """report.html (self-contained) and report.md (+ its PNGs) under `out_dir` (default: `run_dir`), titled with the
    run's name (`prefsift.report.run_name`: a staging directory's final name) and opening with the verdict on
    `metric`. The verdict and the methods table read one family of tests, corrected together: `correction` ("holm"
    or "bh"), `alpha` and the non-inferiority `margin` default to those the run itself used (its results.json's
    `significance`), else `prefsift.stats`'s CORRECTION, ALPHA and MARGIN: a report says what the run's results.md
    says unless told otherwise."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir
    path = run_dir / "results.json"
    if not path.is_file():
        raise PrefsiftError(f"no results.json in {run_dir}: give a directory written by `prefsift run`, `compare` "
                            "or `demo`")
    try:
        results = json.loads(path.read_text())
        records, summary = results["records"], results["summary"]
    except (ValueError, KeyError, TypeError):
        raise PrefsiftError(f"{path} is not a prefsift results file") from None
    out.mkdir(parents=True, exist_ok=True)
    metric = metric or ("win_rate" if any(r.get("win_rate") is not None for r in records) else "pref_accuracy")
    starts = [r["start_from"] for r in records]
    start_from = start_from or ("reference" if "reference" in starts else (starts[0] if starts else "reference"))
    sections: list[tuple[str, str, Path | None]] = []  # (title, markdown text, image)
    summary = resummarize(records, summary)
    used = results.get("significance") if isinstance(results.get("significance"), dict) else {}
    correction = correction if correction is not None else used.get("correction")
    alpha = alpha if alpha is not None else used.get("alpha")
    margin = margin if margin is not None else used.get("margin")
    settings = {"correction": correction, "alpha": alpha, "margin": margin}
    # the verdict first: a plain reading of the same corrected family the methods table marks
    decision = verdict(summary, claims(summary, **settings), metric)
    table = markdown_table(summary, **settings)
    skipped = not_trained_markdown(results.get("not_trained") or [])
    if skipped:  # rows whose training moved nothing: named, with the reason, before any table leaves them out
        sections.append(("Not trained", skipped.rstrip("\n"), None))
    sections.append(("Methods", "Δ: paired difference from random at the same budget and from the full data (same "
                     "seeds, same test items).\n\n" + table, None))
    plot = run_dir / "quality_vs_compute.png"
    if plot.is_file():
        sections.append(("Quality against compute", "", plot))
    share, score = scaling_points(records, method=method, metric=metric, start_from=start_from)
    try:
        fit = fit_plateau(share, score)
        plan = plan_share(fit)
        image = plot_fit(fit, out / "report-scaling.png", plan, title=f"{method}, {start_from} start",
                         ylabel=metric.replace("_", " "))
        sections.append(("Data scaling", summary_markdown(fit, plan).split("\n", 2)[2], image))
    except PrefsiftError as error:
        sections.append(("Data scaling", f"No fit: {error}. Evaluate the full run at shares of its epoch "
                         "(`checkpoint_shares: [0.1, 0.25, 0.5, 0.75]`), compare at more budgets, or fit measured "
                         "points with `prefsift scale --points`.", None))
    found = score_panels(run_dir, summary, decision.row["budget"] if decision.row else None)
    if found is not None:
        scores_dir, panels = found
        image = plot_score_distributions(panels, out / "report-scores.png")
        if image is not None:
            where = scores_dir.relative_to(run_dir)
            sections.append(("Score distributions", f"Scores of {where} (grey: every scored pair); blue: the pairs "
                             f"each method's subset trained on at the budget its panel names ({where.parent}/"
                             "selected/), not its rule's nominal band.", image))
    sections.append(("Per seed", "Each seed's training, before averaging.\n\n" + records_table(records), None))
    title = f"prefsift report: {run_name(run_dir)}"
    md = [f"# {title}", "", "## Verdict", "", decision.markdown()]
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
            "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}"
            ".verdict{border:2px solid #468;background:#f3f6fa;padding:0.2em 1em;font-size:15px}</style></head>"
            "<body>", f"<h1>{html.escape(title)}</h1>",
            "<section class='verdict'><h2>Verdict</h2>"
            f"<p><strong>{html.escape(decision.headline)}</strong></p><ul>"
            + "".join(f"<li>{html.escape(line)}</li>" for line in decision.details) + "</ul></section>"]
    for name, text, image in sections:
        md += [f"## {name}", "", text, ""] + ([f"![{name}]({image.name})", ""] if image else [])
        page.append(f"<h2>{html.escape(name)}</h2>")
        for block in text.split("\n\n"):
            if block.strip().startswith("|"):
                page.append(_html_table(block))
            elif block.strip().startswith("- "):  # a list, one item a line (the rows not trained)
                page.append("<ul>" + "".join(f"<li>{html.escape(line.strip()[2:])}</li>"
                                             for line in block.strip().splitlines()) + "</ul>")
            elif block.strip():
                page.append(f"<p>{html.escape(block.strip())}</p>")
        if image:
            page.append(_inline(image))
    page.append("</body></html>")
    if plot.is_file() and out != run_dir:
        (out / plot.name).write_bytes(plot.read_bytes())
    paths = {"html": out / "report.html", "markdown": out / "report.md"}
    for path, text in ((paths["html"], "\n".join(page)), (paths["markdown"], "\n".join(md))):
        tmp = temp_sibling(path)  # beside a run's own results: each file replaced whole, never half-written
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return paths


def report_dir(run_dir: str | Path, out: str | Path | None = None, **options) -> dict[str, Path]:
    """`prefsift report`: `write_report(run_dir, directory, **options)` into its place. Beside the results (no
    `out`, or `out` = run_dir): only in a directory prefsift wrote, under its lock (a rerun there replaces the
    directory, report included). Anywhere else `out` is a report directory like any stage's output: checked first
    (never a user's directory or another stage's results), written whole with a manifest."""

    run_dir, out = Path(run_dir), None if out is None else Path(out)

    def write(where: Path) -> dict[str, Path]:
        return write_report(run_dir, where, **options)

    if out is None or out.resolve() == run_dir.resolve():
        if run_dir.is_dir() and stage_of(run_dir) is None and (run_dir / "results.json").is_file():
            raise ConfigError(f"{run_dir} holds no prefsift manifest: the report goes beside the results only in a "
                              f"directory prefsift wrote; give --out")
        with locked(run_dir):
            return write(run_dir)
    check_output(out, "report")
    with locked(out), staged(out, "report") as tmp:
        paths = write(tmp)
        write_manifest(tmp, "report", {"run_dir": str(run_dir), **options})
    return {key: out / Path(path).name for key, path in paths.items()}
