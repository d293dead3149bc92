"""Start-up time of `kvchat --help` (target under 0.3 s), beside a bare interpreter.

Also checks, as a fact and not a timing, that --help never imports llama_cpp.
Usage: python benchmarks/bench_startup.py [--runs 15] [--against OTHER_CHECKOUT]
(--against: time the same commands in another checkout, interleaved; prints after/before)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from side_by_side import median_pair

REPO = Path(__file__).resolve().parent.parent


def _median_s(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--against", type=Path, help="another checkout to time side by side")
    args = parser.parse_args()
    bare = _median_s([sys.executable, "-c", "pass"], args.runs)
    help_cmd = [sys.executable, "-m", "kvchat", "--help"]
    help_s, help_before = median_pair(help_cmd, args.runs, REPO, args.against)
    run_help_s, run_help_before = median_pair([sys.executable, "-m", "kvchat", "run", "--help"], args.runs,
                                              REPO, args.against)
    probe = subprocess.run(
        [sys.executable, "-c",
         "import sys\nfrom kvchat.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
         "print('llama_cpp' in sys.modules, file=sys.stderr)"],
        capture_output=True, text=True, check=True,
    )
    print(f"python -c pass      {bare * 1000:6.1f} ms (median of {args.runs})")
    print(f"kvchat --help       {help_s * 1000:6.1f} ms (target < 300), {help_s / bare:.1f}x bare python")
    print(f"kvchat run --help   {run_help_s * 1000:6.1f} ms")
    print(f"llama_cpp imported by --help: {probe.stderr.strip()}")
    if help_before is not None and run_help_before is not None:
        print(f"against {args.against}: kvchat --help {help_before * 1000:.1f} ms, run --help "
              f"{run_help_before * 1000:.1f} ms; after/before {help_s / help_before:.3f} and "
              f"{run_help_s / run_help_before:.3f}")


if __name__ == "__main__":
    main()
