"""Time one command in this checkout and in another one, interleaved, in one run.

`python -m kvchat` imports the kvchat package from the working directory first, so
running the same command with cwd set to another checkout (e.g. one made with
`git worktree add /tmp/kvchat-before <commit>`) times that version of the code
with the same interpreter and packages. Runs alternate, so a noisy neighbour
slows both sides alike; the ratio is what to read.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path


def median_pair(cmd: list[str], runs: int, here: Path, there: Path | None,
                env: dict[str, str] | None = None) -> tuple[float, float | None]:
    """Median wall seconds of `cmd` run in `here` and (if given) in `there`."""
    mine: list[float] = []
    theirs: list[float] = []
    for _ in range(runs):
        for cwd, times in ((here, mine), (there, theirs)):
            if cwd is None:
                continue
            started = time.perf_counter()
            subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                           env=env)
            times.append(time.perf_counter() - started)
    return statistics.median(mine), (statistics.median(theirs) if theirs else None)
