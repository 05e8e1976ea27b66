"""How well the cheap scores track exact influence (`prefsift analyze SCORES_DIR`).

On one score table holding `influence` (the `if` / `tif` scorers) and the proxies `lossdiff` and `irm`: Pearson and
Spearman correlations of each proxy with influence; the overlap coefficient |A∩B| / min(|A|, |B|) of the LossDiff,
IRM and LossDiff-IRM selections with the TIF selection at the same budget; a scatter plot of influence against each
proxy. The TIF paper's numbers (Zhang et al., ICLR 2026) are printed beside ours.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prefsift.errors import PrefsiftError
from prefsift.maths import band_mask
from prefsift.output import temp_sibling
from prefsift.scorers.base import BAND_HIGH, BAND_LOW
from prefsift.select import select_indices

PROXIES = ("lossdiff", "irm")
# Reported by the TIF paper: Pearson r with IF, and the overlap of each selection with the TIF selection.
PAPER: dict[str, dict[str, Any]] = {"pearson": {"lossdiff": 0.77, "irm": 0.67},
                                    "overlap": {"lossdiff": (0.66, 0.70), "irm": (0.60, 0.70),
                                                "lossdiff-irm": (0.73, 0.78)}}


def _finite(*columns: np.ndarray) -> np.ndarray:
    return np.logical_and.reduce([np.isfinite(c) for c in columns])


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, tied values sharing the mean of their ranks (Spearman's convention)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    _, inverse = np.unique(values, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / np.bincount(inverse))[inverse]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = _finite(a, b)
    a, b = a[keep] - a[keep].mean(), b[keep] - b[keep].mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = _finite(a, b)
    return pearson(average_ranks(a[keep]), average_ranks(b[keep]))


def overlap_coefficient(a: Sequence[int], b: Sequence[int]) -> float:
    """|A ∩ B| / min(|A|, |B|)."""
    a, b = set(np.asarray(a).tolist()), set(np.asarray(b).tolist())
    return len(a & b) / min(len(a), len(b)) if a and b else float("nan")


def analyze(scores: Mapping[str, Sequence], *, band_low: float = BAND_LOW, band_high: float = BAND_HIGH,
            fraction: float | None = None) -> dict[str, Any]:
    """Correlations of the proxies present (`lossdiff`, `irm`) with `influence`, and the overlap of their
    selections with the TIF selection at one budget. The budget is `fraction` of the pairs when given; else the
    pairs LossDiff-IRM keeps at the band cut-offs (the paper's headline ~64% at 10-90%) when both proxies are
    there, else the pairs the TIF band keeps. Every selection is a middle band of that size (`select_indices`,
    rule band / intersection), so the overlaps compare which pairs, not how many. Each overlap comes with its
    chance level k/n (unrelated selections of k of n pairs): at the paper's 64% budget chance alone gives 0.64."""
    if "influence" not in scores:
        raise PrefsiftError("no 'influence' column: score with the 'if' or 'tif' method first")
    columns = {name: np.asarray(scores[name], dtype=float) for name in ("influence", *PROXIES) if name in scores}
    ids = list(scores["pair_id"]) if "pair_id" in scores else None
    table: dict[str, Any] = {**columns, **({"pair_id": ids} if ids is not None else {})}
    proxies = [p for p in PROXIES if p in columns]
    n_valid = int(_finite(*columns.values()).sum())
    if fraction is not None:
        budget, how = max(1, round(fraction * n_valid)), f"fraction {fraction:g}"
    elif len(proxies) == 2:
        both = band_mask(columns["lossdiff"], band_low, band_high, ids) & band_mask(columns["irm"], band_low,
                                                                                   band_high, ids)
        budget, how = int(both.sum()), f"LossDiff-IRM at its {band_low:g}-{band_high:g} bands"
    else:
        budget = int(band_mask(columns["influence"], band_low, band_high, ids).sum())
        how = f"TIF at its {band_low:g}-{band_high:g} band"
    tif = select_indices(table, "band", column="influence", count=budget)
    correlations = {p: {"pearson": pearson(columns[p], columns["influence"]),
                        "spearman": spearman(columns[p], columns["influence"]),
                        "paper_pearson": PAPER["pearson"][p]} for p in proxies}
    selections = {p: select_indices(table, "band", column=p, count=budget) for p in proxies}
    if len(proxies) == 2:
        selections["lossdiff-irm"] = select_indices(table, "intersection", columns=list(PROXIES), count=budget)
    # Two selections of k pairs drawn independently share k/n of them on average: the overlap's chance level.
    chance = budget / max(n_valid, 1)
    overlaps = {name: {"overlap": overlap_coefficient(rows, tif), "chance": chance,
                       "paper": list(PAPER["overlap"][name])} for name, rows in selections.items()}
    return {"n_pairs": len(columns["influence"]), "n_valid": n_valid,
            "budget": {"count": budget, "fraction": budget / max(n_valid, 1), "from": how},
            "correlations": correlations, "overlaps": overlaps}


def render_markdown(result: Mapping[str, Any]) -> str:
    """The analysis as two Markdown tables, ours beside the paper's."""
    budget = result["budget"]
    lines = [f"Influence against its proxies: {result['n_valid']} pairs scored by all.", "",
             "| proxy | Pearson r with IF | Spearman ρ with IF | paper's Pearson r |", "|---|---|---|---|"]
    for name, c in result["correlations"].items():
        lines.append(f"| {name} | {c['pearson']:.3f} | {c['spearman']:.3f} | {c['paper_pearson']:.2f} |")
    lines += ["", f"Overlap coefficient with the TIF selection, {budget['count']} pairs each "
                  f"({budget['fraction']:.0%}; budget from {budget['from']}):", "",
              "| selection | overlap with TIF | chance (k/n) | paper |", "|---|---|---|---|"]
    for name, o in result["overlaps"].items():
        lines.append(f"| {name} | {o['overlap']:.3f} | {o['chance']:.3f} | {o['paper'][0]:.2f}-{o['paper'][1]:.2f} |")
    return "\n".join(lines) + "\n"


def write_scatter(scores: Mapping[str, Sequence], path: str | Path) -> Path:
    """A PNG of influence (y) against each proxy present (x), one panel a proxy, Pearson r in each title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    influence = np.asarray(scores["influence"], dtype=float)
    proxies = [p for p in PROXIES if p in scores] or ["influence"]
    figure, axes = plt.subplots(1, len(proxies), figsize=(4.5 * len(proxies), 4), squeeze=False)
    for axis, name in zip(axes[0], proxies, strict=True):
        x = np.asarray(scores[name], dtype=float)
        keep = _finite(x, influence)
        axis.scatter(x[keep], influence[keep], s=6, alpha=0.5)
        axis.set_xlabel(name)
        axis.set_ylabel("influence")
        axis.set_title(f"{name}: r = {pearson(x, influence):.2f} (paper {PAPER['pearson'].get(name, float('nan'))})")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    figure.savefig(tmp, dpi=120, format="png")
    tmp.replace(path)
    plt.close(figure)
    return path


ANALYSIS_FILES = ("analysis.json", "analysis.md", "influence-scatter.png")


def analyze_dir(scores_dir: str | Path, out_dir: str | Path | None = None, *, band_low: float = BAND_LOW,
                band_high: float = BAND_HIGH, fraction: float | None = None) -> dict[str, Any]:
    """`prefsift analyze SCORES_DIR`: read scores.parquet, write analysis.json, analysis.md and
    influence-scatter.png into `out_dir` (default: the score directory); returns the analysis with the paths.

    Into the score directory itself (prefsift's: its manifest says `score`), under its lock, each file replaced
    whole; a new score there removes them with the old scores. Anywhere else, `out_dir` is an analyze output
    directory like any stage's: refused when it holds anything else (`check_output`), written whole with a
    manifest."""
    import pyarrow.parquet as pq

    from prefsift.manifest import check_scores, write_manifest
    from prefsift.output import check_output, locked, stage_of, staged

    scores_dir = Path(scores_dir)
    if not (scores_dir / "scores.parquet").is_file():
        raise PrefsiftError(f"{scores_dir} has no scores.parquet: run `prefsift score` into it first")
    out = Path(out_dir) if out_dir is not None else scores_dir
    beside = _same_directory(out, scores_dir)
    if beside:
        stage = stage_of(scores_dir)
        if stage != "score":
            what = f"the results of `prefsift {stage}`" if stage else "no prefsift score manifest"
            raise PrefsiftError(f"{scores_dir} holds {what}: analyze writes beside the scores only in a score "
                                f"directory; give --out")
    else:
        check_output(out, "analyze")  # before any work: a file, another stage's results, a user's directory
    scores = pq.read_table(scores_dir / "scores.parquet").to_pydict()
    check_scores(scores_dir, scores, ["influence", *PROXIES])  # a null, an inf or an unexplained NaN: one line
    result = analyze(scores, band_low=band_low, band_high=band_high, fraction=fraction)
    markdown = render_markdown(result)
    with locked(out):
        if beside:
            _write_analysis(out, scores, result, markdown)
        else:
            with staged(out, "analyze") as tmp:
                _write_analysis(tmp, scores, result, markdown)
                write_manifest(tmp, "analyze", {"scores": str(scores_dir), "band_low": band_low,
                                                "band_high": band_high, "fraction": fraction})
    return {**result, "markdown": markdown, "files": [str(out / name) for name in ANALYSIS_FILES]}


def _write_analysis(out: Path, scores: Mapping[str, Sequence], result: Mapping[str, Any], markdown: str) -> None:
    for name, text in (("analysis.md", markdown), ("analysis.json", json.dumps(result, indent=1))):
        tmp = temp_sibling(out / name)  # each file replaced whole
        tmp.write_text(text)
        tmp.replace(out / name)
    write_scatter(scores, out / "influence-scatter.png")


def _same_directory(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()

