"""`prefsift report RUN_DIR`: one self-contained HTML page (plots inline) and a Markdown version over a run, demo or
compare directory: the methods table with intervals and its tests corrected together, quality against compute, the
data-scaling curve when the run measured enough budgets, and each method's score distribution with the pairs its
rule keeps marked."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import numpy as np

from prefsift.errors import ConfigError, PrefsiftError
from prefsift.manifest import write_manifest
from prefsift.output import check_output, locked, stage_of, staged, temp_sibling
from prefsift.report import markdown_table
from prefsift.scaling import fit_plateau, plan_share, plot_fit, scaling_points, summary_markdown
from prefsift.stats import METRICS, summarize


def _score_dir(run_dir: Path) -> Path | None:
    """The scores a report draws distributions from: the directory itself, or the first seed's."""
    for candidate in (run_dir, *sorted(run_dir.glob("seed-*/scores"))):
        if (candidate / "scores.parquet").is_file() and (candidate / "manifest.json").is_file():
            return candidate
    return None


def plot_score_distributions(scores_dir: Path, path: Path, fraction: float | None) -> Path | None:
    """A histogram per method's score column with what its rule keeps shaded: its band (its own cut-offs) or, for
    a top/bottom rule, the share `fraction` of the pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq

    manifest = json.loads((scores_dir / "manifest.json").read_text())
    table = pq.read_table(scores_dir / "scores.parquet").to_pydict()
    panels = []
    for name, method in (manifest.get("methods") or {}).items():
        rule = method.get("rule", {})
        for column in rule.get("columns") or [rule.get("column")]:
            if column in table:
                values = np.asarray(table[column], dtype=float)
                values = values[np.isfinite(values)]
                if len(values) and np.ptp(values) > 0:
                    panels.append((name, column, rule, values))
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, (name, column, rule, values) in zip(axes.flat, panels, strict=False):
        ax.hist(values, bins=40, color="0.6")
        kind = rule.get("rule")
        if kind in ("band", "intersection") and rule.get("low") is not None:
            lo, hi = np.quantile(values, [rule["low"], rule["high"]])
            label = f"band {rule['low']:.0%}-{rule['high']:.0%}"
        elif kind in ("top", "bottom") and fraction:
            cut = np.quantile(values, 1 - fraction if kind == "top" else fraction)
            lo, hi = (cut, values.max()) if kind == "top" else (values.min(), cut)
            label = f"{kind} {fraction:.0%}"
        else:
            lo = hi = None
            label = kind or ""
        if lo is not None:
            ax.axvspan(lo, hi, color="tab:blue", alpha=0.2, label=f"kept: {label}")
            ax.legend(fontsize=7)
        ax.set_title(f"{name}: {column}", fontsize=9)
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


def resummarize(records: list[dict], summary: list[dict]) -> list[dict]:
    """The summary recomputed from the records' per-item outcomes with this prefsift's statistics (ceilings as the
    stored summary marks them), so a report over an older run has the same intervals and tests as a new one; the
    stored summary when the records carry no outcomes."""
    if not records or not all(any(f in r for f in METRICS.values()) for r in records):
        return summary
    return summarize(records, ceilings={r["method"] for r in summary if r.get("ceiling")})


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, *, method: str = "random",
                 metric: str | None = None, start_from: str | None = None, correction: str | None = None,
                 alpha: float | None = None, margin: float | None = None) -> dict[str, Path]:
    """report.html (self-contained) and report.md (+ its PNGs) under `out_dir` (default: `run_dir`). The methods
    table corrects its tests together: `correction` ("holm" or "bh"), `alpha` and the non-inferiority `margin`
    default to those the run itself used (its results.json's `significance`), else `prefsift.stats`'s CORRECTION,
    ALPHA and MARGIN: a report says what the run's results.md says unless told otherwise."""
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
    table = markdown_table(summary, correction=correction, alpha=alpha, margin=margin)
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
    scores_dir = _score_dir(run_dir)
    fractions = [r["fraction"] for r in summary if r["method"] not in ("full",)]
    if scores_dir is not None:
        image = plot_score_distributions(scores_dir, out / "report-scores.png", min(fractions) if fractions else None)
        if image is not None:
            sections.append(("Score distributions", f"Scores of {scores_dir.relative_to(run_dir.parent)}; shaded: "
                             "what each method's rule keeps (its band, or its smallest budget).", image))
    title = f"prefsift report: {run_dir.name}"
    md = [f"# {title}", ""]
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
            "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>"]
    for name, text, image in sections:
        md += [f"## {name}", "", text, ""] + ([f"![{name}]({image.name})", ""] if image else [])
        page.append(f"<h2>{html.escape(name)}</h2>")
        for block in text.split("\n\n"):
            if block.strip().startswith("|"):
                page.append(_html_table(block))
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
