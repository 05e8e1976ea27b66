"""The `prefsift` command: parses options, calls the library, prints a short summary. No logic lives here."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from prefsift.errors import PrefsiftError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Score preference pairs with the model you will align, keep the subset worth training on, "
                       "train with TRL, and measure what it bought.")
console = Console(stderr=True)

DataOpt = Annotated[str, typer.Option("--data", help="JSONL/JSON/Parquet/CSV file, datasets directory, or hub "
                                                     "name[:split].")]
PromptKey = Annotated[str, typer.Option(help="Input column of the prompt.")]
ChosenKey = Annotated[str, typer.Option(help="Input column of the chosen response.")]
RejectedKey = Annotated[str, typer.Option(help="Input column of the rejected response.")]
OnInvalid = Annotated[str, typer.Option(help="Invalid rows: 'skip' (report and go on) or 'fail'.")]
Split = Annotated[str | None, typer.Option(help="Split of a datasets directory or hub dataset.")]
MaxLength = Annotated[int, typer.Option(help="Token cut-off, as TRL's max_length.")]
Beta = Annotated[float, typer.Option(help="DPO temperature β.")]


def friendly(fn):
    """Users' errors print as one line and exit 2; an interrupt says that finished shards are kept."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PrefsiftError as error:
            console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted:[/] finished log-prob shards are kept; rerun the same command to "
                          "resume from them")
            raise typer.Exit(130) from None

    return wrapper


def _load(data: str, split, prompt_key, chosen_key, rejected_key, on_invalid):
    from prefsift.data import load_pairs
    from prefsift.errors import ConfigError

    if on_invalid not in ("skip", "fail"):
        raise ConfigError(f"--on-invalid must be 'skip' or 'fail' (got {on_invalid!r})")
    loaded = load_pairs(data, split=split, prompt_key=prompt_key, chosen_key=chosen_key,
                        rejected_key=rejected_key, on_invalid=on_invalid)
    console.print(loaded.summary(), highlight=False)
    for row in loaded.invalid[:5]:
        console.print(f"  skipped row {row.row}: {row.reason}", highlight=False)
    if len(loaded.invalid) > 5:
        console.print(f"  ... and {len(loaded.invalid) - 5} more", highlight=False)
    return loaded


@app.command()
@friendly
def score(
    data: DataOpt,
    method: Annotated[str, typer.Option(help="random, margin, irm, lossdiff or lossdiff-irm.")],
    out: Annotated[Path, typer.Option(help="Output directory (scores.parquet, manifest.json).")],
    model: Annotated[str | None, typer.Option(help="Policy: hub id, local directory or .gguf file.")] = None,
    reference: Annotated[str | None, typer.Option(help="Reference model (default: --model).")] = None,
    validation: Annotated[str | None, typer.Option(help="Validation model θ_val (lossdiff).")] = None,
    reward_model: Annotated[str | None, typer.Option(help="Reward model for 'margin'.")] = None,
    beta: Beta = 0.1,
    max_length: MaxLength = 1024,
    batch_tokens: Annotated[int, typer.Option(help="Tokens per forward batch.")] = 8192,
    band_low: Annotated[float, typer.Option(help="Lower percentile of the middle band.")] = 0.1,
    band_high: Annotated[float, typer.Option(help="Upper percentile of the middle band.")] = 0.9,
    seed: int = 0,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16.")] = "auto",
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ...")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Let a model run its own code.")] = False,
    split: Split = None,
    prompt_key: PromptKey = "prompt",
    chosen_key: ChosenKey = "chosen",
    rejected_key: RejectedKey = "rejected",
    on_invalid: OnInvalid = "skip",
) -> None:
    """Score every pair with METHOD; write scores.parquet under TRL's column names."""
    from prefsift.score import ScoreConfig
    from prefsift.score import score as run_score
    from prefsift.scorers import get_scorer

    get_scorer(method)  # an unknown method fails before any loading
    loaded = _load(data, split, prompt_key, chosen_key, rejected_key, on_invalid)
    config = ScoreConfig(method=method, model=model, reference=reference, validation=validation,
                         reward_model=reward_model, beta=beta, max_length=max_length, batch_tokens=batch_tokens,
                         band_low=band_low, band_high=band_high, seed=seed, dtype=dtype, device=device,
                         trust_remote_code=trust_remote_code)
    result = run_score(loaded, config, out)
    columns = [c for c in result.scores if c != "pair_id"]
    console.print(f"scored {len(result.scores['pair_id'])} pairs with {method} in {result.seconds:.1f}s: "
                  f"{', '.join(columns)} → {out / 'scores.parquet'}", highlight=False)


@app.command()
@friendly
def select(
    scores: Annotated[Path, typer.Option(help="Directory written by `prefsift score`.")],
    out: Annotated[Path, typer.Option(help="Output directory (selected.jsonl, selected.parquet).")],
    rule: Annotated[str | None, typer.Option(help="top, bottom, band, intersection, all (default: the "
                                                   "method's own rule).")] = None,
    fraction: Annotated[float | None, typer.Option(help="Share of the pairs to keep, in (0, 1].")] = None,
    count: Annotated[int | None, typer.Option(help="Number of pairs to keep.")] = None,
    column: Annotated[str | None, typer.Option(help="Score column (default: the method's).")] = None,
    columns: Annotated[str | None, typer.Option(help="Comma-separated columns for 'intersection'.")] = None,
    low: Annotated[float | None, typer.Option(help="Lower percentile cut-off of a band, in [0, 1].")] = None,
    high: Annotated[float | None, typer.Option(help="Upper percentile cut-off of a band, in [0, 1].")] = None,
) -> None:
    """Keep the pairs a rule picks; write them in the input's own columns plus pair_id."""
    from prefsift.select import select_from_scores

    result = select_from_scores(scores, out, rule=rule, fraction=fraction, count=count, column=column,
                                columns=columns.split(",") if columns else None, low=low, high=high)
    console.print(f"kept {result['n_selected']} of {result['n_pairs']} pairs ({result['rule']}) → "
                  f"{out / 'selected.jsonl'}", highlight=False)


@app.command()
@friendly
def train(
    data: DataOpt,
    model: Annotated[str, typer.Option(help="Model to align: hub id, local directory or .gguf file.")],
    out: Annotated[Path, typer.Option(help="Where the trained model (or LoRA adapter) is saved.")],
    algo: Annotated[str | None, typer.Option(help="dpo or kto (default: the config's, else dpo).")] = None,
    scores: Annotated[Path | None, typer.Option(help="A `prefsift score` directory whose reference log-probs "
                                                      "are reused (TRL then skips its reference pass).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file of TrainConfig options (CLI flags win).")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    epochs: Annotated[float | None, typer.Option(help="Epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Pairs per device and step.")] = None,
    beta: Annotated[float | None, typer.Option(help="β of the loss.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Token cut-off.")] = None,
    lora: Annotated[bool | None, typer.Option(help="Train a LoRA adapter.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed.")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16.")] = "auto",
    split: Split = None,
    prompt_key: PromptKey = "prompt",
    chosen_key: ChosenKey = "chosen",
    rejected_key: RejectedKey = "rejected",
    on_invalid: OnInvalid = "skip",
) -> None:
    """Align MODEL on the pairs with DPO or KTO through TRL."""
    from prefsift.config import from_dict, load_yaml
    from prefsift.manifest import write_manifest
    from prefsift.models import load_model
    from prefsift.score import reference_logps_from_scores
    from prefsift.train import TrainConfig
    from prefsift.train import train as run_train

    values = load_yaml(config) if config else {}
    flags = {"algo": algo, "learning_rate": learning_rate, "epochs": epochs, "batch_size": batch_size,
             "beta": beta, "max_length": max_length, "lora": lora, "seed": seed}
    values.update({k: v for k, v in flags.items() if v is not None})
    train_config = from_dict(TrainConfig, values, str(config or "options"))
    loaded_data = _load(data, split, prompt_key, chosen_key, rejected_key, on_invalid)
    loaded_model = load_model(model, dtype=dtype)
    ref = None
    if scores is not None and train_config.algo == "dpo":
        ref = reference_logps_from_scores(scores, loaded_data, loaded_model, train_config.max_length)
        console.print(f"reusing reference log-probs from {scores}", highlight=False)
    result = run_train(loaded_model, loaded_data.pairs, train_config, out, ref_logps=ref)
    write_manifest(out, "train", {"model": model, "fingerprint": loaded_model.fingerprint,
                                  "data": {"source": data, "hash": loaded_data.data_hash, "n_pairs": result.n_pairs},
                                  "config": dataclasses.asdict(train_config), "scores": str(scores) if scores else None,
                                  "seconds": result.seconds})
    console.print(f"trained {train_config.algo} on {result.n_pairs} pairs in {result.seconds:.1f}s → {out}",
                  highlight=False)


@app.command("eval")
@friendly
def eval_(
    model: Annotated[str, typer.Option(help="The aligned policy.")],
    data: DataOpt,
    out: Annotated[Path, typer.Option(help="Output directory (eval.json).")],
    reference: Annotated[str | None, typer.Option(help="Reference (SFT) policy; default: --model.")] = None,
    judge_model: Annotated[str | None, typer.Option(help="Reward model judging the win rate.")] = None,
    eval_prompts: Annotated[int, typer.Option(help="Prompts for the win rate (needs --judge-model).")] = 200,
    beta: Beta = 0.1,
    max_length: MaxLength = 1024,
    max_new_tokens: Annotated[int, typer.Option(help="Generation budget per answer.")] = 128,
    split: Split = None,
    prompt_key: PromptKey = "prompt",
    chosen_key: ChosenKey = "chosen",
    rejected_key: RejectedKey = "rejected",
    on_invalid: OnInvalid = "skip",
) -> None:
    """Held-out preference accuracy (implicit reward against --reference; without one, the share of pairs where
    the policy gives chosen the higher log-prob), and the win rate against the reference with a judge."""
    from prefsift.evaluate import EvalConfig, RewardModelJudge, evaluate, load_reward_model, win_rate_prompts
    from prefsift.manifest import write_manifest
    from prefsift.models import load_model
    from prefsift.report import one_line

    loaded_data = _load(data, split, prompt_key, chosen_key, rejected_key, on_invalid)
    if loaded_data.kind == "unpaired":
        from prefsift.errors import ConfigError

        raise ConfigError("eval needs preference pairs (prompt, chosen, rejected); this data is unpaired")
    policy = load_model(model)
    ref = load_model(reference) if reference else None
    config = EvalConfig(beta=beta, max_length=max_length, max_new_tokens=max_new_tokens)
    judge = RewardModelJudge(load_reward_model(judge_model), max_length) if judge_model else None
    prompts = win_rate_prompts(loaded_data, eval_prompts) if judge is not None else None
    record = evaluate(policy, ref, test_pairs=loaded_data.pairs, prompts=prompts, judge=judge, config=config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(record, indent=2) + "\n")
    write_manifest(out, "eval", {"model": model, "reference": reference, "data_hash": loaded_data.data_hash,
                                 "config": dataclasses.asdict(config)})
    console.print(one_line(record), highlight=False)


@app.command()
@friendly
def run(
    config: Annotated[Path, typer.Option(help="YAML file of RunConfig options (see README).")],
    out: Annotated[Path | None, typer.Option(help="Output directory (overrides the config's).")] = None,
) -> None:
    """The whole flow from one config: warm-up, validation model, score, select, train, evaluate, report."""
    from prefsift.config import from_dict, load_yaml
    from prefsift.pipeline import RunConfig, run_pipeline

    run_config = from_dict(RunConfig, load_yaml(config), str(config))
    if out is not None:
        run_config.out = str(out)
    if not run_config.data or not run_config.model:
        from prefsift.errors import ConfigError

        raise ConfigError(f"{config}: 'data' and 'model' are required")
    run_pipeline(run_config, log=lambda line: console.print(line, highlight=False))
    console.print(f"results → {Path(run_config.out) / 'results.md'}", highlight=False)


@app.command()
@friendly
def demo(
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("prefsift-demo"),
    seed: Annotated[int, typer.Option(help="Seed of the task, the model and every run.")] = 0,
) -> None:
    """The embedded benchmark end to end: a synthetic task with a hidden oracle, a tiny SFT model, every method."""
    from prefsift.demo import run_demo

    records = run_demo(out, seed=seed, log=lambda line: console.print(line, highlight=False))
    from prefsift.report import markdown_table

    typer.echo(markdown_table(records))
    console.print(f"results → {out / 'results.md'}, plot → {out / 'win_rate.png'}", highlight=False)


def main() -> None:
    app(prog_name="prefsift")


if __name__ == "__main__":
    sys.exit(main())
