"""The data-scaling planner: fit the exponential plateau R(x) = r − (r − a)·exp(−b·x) (Khera et al. 2024) to
(share of the data, score) points, and say how much data reaches a chosen part of the plateau gain.

x is the share of the training data in [0, 1] (a CSV in percent is read as percent / 100, so b here is 100 × the
paper's per-percent b: the paper's HH fit b = 0.3/% is 30 here). a is the score with no alignment data, r the
plateau, b the rate. The share reaching a part q of the gain r − a solves R(x) − a = q(r − a): x* = −ln(1 − q)/b,
independent of a and r; its interval is b's interval mapped through that (monotone) formula, and is printed beside
x* wherever x* is. A plan whose interval runs past all of the data is uninformative (`Plan.informative`) and says so.

    points = read_points("scaling.csv")            # columns share (or percent) and score; one row a run/seed
    fit = fit_plateau(points.share, points.score)  # parameters, intervals (covariance or bootstrap), R²
    plan = plan_share(fit, part=0.95)              # x*, its interval, the training compute it saves
    write_scaling_report(fit, plan, "out/")        # scaling.json, scaling.md, scaling.png
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from prefsift.errors import PrefsiftError

PARAMS = ("r", "a", "b")


def plateau(x: np.ndarray, r: float, a: float, b: float) -> np.ndarray:
    """R(x) = r − (r − a)·exp(−b·x)."""
    return r - (r - a) * np.exp(-b * np.asarray(x, dtype=np.float64))


@dataclass
class Points:
    share: np.ndarray
    score: np.ndarray
    source: str = ""


def read_points(path: str | Path, *, share_column: str | None = None, score_column: str = "score") -> Points:
    """(share, score) points from a CSV with a header. The share column is `share` (fractions in [0, 1]) or
    `percent` (0-100), or `share_column`; values above 1 in a `share` column are read as percent too."""
    path = Path(path)
    if not path.is_file():
        raise PrefsiftError(f"scaling points file not found: {path}")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise PrefsiftError(f"{path}: no rows (expected a header such as 'share,score')")
    columns = list(rows[0])
    name = share_column or next((c for c in ("share", "fraction", "percent") if c in columns), None)
    if name is None or name not in columns or score_column not in columns:
        raise PrefsiftError(f"{path}: needs a share (or percent) column and a '{score_column}' column "
                            f"(columns: {', '.join(columns)})")
    try:
        share = np.array([float(r[name]) for r in rows])
        score = np.array([float(r[score_column]) for r in rows])
    except (TypeError, ValueError):
        raise PrefsiftError(f"{path}: '{name}' and '{score_column}' must be numbers") from None
    if name == "percent" or share.max() > 1:
        share = share / 100
    if not (np.isfinite(share).all() and np.isfinite(score).all()) or share.min() < 0 or share.max() > 1:
        raise PrefsiftError(f"{path}: shares must lie in [0, 1] (or 0-100 percent) and scores be finite")
    return Points(share, score, str(path))


@dataclass
class PlateauFit:
    params: dict[str, float]  # r, a, b
    intervals: dict[str, tuple[float, float]]  # each parameter's interval at `level`
    stderr: dict[str, float]
    r2: float
    level: float
    method: str  # "covariance" (t intervals from curve_fit's covariance) or "bootstrap" (percentile, residuals)
    share: np.ndarray = field(repr=False)
    score: np.ndarray = field(repr=False)
    boot_b: np.ndarray | None = field(default=None, repr=False)
    n_boot: int = 0  # bootstrap refits attempted (0 for covariance intervals)
    failed_refits: int = 0  # of those, the ones the optimizer could not fit: left out of the percentiles, counted

    def predict(self, x) -> np.ndarray:
        return plateau(x, **self.params)


def _curve_fit(x: np.ndarray, y: np.ndarray, p0: tuple[float, float, float] | None = None):
    from scipy.optimize import curve_fit

    if p0 is None:
        low, high = y[x == x.min()].mean(), y[x == x.max()].mean()
        p0 = (high, low, 3.0 / max(float(np.ptp(x)), 1e-9))  # most of the gain within the measured range
    return curve_fit(plateau, x, y, p0=p0, bounds=([-np.inf, -np.inf, 0.0], [np.inf, np.inf, np.inf]),
                     maxfev=20000)


def fit_plateau(share, score, *, level: float = 0.95, interval: str = "covariance", n_boot: int = 1000,
                seed: int = 0) -> PlateauFit:
    """Least-squares fit of R(x) to the points, intervals on r, a, b at `level`, and R².

    interval="covariance": estimate ± t(n − 3) × standard error from curve_fit's covariance (fast; good when the
    points pin b down). interval="bootstrap": percentile intervals over `n_boot` refits to the fitted curve plus
    resampled residuals (better when b is poorly determined and its error is lopsided)."""
    from scipy.stats import t as student_t

    x, y = np.asarray(share, dtype=np.float64), np.asarray(score, dtype=np.float64)
    if len(x) != len(y) or len(x) < 4 or len(np.unique(x)) < 3:
        raise PrefsiftError(f"the plateau fit needs at least 4 points at 3 or more distinct shares (got {len(x)} "
                            f"at {len(np.unique(x))})")
    if interval not in ("covariance", "bootstrap"):
        raise PrefsiftError(f"interval must be covariance or bootstrap (got {interval!r})")
    try:
        estimate, covariance = _curve_fit(x, y)
    except RuntimeError as error:
        raise PrefsiftError(f"the plateau fit did not converge: {str(error).splitlines()[0]}") from None
    residuals = y - plateau(x, *estimate)
    total = ((y - y.mean()) ** 2).sum()
    r2 = float(1 - (residuals ** 2).sum() / total) if total > 0 else float("nan")
    stderr = np.sqrt(np.clip(np.diag(covariance), 0, None))
    params = dict(zip(PARAMS, map(float, estimate), strict=True))
    boot_b, n_tried, failed = None, 0, 0
    if interval == "covariance":
        q = student_t.ppf(0.5 + level / 2, len(x) - 3)
        intervals = {k: (float(v - q * s), float(v + q * s)) for k, v, s in zip(PARAMS, estimate, stderr, strict=True)}
    else:
        rng = np.random.default_rng(seed)
        fitted = plateau(x, *estimate)
        residuals = residuals * math.sqrt(len(x) / (len(x) - 3))  # fitted residuals are too small by that factor
        draws = []
        for _ in range(n_boot):
            try:
                draws.append(_curve_fit(x, fitted + rng.choice(residuals, len(x)), tuple(estimate))[0])
            except RuntimeError:
                continue  # a resample the optimizer cannot fit is left out of the percentiles, and counted
        n_tried, failed = n_boot, n_boot - len(draws)
        if len(draws) < 2:
            raise PrefsiftError(f"the plateau fit's bootstrap failed: {failed} of {n_boot} refits did not converge")
        boot = np.array(draws)
        lo, hi = np.quantile(boot, [0.5 - level / 2, 0.5 + level / 2], axis=0)
        intervals = {k: (float(lo[i]), float(hi[i])) for i, k in enumerate(PARAMS)}
        stderr = boot.std(0, ddof=1)
        boot_b = boot[:, 2]
    return PlateauFit(params, intervals, dict(zip(PARAMS, map(float, stderr), strict=True)), r2, level, interval,
                      x, y, boot_b, n_tried, failed)


@dataclass
class Plan:
    part: float  # the part q of the plateau gain r − a to reach
    share: float  # x* = −ln(1 − q)/b
    interval: tuple[float, float]  # x* over b's interval
    saved: float  # share of the full run's training compute not spent: 1 − min(x*, 1)
    reached_within_data: bool  # x* ≤ 1: the measured data reach that part of the gain
    extrapolated: bool  # x* beyond the largest measured share
    saved_cost: float | None = None  # `full_cost` × saved, in the unit full_cost was given

    @property
    def informative(self) -> bool:
        """Whether the interval of x* says anything: False when it runs past all of the data (up to ∞ when b's
        interval reaches 0), so the fit cannot tell whether any share short of the full data reaches the part."""
        return math.isfinite(self.interval[1]) and self.interval[1] <= 1.0


def share_for(part: float, b: float) -> float:
    """x* = −ln(1 − q)/b: the share where R(x) − a = q(r − a)."""
    if not 0 < part < 1:
        raise PrefsiftError(f"the part of the plateau gain must be in (0, 1) (got {part})")
    return math.inf if b <= 0 else -math.log1p(-part) / b


def plan_share(fit: PlateauFit, part: float = 0.95, full_cost: float | None = None) -> Plan:
    """The smallest share of the data that reaches `part` of the plateau gain, and the training compute it saves
    against training on all of it (compute ∝ data for a fixed number of epochs). `full_cost`: the full run's
    cost (seconds, GPU-hours...) to express the saving in."""
    x_star = share_for(part, fit.params["b"])
    b_low, b_high = fit.intervals["b"]
    interval = (share_for(part, b_high), share_for(part, b_low) if b_low > 0 else math.inf)
    saved = max(0.0, 1.0 - min(x_star, 1.0))
    return Plan(part, x_star, interval, saved, x_star <= 1.0, x_star > float(fit.share.max()),
                None if full_cost is None else full_cost * saved)


def plot_fit(fit: PlateauFit, path: str | Path, plan: Plan | None = None, *, title: str = "Data scaling",
             ylabel: str = "score") -> Path:
    """Points, the fitted curve, the plateau, and x* when a plan is given; a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    grid = np.linspace(0, max(1.0, float(fit.share.max())), 200)
    ax.scatter(fit.share * 100, fit.score, color="black", s=18, label="measured", zorder=3)
    r, a, b = (fit.params[k] for k in PARAMS)
    ax.plot(grid * 100, fit.predict(grid), color="tab:blue",
            label=f"R(x) = {r:.3g} − ({r:.3g} − {a:.3g})·exp(−{b:.3g}·x),  R² = {fit.r2:.3f}")
    ax.axhline(r, color="tab:blue", linestyle=":", linewidth=1, label="plateau r")
    if plan is not None and math.isfinite(plan.share) and plan.share <= grid.max():
        low, high = plan.interval
        ax.axvline(plan.share * 100, color="tab:red", linestyle="--", linewidth=1,
                   label=f"{plan.part:.0%} of the gain at {_pct(plan.share)} of the data ({fit.level:.0%} interval "
                         f"{_pct(low)} to {_pct(high)}" + ("; uninformative)" if not plan.informative else ")"))
        if math.isfinite(low):
            ax.axvspan(low * 100, min(high, float(grid.max())) * 100, color="tab:red", alpha=0.08)
    ax.set_xlabel("share of the training data (%)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    from prefsift.output import temp_sibling

    tmp = temp_sibling(path)  # replaced whole: `report` writes it beside a run's own results
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def scaling_points(records: list[dict], *, method: str = "random", metric: str = "win_rate",
                   start_from: str = "reference") -> tuple[np.ndarray, np.ndarray]:
    """(share, score) points of a run's records, one per seed: the full run's checkpoints and its end when the run
    evaluated them (`checkpoint_shares`, the ISA paper's protocol: one training run), else `method`'s rows at each
    budget and the full data's (separate runs); plus the reference itself at share 0 for a win rate against it
    (½ by definition)."""
    mine = [r for r in records if r["start_from"] == start_from and r.get(metric) is not None]
    by_checkpoints = any(r["budget"].startswith("checkpoint") for r in mine)
    rows = [r for r in mine if r["method"] == "full"] if by_checkpoints else [
        r for r in mine if r["method"] in (method, "full")]
    share = [r["fraction"] for r in rows]
    score = [r[metric] for r in rows]
    if metric == "win_rate" and start_from == "reference":
        share.append(0.0)
        score.append(0.5)
    return np.asarray(share, dtype=float), np.asarray(score, dtype=float)


def _pct(x: float) -> str:
    if not math.isfinite(x):
        return "∞"
    return f"{x:.1%}" if x <= 10 else "> 1000%"  # ten times the data: an extrapolation, its digits mean nothing


def interval_method(fit: PlateauFit) -> str:
    """How the fit's intervals were made, with the bootstrap's failed refits counted: "bootstrap (1000 refits, 3
    failed to converge and are left out of the percentiles)"."""
    if fit.method != "bootstrap":
        return f"{fit.method}"
    failed = ("none failed to converge" if not fit.failed_refits else
              f"{fit.failed_refits} failed to converge and {'is' if fit.failed_refits == 1 else 'are'} left out of "
              "the percentiles")
    return f"bootstrap ({fit.n_boot} refits, {failed})"


def plan_sentences(fit: PlateauFit, plan: Plan, pct=_pct) -> list[str]:
    """The planned share with its interval beside it, what it saves, and what the plan cannot say: uninformative when
    the interval runs past all of the data, an extrapolation beyond the largest measured share."""
    level = f"{fit.level:.0%}"
    lines = [f"**{plan.part:.0%} of the plateau gain is reached at {pct(plan.share)} of the data ({level} interval "
             f"{pct(plan.interval[0])} to {pct(plan.interval[1])})**, saving {plan.saved:.0%} of the full run's "
             "training compute" + (f" ({plan.saved_cost:.4g} in the full run's unit)." if plan.saved_cost is not None
                                   else ".")]
    if not plan.informative:
        lines.append(f"The plan is uninformative: its interval runs past all of the data, so the fit cannot tell "
                     f"whether any share short of the full data reaches {plan.part:.0%} of the gain, nor what it "
                     "saves. More shares, more seeds or larger test sets narrow it.")
    if not plan.reached_within_data:
        lines.append(f"The fit does not reach {plan.part:.0%} of its plateau within the available data.")
    elif plan.extrapolated:
        lines.append(f"x* lies beyond the largest measured share ({fit.share.max():.0%}): an extrapolation.")
    return lines


def summary_markdown(fit: PlateauFit, plan: Plan, *, plot: str | None = None) -> str:
    """A Markdown summary: the parameters with intervals (and the bootstrap's failed refits), R², x* with its
    interval, what it saves, and whether the plan is informative."""
    level = f"{fit.level:.0%}"
    lines = ["## Data scaling", "",
             f"Fit of R(x) = r − (r − a)·exp(−b·x) to {len(fit.share)} points (x: share of the data); "
             f"{level} intervals by {interval_method(fit)}.", "",
             f"| parameter | estimate | {level} interval |", "|---|---|---|"]
    meaning = {"r": "plateau r", "a": "no-data score a", "b": "rate b (per unit share)"}
    for k in PARAMS:
        lo, hi = fit.intervals[k]
        lines.append(f"| {meaning[k]} | {fit.params[k]:.4g} | {lo:.4g} to {hi:.4g} |")
    lines += ["", f"R² = {fit.r2:.3f}.", "", *plan_sentences(fit, plan)]
    if plot:
        lines += ["", f"![scaling curve]({plot})"]
    return "\n".join(lines) + "\n"


def _finite(value):
    """JSON has no infinity: an unreachable share is written as null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_scaling_report(fit: PlateauFit, plan: Plan, out_dir: str | Path) -> dict[str, Path]:
    """scaling.json (fit and plan), scaling.png, scaling.md under `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_fit(fit, out_dir / "scaling.png", plan)
    md = out_dir / "scaling.md"
    md.write_text(summary_markdown(fit, plan, plot=png.name), encoding="utf-8")
    record = {"params": fit.params, "intervals": fit.intervals, "stderr": fit.stderr, "r2": fit.r2,
              "level": fit.level, "method": fit.method, "n_boot": fit.n_boot, "failed_refits": fit.failed_refits,
              "points": {"share": fit.share.tolist(), "score": fit.score.tolist()},
              "plan": _finite({**asdict(plan), "informative": plan.informative})}
    path = out_dir / "scaling.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    return {"json": path, "markdown": md, "plot": png}
