"""The Python API: `prefsift.score`, `select`, `weigh`, `train`, `evaluate`, `compare`, `export` and `run`, the
functions the CLI's commands call, with the same checks, the same files and manifests, and the same summary line
(through `log`).

Data is a path (a JSONL / JSON / Parquet / CSV file, a datasets directory, a hub name), a `datasets.Dataset` or a
list of dicts. Options are keyword arguments named as the CLI's flags (`max_length=64` for `--max-length 64`),
routed to the config dataclass that declares each (`prefsift.config`) and checked there; a config object may be
passed whole instead (`engine=EngineConfig(...)`), keywords win over it. An unknown keyword or a bad value raises
`ConfigError` with one line naming it.

    scores = prefsift.score(pairs, policy="warmup/", reference="sft/", methods=["irm"], out="scores/")
    subset = prefsift.select("scores/", out="subset/", fraction=0.25)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefsift.config import (
    DataConfig,
    EngineConfig,
    EvalConfig,
    ExportConfig,
    ModelConfig,
    RunConfig,
    ScoreConfig,
    TrainConfig,
)
from prefsift.errors import ConfigError, DataError
from prefsift.settings import check_option, from_dict, split_flags

if TYPE_CHECKING:  # datasets costs seconds to import: only when a function runs
    import datasets

    from prefsift.export import Exported
    from prefsift.stages import TrainStage

Log = Callable[[str], None]
PathLike = str | os.PathLike


def _warn_with(log: Log) -> Log:
    return lambda message: log(f"warning: {message}")


def _text(value: Any) -> Any:
    """A path given as a `Path` is the string a config field holds."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def configs(options: Mapping[str, Any], *given: tuple[type, Any]) -> list:
    """Each config class of `given` built from its instance (or its defaults) with the keyword `options` over it,
    every option routed to the class that declares it and checked as its CLI flag is: an unknown name or a bad value
    is one `ConfigError` line."""
    classes = [cls for cls, _ in given]
    parts = split_flags({k: _text(v) for k, v in options.items()}, *classes)
    built = []
    for (cls, instance), part in zip(given, parts, strict=True):
        if instance is not None and not isinstance(instance, cls):
            raise ConfigError(f"expected a {cls.__name__} (got {type(instance).__name__})")
        base = dataclasses.asdict(instance) if instance is not None else {}
        try:
            built.append(from_dict(cls, {**base, **part}, ""))
        except ConfigError as error:  # a value's repr can span lines (a Dataset given for a path): one line
            raise ConfigError(" ".join(str(error).split())) from None
    return built


def _source(data: Any, name: str = "data") -> Any:
    """What `load_pairs` reads: a path as a string, a `Dataset` or `DatasetDict` as it is, a list of dicts as a
    `Dataset`."""
    import datasets

    if isinstance(data, datasets.Dataset | datasets.DatasetDict):
        return data
    if isinstance(data, str | os.PathLike):
        return os.fspath(data)
    if isinstance(data, Sequence) and data and all(isinstance(row, Mapping) for row in data):
        try:
            return datasets.Dataset.from_list([dict(row) for row in data])
        except (TypeError, ValueError, OverflowError) as error:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{name}: the rows do not make one table ({str(error).splitlines()[0]})") from None
    if isinstance(data, Sequence) and not data:
        raise DataError(f"{name}: an empty list holds no pairs")
    raise ConfigError(f"{name} must be a path, a datasets.Dataset or a list of dicts (got {type(data).__name__})")


def _path(value: Any, name: str) -> Path:
    if not isinstance(value, str | os.PathLike) or not os.fspath(value):
        raise ConfigError(f"{name} must be a path (got {value!r})"[:200])
    return Path(value)


def _model(value: Any, name: str, *, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str | os.PathLike) or not os.fspath(value):
        raise ConfigError(f"{name} must be a hub id, a model directory or a .gguf file (got {value!r})"[:200])
    return os.fspath(value)


def _dataset(path: Path) -> datasets.Dataset:
    """A Parquet file a stage wrote, as an in-memory `Dataset` (no cache files left behind)."""
    import datasets
    import pyarrow.parquet as pq

    return datasets.Dataset(pq.read_table(path).replace_schema_metadata(None))


def _method_params(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """`params` as `--param` gives them: `key` (one method) or `method.key`; `{method: {key: value}}` too."""
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"params must be a mapping of parameter names to values (got {type(params).__name__})")
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{name}": v for name, v in value.items()})
        else:
            flat[str(key)] = value
    return flat


def score(data: Any, *, out: PathLike | None = None, methods: str | Sequence[str] | None = None,
          policy: PathLike | None = None,
          params: Mapping[str, Any] | None = None, config: ScoreConfig | None = None,
          engine: EngineConfig | None = None, data_options: DataConfig | None = None, log: Log = print,
          **options: Any) -> datasets.Dataset:
    """`prefsift score`: score every pair of `data` with each of `methods` (`prefsift methods` lists them) and write
    scores.parquet, pairs.parquet, dropped.jsonl and manifest.json into `out`. `policy` is the model θ the scores
    are about (the CLI's `--model`); `reference=`, `validation=`, `reward_model=`, `embedder=`, `validation_data=`
    and every other `ScoreConfig`, `EngineConfig` or `DataConfig` option are keywords. `params`: the methods'
    parameters (`{"band_low": 0.25}` with one method, `{"irm": {"band_low": 0.25}}` or `"irm.band_low"` with
    several). Returns scores.parquet as a `Dataset`: `pair_id`, the score columns and TRL-named log-probs; a pair
    left out (prompt fills max_length, a non-finite score) is NaN and listed in dropped.jsonl. Without `out` nothing
    is written (no files for `select`, no resumable passes): the scores come back as the same `Dataset` only."""
    from prefsift.engine import Engine
    from prefsift.output import check_output, locked
    from prefsift.resources import require, sources_of
    from prefsift.score import method_params
    from prefsift.score import score as run_score
    from prefsift.scorers import get_scorer
    from prefsift.stages import load_data

    options = dict(options)
    if methods is not None:
        options["method"] = methods if isinstance(methods, str) else ",".join(check_option("methods", methods,
                                                                                          list[str]))
    if policy is not None:
        if "model" in options:
            raise ConfigError("give the policy once: policy= or model=")
        options["model"] = policy
    score_config, engine, data_options = configs(options, (ScoreConfig, config), (EngineConfig, engine),
                                                 (DataConfig, data_options))
    out = _path(out, "out") if out is not None else None
    # an unknown method, a bad parameter or a missing model fails before anything is loaded
    per_method = method_params(score_config.methods(), _method_params(params))
    for name in score_config.methods():
        require(get_scorer(name, **per_method[name]).needs, sources_of(score_config), name)
    if out is not None:
        check_output(out, "score")  # a file, another stage's results, a foreign directory: before any work
    source = _source(data)
    Engine(engine).apply_threads()
    with locked(out) if out is not None else contextlib.nullcontext():
        loaded = load_data(source, data_options, log)
        result = run_score(loaded, score_config, engine, out, per_method)
    columns = [c for c in result.scores if c != "pair_id"]
    n_scored = len(result.scores["pair_id"]) - result.n_dropped
    left_out = result.n_dropped + len(loaded.invalid)
    dropped = f" ({left_out} left out" + (f" → {out / 'dropped.jsonl'})" if out is not None else ")")
    where = f" → {out / 'scores.parquet'}" if out is not None else ""
    # times that add up: the wall clock, each shared pass once
    log(f"scored {n_scored} pairs{dropped if left_out else ''} with {score_config.method} {result.timing()}: "
        f"{', '.join(columns)}{where}")
    if out is not None:
        return _dataset(out / "scores.parquet")
    import datasets
    import pyarrow as pa

    # the table write_scores writes
    return datasets.Dataset(pa.table({k: list(v) if k == "pair_id" else v for k, v in result.scores.items()}))


def select(scores: PathLike, *, out: PathLike, rule: str | None = None, fraction: float | None = None,
           count: int | None = None, column: str | None = None, columns: str | Sequence[str] | None = None,
           low: float | None = None, high: float | None = None, method: str | None = None,
           output_columns: str = "split", with_scores: bool = False, log: Log = print,
           warn: Log | None = None) -> datasets.Dataset:
    """`prefsift select`: keep the pairs a rule picks from the score directory `scores` (written by `score`, or a
    run's scores/) and write selected.jsonl, selected.parquet, dropped.jsonl and manifest.json into `out`. Without
    `rule`, the scoring method's own rule applies (`method` picks one when the directory holds several); `fraction`
    or `count` sets the budget. A degenerate score (constant, mostly NaN, ties at the cut) is said through `warn`
    (default: `log`, as `warning: ...`). Returns the subset as a `Dataset` (prompt, chosen, rejected, pair_id; the
    input's own columns with `output_columns="original"`)."""
    from prefsift.output import check_output, locked
    from prefsift.select import select_from_scores

    scores, out = _path(scores, "scores"), _path(out, "out")
    if isinstance(columns, str):
        columns = columns.split(",")
    checked = {"rule": (rule, str | None), "fraction": (fraction, float | None), "count": (count, int | None),
               "column": (column, str | None), "columns": (columns, list[str] | None), "low": (low, float | None),
               "high": (high, float | None), "method": (method, str | None),
               "output_columns": (output_columns, str), "with_scores": (with_scores, bool)}
    values = {name: check_option(name, value, kind) for name, (value, kind) in checked.items()}
    check_output(out, "select")  # never into a score directory (its manifest would be overwritten) or a foreign one
    with locked(out):  # a second writer is refused; the files are swapped in whole (select_from_scores)
        result = select_from_scores(scores, out, **values)
    for warning in result["warnings"]:
        (warn or _warn_with(log))(warning)
    dropped = (f"; {result['n_dropped']} not considered (NaN score) → {out / 'dropped.jsonl'}"
               if result["n_dropped"] else "")
    log(f"kept {result['n_selected']} of {result['n_pairs']} pairs ({result['rule']}){dropped} → "
        f"{out / 'selected.jsonl'}")
    return _dataset(out / "selected.parquet")


def weigh(scores: PathLike, *, out: PathLike, column: str, transform: str, temperature: float | None = None,
          low: float | None = None, high: float | None = None, reverse: bool = False, output_columns: str = "split",
          log: Log = print) -> datasets.Dataset:
    """`prefsift weigh`: turn the score `column` of the directory `scores` into per-pair training weights (`rank`,
    `softmax` with `temperature`, or `band` between the percentiles `low` and `high`; `reverse`: lower scores weigh
    more) and write the pairs of weight > 0 with their `weight` column into `out` (selected.jsonl, .parquet), as
    `select` writes a subset; `train` honours the weights. Returns the weighted pairs as a `Dataset`."""
    from prefsift.output import check_output, locked
    from prefsift.weights import weigh_scores

    scores, out = _path(scores, "scores"), _path(out, "out")
    checked = {"column": (column, str), "transform": (transform, str), "temperature": (temperature, float | None),
               "low": (low, float | None), "high": (high, float | None), "reverse": (reverse, bool),
               "output_columns": (output_columns, str)}
    values = {name: check_option(name, value, kind) for name, (value, kind) in checked.items()}
    check_output(out, "weigh")  # never into a score directory (its manifest would be overwritten) or a foreign one
    with locked(out):  # a second writer is refused; the files are swapped in whole (weigh_scores)
        result = weigh_scores(scores, out, **values)
    nan = f", {result['n_nan']} without a score" if result["n_nan"] else ""
    log(f"weighted {result['n_weighted']} of {result['n_pairs']} pairs ({result['n_zero']} at weight 0 left out{nan}; "
        f"weights {result['weight_min']:.3g}-{result['weight_max']:.3g}, mean {result['weight_mean']:.3g}) → "
        f"{out / 'selected.jsonl'}")
    return _dataset(out / "selected.parquet")


def train(data: Any, model: PathLike, *, out: PathLike, reference: PathLike | None = None,
          scores: PathLike | None = None, config: TrainConfig | None = None, engine: EngineConfig | None = None,
          data_options: DataConfig | None = None, model_options: ModelConfig | None = None, log: Log = print,
          **options: Any) -> TrainStage:
    """`prefsift train`: align `model` (hub id, directory or .gguf) on the pairs of `data` with DPO or KTO through
    TRL, into `out` (the model or LoRA adapter, dropped.jsonl, manifest.json). `reference`: the loss's reference
    model (default: `model`); `scores`: a score directory whose reference log-probs DPO reuses, whose max_length and
    β are the defaults. Options: `TrainConfig`, `EngineConfig`, `DataConfig`, `ModelConfig` keywords
    (`learning_rate=`, `epochs=`, `lora=`, `max_length=`, ...). Returns what it trained on (`TrainStage`)."""
    from prefsift.stages import scored_defaults, train_stage

    model_path, reference = _model(model, "model"), _model(reference, "reference", required=False)
    out = _path(out, "out")
    scores = _path(scores, "scores") if scores is not None else None
    if engine is None:  # the score directory's max_length and β, unless given
        engine = from_dict(EngineConfig, scored_defaults(scores), str(scores))
    config, engine, data_options, model_options = configs(
        options, (TrainConfig, config), (EngineConfig, engine), (DataConfig, data_options),
        (ModelConfig, model_options))
    result = train_stage(_source(data), model_path, out, reference=reference, scores=scores, config=config,
                         engine=engine, data_options=data_options, model_options=model_options, log=log)
    log(result.summary(engine.max_length))
    return result


def evaluate(model: PathLike, data: Any, *, out: PathLike, reference: PathLike | None = None,
             judge_model: PathLike | None = None, config: EvalConfig | None = None,
             engine: EngineConfig | None = None, data_options: DataConfig | None = None,
             model_options: ModelConfig | None = None, log: Log = print, **options: Any) -> dict:
    """`prefsift eval`: held-out preference accuracy of `model` on the pairs of `data` (implicit reward against
    `reference`; without one, the share of pairs whose chosen answer the policy gives the higher log-prob), and with
    `judge_model` (a reward model) the win rate against the reference. Writes eval.json, eval_pairs.jsonl and
    answers.jsonl into `out`; returns eval.json's record."""
    from prefsift.report import one_line
    from prefsift.stages import eval_stage

    model_path, out = _model(model, "model"), _path(out, "out")
    reference, judge = _model(reference, "reference", required=False), _model(judge_model, "judge_model",
                                                                              required=False)
    config, engine, data_options, model_options = configs(
        options, (EvalConfig, config), (EngineConfig, engine), (DataConfig, data_options),
        (ModelConfig, model_options))
    record = eval_stage(model_path, _source(data), out, reference=reference, judge_model=judge, config=config,
                        engine=engine, data_options=data_options, model_options=model_options, log=log)
    log(one_line(record))
    return record


@dataclass
class Comparison:
    """What `compare` wrote into `out`: compare.md / compare.json (the table), results.json, the plot."""

    out: Path
    summary: list[dict]  # one row a (start, method, budget): quality with intervals, Δ random, Δ full, seconds
    markdown: str  # the table as compare.md shows it
    records: list[dict]  # one record a (seed, start, method, budget)


def compare(data: PathLike | None = None, model: PathLike | None = None, *, out: PathLike | None = None,
            methods: str | Sequence[str | dict] | None = None, fractions: str | Sequence[float] | None = None,
            config: PathLike | None = None, log: Log = print, **options: Any) -> Comparison:
    """`prefsift compare`: every selection rule (or `methods`; `"all"`: every method this data and these models can
    score; random is always added) on `model` and the pairs at `data` (a path: the run splits it), at the same
    budgets (`fractions`), over seeds: quality with 95% intervals, paired differences from random and full, and
    each method's measured cost. `config`: a YAML file in `prefsift run`'s format; `RunConfig`, `EngineConfig` and
    `TrainConfig` options as keywords win over it (`seeds=`, `start_from=`, `max_length=`, `learning_rate=`)."""
    from prefsift.compare import compare as run_compare
    from prefsift.engine import Engine
    from prefsift.stages import compare_config

    flags = dict(options)
    if data is not None:
        if not isinstance(data, str | os.PathLike):
            raise ConfigError("compare splits the pairs it reads from a path (a file, a datasets directory or a hub "
                              f"name), not a {type(data).__name__}: save it first (dataset.to_json('pairs.jsonl'))")
        flags["data"] = data
    for name, value in (("model", model), ("out", out)):
        if value is not None:
            flags[name] = value
    if methods is not None and not isinstance(methods, str):
        flags["methods"], methods = list(methods), None
    if fractions is not None and not isinstance(fractions, str):
        flags["fractions"], fractions = list(fractions), None
    if config is not None:
        config = _path(config, "config")
    run_config = compare_config({k: _text(v) for k, v in flags.items()}, methods=methods, fractions=fractions,
                                config=config)
    Engine(run_config.engine).apply_threads()
    result = run_compare(run_config, log=log)
    where = Path(run_config.out)
    log(f"table → {where / 'compare.md'}, plot → {where / 'quality_vs_compute.png'}")
    return Comparison(where, result["summary"], result["markdown"], result["records"])


def export(selected: PathLike, out: PathLike, *, config: ExportConfig | None = None, log: Log = print,
           **options: Any) -> Exported:
    """`prefsift export`: write the subset at `selected` (a `select` or `weigh` directory, or a pairs file) to `out`
    in the layout of `format=` (trl, llamafactory, openrlhf, axolotl: files; datasets: a directory; hub: a repo id).
    Returns the files written and the command that reads them (`Exported.usage`)."""
    from prefsift.export import export as run_export

    selected = _path(selected, "selected")
    if not isinstance(out, str | os.PathLike) or not os.fspath(out):
        raise ConfigError(f"out must be a path or a hub repo id (got {out!r})"[:200])
    (config,) = configs(options, (ExportConfig, config))
    result = run_export(selected, os.fspath(out), config)
    skipped = f" ({result.n_invalid} invalid rows skipped)" if result.n_invalid else ""
    where = ", ".join(str(p) for p in result.paths) or f"hub:{os.fspath(out)}"
    log(f"exported {result.n_pairs} pairs{skipped} as {config.format} → {where}")
    log(f"read it with: {result.usage}")
    return result


def run(config: PathLike | RunConfig | Mapping[str, Any] | None = None, *, log: Log = print,
        **options: Any) -> dict:
    """`prefsift run`: the whole flow from one config (a YAML path, a `RunConfig` or a mapping in the YAML's
    format): warm-up, validation model, scores, subsets, trainings, evaluations, results.md. Keywords are
    `RunConfig`, `EngineConfig` or `TrainConfig` options (`out=`, `seeds=`, `max_length=`, ...) and win over the
    config. Returns {"records", "summary"}, as results.json holds them."""
    from prefsift.engine import Engine
    from prefsift.pipeline import load_run_config, run_staged
    from prefsift.settings import load_yaml

    if isinstance(config, RunConfig):
        values, where = dataclasses.asdict(config), "config"
    elif isinstance(config, Mapping):
        values, where = dict(config), "config"
    elif config is None:
        values, where = {}, "options"
    else:
        values, where = load_yaml(_path(config, "config")), os.fspath(config)
    run_options, engine_options, train_options = split_flags({k: _text(v) for k, v in options.items()}, RunConfig,
                                                             EngineConfig, TrainConfig)
    values.update(run_options)
    for section, given in (("engine", engine_options), ("train", train_options)):
        if given:
            nested = values.get(section) or {}
            if not isinstance(nested, Mapping):
                raise ConfigError(f"{where}: {section} must be a mapping of options")
            values[section] = {**nested, **given}
    run_config = load_run_config(values, where)
    if not run_config.data or not run_config.model:
        raise ConfigError(f"{where}: 'data' and 'model' are required")
    Engine(run_config.engine).apply_threads()
    results = run_staged(run_config, log=log)  # locked, swapped in whole
    log(f"results → {Path(run_config.out) / 'results.md'}")
    return results
