"""`prefsift demo`: the embedded benchmark end to end, offline, on a CPU.

A synthetic task with a hidden oracle (src/prefsift/synthetic/task.py), a tiny Llama SFT-trained on the spot on
mixed-quality demonstrations, then the TIF pipeline of `prefsift run` with every method at the same budgets, the
oracle judging win rates against the SFT model. Because the oracle is known, the table also says what share of the
flipped (noisy) pairs each method kept.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from datasets import Dataset

from prefsift.config import EngineConfig
from prefsift.data import load_pairs
from prefsift.evaluate import EvalConfig
from prefsift.manifest import write_manifest
from prefsift.models import LoadedModel, fingerprint_files
from prefsift.pipeline import RunConfig, Splits, run_pipeline
from prefsift.synthetic import sft_model
from prefsift.synthetic.task import HIDDEN_COLUMNS, OracleJudge, TaskConfig, make_task
from prefsift.synthetic.tiny import dpo_engine, dpo_train, torch_threads
from prefsift.train import TrainConfig

# The default set fits 10 minutes on 2 cores; --all adds LossDiff's other end (RHO-LOSS's top), exact influence (its
# top and its middle band), ISA and density sampling over the SFT model's embeddings, and the peer rules of the
# literature (the task's visible score_chosen/score_rejected ratings are their external reward).
DEFAULT_METHODS = ("random", "irm", "lossdiff", "lossdiff-irm", "oracle")
PEER_METHODS: tuple[str | dict, ...] = (
    "small-margin", "large-margin", "reward-margin", "alignment-potential",
    # Selective DPO's cross-fitting models train with the demo's own recipe (its defaults are the authors' 7B
    # ones: lr 1e-6 would leave a tiny model where it started), one seed of two halves to fit the time
    {"name": "selective", "learning_rate": 2e-4, "batch_size": 32, "epochs": 2.0, "seeds": 1})
# ISA as its paper ran it: completions embedded one by one, the selected ones trained with KTO; under both readings
# of its sort order (the literal one keeps atypical items, the other typical ones).
ISA_METHODS: tuple[dict, ...] = ({"name": "isa", "train_with": "kto", "order": "atypical"},
                                 {"name": "isa", "label": "isa-typical", "train_with": "kto", "order": "typical"})
# TIF's truncated influence at a budget keeps the centred band of the budget's width (45-55th percentiles at 10%), a
# rule the paper never proposes (it keeps a band between cut-offs it does not publish): its label says so in every row.
TIF_AT_A_BUDGET: dict = {"name": "tif", "label": "tif-band-at-a-budget"}
ALL_METHODS = (*DEFAULT_METHODS, "rho-loss", "if", TIF_AT_A_BUDGET, *ISA_METHODS, "density", *PEER_METHODS)
# registered names --all leaves out: another name of a method it runs (`margin` is `reward-margin`)
NOT_IN_ALL = ("margin",)


@dataclass
class DemoConfig:
    """What the demo runs; the defaults fit 2 CPU cores in about five minutes."""

    task: TaskConfig = field(default_factory=TaskConfig, metadata={"help": "The synthetic task."})
    engine: EngineConfig = field(default_factory=dpo_engine,
                                 metadata={"help": "β, max_length, precision and threads (synthetic.tiny.dpo_engine)."})
    train: TrainConfig = field(default_factory=dpo_train, metadata={"help": "DPO settings of the subset runs "
                                                                           "(synthetic.tiny.dpo_train)."})
    warmup_epochs: float = field(default=1.0, metadata={"help": "Warm-up DPO epochs on the full train set."})
    validation_epochs: float = field(default=3.0, metadata={"help": "DPO epochs on the validation pairs."})
    start_from: str = field(default="both", metadata={"help": "Subsets continue from the warm-up model (the TIF "
                                                              "paper) and train from the SFT model: a row for each."})
    seeds: int = field(default=3, metadata={"help": "Training seeds every comparison repeats over (the task and "
                                                    "the SFT model stay those of --seed)."})
    methods: list[str | dict] = field(default_factory=lambda: list(DEFAULT_METHODS),
                                      metadata={"help": "Methods compared (`prefsift demo --all`: ALL_METHODS)."})
    fractions: list[float] = field(default_factory=lambda: [0.1], metadata={"help": "Budgets besides the "
                                                                                     "LossDiff-IRM rule's own."})
    score_share: float = field(default=1.0, metadata={"help": "Share of the training pairs scored: a candidate pool "
                                                               "the methods pick from (RunConfig.score_share)."})
    max_new_tokens: int = field(default=8, metadata={"help": "Generation budget of an answer."})
    baselines: str | None = field(default=None, metadata={"help": "Baseline arms (RunConfig.baselines); None: "
                                                                   "validation-only and random+validation, and "
                                                                   "random-kto when a method trains with KTO (ISA)."})

    def baseline_arms(self) -> str:
        """The baselines the demo trains: its own, or those that answer its methods (random with KTO beside ISA)."""
        if self.baselines is not None:
            return self.baselines
        from prefsift.scorers import parse_methods

        kto = any(s.completion_columns() is not None for s in parse_methods(self.methods))
        return "validation-only,random+validation" + (",random-kto" if kto else "")


def run_demo(out: Path, *, seed: int = 0, config: DemoConfig | None = None, log=print) -> dict:
    """The demo under `seed` (task, SFT model, splits); training seeds seed .. seed + config.seeds - 1. Returns
    run_pipeline's {"records", "summary"}."""
    from prefsift.output import CACHE_ENTRIES, check_output, locked, staged
    from prefsift.pipeline import name_final_paths

    config = config or DemoConfig()
    config = replace(config, task=replace(config.task, seed=seed), train=replace(config.train, seed=seed))
    out = Path(out)
    check_output(out, "demo")  # a file, another stage's results: one line before the SFT model trains
    # written whole or not at all, as `run` is: a demo failing part-way leaves an earlier one complete
    with torch_threads(config.engine.threads), locked(out), staged(out, "demo", carry=CACHE_ENTRIES) as tmp:
        results = _run(tmp, seed, config, log)
        name_final_paths(tmp, out)
    return results


def _run(out: Path, seed: int, config: DemoConfig, log) -> dict:
    start = time.perf_counter()
    task = make_task(config.task)
    log(f"task: {len(task.train)} noisy train pairs ({config.task.flip_rate:.0%} flipped), "
        f"{len(task.validation)} validation, {len(task.test)} test, {len(task.eval_prompts)} eval prompts")
    model, tokenizer = sft_model(task, seed=seed)
    sft_dir = out / "sft-model"
    model.save_pretrained(sft_dir)
    tokenizer.save_pretrained(sft_dir)
    log(f"SFT model ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) trained in "
        f"{time.perf_counter() - start:.0f}s → {sft_dir}")
    base = LoadedModel(model, tokenizer, str(sft_dir), fingerprint_files(str(sft_dir), None))

    def pairs(rows: list[dict]):
        return load_pairs(Dataset.from_list(rows))  # hidden columns stay in .raw, out of training

    splits = Splits(train=pairs(task.train), validation=pairs(task.validation), test=pairs(task.test),
                    eval_prompts=list(task.eval_prompts))
    run_config = RunConfig(out=str(out), methods=list(config.methods), fractions=list(config.fractions),
                           train=config.train, engine=config.engine, seed=seed,
                           warmup_epochs=config.warmup_epochs, validation_epochs=config.validation_epochs,
                           start_from=config.start_from, seeds=config.seeds, baselines=config.baseline_arms(),
                           score_share=config.score_share,
                           eval=EvalConfig(max_new_tokens=config.max_new_tokens, batch_size=256,
                                           eval_prompts=max(1, len(task.eval_prompts))))
    results = run_pipeline(run_config, splits=splits, base=base, judge=OracleJudge(task), log=log, quiet=True)
    from prefsift.run_report import write_report

    write_report(out)  # report.html: the table, quality against compute, the scaling fit, the score distributions
    write_manifest(out, "demo", {"seed": seed, "config": asdict(config), "hidden_columns": list(HIDDEN_COLUMNS),
                                 "seconds": time.perf_counter() - start})
    log(f"demo finished in {time.perf_counter() - start:.0f}s")
    return results
