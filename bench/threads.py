"""Benchmark: torch CPU threads and OpenMP's wait policy on a shared machine.

Each configuration runs in its own process (OMP_WAIT_POLICY is read once, when torch loads its OpenMP runtime):
a SmolLM2-sized matmul (512 × 576 @ 576 × 1536), ten small 64 × 64 matmuls and a SiLU, 60 times, with 1 or 2
threads under ACTIVE (spinning) and PASSIVE (sleeping) waits, alternated so load changes hit every configuration.
On a busy 2-core box spinning threads wait for a time slice at every op; this is why `prefsift` sets
OMP_WAIT_POLICY=PASSIVE before torch loads and defaults --threads to the cores the load average leaves idle.

    python bench/threads.py [--repeats 3] [--out bench/results/threads.txt]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

WORK = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
x, w = torch.randn(512, 576), torch.randn(576, 1536)
small = [torch.randn(64, 64) for _ in range(10)]
t = time.perf_counter()
for _ in range(60):
    y = x @ w
    for v in small:
        v = v @ v
    torch.nn.functional.silu(y).sum()
print(time.perf_counter() - t)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the table here")
    args = parser.parse_args()
    times: dict[tuple[str, int], list[float]] = {}
    loads = []
    for _ in range(args.repeats):
        for policy in ("ACTIVE", "PASSIVE"):
            for threads in (1, 2):
                env = {**os.environ, "OMP_WAIT_POLICY": policy}
                out = subprocess.run([sys.executable, "-c", WORK, str(threads)], env=env, capture_output=True,
                                     text=True, check=True).stdout
                times.setdefault((policy, threads), []).append(float(out))
                loads.append(os.getloadavg()[0])
    lines = [f"# python bench/threads.py --repeats {args.repeats}   ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} "
             f"cores, 1-minute load {min(loads):.1f}-{max(loads):.1f} during the runs)",
             f"{'OMP_WAIT_POLICY':16s} {'threads':>7s} {'seconds (each run)':>28s} {'vs 1 thread, same policy':>26s}"]
    for (policy, threads), seconds in times.items():
        ratio = [s / one for s, one in zip(seconds, times[policy, 1], strict=True)]
        lines.append(f"{policy:16s} {threads:7d} {' '.join(f'{s:.2f}' for s in seconds):>28s} "
                     f"{min(ratio):.2f}-{max(ratio):.2f}x".rjust(26))
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
