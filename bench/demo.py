"""The demo's comparison as a committed result: runs `prefsift demo` (the default methods, or `--all`) and writes
its records and summary, the configuration, the code it ran on (commit, whether the tree was dirty, and which of
the files it runs differed from the commit), the machine and the wall time to bench/results/demo.json, which
bench/render_readme.py turns into the README's demo table. `--task KEY=VALUE` sets an option of the synthetic task
(`prefsift.synthetic.task.TaskConfig`, checked as YAML would be), e.g. the shifted-validation setting:

    python bench/demo.py [--seed 0] [--seeds 3] [--all] [--out bench/results/demo.json]
    python bench/demo.py --task validation_shift=family --out bench/results/demo-shift.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from prefsift.demo import ALL_METHODS, TIF_AT_A_BUDGET, DemoConfig, run_demo
from prefsift.errors import ConfigError
from prefsift.settings import from_dict
from prefsift.synthetic.task import TaskConfig


def commit() -> str | None:
    """The code a result came from, as bench/render_readme.py reads it: `abc1234`, `+changes` when tracked files
    differed from that commit (prefsift.report.provenance)."""
    from prefsift.report import provenance

    code = provenance()
    if code["commit"] is None:
        return None
    return code["commit"] + ("+changes" if code["dirty"] else "")


def uncommitted() -> list[str]:
    """The files the demo runs (prefsift's source, bench/) that differed from the commit when it started: in a tree
    others are working in, `+changes` alone cannot say whether the result's own code was committed."""
    import subprocess

    try:
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/src", ":/bench"],
                                capture_output=True, text=True, check=True, cwd=Path(__file__).parent).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [line[3:] for line in status.splitlines()]


def task_options(pairs: list[str]) -> TaskConfig:
    """TaskConfig from KEY=VALUE pairs, each value read as YAML and checked (one line for a bad one, exit 2)."""
    values = {}
    try:
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise ConfigError(f"--task takes KEY=VALUE, got {pair!r}")
            values[key.strip()] = yaml.safe_load(value)
        return from_dict(TaskConfig, values, "--task")
    except (ConfigError, yaml.YAMLError) as error:
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2) from None


def machine() -> dict:
    """The machine, and its 1-minute load when asked: on a shared 2-core box a neighbour's load moves wall times."""
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "load_average_1min": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=DemoConfig.seeds)
    parser.add_argument("--all", action="store_true", help="every method, not the default set")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "demo.json")
    parser.add_argument("--methods", default=None, help="comma-separated methods instead of the default set (`tif` "
                                                           "as the demo labels it: tif-band-at-a-budget)")
    parser.add_argument("--start-from", choices=("both", "warmup", "reference"), default=DemoConfig.start_from,
                        help="the subsets' starting model(s) (DemoConfig.start_from)")
    parser.add_argument("--task", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the synthetic task (TaskConfig), e.g. validation_shift=family; repeatable")
    parser.add_argument("--fractions", default=None, help="comma-separated budgets (DemoConfig.fractions)")
    parser.add_argument("--validation-epochs", type=float, default=DemoConfig.validation_epochs)
    parser.add_argument("--score-share", type=float, default=1.0,
                        help="a candidate pool of this share of the training pairs (RunConfig.score_share)")
    args = parser.parse_args()
    task = task_options(args.task)
    methods = list(ALL_METHODS) if args.all else DemoConfig().methods
    if args.methods:
        methods = [TIF_AT_A_BUDGET if m.strip() == "tif" else m.strip() for m in args.methods.split(",")]
    try:
        fractions = [float(f) for f in args.fractions.split(",")] if args.fractions else DemoConfig().fractions
    except ValueError:
        sys.exit(f"error: --fractions takes comma-separated numbers, got {args.fractions!r}")
    config = DemoConfig(task=task, seeds=args.seeds, methods=methods, start_from=args.start_from, fractions=fractions,
                        validation_epochs=args.validation_epochs, score_share=args.score_share)
    code, changed, start = commit(), uncommitted(), time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        results = run_demo(Path(out), seed=args.seed, config=config)
    command = (f"python bench/demo.py --seed {args.seed} --seeds {args.seeds}" + (" --all" if args.all else "")
               + (f" --methods {args.methods}" if args.methods else "")
               + (f" --start-from {args.start_from}" if args.start_from != DemoConfig.start_from else "")
               + "".join(f" --task {t}" for t in args.task)
               + (f" --fractions {args.fractions}" if args.fractions else "")
               + (f" --validation-epochs {args.validation_epochs:g}"
                  if args.validation_epochs != DemoConfig.validation_epochs else "")
               + (f" --score-share {args.score_share:g}" if args.score_share != 1.0 else ""))
    record = {"command": command, "commit": code, "uncommitted": changed, "config": asdict(config),
              "machine": machine(), "wall_seconds": round(time.perf_counter() - start, 1), **results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out} ({record['wall_seconds']} s)")


if __name__ == "__main__":
    main()
