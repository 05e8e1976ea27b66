"""What a run bought: results.json (DESIGN.md's record per method and fraction), a Markdown table, a plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

RESULT_FIELDS = ("method", "fraction", "n_pairs", "win_rate", "pref_accuracy", "score_seconds", "train_seconds")


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def one_line(record: dict) -> str:
    """`key=value, ...` with floats to three decimals: the CLI's summary of a record."""
    return ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())


def markdown_table(records: list[dict]) -> str:
    extra = [c for c in ("warmup_seconds", "flipped_kept", "near_tie_kept", "wins", "ties", "losses")
             if any(c in r for r in records)]
    header = [*RESULT_FIELDS, *extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in records:
        lines.append("| " + " | ".join(_cell(record.get(c)) for c in header) + " |")
    return "\n".join(lines) + "\n"


def plot_win_rate(records: list[dict], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = [r for r in records if r.get("win_rate") is not None]
    if not usable:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in usable):
        points = sorted((r["n_pairs"], r["win_rate"]) for r in usable if r["method"] == method)
        xs, ys = zip(*points, strict=True)
        style = {"marker": "*", "markersize": 12, "linestyle": "none"} if method == "full" else {"marker": "o"}
        ax.plot(xs, ys, label=method, **style)
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("training pairs used")
    ax.set_ylabel("win rate vs the reference policy")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(records: list[dict], out_dir: Path, title: str = "prefsift results") -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    paths["json"].write_text(json.dumps(records, indent=2) + "\n")
    paths["markdown"].write_text(f"# {title}\n\n" + markdown_table(records))
    plot = plot_win_rate(records, out_dir / "win_rate.png")
    if plot is not None:
        paths["plot"] = plot
    return paths
