"""Render the result tables of README.md and of the manual's pages (docs/**/*.md) from the results files committed
under bench/results: no number in them is typed by hand. Each table sits between `<!-- NAME -->` and
`<!-- /NAME -->` markers, NAME one of TABLES; the same block may sit in several files. The `walkthrough` block is
README.md's tested walkthrough, copied into the manual.

    python bench/render_readme.py          # rewrites the stale blocks in place
    python bench/render_readme.py --check  # changes nothing; exits 1 naming each stale file and block

The output is deterministic: the same results files give the same text, byte for byte (the demo's plateau fit
bootstraps with a fixed seed and says how many refits failed). The method tables and the `*-findings` sentences
beside them are rendered from each file's summary as `prefsift.stats.summarize` computes it from the file's records
today (its intervals, and its tests corrected together); a stored summary that differs is rewritten (--check names
it), so a change to the statistics reaches every table, sentence and results file at once.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from prefsift.report import markdown_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def resummarized(path: Path) -> dict:
    """A results file with its summary recomputed from its records' per-item outcomes by this prefsift's statistics
    (ceilings as the stored summary marks them): the tables and sentences are rendered from it, and `main` writes it
    back when the stored summary differs (--check names the file instead)."""
    from prefsift.stats import summarize

    if path not in _summaries:
        record = json.loads(path.read_text())
        ceilings = {r["method"] for r in record["summary"] if r.get("ceiling")}
        _summaries[path] = {**record, "summary": summarize(record["records"], ceilings=ceilings)}
    return _summaries[path]


_summaries: dict[Path, dict] = {}


def code(record: dict) -> str:
    """The commit a result ran on, as bench/demo.py records it (`abc1234`, `+changes` when the tree was dirty)."""
    commit = record.get("commit")
    if not commit:
        return "commit not recorded"
    head, _, dirty = commit.partition("+")
    return f"commit {head}" + (", from a tree with uncommitted changes" if dirty else "")


def demo_table(path: Path) -> str:
    record = resummarized(path)
    m = record["machine"]
    load = f", load average {m['load_average_1min']} when it ended" if "load_average_1min" in m else ""
    head = (f"`{record['command']}` ({code(record)}): {record['wall_seconds'] / 60:.1f} minutes on {m['cores']} "
            f"cores ({m['cpu']}, torch {m['torch']}{load}); from `bench/results/{path.name}`.\n\n")
    task = (record.get("config") or {}).get("task")
    if task:  # the task regime the table ran under (prefsift.synthetic.task.TaskConfig)
        head += (f"Task: {task['label_noise']} label noise at flip_rate {task['flip_rate']:g}, {task['ratings']} "
                 f"ratings, validation shift `{task['validation_shift']}`"
                 + (f" (every validation prompt of family `{task['shift_family']}`)"
                    if task["validation_shift"] == "family" else "") + ".\n\n")
    return head + markdown_table(record["summary"]) + selection_rules(record)


def selection_rules(record: dict) -> str:
    """Which rule produced each method's rows, from the methods the file records: a band rule at a budget keeps the
    centred band of the budget's width (band-at-a-budget), which no paper proposes; said beside the table."""
    from prefsift.scorers import parse_methods

    specs = (record.get("config") or {}).get("methods")
    if not specs:
        return ""
    by_rule: dict[str, list[str]] = {}
    for scorer in parse_methods(specs):
        if not scorer.ceiling and scorer.name != "random":  # random's "top" is of a uniform draw: said below
            by_rule.setdefault(scorer.selection_rule()["rule"], []).append(f"`{scorer.name}`")
    parts = ["`random` a uniform draw"]
    if by_rule.get("band"):
        parts.append(f"{', '.join(by_rule['band'])} keep the centred band of their score as wide as the budget "
                     "(band-at-a-budget: the 45th-55th percentiles at 10%, 50 ± 50·share in general; the papers "
                     "keep a band between fixed cut-offs, never one sized to a budget)")
    if by_rule.get("intersection"):
        parts.append(f"{', '.join(by_rule['intersection'])} the centred intersection of its bands sized to the "
                     "budget the same way (band-at-a-budget), and its own 10-90% cut-offs only at its rule's share")
    for rule, kept in (("top", "the highest"), ("bottom", "the lowest")):
        if by_rule.get(rule):
            parts.append(f"{', '.join(by_rule[rule])} {kept} scores")
    arms = {"validation-only": "`validation-only` the trusted validation pairs alone (its budget: their count)",
            "random+validation": "`random+validation` random's subset plus the validation pairs",
            "random-kto": "`random-kto` random completions trained with KTO (ISA's training, beside it)"}
    present = {r["method"] for r in record["summary"]}
    parts += [text for arm, text in arms.items() if arm in present]
    pooled = {(r["method"], r["n_scored"]) for r in record.get("records", []) if r.get("score_share", 1.0) < 1}
    if pooled:  # RunConfig.score_share: these methods picked from a seeded candidate pool, random from every pair
        n_usable = max(r.get("n_usable", 0) for r in record["records"])
        parts.append(f"{', '.join(sorted(f'`{m}`' for m, _ in pooled))} picked from each seed's random candidate "
                     f"pool of {', '.join(sorted({str(n) for _, n in pooled}))} of the {n_usable} training pairs "
                     f"(`score_share`), its rule's share a share of the pool; `random` and the baselines from every "
                     f"pair")
    return "\nSelection rules of the rows, at every budget: " + "; ".join(parts) + ".\n"


def task_regimes(path: Path) -> str:
    """The synthetic task's noise regimes side by side, generated here from `path` (the task's module) at the demo's
    sizes and seed 0: where the flips fall (oracle margins of flipped and clean pairs) and whether the visible ratings
    can see them (the share of flipped pairs rated the wrong way round)."""
    from statistics import mean

    from prefsift.synthetic.task import TaskConfig, make_task

    lines = ["| label_noise | ratings | flipped | τ | oracle margin, flipped | oracle margin, clean | flipped pairs "
             "rated the wrong way round |", "|---|---|---|---|---|---|---|"]
    for noise, ratings in (("bradley-terry", "label-derived"), ("bradley-terry", "independent"),
                           ("lazy-biased", "independent")):
        task = make_task(TaskConfig(label_noise=noise, ratings=ratings))
        flipped = [r for r in task.train if r["is_flipped"]]
        clean = [r for r in task.train if not r["is_flipped"] and r["oracle_margin"] > 0]
        tau = task.flip_temperatures.get("train")
        wrong = mean(r["score_chosen"] < r["score_rejected"] for r in flipped)
        lines.append(f"| {noise} | {ratings} | {len(flipped) / len(task.train):.1%} | "
                     f"{'–' if tau is None else f'{tau:.3f}'} | {mean(-r['oracle_margin'] for r in flipped):.3f} | "
                     f"{mean(r['oracle_margin'] for r in clean):.3f} | {wrong:.1%} |")
    return (f"Generated from `{path.relative_to(ROOT)}` at the demo's sizes, seed 0 (2,000 training pairs; clean: the "
            "unflipped pairs with a margin):\n\n" + "\n".join(lines) + "\n")


def real_table(path: Path) -> str:
    record = resummarized(path)
    m = record["machine"]
    head = (f"`{record['command']}` ({code(record)}): {record['wall_seconds'] / 60:.1f} minutes on {m['cores']} "
            f"cores ({m['cpu']}); {record['description']}; from `bench/results/{path.name}`.\n\n")
    return head + markdown_table(record["summary"])


def _span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:+.3f}" if round(low, 3) == round(high, 3) else f"{low:+.3f} to {high:+.3f}"


def _verdicts(family) -> str:
    """The surviving claims of a family by verdict, each (start, method, budget) once with its metrics."""
    return "; ".join(f"non-inferior to full within {family.margin:g}: {_claims(picked)}" if verdict == "non-inferior"
                     else f"{verdict} than {against}: {_claims(picked)}"
                     for verdict, against, picked in family.grouped())


def _claims(picked: list) -> str:
    groups: dict[tuple, list[str]] = {}
    for c in picked:
        groups.setdefault((c.method, c.budget, c.start_from), []).append(c.metric.replace("_", " "))
    return ", ".join(f"`{m}` {_budget(b)} from the {_START.get(s, s)} ({' and '.join(metrics)})"
                     for (m, b, s), metrics in sorted(groups.items()))


_START = {"reference": "SFT model", "warmup": "warm-up model"}


def _budget(budget: str) -> str:
    if budget.endswith(" rule"):
        return f"at the {budget[:-5]} rule's share"
    try:
        return f"at {float(budget):.0%}"
    except ValueError:
        return f"at {budget}"


def findings(path: Path) -> str:
    """What the table of a results file shows, in sentences rendered from the file: the claims that survive Holm
    and Benjamini-Hochberg over the table's tests, how many intervals exclude 0 uncorrected, the ceiling's
    differences (outside the family), and the measured shares of flipped pairs and compute beside random's."""
    from prefsift.stats import claims

    record = resummarized(path)
    summary = record["summary"]
    holm, bh = claims(summary, correction="holm"), claims(summary, correction="bh")
    n, diffs = len(holm.claims), holm.differences
    lines = [f"Over the table's {n} tests ({len(diffs)} differences from random and from full, "
             f"{len(holm.noninferiority)} non-inferiority tests at margin {holm.margin:g}), "
             + (f"{holm.rule()} keeps {len(holm.survivors())}: {_verdicts(holm)}." if holm.survivors() else
                f"{holm.rule()} keeps none: no method is shown better or worse than random or the full data, nor "
                f"within {holm.margin:g} of full.")
             + (f" At a {bh.alpha:.0%} false discovery rate (Benjamini-Hochberg, `correction=\"bh\"`) "
                f"{len(bh.survivors())} survive: {_verdicts(bh)}." if bh.survivors() else
                f" Benjamini-Hochberg at a {bh.alpha:.0%} false discovery rate keeps none either.")
             + f" Uncorrected, {sum(c.p < holm.alpha for c in diffs)} of the {len(diffs)} differences have p < "
             f"{holm.alpha:g}, where about {holm.alpha * len(diffs):.1f} would with no difference anywhere."]
    ceilings = [r for r in summary if r.get("ceiling")]
    for name in sorted({r["method"] for r in ceilings}):
        rows = [{**r, "ceiling": False} for r in ceilings if r["method"] == name]
        own = claims(rows, correction="holm")  # its differences tested on their own, as a family of their own
        spans = [f"{'above' if min(v) > 0 else 'from'} {against} by {_span(v)}" for against in ("random", "full")
                 if (v := [c.difference for c in own.differences if c.against == against])]
        if spans:
            lines.append(f"The `{name}` ceiling, outside the table's family (it selects by hidden labels), lies "
                         f"{' and '.join(spans)} over its rows and metrics; tested as a family of its own, "
                         f"{own.rule()} keeps {len(own.survivors('better'))} of its {len(own.differences)} "
                         f"differences as better and {len(own.survivors('worse'))} as worse.")
    random = {(r["start_from"], r["budget"]): r for r in summary if r["method"] == "random"}
    methods = [r for r in summary if r["method"] not in ("random", "full") and not r.get("ceiling")
               and (r["start_from"], r["budget"]) in random]
    if methods and all("flipped_kept" in r for r in methods):
        fewer = sorted({r["method"] for r in methods} - {r["method"] for r in methods
                       if r["flipped_kept"] >= random[(r["start_from"], r["budget"])]["flipped_kept"]})
        lines.append("Measured in this run (a share, not a test): "
                     + (f"{', '.join(f'`{m}`' for m in fewer)} kept a smaller share of the flipped pairs than "
                        "random at every budget and start" if fewer else "no method kept a smaller share of the "
                                                                          "flipped pairs than random everywhere")
                     + f" ({len(fewer)} of {len({r['method'] for r in methods})} methods).")
    if methods and all("compute_ratio" in r for r in methods):
        cheaper = [r for r in methods if r["compute_ratio"] <= random[(r["start_from"], r["budget"])]["compute_ratio"]]
        names = sorted({f"`{r['method']}`" for r in cheaper})
        # since the pipeline measures each row's compute, `compute` is seconds (nominal pair passes beside it)
        unit = "measured seconds" if all("pair_passes" in r for r in record["records"]) else "pair passes"
        lines.append(f"Compute ({unit}): {len(methods) - len(cheaper)} of the {len(methods)} method "
                     "rows used more than random at the same budget and start"
                     + (f" (the {len(cheaper)} others, of {', '.join(names)}, no more)" if cheaper else "")
                     + f", and {sum(r['compute_ratio'] > 1 for r in methods)} more than training on all the pairs.")
    return "\n\n".join(lines) + "\n"


def memory_table(path: Path) -> str:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "bench" / "memory.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    record = json.loads(path.read_text())
    m = record["machine"]
    load = f", load average {m['load_average_1min']}" if "load_average_1min" in m else ""
    head = (f"`{record['command']}` ({record['data']}), peak RSS of the whole process, on {m['cores']} cores"
            f"{load}; from `bench/results/{path.name}` ({record['when']}).\n\n")
    before = path.with_name("memory-before.json")
    if before.is_file():  # the same measure of the whole-file reader, for contrast
        old = json.loads(before.read_text())
        rows = ", ".join(f"{r['copies']}× {r['peak_rss_mib']} MiB" for r in old["rows"])
        head_note = (f"\n\nThe whole-file reader it replaced ({old['note']}; `bench/results/{before.name}`): {rows}, "
                     f"{old['mib_per_input_mib']} MiB per further MiB of input.")
        return head + module.table(record) + head_note + "\n"
    return head + module.table(record) + "\n"


N_BOOT, BOOT_SEED = 1000, 0  # the bootstrap of the demo's plateau fit: fixed, so a render reproduces
RIDGE = 0.01  # b·(largest share) below this: the curve is a straight line over the data (curvature under 0.5%)


def _bound(value: float, low: float | None, high: float | None, digits: str = ".4g") -> str:
    """An interval end, or the bound it lies beyond: an end past the bound sits on the fit's flat ridge, where its
    digits depend on the last bits of the arithmetic (another BLAS, another CPU), not on the data."""
    if high is not None and value > high:
        return f"> {high:g}"
    if low is not None and value < low:
        return f"< {low:g}"
    return f"{value:{digits}}"


def demo_scaling(path: Path) -> str:
    """The plateau fit of the demo's random subsets and full data from the SFT start, one point a seed, with
    percentile-bootstrap intervals (b is poorly pinned by 4 shares). Deterministic: a fixed seed and number of
    refits; refits the optimizer cannot fit are counted and said, not dropped in silence; an interval end out on the
    fit's flat ridge (r beyond what the metric can reach, b so small the curve is a straight line over the data)
    is printed as the bound it lies beyond, since its digits there are float noise."""
    from prefsift.scaling import PARAMS, fit_plateau, interval_method, plan_sentences, plan_share, scaling_points

    def pct(x: float) -> str:  # as `prefsift scale` prints a share: ten times the data is an extrapolation
        return "∞" if not math.isfinite(x) else f"{x:.1%}" if x <= 10 else "> 1000%"

    record = json.loads(path.read_text())
    metric = "win_rate"
    share, score = scaling_points(record["records"], method="random", metric=metric, start_from="reference")
    fit = fit_plateau(share, score, interval="bootstrap", n_boot=N_BOOT, seed=BOOT_SEED)
    plan = plan_share(fit)
    top = float(max(fit.share))
    bounded = metric in ("win_rate", "pref_accuracy")  # both lie in [0, 1]
    limits = {"r": (0.0, 1.0) if bounded else (None, None), "a": (0.0, 1.0) if bounded else (None, None),
              "b": (RIDGE / top, None)}
    level = f"{fit.level:.0%}"
    meaning = {"r": "plateau r", "a": "no-data score a", "b": "rate b (per unit share)"}
    lines = [f"From `bench/results/{path.name}` (`{record['command']}`): random's rows and the full data's from the "
             "SFT start, win rate against the SFT model.", "",
             f"Fit of R(x) = r − (r − a)·exp(−b·x) to {len(fit.share)} points (x: share of the data); {level} "
             f"intervals by {interval_method(fit)}, to the fitted curve plus resampled residuals (seed {BOOT_SEED}).",
             "", f"| parameter | estimate | {level} interval |", "|---|---|---|"]
    ridge = False
    for k in PARAMS:
        (lo, hi), (floor, ceiling) = fit.intervals[k], limits[k]
        ends = [_bound(lo, floor, ceiling), _bound(hi, floor, ceiling)]
        ridge |= any(e[0] in "<>" for e in ends)
        lines.append(f"| {meaning[k]} | {fit.params[k]:.4g} | {ends[0]} to {ends[1]} |")
    lines += ["", f"R² = {fit.r2:.3f}."]
    if ridge:
        lines += ["", f"An end shown as `<` or `>` a bound lies on the fit's flat ridge, where the curve is a straight "
                      f"line over the measured shares (b·x under {RIDGE:g}) and r and b trade off freely, r beyond "
                      "any win rate: its digits there change with the last bits of the arithmetic, not with the data."]
    lines += ["", *plan_sentences(fit, plan, pct)]
    return "\n".join(lines) + "\n"


def logps_table(path: Path) -> str:
    """bench/logps.py's records of one data shape, one row a max_length: engine-only and whole-process seconds of
    both sides (each repeat's ratio, so the spread shows), tokens fed over the floor, peak RSS of the processes."""
    records = [r for _, r in sorted(json.loads(path.read_text()).items(), key=lambda kv: int(kv[0]))]
    if not records:
        return ""
    first = records[0]
    m = first["machine"]
    loads = [r["machine"][k] for r in records for k in ("load_average_1min_start", "load_average_1min_end")]
    commands = "; ".join(dict.fromkeys(f"`{r['command']}`" + (f" (commit {r['commit']})" if r.get("commit") else "")
                                       for r in records))
    head = (f"{commands}: {first['model']}, fp32, {first['threads']} torch thread, TRL batch "
            f"{first['trl_batch_size']} pairs, prefsift {first['batch_tokens']} tokens a batch, on {m['cores']} cores "
            f"(1-minute load average {min(loads):.1f}-{max(loads):.1f}); from `bench/results/{path.name}` "
            f"({first['when']}).\n\n")

    def spread(trl: list[float], ours: list[float]) -> str:
        ratios = sorted(t / o for t, o in zip(trl, ours, strict=True))
        return f"**{ratios[0]:.2f}×**" if len(ratios) == 1 else f"**{ratios[0]:.2f}-{ratios[-1]:.2f}×**"

    rows = []
    for r in records:
        e, w = r["engine"], r.get("whole")
        floor, seconds = e["floor_tokens"], e["seconds"]
        row = {"max_length": r["max_length"], "pairs": e["kept"], "floor tokens": floor,
               "× floor TRL / prefsift": f"{e['trl_tokens'] / floor:.2f} / {e['prefsift_tokens'] / floor:.2f}",
               "engine s TRL / prefsift": f"{min(seconds['trl']):.1f} / {min(seconds['prefsift']):.1f}",
               "engine ratio": spread(seconds["trl"], seconds["prefsift"])}
        if "packed" in seconds:
            row["prefsift packed / cached only, s"] = f"{seconds['packed'][0]:.1f} / {seconds['cached'][0]:.1f}"
        if w:
            row["whole process loads"] = r.get("whole_process_loads", "gguf")
            row["whole process s TRL / prefsift"] = (f"{min(w['trl']['seconds']):.1f} / "
                                                     f"{min(w['prefsift']['seconds']):.1f}")
            row["whole ratio"] = spread(w["trl"]["seconds"], w["prefsift"]["seconds"])
            row["peak RSS MB TRL / prefsift"] = (f"{max(w['trl']['peak_rss_mb']):.0f} / "
                                                 f"{max(w['prefsift']['peak_rss_mb']):.0f}")
            row["same scores"] = "yes" if w["same_values"] else "no"
        row["max rel. diff"] = f"{e['max_relative_difference']:.1e}"
        rows.append(row)
    columns = list(dict.fromkeys(c for row in rows for c in row))  # a row may lack a column another has
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return head + "\n".join(lines) + "\n"


def layouts_table(path: Path) -> str:
    """bench/logps.py --layouts: the unpadded layouts beside the padded rule (the default, i.e. before), both timed in
    each repeat on the same model and pairs; a ratio above 1 is the layout slower."""
    records = [r for _, r in sorted(json.loads(path.read_text()).items(), key=lambda kv: int(kv[0]))]
    if not records:
        return ""
    first = records[0]
    loads = [r["machine"][k] for r in records for k in ("load_average_1min_start", "load_average_1min_end")]
    dirty = {r.get("dirty") for r in records}
    head = (f"`{first['command']}` (commit {first.get('commit')}{', uncommitted changes' if True in dirty else ''}):"
            f" {first['model']}, fp32, {first['threads']} torch thread, {first['batch_tokens']} tokens a batch, on "
            f"{first['machine']['cores']} cores (1-minute load average {min(loads):.1f}-{max(loads):.1f}); wall "
            f"seconds, best of {len(first['engine']['seconds']['prefsift'])}; from `bench/results/{path.name}` "
            f"({first['when']}).\n\n")
    lines = ["| data | max_length | pairs | layout | seconds | ÷ padded rule (each repeat) | max rel. diff to TRL |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        e = r["engine"]
        padded = e["seconds"]["prefsift"]
        lines.append(f"| {r['shape']} | {r['max_length']} | {e['kept']} | padded (rule; default) | {min(padded):.1f} "
                     f"| 1 | {e['max_relative_difference']:.1e} |")
        for layout, difference in e.get("layouts_max_relative_difference_to_trl", {}).items():
            ratios = sorted(t / p for t, p in zip(e["seconds"][layout], padded, strict=True))
            spread = f"{ratios[0]:.2f}" if len(ratios) == 1 else f"{ratios[0]:.2f}-{ratios[-1]:.2f}"
            lines.append(f"| {r['shape']} | {r['max_length']} | {e['kept']} | {layout} | "
                         f"{min(e['seconds'][layout]):.1f} | {spread} | {difference:.1e} |")
    return head + "\n".join(lines) + "\n"


def floor_table(path: Path) -> str:
    record = json.loads(path.read_text())
    head = (f"`{record['command']}` ({record['when']}): tokens fed to the backbone over the floor, counted on "
            f"SmolLM2's tokenizer (prefsift: its batch plan at {record['batch_tokens']} tokens, packed layout; "
            f"TRL: its collator's rows, {record['trl_batch_size']} pairs a batch); from "
            f"`bench/results/{path.name}`.\n\n")
    lines = ["| shape | max_length | pairs | floor tokens | TRL × floor | prefsift × floor |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['max_length']} | {r['pairs']} | {r['floor_tokens']} | {r['trl_x_floor']:.2f} | "
              f"{r['prefsift_x_floor']:.2f} |" for r in record["rows"]]
    return head + "\n".join(lines) + "\n"


def kto_ref_line(path: Path) -> str:
    r = json.loads(path.read_text())
    return (f"`{r['command']}` ({r['when']}, {r['threads']} thread, {r['model']}): {r['rows']} KTO rows of HH-RLHF at "
            f"max_length {r['max_length']}, TRL {min(r['seconds']['trl']):.1f} s, prefsift "
            f"{min(r['seconds']['prefsift']):.1f} s, **{r['ratio_best']:.2f}×** (best of {len(r['seconds']['trl'])} "
            f"alternated repeats); TRL feeds each prompt twice, {r['trl_unpadded_tokens'] / r['floor_tokens']:.2f}× "
            f"the unique tokens before its padding; largest relative difference {r['max_relative_difference']:.1e}; "
            f"from `bench/results/{path.name}`.\n")


def _micro_batches(record: dict) -> str:
    """How prefsift's side cut its steps (TrainConfig.micro_batch_tokens); nothing for a run from before the option."""
    if "micro_batch_tokens" not in record:
        return ""
    budget = record["micro_batch_tokens"]
    return (", prefsift's steps in micro-batches at its default token budget on a CPU" if budget is None
            else f", prefsift's steps in micro-batches of at most {budget} tokens")


def train_block(path: Path) -> str:
    """bench/train.py's record: one epoch of DPO as a whole process, TRL's DPOTrainer against `prefsift train`, with
    the run's commit and the machine's load (the cores are shared)."""
    r = json.loads(path.read_text())
    sides = r["sides"]
    best = {s: {k: min(v) for k, v in sides[s].items() if k != "losses" and v} for s in sides}
    ratio = r["ratio_trl_over_prefsift"]
    # the code it ran: bench/train.py lists the files of src/ and itself that differed (an earlier run's results file
    # written into the tree makes the tree dirty, not the code)
    changed = r["uncommitted"] if "uncommitted" in r else r.get("dirty")
    dirty = " with uncommitted changes" if changed else ""
    machine = r["machine"]
    shape = {"transcripts": "HH-RLHF transcripts (long prompts, short answers)",
             "instructions": "instruction pairs (one short human turn, long answers)"}.get(r.get("shape"), "pairs")
    load = (machine["load_average_1min_start"], machine["load_average_1min_end"])
    checkpointing = "on" if r["gradient_checkpointing"] else "off"
    head = (f"`{r['command']}` ({r['when']}, commit {r.get('commit')}{dirty}; {r['threads']} torch thread on "
            f"{machine['cores']} cores shared with other jobs, 1-minute load average {load[0]:.1f} at the start and "
            f"{load[1]:.1f} at the end): {r['model']}, {r['n_pairs']} {shape}, max_length {r['max_length']}, batch "
            f"{r['batch_size']}, {r['precision']}, gradient checkpointing {checkpointing}"
            f"{', LoRA (r 16, alpha 32, all linear layers)' if r.get('lora') else ''}"
            f"{', learning rate ' + format(r['learning_rate'], 'g') if r.get('learning_rate') else ''}"
            f"{_micro_batches(r)}; one epoch, "
            f"each side a whole process, "
            f"{'one run each' if r['repeats'] == 1 else 'best of ' + str(r['repeats']) + ' alternated runs'}; from "
            f"`bench/results/{path.name}`.\n\n")
    lines = ["| | TRL DPOTrainer | prefsift train | prefsift against TRL |", "|---|---|---|---|",
             f"| whole process (s) | {best['trl']['seconds']:.1f} | {best['prefsift']['seconds']:.1f} | "
             f"**{ratio['seconds']:.2f}×** TRL's speed |",
             f"| training loop (s) | {best['trl']['train_loop_seconds']:.1f} | "
             f"{best['prefsift']['train_loop_seconds']:.1f} | {ratio['train_loop_seconds']:.2f}× TRL's speed |",
             f"| peak RSS (MB) | {best['trl']['peak_rss_mb']:.0f} | {best['prefsift']['peak_rss_mb']:.0f} | "
             f"**{1 / ratio['peak_rss_mb']:.2f}×** TRL's memory |"]
    if "after_load_mb" in best["trl"]:
        lines.append(f"| peak RSS after loading / after the reference pass (MB) | {best['trl']['after_load_mb']:.0f} / "
                     f"{best['trl']['after_reference_mb']:.0f} | {best['prefsift']['after_load_mb']:.0f} / "
                     f"{best['prefsift']['after_reference_mb']:.0f} | |")
    agree = r.get("largest_loss_difference")
    tail = f"\nThe two sides' logged losses agree to {agree:.1e}.\n" if agree is not None else "\n"
    return head + "\n".join(lines) + "\n" + tail


def analysis_table(path: Path) -> str:
    from prefsift.analyze import render_markdown

    record = json.loads(path.read_text())
    return (f"`{record['command']}`: {record['description']}; from `bench/results/{path.name}`.\n\n"
            + render_markdown(record["analysis"]))


def influence_table(path: Path) -> str:
    """bench/influence.py's record: each way to ⟨ḡ_val, g_w − g_l⟩ as a multiple of one log-prob pass (CPU time),
    per-example gradients' time over it, and its agreement with per-example gradients."""
    r = json.loads(path.read_text())
    seconds = {label: cpu for label, (cpu, _wall) in r["cpu_wall_seconds"].items()}
    passes = next(t for label, t in seconds.items() if label.startswith("log-prob pass"))
    per_example = next(t for label, t in seconds.items() if label.startswith("per-example"))
    lines = ["| method | × a log-prob pass | per-example ÷ method | Spearman vs per-example | max rel. error |",
             "|---|---|---|---|---|"]
    for label, t in seconds.items():
        rho, error = r["accuracy"].get(label) or (None, None)
        agreement = "— | —" if rho is None or label.startswith("per-example") else f"{rho:.3f} | {error:.1e}"
        lines.append(f"| {label} | {t / passes:.2f} | {per_example / t:.1f} | {agreement} |")
    val = r["validation_gradient_cpu_wall_s"][0] / r["n_val"] / (passes / r["n_pairs"])
    lines.append(f"\nḡ_val, one backward pass over the validation pairs: {val:.2f}× a log-prob pass a pair, once. "
                 f"Per-example gradients over a finite difference in FLOPs alone: "
                 f"{r['per_example_over_fd_flop_ratio']:.2f}× (a forward and a backward of TRL's two rows a pair "
                 "with the LM head at every position, against two forwards of the unique tokens with the head on the "
                 "completions only; attention left out).")
    if r.get("chosen_step") is not None:  # bench/influence.py's step chosen on the check pairs (choose_step)
        tried = ", ".join(f"{float(k):g}: {v:.1e}" for k, v in sorted(r["chosen_step_errors_on_check_pairs"].items(),
                                                                      key=lambda kv: -float(kv[0])))
        lines.append(f"\nNo hand-set step: `choose_step` took {r['chosen_step']:g} on the 4 check pairs (their largest "
                     f"error against per-example gradients at each step tried: {tried}). With the policy's own pass "
                     f"the one-sided difference at that step costs "
                     f"**{r['one_sided_chosen_step_with_policy_pass_x']:.2f}×** a log-prob pass; choosing the step "
                     f"cost {r['choose_step_cpu_wall_s'][0] / passes:.2f} passes of these pairs, once, whatever their "
                     f"number (the check pairs' per-example gradients included, which the check computes anyway).")
    threads = f"{r['threads']} thread" + ("s" if r["threads"] > 1 else "")
    head = (f"`{r['command']}` ({r['when']}, 1-minute load average {r['load_average_1min']} at the end): "
            f"{r['model']}, fp32, {threads}, {r['n_pairs']} training pairs, {r['n_val']} validation pairs, max_length "
            f"{r['max_length']}, scope {r['scope']}; CPU time; from `bench/results/{path.name}`.\n\n")
    return head + "\n".join(lines) + "\n"


def walkthrough_block(path: Path) -> str:
    """README.md's tested walkthrough (tests/test_pipeline.py runs it), copied into the manual as it is."""
    match = re.search(r"<!-- walkthrough -->\n(.*?)<!-- /walkthrough -->", path.read_text(), re.S)
    if match is None:
        raise ValueError(f"{path.name} has no walkthrough block")
    return match.group(1)


_LEVERS = {"paper": "the paper's (warm-up 1 epoch on all pairs, 3 validation epochs)",
           "paper-defaults": "the demo's recipe at RunConfig's defaults (3 validation epochs)",
           "warmup-0.25": "`warmup_fraction: 0.25`", "warmup-0.1": "`warmup_fraction: 0.1`",
           "warmup-0.25-val1": "`warmup_fraction: 0.25`, `validation_epochs: 1`",
           "warmup-0.1-val1": "`warmup_fraction: 0.1`, `validation_epochs: 1`",
           "warmup-0.25-lora-val": "`warmup_fraction: 0.25`, `validation_lora: true`",
           "warmup-0.1-val1-lora": "`warmup_fraction: 0.1`, `validation_epochs: 1`, `validation_lora: true`",
           "continue-warmup-0.25": "`warmup_fraction: 0.25`, subsets continue from the warm-up (against full from "
                                   "the SFT model)",
           "pool-0.3-warmup-0.1-val1": "`score_share: 0.3` (a candidate pool of 30% scored), `warmup_fraction: "
                                       "0.1`, `validation_epochs: 1`",
           "continue-warmup-0.1-val1": "`warmup_fraction: 0.1`, `validation_epochs: 1`, subsets continue from the "
                                       "warm-up (against full from the SFT model)"}


def levers_table(path: Path) -> str:
    """bench/warmup_share.py's record: LossDiff-IRM's whole compute at 10% and at its rule's share against DPO on
    every pair from the SFT model, per setting of the pipeline's levers, beside random's and their quality (one
    seed), and the floor the reference pass and the two scoring passes put under any setting."""
    r = json.loads(path.read_text())
    epochs = r["demo"]["train"]["epochs"]
    head = (f"`{r['command']}` ({code(r)}; {r['machine']['threads']} torch thread, 1-minute load "
            f"average {r['machine']['load_average_1min']:.1f} at the end; the demo's task, model and recipe: full "
            f"training {epochs:g} epochs of DPO on every pair from the SFT model); CPU seconds against that run's "
            f"`full`, quality (preference accuracy on the test pairs) of {r['settings'][0]['rows'][0]['n_seeds']} "
            f"seed, so no difference in it is a finding; from `bench/results/{path.name}`.\n\n")
    lines = ["| setting | LossDiff-IRM @ 10% | random @ 10% | LossDiff-IRM @ rule share | random @ rule share "
             "| accuracy @ 10%: LossDiff-IRM / random | a training epoch in reference passes |",
             "|---|---|---|---|---|---|---|"]
    for setting in r["settings"]:
        start = "warmup" if setting["overrides"].get("start_from") == "both" else "reference"
        rows = {(x["method"], x["budget"]): x for x in setting["rows"] if x["start_from"] == start}
        rule = next(b for m, b in rows if b.endswith("rule"))
        cells = [f"{rows[(m, b)]['x_full']:.2f}×" for b in ("0.1", rule) for m in ("lossdiff-irm", "random")]
        accuracy = [rows[(m, "0.1")]["pref_accuracy"] for m in ("lossdiff-irm", "random")]
        # `paper` set no override before its warm-up share was explicit: it ran the defaults of its day
        name = "paper-defaults" if setting["setting"] == "paper" and not setting["overrides"] else setting["setting"]
        label = _LEVERS.get(name, name)
        if setting["overrides"].get("score_share", 1.0) < 1:  # its rule keeps a share of the pool, not of all pairs
            label += (f" (its rule's share: {rows[('random', rule)]['n_pairs'] / r['demo']['task']['n_train']:.2f} "
                      f"of all pairs)")
        lines.append(f"| {label} | {' | '.join(cells)} | "
                     f"{accuracy[0]:.3f} / {accuracy[1]:.3f} | {setting['epoch_in_reference_passes']:.1f} |")
    floor = 3 / (1 + 3 * epochs)
    ks = [setting["epoch_in_reference_passes"] for setting in r["settings"]]
    # the rule's share of the pairs, as the `random` row at it trained (its subset is the rule's size)
    sizes = [x["n_pairs"] for setting in r["settings"] for x in setting["rows"]
             if x["method"] == "random" and x["budget"].endswith("rule") and x["start_from"] == "reference"
             and setting["overrides"].get("score_share", 1.0) == 1.0]  # a pool's rule keeps a share of the pool
    share = sum(sizes) / len(sizes) / r["demo"]["task"]["n_train"]
    tail = (f"\nThe floor under every setting, in nominal pair passes (a forward pass a pair, a training step three): "
            f"the reference pass and the two scoring passes (θ and θ_val over every training pair) are 3 passes a pair "
            f"against the {1 + 3 * epochs:g} of full training ({epochs:g} epochs and its reference pass): "
            f"{floor:.2f}× full before the warm-up, the validation model or the subset's training. In measured "
            f"seconds the floor is 3 / (1 + {epochs:g} × k), k a training epoch in reference passes (the last "
            f"column, which swings with the machine's load more than with the setting: every setting trains the "
            f"same full run): {3 / (1 + epochs * max(ks)):.2f}-{3 / (1 + epochs * min(ks)):.2f}× here. At the "
            f"rule's share s = {share:.2f} the subset's training costs s·{epochs:g}·k of the 1 + {epochs:g}·k, "
            f"so the three passes alone fit under 0.8× full only where 3 + s·{epochs:g}·k ≤ 0.8·(1 + {epochs:g}·k), "
            f"k ≥ {2.2 / (epochs * (0.8 - share)):.1f}, before the warm-up and the validation model.")
    for setting in r["settings"]:
        pool = setting["overrides"].get("score_share", 1.0)
        if pool < 1:
            row = next(x for x in setting["rows"] if x["method"] == "lossdiff-irm" and x["budget"] == "0.1"
                       and x["start_from"] == "reference")
            tail += (f" With a candidate pool of {pool:g} (`score_share`) the floor's 3 passes a pair become "
                     f"{3 * pool:.2g}, and LossDiff-IRM at 10% cost {row['x_full']:.2f}× full: "
                     f"{'within' if row['x_full'] <= 0.4 else 'over'} issue 23's 0.4× at 10-20%, at a quality one "
                     f"seed cannot judge.")
    tail += "\n"
    return head + "\n".join(lines) + "\n" + tail


def hh_crossfit_block(cost: Path, protocol: str = "lora") -> str:
    """The cross-fitted HH-RLHF table over the (fold, seed) cells of bench/results/hh-crossfit/PROTOCOL that have
    finished, with its n (n = 0 rendered as such), beside the measured cost of one cell (`cost`: cost.json)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from hh_crossfit import table

    return table(cost.parent / protocol, cost)


def hh_crossfit_smoke_block(cost: Path) -> str:
    """The smoke cell the cost was measured on: the protocol end to end on a few pairs (not a result)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from hh_crossfit import table

    return table(cost.parent / json.loads(cost.read_text())["measured_on"]["protocol_dir"])


TABLES = {"floor-table": (RESULTS / "floor.json", floor_table),
          "logps-transcripts": (RESULTS / "logps-transcripts.json", logps_table),
          "logps-instructions": (RESULTS / "logps-instructions.json", logps_table),
          "demo-table": (RESULTS / "demo.json", demo_table), "real-table": (RESULTS / "real.json", real_table),
          "memory-table": (RESULTS / "memory.json", memory_table),
          "demo-all-table": (RESULTS / "demo-all.json", demo_table),
          "demo-shift-table": (RESULTS / "demo-shift.json", demo_table),
          "demo-shift-findings": (RESULTS / "demo-shift.json", findings),
          "task-regimes": (ROOT / "src" / "prefsift" / "synthetic" / "task.py", task_regimes),
          "real-peers-table": (RESULTS / "real-peers.json", real_table),
          "demo-scaling": (RESULTS / "demo.json", demo_scaling),
          "demo-findings": (RESULTS / "demo.json", findings),
          "demo-all-findings": (RESULTS / "demo-all.json", findings),
          "real-findings": (RESULTS / "real.json", findings),
          "real-peers-findings": (RESULTS / "real-peers.json", findings),
          "kto-ref": (RESULTS / "kto-ref.json", kto_ref_line),
          "train-transcripts": (RESULTS / "train-smollm2-transcripts.json", train_block),
          "train-instructions": (RESULTS / "train-smollm2-instructions.json", train_block),
          "train-lora-transcripts": (RESULTS / "train-smollm2-lora-transcripts.json", train_block),
          "train-lora-instructions": (RESULTS / "train-smollm2-lora-instructions.json", train_block),
          "analysis-demo": (RESULTS / "analysis-demo.json", analysis_table),
          "analysis-hh": (RESULTS / "analysis-hh.json", analysis_table),
          "influence-table": (RESULTS / "influence-smollm2.json", influence_table),
          "logps-layouts-transcripts": (RESULTS / "logps-layouts-transcripts.json", layouts_table),
          "logps-layouts-instructions": (RESULTS / "logps-layouts-instructions.json", layouts_table),
          "influence-adaptive": (RESULTS / "influence-smollm2-adaptive.json", influence_table),
          "walkthrough": (ROOT / "README.md", walkthrough_block),
          "pipeline-levers": (RESULTS / "pipeline-levers.json", levers_table),
          "demo-pool-table": (RESULTS / "demo-pool.json", demo_table),
          "demo-pool-findings": (RESULTS / "demo-pool.json", findings),
          "demo-pool-rule-share-table": (RESULTS / "demo-pool-0.6.json", demo_table),
          "demo-pool-rule-share-findings": (RESULTS / "demo-pool-0.6.json", findings),
          "hh-crossfit": (RESULTS / "hh-crossfit" / "cost.json", hh_crossfit_block),
          "hh-crossfit-smoke": (RESULTS / "hh-crossfit" / "cost.json", hh_crossfit_smoke_block)}
BLOCK = re.compile(r"<!-- ([A-Za-z0-9_-]+) -->\n(.*?)<!-- /\1 -->", re.S)


def pages() -> list[Path]:
    """README.md and every page of the manual: the files whose marked blocks are rendered."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


_rendered: dict[str, str] = {}


def block(name: str) -> str:
    """A block's text, rendered once a run however many files hold it."""
    if name not in _rendered:
        path, render_one = TABLES[name]
        _rendered[name] = render_one(path)
    return _rendered[name]


def render(text: str, label: str = "text") -> tuple[str, list[str], list[str]]:
    """The text with every known block rendered, the names of the blocks that changed, and problems: a block of an
    unknown name or whose results file is missing (left as it is)."""
    changed, problems = [], []

    def one(match: re.Match) -> str:
        name, old = match.group(1), match.group(2)
        if name not in TABLES:
            problems.append(f"{label}: block '{name}' has no renderer (known: {', '.join(TABLES)})")
            return match.group(0)
        if not TABLES[name][0].is_file():
            problems.append(f"{label}: block '{name}': {TABLES[name][0].relative_to(ROOT)} is missing")
            return match.group(0)
        try:
            new = block(name)
        except Exception:
            print(f"render_readme: while rendering block '{name}' of {label}", file=sys.stderr)
            raise
        if new != old:
            changed.append(name)
        return f"<!-- {name} -->\n{new}<!-- /{name} -->"

    return BLOCK.sub(one, text), changed, problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 naming each stale block")
    args = parser.parse_args()
    stale, problems = [], []
    for path in sorted({path for path, render_one in TABLES.values() if render_one in (demo_table, real_table,
                                                                                          findings)}):
        if not path.is_file():
            continue
        label = str(path.relative_to(ROOT))
        stored, fresh = json.loads(path.read_text()), resummarized(path)
        if stored["summary"] != fresh["summary"]:  # the tables are rendered from the fresh one: the file must agree
            if args.check:
                stale.append(f"{label}: summary (recomputed from its records by prefsift.stats.summarize)")
            else:
                path.write_text(json.dumps(fresh, indent=1) + "\n")
                print(f"{label}: summary recomputed from its records")
    for path in pages():
        old = path.read_text()
        label = str(path.relative_to(ROOT))
        new, changed, found = render(old, label)
        problems += found
        if args.check:
            stale += [f"{label}: {name}" for name in changed]
        elif new != old:
            path.write_text(new)
            print(f"{label}: updated ({', '.join(changed)})")
    for problem in problems:
        print(f"render_readme: {problem}", file=sys.stderr)
    if args.check:
        for entry in stale:
            print(f"render_readme: out of date: {entry}", file=sys.stderr)
        if stale:
            print("render_readme: run `python bench/render_readme.py` and commit the result", file=sys.stderr)
        sys.exit(1 if stale or problems else 0)
    if not problems:
        print(f"{len(pages())} files checked; every rendered block is up to date")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
