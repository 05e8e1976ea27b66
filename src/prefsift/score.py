"""The score stage: load the models a method needs, run its scorer, write scores.parquet + manifest.json."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prefsift.data import LoadedPairs
from prefsift.errors import ConfigError, PrefsiftError
from prefsift.manifest import read_manifest, tokenizer_fingerprint, write_manifest
from prefsift.models import LoadedModel, load_model
from prefsift.scorers import ScoringContext, get_scorer
from prefsift.scorers.base import ROLE_FLAGS


@dataclass
class ScoreConfig:
    method: str = field(default="irm", metadata={"help": "Scoring method (random, margin, irm, lossdiff, "
                                                          "lossdiff-irm)."})
    model: str | None = field(default=None, metadata={"help": "Policy: hub id, local directory or .gguf file."})
    reference: str | None = field(default=None, metadata={"help": "Reference (SFT) model; defaults to --model."})
    validation: str | None = field(default=None, metadata={"help": "Validation model θ_val (lossdiff)."})
    reward_model: str | None = field(default=None, metadata={"help": "Sequence-classification reward model "
                                                                      "(margin)."})
    beta: float = field(default=0.1, metadata={"help": "DPO temperature β of the margins and losses."})
    max_length: int | None = field(default=1024, metadata={"help": "Token cut-off, as TRL's DPOConfig.max_length."})
    batch_tokens: int = field(default=8192, metadata={"help": "Tokens per forward batch (memory knob)."})
    band_low: float = field(default=0.1, metadata={"help": "Lower percentile of the middle band (lossdiff-irm)."})
    band_high: float = field(default=0.9, metadata={"help": "Upper percentile of the middle band (lossdiff-irm)."})
    seed: int = field(default=0, metadata={"help": "Seed (random scores)."})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1 ...; default: GPU if any."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow a model's own code to run."})


def load_models(config: ScoreConfig, needs: tuple[str, ...]) -> dict[str, LoadedModel]:
    """Load each role's model once; roles naming the same source share one object (and one log-prob pass)."""
    sources = {"policy": config.model, "reference": config.reference or config.model,
               "validation": config.validation, "reward_model": config.reward_model}
    loaded: dict[str, LoadedModel] = {}
    by_source: dict[str, LoadedModel] = {}
    for role in needs + (("reward_model",) if config.reward_model and config.method == "margin" else ()):
        source = sources[role]
        if source is None:
            raise ConfigError(f"method '{config.method}' needs a {role} model ({ROLE_FLAGS[role]})")
        if role == "reward_model":
            from prefsift.evaluate import load_reward_model

            loaded[role] = load_reward_model(source, dtype=config.dtype, device=config.device,
                                             trust_remote_code=config.trust_remote_code)
            continue
        if source not in by_source:
            by_source[source] = load_model(source, dtype=config.dtype, device=config.device,
                                           trust_remote_code=config.trust_remote_code)
        loaded[role] = by_source[source]
    return loaded


@dataclass
class ScoreResult:
    scores: dict[str, np.ndarray]  # pair_id + score columns + log-prob columns
    seconds: float
    out_dir: Path | None


def score(data: LoadedPairs, config: ScoreConfig, out_dir: Path | None = None,
          models: dict[str, LoadedModel] | None = None) -> ScoreResult:
    """Score every pair of `data` with `config.method`; with `out_dir`, write the files other stages read."""
    scorer = get_scorer(config.method)
    if data.kind == "unpaired":
        raise ConfigError(f"method '{config.method}' scores preference pairs; this data is unpaired (KTO)")
    start = time.perf_counter()
    models = models if models is not None else load_models(config, scorer.needs)
    context = ScoringContext(pairs=data.pairs, raw=data.raw, models=models, beta=config.beta,
                             max_length=config.max_length, batch_tokens=config.batch_tokens, seed=config.seed,
                             out_dir=out_dir, data_hash=data.data_hash, band=(config.band_low, config.band_high))
    columns = scorer.score(context)
    result = {"pair_id": np.asarray(data.pairs["pair_id"], dtype=object), **columns, **context.logps_columns()}
    seconds = time.perf_counter() - start
    if out_dir is not None:
        write_scores(out_dir, result, data, config, models, seconds)
    return ScoreResult(result, seconds, out_dir)


def write_scores_table(out_dir: Path, scores: dict[str, np.ndarray], data: LoadedPairs) -> None:
    """scores.parquet (pair_id + scores + TRL-named log-probs) and pairs.parquet (the input's own rows)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({k: list(v) if k == "pair_id" else v for k, v in scores.items()}),
                   out_dir / "scores.parquet")
    data.raw.to_parquet(str(out_dir / "pairs.parquet"))


def write_scores(out_dir: Path, result: dict[str, np.ndarray], data: LoadedPairs, config: ScoreConfig,
                 models: dict[str, LoadedModel], seconds: float) -> None:
    write_scores_table(out_dir, result, data)
    scorer = get_scorer(config.method)
    record = {
        "method": config.method, "config": asdict(config), "default_rule": scorer.selection_rule(),
        "data": {"source": data.source, "kind": data.kind, "hash": data.data_hash, "n_pairs": len(data.pairs),
                 "n_invalid": len(data.invalid)},
        "models": {role: {"source": m.source, "fingerprint": m.fingerprint,
                          "tokenizer": tokenizer_fingerprint(m.tokenizer)} for role, m in models.items()},
        "n_dropped_too_long": int(np.isnan(result["chosen_logps"]).sum()) if "chosen_logps" in result else 0,
        "seconds": seconds,
    }
    write_manifest(out_dir, "score", record)


def reference_logps_from_scores(scores_dir: Path, data: LoadedPairs, model: LoadedModel, max_length: int | None
                                ) -> np.ndarray:
    """The (n, 2) reference log-probs of `data`'s pairs from a score directory, matched by pair_id.

    Refuses (one line) when that directory's reference model (weights fingerprint, tokenizer) or max_length differ
    from training's, or a pair is missing: log-probs of another model would silently train against the wrong
    reference."""
    manifest = read_manifest(Path(scores_dir))
    reference = manifest.get("models", {}).get("reference", {})
    scored_length = manifest.get("config", {}).get("max_length")
    same_model = (reference.get("fingerprint") == model.fingerprint
                  and reference.get("tokenizer") == tokenizer_fingerprint(model.tokenizer))
    if not same_model or scored_length != max_length:
        raise PrefsiftError(f"{scores_dir} was scored with reference {reference.get('source')!r} at max_length "
                            f"{scored_length}; training starts from {model.source!r} at max_length {max_length}: "
                            "drop --scores or rescore")
    table = pq.read_table(Path(scores_dir) / "scores.parquet").to_pydict()
    if "ref_chosen_logps" not in table:
        raise PrefsiftError(f"{scores_dir}/scores.parquet has no reference log-probs (score with irm/lossdiff)")
    index = {pid: i for i, pid in enumerate(table["pair_id"])}
    missing = [pid for pid in data.pairs["pair_id"] if pid not in index]
    if missing:
        raise PrefsiftError(f"{len(missing)} training pairs are not in {scores_dir} (e.g. {missing[0]})")
    rows = [index[pid] for pid in data.pairs["pair_id"]]
    return np.stack([np.asarray(table["ref_chosen_logps"])[rows], np.asarray(table["ref_rejected_logps"])[rows]],
                    axis=1)
