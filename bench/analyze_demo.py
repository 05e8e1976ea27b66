"""How well LossDiff and IRM track exact influence on the embedded task: the demo's own scores (seed 0, the
warm-up model against the SFT model, validation pairs from the task), read by `prefsift analyze`. Writes
bench/results/analysis-demo.json, which bench/render_readme.py renders into the README beside the HH-RLHF one
(bench/analyze_hh.py).

    python bench/analyze_demo.py [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from demo import commit, machine, uncommitted  # bench/demo.py

from prefsift.analyze import analyze_dir
from prefsift.demo import DemoConfig, run_demo

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "analysis-demo.json")
    args = parser.parse_args()
    code, changed, start = commit(), uncommitted(), time.perf_counter()
    # the scores are the demo's whatever it trains after them: one seed, one start and one budget keep it short
    config = DemoConfig(seeds=1, start_from="reference", methods=["tif", "lossdiff-irm"], fractions=[0.1],
                        baselines="")
    with tempfile.TemporaryDirectory() as out:
        run_demo(Path(out), seed=args.seed, config=config, log=lambda _: None)
        analysis = analyze_dir(Path(out) / "seed-0" / "scores")
    analysis = {k: v for k, v in analysis.items() if k not in ("files", "markdown")}
    task = config.task
    record = {"command": f"python bench/analyze_demo.py --seed {args.seed}", "commit": code, "uncommitted": changed,
              "config": asdict(config),
              "description": f"the embedded task's {analysis['n_pairs']} training pairs ({task.label_noise} label "
                             f"noise, {task.ratings} ratings), scored as `prefsift demo --seed {args.seed}` scores "
                             "them (warm-up model against the SFT model)",
              "machine": machine(), "wall_seconds": round(time.perf_counter() - start, 1), "analysis": analysis}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
