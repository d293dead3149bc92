"""Fuzz `kvchat run` with damaged GGUF files: 0 aborts, 0 hangs, 0 tracebacks expected.

Not a speed benchmark: it writes each damaged file (structured mutations of a tiny
real model, then random header damage) into a temp folder, runs
`kvchat run -m FILE --ctx 256 --max-tokens 2 Hello` on it with a time limit, and
prints a verdict, the exit code and the peak resident memory per file, then a summary.
Exit status 1 if any file aborted, hung, printed a traceback or an internal error,
or went over the memory bound.

    nice -n 10 python benchmarks/fuzz_run.py --random 200 [--timeout 60] [--max-rss-mib 1024]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gguf_fuzz import random_cases, run_case, structured_cases, write_case  # noqa: E402

from kvchat.registry import default_model_path  # noqa: E402

FAILURES = ("abort", "hang", "traceback", "internal-error")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--random", type=int, default=200, help="random header mutations (after the structured ones)"
    )
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds per file before it counts as a hang"
    )
    parser.add_argument("--max-rss-mib", type=float, default=1024.0)
    parser.add_argument("--limit", type=int, default=0, help="stop after this many files (smoke runs)")
    parser.add_argument("--quiet", action="store_true", help="print only failures and the summary")
    opts = parser.parse_args()

    tokenizer = default_model_path()
    if tokenizer is None:
        print("the SmolLM2 test model is missing (its tokenizer is the base's)", file=sys.stderr)
        return 2
    # Generated lazily: the parent stays small (a big parent would also inflate each
    # child's ru_maxrss, which Linux carries over from the parent at spawn).
    base = next(structured_cases(tokenizer))[1]
    cases = itertools.chain(structured_cases(tokenizer), random_cases(base, opts.random, opts.seed))
    del base
    if opts.limit:
        cases = itertools.islice(cases, opts.limit)
    n_files = 0

    verdicts: collections.Counter[str] = collections.Counter()
    worst_rss = (0, "")
    worst_rusage = 0
    worst_wall = (0.0, "")
    failed = []
    with tempfile.TemporaryDirectory(prefix="kvchat-fuzz-") as tmp:
        home = Path(tmp) / "home"
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVCHAT_")}
        env.update(KVCHAT_HOME=str(home), HF_HUB_OFFLINE="1", NO_COLOR="1")
        path = Path(tmp) / "model.gguf"
        for i, (label, data, tail) in enumerate(cases):
            n_files += 1
            write_case(path, data, tail)
            del data
            outcome = run_case(label, path, env=env, timeout=opts.timeout)
            path.unlink()
            verdicts[outcome.verdict] += 1
            worst_rusage = max(worst_rusage, outcome.rusage_maxrss_kib)
            rss_mib = outcome.max_rss_kib / 1024
            if outcome.max_rss_kib > worst_rss[0]:
                worst_rss = (outcome.max_rss_kib, label)
            if outcome.wall_s > worst_wall[0]:
                worst_wall = (outcome.wall_s, label)
            bad = outcome.verdict in FAILURES or rss_mib > opts.max_rss_mib
            if bad:
                failed.append(outcome)
            if bad or not opts.quiet:
                print(
                    f"{i:4d} {outcome.verdict:15s} rc {outcome.returncode:4d} {outcome.wall_s:6.2f}s "
                    f"{rss_mib:7.1f} MiB  {label[:60]!s:60s} {outcome.first_line[:90]}",
                    flush=True,
                )
    print()
    print(f"files: {n_files}  " + "  ".join(f"{k}: {v}" for k, v in sorted(verdicts.items())))
    print(
        f"aborts: {verdicts['abort']}  hangs: {verdicts['hang']}  tracebacks: {verdicts['traceback']}  "
        f"internal errors: {verdicts['internal-error']}"
    )
    print(f"max resident memory (VmHWM): {worst_rss[0] / 1024:.1f} MiB ({worst_rss[1]}); "
          f"largest ru_maxrss (an upper bound): {worst_rusage / 1024:.1f} MiB")
    print(f"slowest: {worst_wall[0]:.2f} s ({worst_wall[1]})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
