"""Peak memory of `prefsift score --method random` at 1×, 4× and 16× a data file: it should be flat in the data
size, not linear (reading is streamed into memory-mapped Arrow files; random needs no model, so what grows is the
data path alone).

The larger files repeat the HH-RLHF harmless-base test file with fresh prompts (copy k's first human turn gets a
`(copy k)` prefix, so no pair is a duplicate of another); they are written under --work (default /tmp), never into
the repository. Each run is its own process; its peak RSS is read from the kernel's accounting of children.

    python bench/memory.py                     # writes bench/results/memory.json and prints the table
    python bench/memory.py --copies 1 4 16 --data /work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = Path("/work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz")
# The child reports its own peak: ru_maxrss of RUSAGE_CHILDREN is the largest child so far, so each measured run
# gets a fresh parent of its own.
MEASURE = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
           "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode; "
           "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t)")


def repeated(source: Path, copies: int, target: Path) -> tuple[int, int]:
    """`copies` copies of the JSONL(.gz) `source` with fresh prompts, gzipped into `target`; (rows, text bytes)."""
    rows = text_bytes = 0
    with gzip.open(source, "rt", encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    with gzip.open(target, "wt", encoding="utf-8", compresslevel=1) as out:
        for k in range(copies):
            for line in lines:
                record = json.loads(line)
                if k:  # a fresh prompt: both transcripts share it, so the pair stays valid and new
                    for side in ("chosen", "rejected"):
                        record[side] = record[side].replace("\n\nHuman: ", f"\n\nHuman: (copy {k}) ", 1)
                text = json.dumps(record) + "\n"
                out.write(text)
                rows += 1
                text_bytes += len(text.encode())
    return rows, text_bytes


def measure(data: Path, out: Path) -> dict:
    if out.exists():
        shutil.rmtree(out)
    command = [sys.executable, "-m", "prefsift.cli", "score", "--data", str(data), "--method", "random", "--out",
               str(out)]
    done = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, check=True)
    rc, kib, seconds = done.stdout.split()
    if rc != "0":
        raise SystemExit(f"`{' '.join(command)}` failed ({rc}): {done.stderr.strip()}")
    return {"peak_rss_mib": round(int(kib) / 1024, 1), "seconds": round(float(seconds), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--work", type=Path, default=Path("/tmp/prefsift-memory"))
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "memory.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    # one untimed run first: the first process pays for reading torch & co. from a cold disk cache
    repeated(args.data, 1, args.work / "warmup.jsonl.gz")
    measure(args.work / "warmup.jsonl.gz", args.work / "scores-warmup")
    for copies in args.copies:
        data = args.work / f"hh-{copies}x.jsonl.gz"
        n, text_bytes = repeated(args.data, copies, data)
        out = args.work / f"scores-{copies}x"
        row = {"copies": copies, "rows": n, "text_mib": round(text_bytes / 2**20, 1), **measure(data, out)}
        rows.append(row)
        print(f"{copies}x: {row}", file=sys.stderr)
    first, last = rows[0], rows[-1]
    slope = ((last["peak_rss_mib"] - first["peak_rss_mib"]) / (last["text_mib"] - first["text_mib"])
             if last["text_mib"] != first["text_mib"] else None)
    record = {
        "command": "prefsift score --method random --data hh-<k>x.jsonl.gz",
        "data": f"{args.data.name} repeated k times with fresh prompts",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "load_average_1min": round(os.getloadavg()[0], 2)},
        "rows": rows,
        # what each further MiB of input text costs in peak memory: ~0 when flat, ~4.8 before streaming
        "mib_per_input_mib": round(slope, 3) if slope is not None else None,
        "when": time.strftime("%Y-%m-%d"),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(record, indent=2) + "\n")
    print(table(record))


def table(record: dict) -> str:
    lines = ["| copies | rows | input text (MiB) | peak RSS (MiB) | seconds |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['copies']}× | {r['rows']} | {r['text_mib']} | {r['peak_rss_mib']} | {r['seconds']} |"
              for r in record["rows"]]
    return "\n".join(lines) + f"\n\nPeak memory per further MiB of input: {record['mib_per_input_mib']} MiB."


if __name__ == "__main__":
    main()
