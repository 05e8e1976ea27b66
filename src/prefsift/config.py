"""The settings of every stage, one typed dataclass a concern: `EngineConfig` (shared by score, train and eval),
`DataConfig`, `ModelConfig`, `ScoreConfig`, `TrainConfig`, `EvalConfig`, `RunConfig` and `ExportConfig`. Each field
carries its default, help and range (`settings.option`), from which come the checks at construction, the YAML keys
and the CLI flags. A leaf: it imports nothing of prefsift's but the settings mechanism and the errors.
"""

from __future__ import annotations

import dataclasses
import re

from prefsift.errors import ConfigError
from prefsift.settings import Checked, option

DEVICE_PATTERN = re.compile(r"^(cpu|mps|(cuda|xpu|npu)(:[0-9]+)?)$")
MAX_SEED = 2**32 - 1  # numpy's legacy seeding and torch's take no larger seed


@dataclasses.dataclass
class EngineConfig(Checked):
    """The engine setting every stage shares (score, train, eval): one β, one max_length, one precision."""

    beta: float = option(0.1, "DPO temperature β of margins, losses and the implicit reward.", low=0, low_open=True)
    max_length: int | None = option(1024, "Token cut-off of prompt + completion, as TRL's max_length (None: no "
                                          "cut).", low=2)
    batch_tokens: int = option(8192, "Tokens per forward batch of the log-prob engine (a memory knob).", low=1)
    dtype: str = option("auto", "Weights' precision for scoring: auto (bf16 on a GPU, fp32 on a CPU), float32, "
                                "bfloat16, float16. Training keeps fp32 weights and autocasts to it.",
                        choices=("auto", "float32", "bfloat16", "float16"))
    device: str | None = option(None, "cpu, cuda, cuda:1, mps ...; default: a GPU if there is one.")
    threads: int | None = option(None, "torch CPU threads (default: the cores the load average leaves idle, at "
                                       "least 1).", low=1)
    backend: str = option("local", "Where the log-prob, reward and embedding passes run: local (this process) or "
                                   "ray (a Ray Data actor pool, one model replica a worker; same shards and scores).",
                          choices=("local", "ray"))
    ray_address: str | None = option(None, "Ray cluster to join (host:6379, auto, ray://host:10001); default: start "
                                           "Ray on this machine.")
    workers: int = option(2, "Ray workers (model replicas) of --backend ray.", low=1)
    layout: str = option("padded", "Log-prob batches: padded (a row a pair, or the prompts' cache) or unpadded, one "
                                   "flat sequence a batch with flex attention's block mask (flex) or variable-length "
                                   "attention over the pairs (jagged); in this process only. See docs/engine.md.",
                         choices=("padded", "flex", "jagged"))

    def check(self) -> None:
        if self.device is not None and not DEVICE_PATTERN.match(self.device):
            raise ConfigError(f"device must look like cpu, cuda, cuda:1 or mps (got {self.device!r})")


@dataclasses.dataclass
class DataConfig(Checked):
    """How an input file's columns map to prompt / chosen / rejected, and what to do with invalid rows."""

    split: str | None = option(None, "Split of a datasets directory or hub dataset (default: train).")
    prompt_key: str = option("prompt", "Input column holding the prompt.")
    chosen_key: str = option("chosen", "Input column holding the chosen response.")
    rejected_key: str = option("rejected", "Input column holding the rejected response.")
    on_invalid: str = option("skip", "Invalid rows: 'skip' (report and go on) or 'fail'.", choices=("skip", "fail"))
    chat_template: bool = option(False, "Plain-text prompts and completions as user / assistant messages, so the "
                                        "model's chat template formats them (an HH transcript as its turns); the "
                                        "tokenizer must have one.")


@dataclasses.dataclass
class ModelConfig(Checked):
    """How `train` and `eval` load their models, settable from a flat YAML like any other option (`score` and
    `run` carry the same field in their own configs; --device and --dtype are the shared `EngineConfig`'s)."""

    trust_remote_code: bool = option(False, "Let a model run its own code (off unless you ask).")


@dataclasses.dataclass
class ScoreConfig(Checked):
    """`prefsift score`: the method and the sources of the roles it needs (see prefsift.resources.ROLES)."""

    method: str = option("irm", "Scoring method, or several comma-separated (one pass each model, one scores "
                                "file): `prefsift methods` lists them and their parameters (--param k=v).")
    model: str | None = option(None, "Policy θ: hub id, local directory or .gguf file.")
    reference: str | None = option(None, "Reference (SFT) model π_ref; default: --model.")
    validation: str | None = option(None, "Validation model θ_val (lossdiff, lossdiff-irm, rho-loss).")
    reward_model: str | None = option(None, "Sequence-classification reward model (margin).")
    validation_data: str | None = option(None, "Trusted validation pairs (methods that read them).")
    embedder: str | None = option(None, "Embedding model (methods that embed).")
    seed: int = option(0, "Seed of random scores and of any sampling a scorer does.", low=0, high=MAX_SEED)
    trust_remote_code: bool = option(False, "Let a model run its own code (off unless you ask).")
    allow_dropped: bool = option(False, "Go on when more than half of the pairs are dropped (prompt fills "
                                        "max_length, non-finite score); every pair dropped always stops.")

    def methods(self) -> list[str]:
        names = [m.strip() for m in self.method.split(",") if m.strip()]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"--method: one or more distinct names, comma-separated (got {self.method!r})")
        return names



ALGOS = ("dpo", "kto")
# Learning-rate defaults. All weights: TRL's DPO default. A LoRA adapter starts at zero (B = 0) and moves only through
# its low-rank factors: TRL's PEFT guide puts LoRA at ~10x the full rate, and 1e-6 with LoRA left TRL's
# rewards/margins at 0.0015 on 60 HH pairs (issue 22); 5e-5 sits in the 5e-6..1e-4 range of LoRA DPO recipes.
FULL_LEARNING_RATE = 1e-6
LORA_LEARNING_RATE = 5e-5
CORRECTIONS = ("holm", "bh")  # prefsift.stats's corrections of a table's family of tests
# transformers' SchedulerType values (a test keeps this list equal to them; importing transformers here would slow
# every `prefsift --help`)
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
              "warmup_stable_decay", "greedy")


@dataclasses.dataclass
class TrainConfig(Checked):
    """DPO / KTO training through TRL. β, max_length and precision are the shared `EngineConfig`'s."""

    algo: str = option("dpo", "dpo or kto.", choices=ALGOS)
    learning_rate: float | None = option(None, f"Peak learning rate; default {FULL_LEARNING_RATE:g} for all weights "
                                               f"(TRL's DPO default), {LORA_LEARNING_RATE:g} with --lora (an adapter "
                                               f"needs ~10-50x more to move as far).", low=0, low_open=True)
    epochs: float = option(1.0, "Passes over the training pairs.", low=0, low_open=True)
    batch_size: int = option(8, "Pairs per device and step.", low=1)
    gradient_accumulation_steps: int = option(1, "Steps accumulated per update.", low=1)
    lr_scheduler_type: str = option("linear", "transformers scheduler name (linear, cosine, constant, ...).",
                                    choices=SCHEDULERS)
    warmup_steps: float = option(0.0, "Learning-rate warm-up steps (< 1: share of the steps).", low=0)
    seed: int = option(0, "Seed of shuffling and initialisation.", low=0, high=MAX_SEED)
    lora: bool = option(False, "Train a LoRA adapter (peft) instead of all weights.")
    lora_r: int = option(16, "LoRA rank.", low=1)
    lora_alpha: int = option(32, "LoRA alpha.", low=1)
    lora_target_modules: str = option("all-linear", "Modules LoRA adapts (comma-separated names, or all-linear).")
    gradient_checkpointing: bool = option(True, "Recompute activations in the backward pass (TRL's default; off "
                                                "for tiny models).")
    micro_batch_tokens: int | None = option(None, "Most tokens one forward and backward of a DPO step holds (pairs "
                                                  "× the widest pair, each prompt once): a larger batch runs in "
                                                  "micro-batches, its gradients summed, so memory follows this "
                                                  "budget, not --batch-size. Default on a CPU: 512 tokens of "
                                                  "SmolLM2-135M's size (scaled by layers × hidden size); on a GPU "
                                                  "the whole batch.", low=1)
    logging_steps: int = option(10, "Log every N steps.", low=1)
    order: str | None = option(None, "Curriculum: train in the order of this score column (from --scores' "
                                     "scores.parquet, else a column of the data), lowest first (Selective DPO: "
                                     "easiest first); shuffling is off only then. DPO only.")
    order_descending: bool = option(False, "With --order: highest score first.")

    @property
    def effective_learning_rate(self) -> float:
        """The learning rate a training uses: the one given, else the default for what trains (every weight, or a
        LoRA adapter). Resolved when read, not at construction, so a copy that switches `lora` on
        (`replace(config, lora=True)`) takes the adapter's default instead of keeping the full one."""
        if self.learning_rate is not None:
            return self.learning_rate
        return LORA_LEARNING_RATE if self.lora else FULL_LEARNING_RATE


@dataclasses.dataclass
class EvalConfig(Checked):
    """Evaluation; β and max_length of the log-prob pass are the shared `EngineConfig`'s."""

    max_new_tokens: int = option(128, "Generation budget of each greedy answer.", low=1)
    batch_size: int = option(32, "Prompts per generation batch.", low=1)
    eval_prompts: int = option(200, "Held-out prompts for the win rate (needs a judge).", low=1)


# the baseline arms `run` trains beside the methods (pipeline.run.arm_data builds each one's subset)
BASELINES = ("validation-only", "random+validation", "random-kto")


@dataclasses.dataclass
class RunConfig(Checked):
    data: str = option("", "Training pairs: file, datasets directory or hub name.")
    model: str = option("", "The SFT model to align (also the DPO reference).")
    out: str = option("prefsift-run", "Output directory.")
    validation_data: str | None = option(None, "Trusted validation pairs; default: a split of data.")
    test_data: str | None = option(None, "Held-out test pairs; default: a split of data.")
    validation_fraction: float = option(0.05, "Share of data split off for validation.", low=0, high=1, high_open=True)
    test_fraction: float = option(0.1, "Share of data split off for testing.", low=0, high=1, high_open=True)
    prompt_key: str = option("prompt", "Input column holding the prompt.")
    chosen_key: str = option("chosen", "Input column holding the chosen response.")
    rejected_key: str = option("rejected", "Input column holding the rejected response.")
    chat_template: bool = option(False, "Plain-text prompts and completions as user / assistant messages, so the "
                                        "model's chat template formats them (as DataConfig.chat_template).")
    methods: list[str | dict] = option(default_factory=lambda: ["random", "irm", "lossdiff", "lossdiff-irm"],
                                       help="Methods to compare: names, or {name: ..., <param>: ...} mappings.",
                                       cli=False)
    fractions: list[float] = option(default_factory=lambda: [0.1], help="Subset sizes to compare.", low=0,
                                    low_open=True, high=1, cli=False)
    rule_share: bool = option(True, "Also compare every method at the share the LossDiff-IRM band rule keeps.")
    checkpoint_shares: list[float] = option(default_factory=list, help="Shares of the full run's steps at which its "
                                            "model is evaluated too (the ISA paper's scaling protocol: 0.1, 0.25, "
                                            "0.5, 0.75): data-scaling points from one training run, for `prefsift "
                                            "scale --results` and `prefsift report`. Needs train.epochs 1.",
                                            low=0, low_open=True, high=1, high_open=True, cli=False)
    full: bool = option(True, "Also train on all the training pairs.")
    warmup_fraction: float = option(0.1, "Share of the training pairs the warm-up DPO sees: its largest lever on "
                                         "cost (bench/warmup_share.py; 1.0: the TIF paper's warm-up on all).",
                                    low=0, low_open=True, high=1)
    warmup_epochs: float = option(1.0, "Epochs of the warm-up DPO.", low=0, low_open=True)
    score_share: float = option(1.0, "Share of the training pairs scored: a seeded random draw (the candidate pool) "
                                     "from which every scored method's budget selects; < 1 saves the reference and "
                                     "scoring passes over the rest. A fractional budget stays a share of all "
                                     "usable training pairs, so a pooled method's must not exceed score_share (nor "
                                     "may warmup_fraction when a warm-up is trained); a rule's own share (e.g. "
                                     "lossdiff-irm's band rule) is a share of the pool.", low=0, low_open=True, high=1)
    validation_epochs: float = option(1.0, "Epochs of DPO on validation from θ.", low=0, low_open=True)
    validation_lora: bool = option(False, "Train θ_val as a LoRA adapter on the warm-up model (merged after): "
                                          "cheaper than all weights on a large model.")
    baselines: str = option("", "Baseline arms beside the methods, comma-separated: validation-only (DPO on the "
                                "trusted validation pairs alone), random+validation (the random subset plus them), "
                                "random-kto (random completions trained with KTO, beside ISA's).")
    start_from: str = option("warmup", "Subsets continue from the 'warmup' model (the TIF paper), train from the "
                                       "'reference' model (cheaper), or 'both' (a row for each).",
                             choices=("warmup", "reference", "both"))
    seeds: int = option(1, "Training seeds the comparison repeats over (seed, seed+1, ...): intervals and paired "
                           "differences cover them. The splits stay those of `seed`.", low=1)
    save_models: bool = option(True, "Save the warm-up and validation models under OUT/models (reloadable by "
                                     "`prefsift score` and `prefsift train --model`).")
    save_subset_models: bool = option(False, "Also save every subset's trained model under "
                                              "OUT/seed-S/models/<start>-<method>-<budget> (one model a row: large).")
    min_test_pairs: int = option(20, "Refuse a test split of fewer pairs (an accuracy near 0.5 over 20 pairs already "
                                     "has a 95% interval of ±0.22). 0 allows any size: the summary's intervals then "
                                     "show how little it says.", low=0)
    judge_model: str | None = option(None, "Reward model judging win rates.")
    reward_model: str | None = option(None, "Sequence-classification reward model of the methods that score with one "
                                            "(reward-margin, alignment-potential); default: the data's "
                                            "score_chosen/score_rejected columns.")
    embedder: str | None = option(None, "Embedding model of the methods that embed (isa, density); default: the "
                                        "SFT model's last-token hidden state, the ISA paper's choice.")
    seed: int = option(0, "Seed of splits, random scores and training (overrides train.seed).", low=0, high=MAX_SEED)
    trust_remote_code: bool = option(False, "Let a model run its own code.")
    allow_dropped: bool = option(False, "Go on when max_length drops more than half of the training pairs (every "
                                        "pair dropped always stops).")
    correction: str = option("holm", "How a table's tests are corrected together: holm (family-wise error ≤ alpha) or "
                                     "bh (Benjamini-Hochberg, false discovery rate alpha).", choices=CORRECTIONS)
    alpha: float = option(0.05, "Family-wise error (holm) or false discovery rate (bh) of a table's marks.", low=0,
                          high=1, low_open=True, high_open=True)
    noninferiority_margin: float = option(0.02, "Non-inferiority against the full data: method − full > −margin.",
                                          low=0)
    engine: EngineConfig = option(default_factory=EngineConfig, help="β, max_length, precision: shared by all.")
    train: TrainConfig = option(default_factory=TrainConfig, help="DPO settings of every training.")
    eval: EvalConfig = option(default_factory=EvalConfig, help="Evaluation settings.")

    def check(self) -> None:
        if self.validation_fraction + self.test_fraction >= 1:
            raise ConfigError("validation_fraction + test_fraction must leave some training pairs (< 1)")
        if self.train.algo != "dpo":
            raise ConfigError(f"run trains with DPO (the TIF pipeline); train.algo is {self.train.algo!r}")
        if self.train.order is not None:  # a curriculum needs its scores' values, which `prefsift train` reads
            raise ConfigError("train.order (a curriculum) is an option of `prefsift train --order`; run trains each "
                              "subset shuffled")
        if not self.methods:
            raise ConfigError("methods: give at least one method")
        if len(set(self.fractions)) != len(self.fractions):
            raise ConfigError(f"fractions: each once (got {self.fractions})")
        if self.checkpoint_shares and (self.train.epochs != 1 or not self.full):
            raise ConfigError("checkpoint_shares evaluate the full run at shares of one epoch: they need full: true "
                              f"and train.epochs 1 (got full: {self.full}, epochs {self.train.epochs:g})")
        if len(set(self.checkpoint_shares)) != len(self.checkpoint_shares):
            raise ConfigError(f"checkpoint_shares: each once (got {self.checkpoint_shares})")
        if not self.fractions and not self.rule_share:
            raise ConfigError("fractions is empty and rule_share is off: no budget to compare methods at")
        # score_share against fractions and warmup_fraction depends on the methods (a pooled one, a warm-up trained):
        # checked where they are parsed (pipeline.run.check_pool_config)
        self.baseline_arms()

    def baseline_arms(self) -> list[str]:
        """The `baselines` option as a list, each name checked."""
        names = [b.strip() for b in self.baselines.split(",") if b.strip()]
        unknown = [b for b in names if b not in BASELINES]
        if unknown or len(set(names)) != len(names):
            raise ConfigError(f"baselines: distinct names among {', '.join(BASELINES)}, comma-separated "
                              f"(got {self.baselines!r})")
        return names


EXPORT_FORMATS = ("datasets", "hub", "trl", "llamafactory", "openrlhf", "axolotl")


@dataclasses.dataclass
class ExportConfig(Checked):
    """`prefsift export`: where a selected subset goes and in which layout."""

    format: str = option("trl", "Layout: datasets, hub, trl, llamafactory, openrlhf, axolotl.", choices=EXPORT_FORMATS)
    name: str = option("prefsift_subset", "Dataset name: LLaMA-Factory's dataset_info.json key and data file stem.")
    split: str = option("train", "Split name of a hub push.")
    private: bool = option(True, "Hub push: a private dataset repository.")

    def check(self) -> None:
        if not self.name or any(c in self.name for c in "/\\ ") or self.name.startswith("."):
            raise ConfigError(f"name must be a plain file stem without spaces or slashes (got {self.name!r})")
