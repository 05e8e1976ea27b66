"""The `train` and `eval` stages, and `compare`'s settings, as the CLI runs them: load, check, compute, write the
stage's directory (staged and swapped in whole, with its manifest and dropped rows). The CLI parses its options and
calls these; a notebook or a script calls the same functions with the same checks and files.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefsift import models  # models.load_model: looked up at call time, so a test can watch what reaches it
from prefsift.config import DataConfig, EngineConfig, EvalConfig, ModelConfig, RunConfig, TrainConfig
from prefsift.data import LoadedPairs, load_pairs
from prefsift.engine import Engine
from prefsift.errors import ConfigError, PrefsiftError
from prefsift.manifest import dropped_record, read_manifest, write_dropped, write_input_drops, write_manifest
from prefsift.output import check_output, locked, staged
from prefsift.settings import split_flags

Log = Callable[[str], None]


def load_data(source: str, options: DataConfig, log: Log = print) -> LoadedPairs:
    """The pairs of `source` under the data options, with a summary line and the first invalid rows logged."""
    loaded = load_pairs(source, split=options.split, prompt_key=options.prompt_key, chosen_key=options.chosen_key,
                        rejected_key=options.rejected_key, on_invalid=options.on_invalid,
                        chat_template=options.chat_template)
    log(loaded.summary())
    for row in loaded.invalid[:5]:
        log(f"  skipped row {row.row}: {row.reason}")
    if len(loaded.invalid) > 5:
        log(f"  ... and {len(loaded.invalid) - 5} more")
    return loaded


def scored_defaults(scores: Path | None) -> dict[str, Any]:
    """The engine settings a training takes from the score directory whose reference log-probs it reuses, so the
    two agree unless the user says otherwise: max_length and β."""
    if scores is None:
        return {}
    return {k: v for k, v in read_manifest(scores).get("engine", {}).items() if k in ("max_length", "beta")}


@dataclass
class TrainStage:
    """What `train_stage` did: the trained pairs, the pairs and rows it left out, and its seconds."""

    out: Path
    algo: str
    n_pairs: int
    n_too_long: int
    n_invalid: int
    seconds: float
    reused_scores: bool
    epochs: float = 1.0  # as asked
    rows: int = 0  # rows TRL trained on (pairs for DPO, completions for KTO) and how many its steps reached
    rows_seen: int = 0
    epochs_done: float = 1.0
    steps: int = 0

    def summary(self, max_length: int | None) -> str:
        """What was trained on, truthfully: the pairs left out and why, and, when the steps ended inside the first
        epoch (a small --epochs), how many pairs they never reached."""
        def counted(n: int, what: str) -> str:
            return f"{n} {what}{'' if n == 1 else 's'}"

        too_long = f"prompt fills max_length {max_length}"
        reasons = [counted(self.n_too_long, "pair") + f" whose {too_long}"] if self.n_too_long else []
        reasons += [counted(self.n_invalid, "invalid input row")] if self.n_invalid else []
        notes = [f"{'; '.join(reasons)} left out → {self.out / 'dropped.jsonl'}"] if reasons else []
        n = self.n_pairs
        if self.rows_seen < self.rows:
            unit = "pairs" if self.algo == "dpo" else "completions"
            notes.append(f"--epochs {self.epochs:g} ends after {counted(self.steps, 'step')}, {self.epochs_done:.2g} "
                         f"of an epoch: {self.rows - self.rows_seen} of the {self.rows} {unit} never seen")
            n = self.rows_seen if self.algo == "dpo" else n
        of = (f" of {self.n_pairs + self.n_too_long + self.n_invalid} rows" if reasons else
              f" of {self.n_pairs} pairs" if n != self.n_pairs else " pairs")
        why = f" ({'; '.join(notes)})" if notes else ""
        return f"trained {self.algo} on {n}{of}{why} in {self.seconds:.1f}s → {self.out}"


def train_stage(data: str, model: str, out: Path, *, reference: str | None = None, scores: Path | None = None,
                config: TrainConfig | None = None, engine: EngineConfig | None = None,
                data_options: DataConfig | None = None, model_options: ModelConfig | None = None,
                log: Log = print) -> TrainStage:
    """`prefsift train`: align `model` on the pairs of `data` with DPO or KTO through TRL, into `out`. DPO's reference
    log-probs come from `reference.reference_logps` (reused from `scores` when given); KTO's from its own pass on the
    engine against `reference` (default: the policy)."""
    from prefsift.reference import reference_logps
    from prefsift.train import order_values, training_pairs
    from prefsift.train import train as run_train

    config, engine = config or TrainConfig(), engine or EngineConfig()
    data_options, model_options = data_options or DataConfig(), model_options or ModelConfig()
    check_output(out, "train")  # before any model is loaded or trained
    Engine(engine).apply_threads()
    loaded_data = load_data(data, data_options, log)
    order = order_values(config.order, loaded_data, scores) if config.order else None
    if config.algo == "kto" and scores is not None:
        raise ConfigError("--scores feeds DPO's reference log-probs; KTO computes its own (its KL term needs "
                          "mismatched completions no score holds): give --reference instead")
    if scores is not None:  # the reference log-probs it reuses: finite, or left out there (before any model loads)
        check_reference_columns(scores)
    common = {"dtype": engine.dtype, "device": engine.device, "trust_remote_code": model_options.trust_remote_code}
    policy = models.load_model(model, **common)
    ref_model = models.load_model(reference, **common) if reference and reference != model else policy
    ref = None
    if config.algo == "dpo" and (scores is not None or ref_model is not policy):
        ref = reference_logps(ref_model, loaded_data.pairs, engine, scores_dir=scores)
        if scores is not None:
            log(f"reusing reference log-probs from {scores}")
    kto_reference = ref_model if config.algo == "kto" and ref_model is not policy else None
    del ref_model  # DPO needs only its log-probs from here on
    # the model is saved into a staging directory swapped in whole: a failure keeps an earlier model at --out intact
    with locked(out), staged(out, "train") as tmp:
        result = run_train(policy, training_pairs(loaded_data), config, engine, tmp, ref_logps=ref, order=order,
                           reference=kto_reference)
        # the pairs TRL would drop (prompt fills max_length), then the input rows left out, beside the model
        too_long = f"prompt fills max_length {engine.max_length}"
        rows = loaded_data.rows or [None] * len(loaded_data.pairs)
        write_dropped(tmp, [dropped_record("train", too_long, pair_id=loaded_data.pairs[i]["pair_id"], row=rows[i])
                            for i in result.too_long])
        write_input_drops(tmp, loaded_data.invalid)
        write_manifest(tmp, "train", {"model": model, "fingerprint": policy.fingerprint, "reference": reference,
                                      "data": {"source": data, "hash": loaded_data.data_hash,
                                               "n_pairs": result.n_pairs, "rows": result.rows,
                                               "rows_seen": result.rows_seen, "epochs_done": result.epochs_done,
                                               "steps": result.steps},
                                      "config": {**dataclasses.asdict(config),
                                                 "learning_rate": config.effective_learning_rate},
                                      "engine": dataclasses.asdict(engine),
                                      "scores": str(scores) if scores else None, "seconds": result.seconds})
    return TrainStage(out, config.algo, result.n_pairs, len(result.too_long), len(loaded_data.invalid),
                      result.seconds, scores is not None, config.epochs, result.rows, result.rows_seen,
                      result.epochs_done, result.steps)


def check_reference_columns(scores: Path) -> None:
    """A score directory's reference log-probs hold a finite number for every pair it scored and NaN only for those
    its dropped.jsonl lists (prompt fills max_length); a hand-edited null or inf is one line, not a training against
    it."""
    import pyarrow.parquet as pq

    from prefsift.manifest import check_scores

    path = Path(scores) / "scores.parquet"
    if not path.is_file():
        return  # reference_logps names the missing file
    names = [n for n in ("ref_chosen_logps", "ref_rejected_logps") if n in pq.read_schema(path).names]
    if names:
        check_scores(scores, pq.read_table(path, columns=["pair_id", *names]).to_pydict(), names)


def eval_stage(model: str, data: str, out: Path, *, reference: str | None = None, judge_model: str | None = None,
               config: EvalConfig | None = None, engine: EngineConfig | None = None,
               data_options: DataConfig | None = None, model_options: ModelConfig | None = None,
               log: Log = print) -> dict:
    """`prefsift eval`: held-out preference accuracy of `model` (against `reference`) on the pairs of `data`, and
    the win rate against the reference judged by `judge_model`; writes eval.json and its item files into `out` and
    returns the record."""
    from prefsift.engine.reward import load_reward_model
    from prefsift.evaluate import RewardModelJudge, evaluate, win_rate_prompts, write_eval_outputs

    config, engine = config or EvalConfig(), engine or EngineConfig()
    data_options, model_options = data_options or DataConfig(), model_options or ModelConfig()
    check_output(out, "eval")  # before any model is loaded
    Engine(engine).apply_threads()
    loaded_data = load_data(data, data_options, log)
    if loaded_data.kind == "unpaired":
        raise ConfigError("eval needs preference pairs (prompt, chosen, rejected); this data is unpaired")
    common = {"dtype": engine.dtype, "device": engine.device, "trust_remote_code": model_options.trust_remote_code}
    policy = models.load_model(model, **common)
    ref = models.load_model(reference, **common) if reference else None
    # a NaN or inf weight would read as pairs dropped ("prompt fills max_length") in the evaluation: said as itself
    models.check_finite_weights(policy, "--model")
    if ref is not None:
        models.check_finite_weights(ref, "--reference")
    judge = (RewardModelJudge(load_reward_model(judge_model, **common), engine.max_length, config.batch_size)
             if judge_model else None)
    prompts = win_rate_prompts(loaded_data, config.eval_prompts) if judge is not None else None
    record = evaluate(policy, ref, test_pairs=loaded_data.pairs, prompts=prompts, judge=judge, config=config,
                      engine=engine)
    with locked(out), staged(out, "eval") as tmp:  # eval.json and its item files replace earlier ones whole
        # item by item beside the summary: eval_pairs.jsonl (margins), answers.jsonl (what the judge saw)
        record = write_eval_outputs(record, tmp, pair_ids=list(loaded_data.pairs["pair_id"]), prompts=prompts)
        try:
            text = json.dumps(record, indent=2, allow_nan=False)
        except ValueError:  # a NaN is not JSON, and not a result
            bad = sorted(k for k, v in record.items() if isinstance(v, float) and v != v)
            raise PrefsiftError(f"evaluation gave no number for {', '.join(bad) or 'a metric'} (every pair dropped? "
                                f"raise --max-length)") from None
        (tmp / "eval.json").write_text(text + "\n")
        write_input_drops(tmp, loaded_data.invalid)  # the test rows left out
        write_manifest(tmp, "eval", {"model": model, "reference": reference, "data_hash": loaded_data.data_hash,
                                     "config": dataclasses.asdict(config), "engine": dataclasses.asdict(engine)})
    return record


def compare_config(flags: dict[str, Any], *, methods: str | None, fractions: str | None,
                   config: Path | None) -> RunConfig:
    """`prefsift compare`'s settings: the YAML of --config (in `run`'s nested format), then the flags, which win; three
    seeds unless told; `all` methods resolved against the data's columns and the models given."""
    from prefsift.compare import resolve_methods
    from prefsift.pipeline import load_run_config
    from prefsift.settings import load_yaml

    values = load_yaml(config) if config else {}
    run_flags, engine_flags, train_flags = split_flags(flags, RunConfig, EngineConfig, TrainConfig)
    values.update(run_flags)
    values.setdefault("seeds", 3)
    for section, given in (("engine", engine_flags), ("train", train_flags)):
        nested = values.get(section) or {}  # `engine:` with nothing under it is YAML's null
        if not isinstance(nested, dict):
            raise ConfigError(f"{config}: {section} must be a mapping of {section} settings (got "
                              f"{type(nested).__name__})")
        values[section] = {**nested, **given}
    if fractions is not None:
        try:
            values["fractions"] = [float(f) for f in fractions.split(",")]
        except ValueError:
            raise ConfigError(f"--fractions takes comma-separated numbers (got {fractions!r})") from None
    if not values.get("data") or not values.get("model"):
        raise ConfigError("--data and --model are required (or data/model in --config)")
    listed = [m.strip() for m in methods.split(",") if m.strip()] if methods is not None else values.get("methods",
                                                                                                         ["all"])
    columns = load_pairs(values["data"]).raw.column_names if listed == ["all"] else []
    values["methods"] = resolve_methods(listed, values.get("reward_model"), columns)
    return load_run_config(values, str(config or "options"))
