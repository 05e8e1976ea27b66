"""Seeds, intervals, paired differences and the tests behind them: what makes a method comparison a claim rather
than an anecdote.

An evaluation yields one outcome per (seed, item): a win rate's items are prompts (win 1, tie ½, loss 0, judged
against the reference policy's answer), a preference accuracy's are test pairs (1, ½ for a zero margin, 0). Two
methods compared at the same budget share seeds and items, so their difference is taken item by item and seed by
seed (paired), which removes the variance the items and the seeds have in common.

**Two sources of noise, each with its own degrees of freedom.** A mean over a (seeds S, items I) matrix moves with
the training seed (which model a seed produced) and with the items (which prompts were drawn). Its variance is
estimated in two parts (`Estimate`): the seeds' part, the spread of the S seed means (S − 1 degrees of freedom), and
the items' part, the spread of the I item means, each averaged over the seeds (I − 1 degrees of freedom). A seed
mean carries the items' cell noise too, so the two parts overlap by that noise and their sum errs on the wide side;
each part alone is an exact t statistic's denominator. The interval and the test combine them as Banerjee (1960)
does for means whose variances are estimated separately: the half-width is sqrt(t²_{S−1}·v_seeds + t²_{I−1}·v_items)
at the level's t quantiles. Its error rate is at most the nominal one whichever part dominates (the worst cases are
the two extremes, where it is exactly a t test with S − 1 or I − 1 degrees of freedom; tests/test_stats.py checks
the tails numerically). A pooled t or Satterthwaite's degrees of freedom are not: with 3 seeds a seed spread small by
chance buys many degrees of freedom, and their tails reject up to ten times too often at the levels a correction
for 50 comparisons uses. The two-way bootstrap (`bootstrap_interval`) resamples 3 seeds into 10 distinct draws; when
the seeds' part dominates its 95% interval excludes a true difference of 0 about a fifth of the time. With one
seed the seeds' part is not measured: intervals cover the items only.

**A table's claims are a family.** Each difference from random and from the full data is tested two-sided; each
difference from the full data is also tested for non-inferiority (H0: method − full ≤ −margin). `claims` gathers
every such test of a summary's rows (ceiling rows, which select by hidden labels, aside) and corrects them together:
Holm's step-down (family-wise error ≤ alpha, under any dependence between the tests) by default, or
Benjamini-Hochberg (false discovery rate ≤ alpha for independent or positively dependent tests; differences from
one shared random or full row are close to the latter, and tests/test_significance.py measures it on such tables).
A difference that survives is "better" or "worse"; a non-inferiority test that survives makes the method
"non-inferior" to full within the margin. The intervals shown are each comparison's own 95% interval, not corrected.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import stdtrit

CONFIDENCE = 0.95
N_BOOTSTRAP = 4000
CORRECTION = "holm"  # or "bh": what `claims`, the tables and the legends correct with unless told otherwise
ALPHA = 0.05  # Holm's family-wise error rate, or Benjamini-Hochberg's false discovery rate
MARGIN = 0.02  # non-inferiority against the full data: method − full > −MARGIN
CORRECTIONS = {"holm": "Holm", "bh": "Benjamini-Hochberg"}


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def significant(self) -> bool:
        """For a difference: the interval excludes 0 (one comparison alone, uncorrected)."""
        return self.low > 0 or self.high < 0

    def as_dict(self, prefix: str) -> dict[str, float]:
        return {prefix: round(self.mean, 4), f"{prefix}_low": round(self.low, 4), f"{prefix}_high": round(self.high, 4)}


def _as_matrix(outcomes) -> np.ndarray:
    """(seeds, items) float matrix; NaN marks an item a seed did not evaluate."""
    matrix = np.asarray(outcomes, dtype=float)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        raise ValueError(f"outcomes must be (seeds, items) with at least one item, got shape {matrix.shape}")
    return matrix


def _quantile(level: np.ndarray | float, df) -> np.ndarray:
    """The upper `level` quantile of t with `df` degrees of freedom (as the lower one's negative: exact for tiny
    levels); 0 where df is 0 (a part not measured)."""
    df = np.asarray(df, dtype=float)
    return np.where(df > 0, -stdtrit(np.maximum(df, 1), level), 0.0)


def _threshold(alpha, var_seeds, var_items, df_seeds, df_items, sides: int):
    """Banerjee's critical distance at level alpha: sqrt(t²_{df_seeds}·v_seeds + t²_{df_items}·v_items)."""
    level = np.asarray(alpha, dtype=float) / sides
    with np.errstate(over="ignore", invalid="ignore"):  # t's quantile at a tiny level overflows when squared
        seeds = np.where(np.asarray(var_seeds) > 0, _quantile(level, df_seeds) ** 2 * var_seeds, 0.0)
        items = np.where(np.asarray(var_items) > 0, _quantile(level, df_items) ** 2 * var_items, 0.0)
        return np.sqrt(seeds + items)


def p_values(excess, var_seeds, var_items, df_seeds, df_items, *, sides: int = 2) -> np.ndarray:
    """The smallest alpha at which Banerjee's test rejects, for arrays of tests: `excess` is |mean − null| (two-sided,
    sides=2) or mean − null (one-sided, greater, sides=1). Found by bisection on log10(alpha) in [-300, 0], to a
    relative precision of 1e-12; an excess ≤ 0 gives 1, a non-zero excess with no variance at all 0."""
    excess, var_seeds, var_items, df_seeds, df_items = np.broadcast_arrays(
        *(np.asarray(x, dtype=float) for x in (excess, var_seeds, var_items, df_seeds, df_items)))
    low, high = np.full(excess.shape, -300.0), np.zeros(excess.shape)
    for _ in range(48):  # 300 / 2**48: log10(alpha) to 1e-12
        mid = (low + high) / 2
        rejected = excess > _threshold(10.0 ** mid, var_seeds, var_items, df_seeds, df_items, sides)
        high, low = np.where(rejected, mid, high), np.where(rejected, low, mid)
    p = np.where(high <= -300.0, 0.0, 10.0 ** high)
    p = np.where(excess <= 0, 1.0, p)
    return np.where((var_seeds + var_items == 0) & (excess > 0), 0.0, p)


@dataclass(frozen=True)
class Estimate:
    """A mean over a (seeds, items) matrix with the two parts of its variance (see the module docstring).

    var_seeds: the squared standard error of the mean of the seed means (df_seeds = seeds − 1; 0 with one seed);
    var_items: the squared standard error of the mean of the item means (df_items = items − 1)."""

    mean: float
    var_seeds: float
    var_items: float
    df_seeds: int
    df_items: int

    def interval(self, confidence: float = CONFIDENCE) -> Interval:
        half = float(_threshold(1 - confidence, self.var_seeds, self.var_items, self.df_seeds, self.df_items, 2))
        return Interval(self.mean, self.mean - half, self.mean + half)

    def p_value(self, null: float = 0.0, alternative: str = "two-sided") -> float:
        """Banerjee's p-value for mean = null (two-sided) or against mean ≤ null (alternative="greater")."""
        if alternative not in ("two-sided", "greater"):
            raise ValueError(f"alternative must be two-sided or greater, got {alternative!r}")
        sides = 2 if alternative == "two-sided" else 1
        excess = abs(self.mean - null) if sides == 2 else self.mean - null
        return float(p_values(excess, self.var_seeds, self.var_items, self.df_seeds, self.df_items, sides=sides))

    def as_dict(self, prefix: str) -> dict:
        """The stored form: the mean and 95% interval (4 decimals) and the parts (6 significant digits), from which
        `claims` recomputes every p-value."""
        return {**self.interval().as_dict(prefix), f"{prefix}_var_seeds": float(f"{self.var_seeds:.6g}"),
                f"{prefix}_var_items": float(f"{self.var_items:.6g}"), f"{prefix}_df_seeds": self.df_seeds,
                f"{prefix}_df_items": self.df_items}


def estimate(outcomes) -> Estimate:
    """The mean of a (seeds, items) matrix and its two variance parts. Items a seed did not evaluate (NaN) are left
    out for every seed, so each seed mean covers the same items."""
    matrix = _as_matrix(outcomes)
    matrix = matrix[:, ~np.isnan(matrix).any(axis=0)]
    n_seeds, n_items = matrix.shape
    if n_items < 2:
        raise ValueError(f"an interval needs at least 2 items every seed evaluated, got {n_items}")
    mean = float(matrix.mean())
    item_means = matrix.mean(axis=0)
    var_items = float(((item_means - mean) ** 2).sum() / ((n_items - 1) * n_items))
    var_seeds = 0.0
    if n_seeds > 1:
        seed_means = matrix.mean(axis=1)
        var_seeds = float(((seed_means - mean) ** 2).sum() / ((n_seeds - 1) * n_seeds))
    return Estimate(mean, var_seeds, var_items, n_seeds - 1, n_items - 1)


def paired_difference(outcomes, baseline) -> Estimate:
    """`outcomes − baseline`, paired by seed and item: its mean and variance parts (`.interval()`, `.p_value()`)."""
    a, b = _as_matrix(outcomes), _as_matrix(baseline)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes need the same (seeds, items) shape: {a.shape} vs {b.shape}")
    return estimate(a - b)


def bootstrap_interval(outcomes, *, confidence: float = CONFIDENCE, n_bootstrap: int = N_BOOTSTRAP,
                       seed: int = 0) -> Interval:
    """Mean of a (seeds, items) matrix with a two-way percentile-bootstrap interval: each replicate resamples the
    seeds and, once for all of them, the items. Not what the summaries use: with 3 seeds it is too narrow whenever
    the seeds differ (see the module docstring); kept to show that."""
    matrix = _as_matrix(outcomes)
    rng = np.random.default_rng(seed)
    n_seeds, n_items = matrix.shape
    seed_draws = rng.integers(0, n_seeds, size=(n_bootstrap, n_seeds))
    item_draws = rng.integers(0, n_items, size=(n_bootstrap, 1, n_items))  # one item draw for all the seeds
    resampled = matrix[seed_draws[:, :, None], item_draws]  # (B, seeds, items)
    means = np.nanmean(resampled.reshape(n_bootstrap, -1), axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return Interval(float(np.nanmean(matrix)), float(low), float(high))


def adjust(p, correction: str = CORRECTION) -> np.ndarray:
    """Adjusted p-values of a family: Holm's step-down ("holm") or Benjamini-Hochberg's step-up ("bh"); a test
    survives at level alpha when its adjusted p-value is ≤ alpha."""
    p = np.asarray(p, dtype=float)
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    ranked = p[order]
    if correction == "holm":
        adjusted = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * ranked))
    elif correction == "bh":
        adjusted = np.minimum.accumulate(np.minimum(1.0, m * ranked / np.arange(1, m + 1))[::-1])[::-1]
    else:
        raise ValueError(f"correction must be one of {', '.join(CORRECTIONS)}, got {correction!r}")
    out = np.empty(m)
    out[order] = adjusted
    return out


@dataclass(frozen=True)
class Claim:
    """One test of a table's family: a row's difference from random or from full (kind "difference", two-sided) or
    its non-inferiority to full (kind "noninferior", H0: difference ≤ −margin)."""

    row: int  # index into the summary
    start_from: str
    method: str
    budget: str
    metric: str
    against: str  # "random" or "full"
    kind: str  # "difference" or "noninferior"
    difference: float
    p: float
    p_adjusted: float
    verdict: str | None  # "better", "worse", "non-inferior", or None when the test does not survive


@dataclass
class Family:
    """Every claim a table makes, corrected together; `seeds`: the seed counts of its rows."""

    correction: str
    alpha: float
    margin: float
    claims: tuple[Claim, ...]
    seeds: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        self._index = {(c.row, c.metric, c.against, c.kind): c.verdict for c in self.claims}

    def verdict(self, row: int, metric: str, against: str, kind: str = "difference") -> str | None:
        return self._index.get((row, metric, against, kind))

    def tested(self, row: int, metric: str, against: str, kind: str = "difference") -> bool:
        return (row, metric, against, kind) in self._index

    @property
    def differences(self) -> list[Claim]:
        return [c for c in self.claims if c.kind == "difference"]

    @property
    def noninferiority(self) -> list[Claim]:
        return [c for c in self.claims if c.kind == "noninferior"]

    def survivors(self, verdict: str | None = None) -> list[Claim]:
        return [c for c in self.claims if c.verdict is not None and (verdict is None or c.verdict == verdict)]

    def grouped(self) -> list[tuple[str, str, list[Claim]]]:
        """The survivors as a reader lists them: (verdict, against, claims) for better and worse than random, better
        and worse than full, then non-inferior to full; groups without a survivor left out."""
        groups = [(verdict, against, [c for c in self.survivors(verdict) if c.against == against])
                  for against in ("random", "full") for verdict in ("better", "worse")]
        groups.append(("non-inferior", "full", self.survivors("non-inferior")))
        return [g for g in groups if g[2]]

    def rule(self) -> str:
        """How the family is corrected, in words: "Holm's correction (family-wise error ≤ 5%)"."""
        if self.correction == "holm":
            return f"Holm's correction (family-wise error ≤ {self.alpha:.0%})"
        return f"Benjamini-Hochberg (false discovery rate {self.alpha:.0%})"

    def legend(self) -> str:
        """What the marks of a table built on this family mean, how many survive, and what uncorrected p < alpha
        would have marked."""
        n = len(self.claims)
        if not n:
            return "No differences to test: the table has no method rows beside random and full."
        diffs, ni = self.differences, self.noninferiority
        raw = sum(c.p < self.alpha for c in diffs)
        family = (f"the {len(diffs)} two-sided differences from random and from full, every metric of every row "
                  "but the ceilings" + (f", and the {len(ni)} non-inferiority tests" if ni else ""))
        text = f"▲ better, ▼ worse: the difference survives {self.rule()} over the {n} tests of this table: {family}."
        if ni:
            text += (f" ≥ full − {self.margin:g}: yes where a one-sided test, in the same family, shows the method "
                     f"less than {self.margin:g} below full (non-inferiority, margin {self.margin:g}).")
        text += (f" Intervals: each comparison's own {CONFIDENCE:.0%} interval, not corrected, over the training "
                 "seeds and the test items (`prefsift.stats`).")
        if self.seeds == {1}:
            text += " One seed: the intervals and tests cover the test items only, not training noise."
        elif self.seeds and 2 <= min(self.seeds) <= 5:
            k, level = min(self.seeds), self.alpha / n / 2
            text += (f" With {k} seeds the seeds' part of each variance has {k - 1} degree{'s' * (k > 2)} of "
                     f"freedom: to pass the first step ({self.alpha:g}/{n}) a difference that part dominates must be "
                     f"{float(_quantile(level, k - 1)):.0f} times its standard error ({float(_quantile(level, 9)):.1f} "
                     "times with 10 seeds); more seeds, not more items, narrow it.")
        text += (f" {len(self.survivors())} of {n} survive: ▲ {len(self.survivors('better'))}, "
                 f"▼ {len(self.survivors('worse'))}"
                 + (f", non-inferior {len(self.survivors('non-inferior'))}" if ni else "")
                 + f"; uncorrected, {raw} of the {len(diffs)} differences have p < {self.alpha:g} (about "
                 f"{self.alpha * len(diffs):.1f} would by chance with no difference anywhere).")
        return text

    def as_dict(self) -> dict:
        return {"correction": self.correction, "alpha": self.alpha, "margin": self.margin, "tests": len(self.claims),
                "family": "every difference from random and from full (two-sided) and every non-inferiority test "
                          "against full of the summary's rows, ceiling rows aside",
                "better": len(self.survivors("better")), "worse": len(self.survivors("worse")),
                "non_inferior": len(self.survivors("non-inferior")),
                "survivors": [{k: v for k, v in asdict(c).items() if k != "row"} for c in self.survivors()]}


def _parts(row: dict, name: str) -> tuple | None:
    keys = (name, f"{name}_var_seeds", f"{name}_var_items", f"{name}_df_seeds", f"{name}_df_items")
    return tuple(row[k] for k in keys) if all(row.get(k) is not None for k in keys) else None


def claims(summary: list[dict], *, correction: str | None = None, alpha: float | None = None,
           margin: float | None = None) -> Family:
    """The family of tests a table of `summary` shows, corrected together: for every row that is not a ceiling and
    each metric, its difference from random and from full (two-sided) and its non-inferiority to full at `margin`.
    Rows written without the variance parts (an older prefsift) contribute nothing."""
    correction = CORRECTION if correction is None else correction
    alpha = ALPHA if alpha is None else alpha
    margin = MARGIN if margin is None else margin
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {', '.join(CORRECTIONS)}, got {correction!r}")
    if not 0 < alpha < 1 or margin < 0:
        raise ValueError(f"alpha must lie in (0, 1) and margin be ≥ 0 (got {alpha}, {margin})")
    tests = []  # (row, metric, against, kind, difference, excess, parts, sides)
    for i, row in enumerate(summary):
        if row.get("ceiling"):
            continue
        for metric in METRICS:
            for against in ("random", "full"):
                parts = _parts(row, f"{metric}_vs_{against}")
                if parts is None:
                    continue
                diff, *variance = parts
                tests.append((i, metric, against, "difference", diff, abs(diff), variance, 2))
                if against == "full":
                    tests.append((i, metric, against, "noninferior", diff, diff + margin, variance, 1))
    p = np.ones(len(tests))
    for sides in (1, 2):
        pick = [k for k, t in enumerate(tests) if t[7] == sides]
        if pick:
            parts = np.array([tests[k][6] for k in pick], dtype=float)
            p[pick] = p_values([tests[k][5] for k in pick], *parts.T, sides=sides)
    adjusted = adjust(p, correction)
    out = []
    for t, p_one, p_adj in zip(tests, p, adjusted, strict=True):
        i, metric, against, kind, diff = t[:5]
        verdict = None
        if p_adj <= alpha:
            verdict = "non-inferior" if kind == "noninferior" else "better" if diff > 0 else "worse"
        row = summary[i]
        out.append(Claim(i, row["start_from"], row["method"], row["budget"], metric, against, kind, diff,
                         float(f"{p_one:.4g}"), float(f"{p_adj:.4g}"), verdict))
    return Family(correction, alpha, margin, tuple(out), frozenset(int(r["n_seeds"]) for r in summary
                                                                   if "n_seeds" in r))


def settings_of(config) -> dict:
    """The family's settings a run configuration carries (`correction`, `alpha`, `noninferiority_margin`), each None
    where it carries none (then claims uses CORRECTION, ALPHA, MARGIN): keyword arguments for `summarize`, `claims`,
    `markdown_table` and `write_results`."""
    return {"correction": getattr(config, "correction", None), "alpha": getattr(config, "alpha", None),
            "margin": getattr(config, "noninferiority_margin", None)}


def annotate(summary: list[dict], family: Family) -> list[dict]:
    """The rows with each test's p-value, adjusted p-value and verdict: `<metric>_vs_<against>_p`, `_p_adjusted`,
    `_verdict` ("better", "worse" or None) and `<metric>_vs_full_noninferior` (True when shown at the margin)."""
    rows = [dict(r) for r in summary]
    for c in family.claims:
        name = f"{c.metric}_vs_{c.against}" + ("_noninferior" if c.kind == "noninferior" else "")
        rows[c.row][f"{name}_p"] = c.p
        rows[c.row][f"{name}_p_adjusted"] = c.p_adjusted
        if c.kind == "noninferior":
            rows[c.row][name] = c.verdict is not None
        else:
            rows[c.row][f"{name}_verdict"] = c.verdict
    return rows


METRICS = {"win_rate": "win_outcomes", "pref_accuracy": "pref_outcomes"}


def _outcomes(records: list[dict], field: str) -> np.ndarray | None:
    if not records or any(field not in r for r in records):
        return None
    return np.asarray([r[field] for r in sorted(records, key=lambda r: r["seed"])], dtype=float)


def summarize(records: list[dict], ceilings: set[str] | frozenset = frozenset(), *, correction: str | None = None,
              alpha: float | None = None, margin: float | None = None) -> list[dict]:
    """One row per (start_from, method, budget) over its seeds: each metric's mean and 95% interval, and its paired
    difference from random at the same budget and from the full data (same start, same seeds, same items) with its
    interval and variance parts; then every row's tests corrected together (`claims`, `annotate`). Rows of
    `ceilings` (selection by hidden labels) are marked and left out of the family."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault((record["start_from"], record["method"], record["budget"]), []).append(record)
    rows = []
    for (start, method, budget), group in groups.items():
        row: dict = {"start_from": start, "method": method, "budget": budget, "ceiling": method in ceilings,
                     "n_seeds": len(group), "fraction": round(float(np.mean([r["fraction"] for r in group])), 3),
                     "n_pairs": round(float(np.mean([r["n_pairs"] for r in group])), 1),
                     "compute": float(np.mean([r["compute"] for r in group]))}
        full = groups.get((start, "full", "full"))
        if full:
            by_seed = {r["seed"]: r["compute"] for r in full}
            row["compute_ratio"] = round(float(np.mean([r["compute"] / by_seed[r["seed"]] for r in group])), 3)
            if all("pair_passes" in r for r in group + full):  # nominal, so the same seed gives the same ratio
                passes = {r["seed"]: r["pair_passes"] for r in full}
                row["pair_pass_ratio"] = round(float(np.mean([r["pair_passes"] / passes[r["seed"]]
                                                              for r in group])), 3)
        if all("flipped_kept" in r for r in group):
            row["flipped_kept"] = round(float(np.mean([r["flipped_kept"] for r in group])), 3)
        for metric, field in METRICS.items():
            mine = _outcomes(group, field)
            if mine is None:
                continue
            try:
                row.update(estimate(mine).interval().as_dict(metric))
            except ValueError:  # fewer than 2 items: a mean without an interval
                row[metric] = round(float(np.nanmean(mine)), 4)
                continue
            for other, label in (((start, "random", budget), "random"), ((start, "full", "full"), "full")):
                if other == (start, method, budget):
                    continue
                # paired by seed: a row can lack a seed another has (a training that moved nothing is not a record)
                seeds = {r["seed"] for r in group} & {r["seed"] for r in groups.get(other, [])}
                mine_paired = _outcomes([r for r in group if r["seed"] in seeds], field)
                theirs = _outcomes([r for r in groups.get(other, []) if r["seed"] in seeds], field)
                if mine_paired is None or theirs is None or theirs.shape != mine_paired.shape:
                    continue
                row.update(paired_difference(mine_paired, theirs).as_dict(f"{metric}_vs_{label}"))
                if len(seeds) < len(group):
                    row[f"{metric}_vs_{label}_seeds"] = len(seeds)  # fewer than the row's own
        rows.append(row)
    return annotate(rows, claims(rows, correction=correction, alpha=alpha, margin=margin))
