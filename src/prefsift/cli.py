"""The `prefsift` command: parses options into the config dataclasses, calls the Python API (`prefsift.api`, the
same functions a notebook calls), prints what they say. No logic lives here.

(Over 400 lines: thirteen commands, each a typed function whose options carry their help text, the CLI contract
users and scripts depend on, and the help page that prints them at any terminal width.)
"""

from __future__ import annotations

import errno
import functools
import inspect
import os
import sys
from pathlib import Path
from typing import Annotated

# Before torch loads: OpenMP threads that spin while another process holds a core stall every op of the others
# (2 threads ran 7-21x slower than 1 on a busy 2-core box; sleeping threads, 1.1-1.8x: bench/results/threads.txt).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # its Arrow bars are not prefsift's progress

import typer  # noqa: E402
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from typer.core import TyperArgument, TyperCommand, TyperGroup

from prefsift.config import (
    DataConfig,
    EngineConfig,
    EvalConfig,
    ModelConfig,
    RunConfig,
    ScoreConfig,
    TrainConfig,
)
from prefsift.errors import ConfigError, PrefsiftError
from prefsift.settings import cli_options

try:  # typer ≥ 0.22 carries its own copy of click
    import typer._click.exceptions as click_errors
except ImportError:  # pragma: no cover - older typer on plain click
    import click.exceptions as click_errors

# --- the help page: options grouped in panels, plain text, readable at 80 columns ---------------------------------
# The panels in the order a help page shows them; options of no panel go under "Options", last, with --help.
PANELS = ("Arguments", "Data", "Model", "Scoring", "Selection", "Weights", "Training", "Evaluation", "Pipeline",
          "Statistics", "Export", "Engine", "Output", "Options")
_CONFIG_PANELS = {ScoreConfig: "Scoring", TrainConfig: "Training", EvalConfig: "Evaluation", RunConfig: "Pipeline",
                  EngineConfig: "Engine", DataConfig: "Data", ModelConfig: "Model"}
_MODEL_OPTIONS = {"model", "reference", "validation", "reward_model", "embedder", "judge_model", "trust_remote_code"}
_DATA_OPTIONS = {"data", "validation_data", "test_data", "validation_fraction", "test_fraction", "prompt_key",
                 "chosen_key", "rejected_key"}
_STATISTICS_OPTIONS = {"seeds", "correction", "alpha", "noninferiority_margin", "min_test_pairs"}
HELP_WIDTH = 100  # a wider terminal still gets lines a reader can follow
NAME_WIDTH = 26  # option names longer than this get a line of their own, their help below
NARROW = 60  # a terminal narrower than this gets every name on a line of its own, its help below


def config_panel(cls: type, name: str) -> str:
    """The help panel of a config field: the models, the data and the statistics wherever they are declared, else
    the panel of the config that declares it ("Export" for ExportConfig's)."""
    if name in _MODEL_OPTIONS:
        return "Model"
    if name in _DATA_OPTIONS:
        return "Data"
    if name == "out":
        return "Output"
    if cls is RunConfig and name in _STATISTICS_OPTIONS:
        return "Statistics"
    return _CONFIG_PANELS.get(cls, cls.__name__.removesuffix("Config"))


def _help_rows(command: TyperCommand | TyperGroup, ctx: typer.Context) -> dict[str, list[tuple[str, str]]]:
    """Each panel's (names, help) rows, panels in PANELS' order. Names and help are click's own help record (the
    metavar, `--x / --no-x`, `[default: ...]`, `[required]`)."""
    panels: dict[str, list[tuple[str, str]]] = {}
    for param in command.get_params(ctx):
        if getattr(param, "hidden", False):
            continue
        if isinstance(param, TyperArgument):
            record = ((param.metavar or param.name or "").upper(), (getattr(param, "help", None) or "")
                      + ("  [required]" if param.required else ""))
            panel = "Arguments"
        else:
            record = param.get_help_record(ctx)
            panel = getattr(param, "rich_help_panel", None) or "Options"
        if record is not None:
            panels.setdefault(panel, []).append((record[0], " ".join(record[1].split())))
    order = {name: k for k, name in enumerate(PANELS)}
    return dict(sorted(panels.items(), key=lambda item: order.get(item[0], len(PANELS) - 1)))


def _panel(title: str, rows: list[tuple[str, str]], stacked: bool = False) -> Panel:
    """One panel: names left, help wrapped beside them; a name too long for the column has a line of its own, and on
    a narrow terminal (`stacked`) every name does, its help indented below."""
    width = 2 if stacked else min(NAME_WIDTH, max(len(names) for names, _ in rows))
    items = []
    for names, text in rows:
        if len(names) > width or stacked:
            items.append(Text(names, style="bold cyan"))
            names = ""
        grid = Table.grid(padding=(0, 1))
        grid.add_column(width=width, no_wrap=True)
        grid.add_column(ratio=1)
        grid.add_row(Text(names, style="bold cyan"), Text(text))  # Text: help is never read as rich markup
        items.append(grid)
    return Panel(Group(*items), title=title, title_align="left", border_style="dim")


def print_help(command: TyperCommand | TyperGroup, ctx: typer.Context) -> None:
    """`--help`: usage, the command's description, then its options in panels (a group: its commands), every
    line within the terminal's width (at most HELP_WIDTH)."""
    out = Console(highlight=False, markup=False, emoji=False, width=min(Console().width, HELP_WIDTH))
    out.print(Text(command.get_usage(ctx)))
    for paragraph in inspect.cleandoc(command.help or "").split("\n\n"):
        out.print()
        out.print(Text(" ".join(paragraph.split())))
    out.print()
    stacked = out.width < NARROW  # too narrow for a name and its help side by side
    for title, rows in _help_rows(command, ctx).items():
        out.print(_panel(title, rows, stacked))
    if isinstance(command, TyperGroup):
        commands = [(name, command.get_command(ctx, name)) for name in command.list_commands(ctx)]
        rows = [(name, sub.get_short_help_str(limit=300)) for name, sub in commands if not sub.hidden]
        out.print(_panel("Commands", rows, stacked))


class _Command(TyperCommand):
    def format_help(self, ctx, formatter) -> None:
        print_help(self, ctx)


class _OneLineUsageErrors(TyperGroup):
    """Usage errors (a missing option, a value typer cannot parse) as one line and exit 2, like prefsift's own
    errors, instead of click's usage block or rich's box."""

    def format_help(self, ctx, formatter) -> None:
        print_help(self, ctx)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as error:
            typer.echo(error.ctx.get_help() if error.ctx else str(error))
            code = 0
        except click_errors.UsageError as error:
            where = f"; see `{error.ctx.command_path} --help`" if error.ctx is not None else ""
            _error(f"{error.format_message().rstrip('.')}{where}")
            code = 2
        except click_errors.ClickException as error:
            _error(error.format_message())
            code = error.exit_code
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=_OneLineUsageErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Score preference pairs with the model you will align, keep the subset worth training on, "
                       "train with TRL, and measure what it bought.")
command = functools.partial(app.command, cls=_Command)
console = Console(stderr=True)


def _say(message: object, *, label: str | None = None, style: str = "", soft_wrap: bool = False) -> None:
    """One line to stderr with its text exactly as given. Every line prefsift prints carries user or library text
    (a path, an output name, a data row's role, an install hint such as `prefsift[ray]`): printed as a `Text`, it is
    never read as rich markup (`[/]` would raise, `[ray]` would vanish), emoji codes or highlighting. `label` (e.g.
    `error:`) is the one styled part."""
    text = Text(str(message)) if label is None else Text.assemble((label, style), " ", str(message))
    console.print(text, soft_wrap=soft_wrap)


ERROR_CHARS = 1000  # an error line quoting user input (a value, a line of data) stays a line a reader can take in


def _error(message: object) -> None:
    text = " ".join(str(message).split("\n"))
    if len(text) > ERROR_CHARS:
        text = text[:ERROR_CHARS] + f" … ({len(text) - ERROR_CHARS} more characters)"
    _say(text, label="error:", style="bold red", soft_wrap=True)


def _warn(message: object) -> None:
    _say(message, label="warning:", style="yellow", soft_wrap=True)

DataOpt = Annotated[str, typer.Option("--data", help="JSONL/JSON/Parquet/CSV file, datasets directory, or hub "
                                                     "name[:split].", rich_help_panel="Data")]
ConfigOpt = Annotated[Path | None, typer.Option(help="YAML file of options (flat: any option of this command); "
                                                     "flags given on the command line win.")]


def _out(help: str) -> typer.models.OptionInfo:
    return typer.Option(help=help, rich_help_panel="Output")


_ENVIRONMENT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def friendly(fn):
    """Users' errors print as one line and exit 2; an interrupt says that finished shards are kept."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _check_input_paths(kwargs)
            return fn(*args, **kwargs)
        except PrefsiftError as error:
            _error(error)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            _say("finished log-prob shards are kept; rerun the same command to resume from them", label="interrupted:",
                 style="yellow")
            raise typer.Exit(130) from None
        except OSError as error:
            if error.errno not in _ENVIRONMENT_ERRORS:
                raise
            # a full disk or a read-only place mid-run, outside a stage's own staging (which says so itself): the
            # path being written (the file the OS names, else the command's --out), and shards only where a pass
            # keeps them
            where = error.filename or kwargs.get("out") or (kwargs.get("flags") or {}).get("out")
            reason = "the disk is full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else error.strerror
            resume = ("; finished log-prob shards are kept, rerun to resume" if fn.__name__ in _SHARD_COMMANDS
                      else "; rerun once it can be written")
            verb = "access" if error.errno in (errno.EACCES, errno.EPERM) else "write"
            _error(f"cannot {verb}{f' {where}' if where else ''}: {reason}{resume}")
            raise typer.Exit(2) from None
        except ValueError as error:
            # a number too long for Python to parse (an integer of thousands of digits in a config or an option):
            # int() refuses it past sys.get_int_max_str_digits(), wherever it is read
            if "integer string conversion" not in str(error):
                raise
            _error(f"a number in {_read_path(error) or _inputs(kwargs)} has more than "
                   f"{sys.get_int_max_str_digits()} digits: too large to parse; give a smaller value")
            raise typer.Exit(2) from None

    return wrapper


# The options naming a file the command reads: a config is a file; the others may also be a directory (a datasets
# save_to_disk directory, a stage's output directory), never a FIFO, a device or a socket, which reads block on
_FILE_OPTIONS = {"config"}
_RESULT_OPTIONS = {"scores", "selected", "run_dir", "results"}  # a stage's output directory
_INPUT_OPTIONS = {"config", "data", "validation_data", "test_data", "scores", "selected", "run_dir", "points",
                  "results"}


def _check_input_paths(kwargs: dict) -> None:
    """One line, before any work, for an input path that is not a regular file where one is read."""
    from prefsift.output import check_result_files, not_regular

    for name, value in {**(kwargs.get("flags") or {}), **kwargs}.items():
        if name not in _INPUT_OPTIONS or not isinstance(value, str | os.PathLike) or not value:
            continue
        kind = not_regular(value)
        if kind is not None and (name in _FILE_OPTIONS or kind != "a directory"):
            raise ConfigError(f"--{name.replace('_', '-')} {value} is {kind}, not a regular file")
        if kind == "a directory" and name in _RESULT_OPTIONS:
            check_result_files(value)  # a stage's directory: its scores.parquet, selected.jsonl, ... are files


_SHARD_COMMANDS = {"score", "run", "compare", "demo", "analyze"}  # the commands whose passes keep resumable shards


def _read_path(error: BaseException) -> str | None:
    """The file being read where `error` was raised: the innermost frame of its traceback holding a `path`."""
    found, tb = None, error.__traceback__
    while tb is not None:
        value = tb.tb_frame.f_locals.get("path")
        if isinstance(value, str | os.PathLike):
            found = value
        tb = tb.tb_next
    return None if found is None else str(found)


def _inputs(kwargs: dict) -> str:
    """The files a command reads, as its options name them (for a line that cannot tell which one it was)."""
    names = [f"--{name.replace('_', '-')} {kwargs[name]}" for name in ("config", "data", "scores", "selected")
             if kwargs.get(name)]
    return " or ".join(names) or "the options"


def _settings(config: Path | None, flags: dict, *classes: type, defaults: dict | None = None) -> list:
    """Each settings dataclass from (in rising priority) `defaults`, the flat YAML of --config, and the flags."""
    from prefsift.settings import from_dict, load_yaml, split_flags

    layers = [split_flags(defaults or {}, *classes), split_flags(load_yaml(config) if config else {}, *classes),
              split_flags(flags, *classes)]
    out = []
    for i, cls in enumerate(classes):
        try:
            out.append(from_dict(cls, {**layers[0][i], **layers[1][i], **layers[2][i]}, ""))
        except ConfigError as error:  # name the flag when the bad value came from one, else the config file
            name, _, rest = str(error).partition(" ")
            if name in layers[2][i]:
                raise ConfigError(f"--{name.replace('_', '-')} {rest}") from None
            raise ConfigError(f"{config or 'options'}: {error}") from None
    return out


def _options(*classes: type):
    """The CLI fields of `classes` as flags, each in its help panel."""
    return cli_options(*classes, panel=config_panel)


@app.callback()
def _quiet() -> None:
    """Score preference pairs with the model you will align, keep the subset worth training on, train with TRL,
    and measure what it bought."""
    import warnings

    # datasets' progress bars are off by HF_DATASETS_DISABLE_PROGRESS_BARS above, without importing it here (it costs
    # seconds, and `prefsift --help` answers in under one)
    # libraries' deprecation notices are for their callers' code, not for prefsift's users
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.showwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning prefsift or a library raises is one line for the user, not a source location and its code."""
    _warn(message)


@command()
@friendly
@_options(ScoreConfig, EngineConfig, DataConfig)
def score(
    data: DataOpt,
    out: Annotated[Path, _out("Output directory (scores.parquet, pairs.parquet, manifest.json).")],
    param: Annotated[list[str] | None, typer.Option("--param", help="A method parameter, key=value, or "
                                                    "method.key=value with several methods (repeatable); "
                                                    "`prefsift methods` lists each method's.",
                                                    rich_help_panel="Scoring")] = None,
    config: ConfigOpt = None,
    *,
    flags: dict,
) -> None:
    """Score every pair with METHOD; write scores.parquet under TRL's column names."""
    from prefsift import api
    from prefsift.settings import parse_params

    score_config, engine, data_options = _settings(config, flags, ScoreConfig, EngineConfig, DataConfig)
    api.score(data, out=out, params=parse_params(param), config=score_config, engine=engine,
              data_options=data_options, log=_say)


@command()
@friendly
def methods() -> None:
    """Every scoring method: the models it needs, the columns it writes, its rule and its parameters."""
    import dataclasses

    from prefsift.scorers import SCORERS

    for name in sorted(SCORERS):
        scorer = SCORERS[name]()
        needs = scorer.requirements()
        typer.echo(f"{name}: needs {needs}; writes {', '.join(scorer.columns)}; rule {scorer.selection_rule()}")
        for f in dataclasses.fields(scorer.params):
            typer.echo(f"    --param {f.name}={getattr(scorer.params, f.name)!r}  {f.metadata.get('help', '')}")


def _selection(help: str) -> typer.models.OptionInfo:
    return typer.Option(help=help, rich_help_panel="Selection")


@command()
@friendly
def select(
    scores: Annotated[Path, typer.Option(help="Directory written by `prefsift score` (or a run's scores/).",
                                         rich_help_panel="Data")],
    out: Annotated[Path, _out("Output directory (selected.jsonl, selected.parquet).")],
    method: Annotated[str | None, _selection("Whose rule to apply when the directory holds several methods' scores "
                                             "(a run's).")] = None,
    rule: Annotated[str | None, _selection("top, bottom, band, intersection, all (default: the method's own "
                                           "rule).")] = None,
    fraction: Annotated[float | None, _selection("Share of the pairs to keep, in (0, 1].")] = None,
    count: Annotated[int | None, _selection("Number of pairs to keep.")] = None,
    column: Annotated[str | None, _selection("Score column (default: the method's).")] = None,
    columns: Annotated[str | None, _selection("Comma-separated columns for 'intersection'.")] = None,
    low: Annotated[float | None, _selection("Lower percentile cut-off of a band, in [0, 1].")] = None,
    high: Annotated[float | None, _selection("Upper percentile cut-off of a band, in [0, 1].")] = None,
    output_columns: Annotated[str, typer.Option("--output-columns", help="split: prefsift's explicit prompt, "
                                                "chosen, rejected (what TRL and the exports read); original: the "
                                                "input's own columns. Both keep pair_id.",
                                                rich_help_panel="Output")] = "split",
    with_scores: Annotated[bool, typer.Option("--with-scores/--no-scores", help="Also write the score columns "
                                              "beside each pair.", rich_help_panel="Output")] = False,
) -> None:
    """Keep the pairs a rule picks; write them with explicit prompt / chosen / rejected columns plus pair_id, list
    the pairs it could not consider (NaN score) in dropped.jsonl, and warn about a degenerate score."""
    from prefsift import api

    api.select(scores, out=out, rule=rule, fraction=fraction, count=count, column=column, columns=columns, low=low,
               high=high, method=method, output_columns=output_columns, with_scores=with_scores, log=_say,
               warn=_warn)


def _export_options(fn):  # ExportConfig lives in config.py: export.py imports datasets (seconds) and is not needed here
    from prefsift.config import ExportConfig

    return _options(ExportConfig)(fn)


@command()
@friendly
@_export_options
def export(
    selected: Annotated[Path, typer.Option(help="A `prefsift select` output directory, or a subset file.",
                                           rich_help_panel="Data")],
    out: Annotated[str, _out("Where to: a directory (datasets, llamafactory), a .jsonl file (trl, openrlhf, "
                             "axolotl) or a hub repo id owner/name (hub).")],
    *,
    flags: dict,
) -> None:
    """Write a selected subset in the layout TRL, LLaMA-Factory, OpenRLHF or Axolotl reads, or as a datasets
    directory or hub dataset; prints the command that consumes it."""
    from prefsift import api
    from prefsift.config import ExportConfig

    (config,) = _settings(None, flags, ExportConfig)
    # soft-wrapped: the command it prints is copied whole, never broken at the terminal's width
    api.export(selected, out, config=config, log=functools.partial(_say, soft_wrap=True))


def _weights(help: str) -> typer.models.OptionInfo:
    return typer.Option(help=help, rich_help_panel="Weights")


@command()
@friendly
def weigh(
    scores: Annotated[Path, typer.Option(help="Directory written by `prefsift score` (or a run's scores/).",
                                         rich_help_panel="Data")],
    out: Annotated[Path, _out("Output directory (selected.jsonl, selected.parquet with a weight column; "
                              "dropped.jsonl).")],
    column: Annotated[str, _weights("Score column turned into weights.")],
    transform: Annotated[str, _weights("rank (percentile rank, 0-1), softmax (mean weight 1) or band (1 inside "
                                       "[--low, --high], 0 outside).")],
    temperature: Annotated[float | None, _weights("Softmax temperature (default 1; smaller: sharper).")] = None,
    low: Annotated[float | None, _weights("Band: lower percentile, in [0, 1].")] = None,
    high: Annotated[float | None, _weights("Band: upper percentile, in [0, 1].")] = None,
    reverse: Annotated[bool, typer.Option("--reverse", help="Weigh the negated score: lower scores weigh more.",
                                          rich_help_panel="Weights")] = False,
    output_columns: Annotated[str, typer.Option("--output-columns", help="split: prefsift's explicit prompt, "
                                                "chosen, rejected; original: the input's own columns.",
                                                rich_help_panel="Output")] = "split",
) -> None:
    """Soft selection: turn a score into per-pair weights; `prefsift train` on the file trains weighted DPO."""
    from prefsift import api

    api.weigh(scores, out=out, column=column, transform=transform, temperature=temperature, low=low, high=high,
              reverse=reverse, output_columns=output_columns, log=_say)


@command()
@friendly
@_options(TrainConfig, EngineConfig, DataConfig, ModelConfig)
def train(
    data: DataOpt,
    model: Annotated[str, typer.Option(help="Model to align, the policy training starts from: hub id, local "
                                            "directory or .gguf file (e.g. a run's models/warmup).",
                                       rich_help_panel="Model")],
    out: Annotated[Path, _out("Where the trained model (or LoRA adapter) is saved.")],
    reference: Annotated[str | None, typer.Option(help="Reference (SFT) model of the DPO or KTO loss; default: "
                                                       "--model. DPO takes its log-probs from --scores when given.",
                                                  rich_help_panel="Model")] = None,
    scores: Annotated[Path | None, typer.Option(help="A score directory whose reference log-probs are reused "
                                                      "(TRL then skips its reference pass); max_length and β "
                                                      "default to its own; --order reads its column here.",
                                                rich_help_panel="Training")] = None,
    config: ConfigOpt = None,
    *,
    flags: dict,
) -> None:
    """Align MODEL on the pairs with DPO or KTO through TRL."""
    from prefsift import api
    from prefsift.stages import scored_defaults

    train_config, engine, data_options, model_options = _settings(config, flags, TrainConfig, EngineConfig,
                                                                  DataConfig, ModelConfig,
                                                                  defaults=scored_defaults(scores))
    api.train(data, model, out=out, reference=reference, scores=scores, config=train_config, engine=engine,
              data_options=data_options, model_options=model_options, log=_say)


@command("eval")
@friendly
@_options(EvalConfig, EngineConfig, DataConfig, ModelConfig)
def eval_(
    model: Annotated[str, typer.Option(help="The aligned policy.", rich_help_panel="Model")],
    data: DataOpt,
    out: Annotated[Path, _out("Output directory (eval.json, eval_pairs.jsonl, answers.jsonl).")],
    reference: Annotated[str | None, typer.Option(help="Reference (SFT) policy.", rich_help_panel="Model")] = None,
    judge_model: Annotated[str | None, typer.Option(help="Reward model judging the win rate.",
                                                    rich_help_panel="Model")] = None,
    config: ConfigOpt = None,
    *,
    flags: dict,
) -> None:
    """Held-out preference accuracy (implicit reward against --reference; without one, the share of pairs where
    the policy gives chosen the higher log-prob), and the win rate against the reference with a judge."""
    from prefsift import api

    eval_config, engine, data_options, model_options = _settings(config, flags, EvalConfig, EngineConfig, DataConfig,
                                                                 ModelConfig)
    api.evaluate(model, data, out=out, reference=reference, judge_model=judge_model, config=eval_config,
                 engine=engine, data_options=data_options, model_options=model_options, log=_say)


@command()
@friendly
def run(
    config: Annotated[Path, typer.Option(help="YAML file of RunConfig options (see README).")],
    out: Annotated[Path | None, _out("Output directory (overrides the config's).")] = None,
) -> None:
    """The whole flow from one config: warm-up, validation model, score, select, train, evaluate, report."""
    from prefsift import api

    api.run(config, log=_say, **({"out": str(out)} if out is not None else {}))


@command()
@friendly
@_options(RunConfig, EngineConfig, TrainConfig)
def compare(
    methods: Annotated[str | None, typer.Option(help="Comma-separated methods, or `all`: every method this data and "
                                                     "these models can score (random is always added: the "
                                                     "baseline). Default: the config's methods, else all.",
                                                rich_help_panel="Pipeline")] = None,
    fractions: Annotated[str | None, typer.Option(help="Comma-separated budgets, shares of the training pairs "
                                                       "(default 0.1).", rich_help_panel="Pipeline")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file in `prefsift run`'s format; flags win.")] = None,
    *,
    flags: dict,
) -> None:
    """Every selection rule (or --methods) on your model and data at the same budgets: one table of quality with 95%
    intervals, paired differences from random and the measured cost of each method, and one plot."""
    from prefsift import api

    result = api.compare(methods=methods, fractions=fractions, config=config, log=_say, **flags)
    typer.echo(result.markdown)


@command()
@friendly
def demo(
    out: Annotated[Path, _out("Output directory.")] = Path("prefsift-demo"),
    seed: Annotated[int, typer.Option(help="Seed of the task, the SFT model and the first training seed.",
                                      min=0, max=2**32 - 1)] = 0,
    seeds: Annotated[int, typer.Option(help="Training seeds each comparison repeats over (intervals need several).",
                                       min=1)] = 3,
    all_methods: Annotated[bool, typer.Option("--all", help="Every method prefsift has, not the default set "
                                                            "(longer than 10 minutes on 2 cores).")] = False,
) -> None:
    """The embedded benchmark end to end: a synthetic task with a hidden oracle, a tiny SFT model, every method
    over several seeds, with intervals and paired differences."""
    from prefsift.demo import ALL_METHODS, DemoConfig, run_demo
    from prefsift.report import markdown_table

    config = DemoConfig(seeds=seeds, methods=list(ALL_METHODS) if all_methods else DemoConfig().methods)
    results = run_demo(out, seed=seed, config=config, log=_say)
    typer.echo(markdown_table(results["summary"]))
    _say(f"results → {out / 'results.md'}, report → {out / 'report.html'}")


@command()
@friendly
def scale(
    out: Annotated[Path, _out("Output directory (scaling.json, scaling.md, scaling.png).")],
    points: Annotated[Path | None, typer.Option(help="CSV of measured points: a `share` (0-1) or `percent` column "
                                                     "and a `score` column.")] = None,
    results: Annotated[Path | None, typer.Option(help="A run or demo directory: the full run's checkpoints "
                                                      "(checkpoint_shares), else --method's rows at each budget and "
                                                      "full's; one point a seed, and the reference (share 0, ½ of a "
                                                      "win rate).")] = None,
    method: Annotated[str, typer.Option(help="Whose rows of --results to fit.")] = "random",
    metric: Annotated[str, typer.Option(help="win_rate or pref_accuracy (of --results).")] = "win_rate",
    start_from: Annotated[str, typer.Option(help="warmup or reference rows of --results.")] = "reference",
    part: Annotated[float, typer.Option(help="Part of the plateau gain the planned share must reach.", min=0.01,
                                        max=0.999)] = 0.95,
    interval: Annotated[str, typer.Option(help="covariance or bootstrap intervals.")] = "covariance",
) -> None:
    """Fit the exponential plateau R(x) = r − (r − a)·exp(−b·x) to quality against the share of the data, and plan
    the smallest share that reaches PART of the plateau gain."""
    from prefsift.scaling import fit_plateau, plan_share, read_points, summary_markdown, write_scaling_report

    if (points is None) == (results is None):
        raise ConfigError("give exactly one of --points or --results")
    if interval not in ("covariance", "bootstrap"):
        raise ConfigError(f"--interval must be covariance or bootstrap (got {interval!r})")
    if points is not None:
        measured = read_points(points)
        share, score = measured.share, measured.score
    else:
        import json

        path = results / "results.json"
        if not path.is_file():
            raise ConfigError(f"no results.json in {results}: run `prefsift run` or `prefsift demo` into it")
        from prefsift.scaling import scaling_points

        share, score = scaling_points(json.loads(path.read_text())["records"], method=method, metric=metric,
                                      start_from=start_from)
    from prefsift.manifest import write_manifest
    from prefsift.output import check_output, locked, staged

    check_output(out, "scale")
    fit = fit_plateau(share, score, interval=interval)
    plan = plan_share(fit, part=part)
    with locked(out), staged(out, "scale") as tmp:  # written whole or not at all
        write_scaling_report(fit, plan, tmp)
        write_manifest(tmp, "scale", {"points": str(points) if points else None,
                                      "results": str(results) if results else None, "part": part})
    typer.echo(summary_markdown(fit, plan))


@command()
@friendly
def report(
    run_dir: Annotated[Path, typer.Argument(help="A directory written by `prefsift run`, `compare` or `demo`.")],
    out: Annotated[Path | None, _out("Output directory (default: RUN_DIR).")] = None,
    method: Annotated[str, typer.Option(help="Whose rows the scaling curve fits (with the full data's).")] = "random",
    metric: Annotated[str | None, typer.Option(help="win_rate or pref_accuracy (default: win_rate when judged).")
                      ] = None,
    start_from: Annotated[str | None, typer.Option(help="warmup or reference rows (default: reference).")] = None,
    correction: Annotated[str | None, typer.Option(help="How the table's tests are corrected together: holm "
                                                        "(family-wise error) or bh (false discovery rate); default: "
                                                        "the run's own, else holm.")] = None,
    alpha: Annotated[float | None, typer.Option(help="Family-wise error (holm) or false discovery rate (bh); "
                                                     "default: the run's own, else 0.05.")] = None,
    margin: Annotated[float | None, typer.Option(help="Non-inferiority margin against the full data; default: "
                                                      "the run's own, else 0.02.")] = None,
) -> None:
    """One HTML page (plots inline) and a Markdown version: the methods table with intervals, quality against
    compute, the data-scaling curve, and each method's score distribution with what its rule keeps marked."""
    import math

    from prefsift.config import CORRECTIONS
    from prefsift.run_report import report_dir

    if correction is not None and correction not in CORRECTIONS:
        raise ConfigError(f"--correction must be holm or bh (got {correction!r})")
    if alpha is not None and not (math.isfinite(alpha) and 0 < alpha < 1):
        raise ConfigError(f"--alpha must be a number in (0, 1) (got {alpha!r})")
    if margin is not None and not (math.isfinite(margin) and margin >= 0):
        raise ConfigError(f"--margin must be a finite number >= 0 (got {margin!r})")
    if metric not in (None, "win_rate", "pref_accuracy"):
        raise ConfigError(f"--metric must be win_rate or pref_accuracy (got {metric!r})")
    if start_from not in (None, "warmup", "reference"):
        raise ConfigError(f"--start-from must be warmup or reference (got {start_from!r})")
    options = {"method": method, "metric": metric, "start_from": start_from, "correction": correction, "alpha": alpha,
               "margin": margin}
    paths = report_dir(run_dir, out, **options)
    _say(f"report → {paths['html']}, {paths['markdown']}")


@command()
@friendly
def analyze(
    scores: Annotated[Path, typer.Argument(help="A score directory holding influence (if/tif) and lossdiff-irm "
                                                "scores, e.g. a run's seed-0/scores.")],
    out: Annotated[Path | None, _out("Output directory (default: SCORES).")] = None,
    fraction: Annotated[float | None, typer.Option(help="Budget of the overlaps (default: the LossDiff-IRM "
                                                        "intersection's share).", min=0.0, max=1.0)] = None,
    band_low: Annotated[float, typer.Option(help="Lower percentile of the bands.", min=0.0, max=1.0)] = 0.1,
    band_high: Annotated[float, typer.Option(help="Upper percentile of the bands.", min=0.0, max=1.0)] = 0.9,
) -> None:
    """How well the cheap scores track exact influence: Pearson and Spearman of LossDiff and IRM with IF, the
    overlap of their selections with TIF's at one budget (beside chance and the paper's numbers), a scatter plot."""
    from prefsift.analyze import analyze_dir

    result = analyze_dir(scores, out, band_low=band_low, band_high=band_high, fraction=fraction)
    typer.echo(result["markdown"])
    _say(f"→ {', '.join(str(p) for p in result['files'])}")


def main() -> None:
    app(prog_name="prefsift")


if __name__ == "__main__":
    sys.exit(main())
