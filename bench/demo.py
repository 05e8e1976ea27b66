"""The demo's comparison as a committed result: runs `prefsift demo` (the default methods, or `--all`) and writes
its results.json, the machine it ran on and the wall time to bench/results/demo.json, which
bench/render_readme.py turns into the README's demo table.

    python bench/demo.py [--seed 0] [--seeds 3] [--all] [--out bench/results/demo.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from prefsift.demo import ALL_METHODS, DemoConfig, run_demo


def commit() -> str | None:
    """The code a result came from (and whether the tree had changes)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


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
    args = parser.parse_args()
    config = DemoConfig(seeds=args.seeds, methods=list(ALL_METHODS) if args.all else DemoConfig().methods)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        results = run_demo(Path(out), seed=args.seed, config=config)
    record = {"command": f"prefsift demo --seed {args.seed} --seeds {args.seeds}" + (" --all" if args.all else ""),
              "commit": commit(), "machine": machine(), "wall_seconds": round(time.perf_counter() - start, 1),
              **results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out} ({record['wall_seconds']} s)")


if __name__ == "__main__":
    main()
