"""The persistent prefix cache: one piped document, five questions, five processes.

Printed side by side in one run, per model (SmolLM2-135M, Gemma 3 270M):

1. TTFT of runs 2-5 over run 1: `kvchat run --json` as separate processes, each
   piping the same ~2,000-token document with a different question; run 1 finds
   nothing and stores, runs 2-5 restore the document from disk (goal <= 0.15);
2. the anchor: the same five questions through llama-server with its RAM prompt
   cache (`--cache-ram`), one server process; its `timings.prompt_ms` per request
   (skipped until `python benchmarks/llama_tools.py --check` says it is built);
3. disk bytes per cached token over llama.cpp's own state bytes per token
   (`llama_state_seq_get_size` after evaluating the document) (goal <= 1.1);
4. a miss's overhead over a plain cold run (`--no-prefix-cache`): TTFT and whole
   process wall time, median of --reps pairs (which runs first alternates), cache
   emptied before each miss
   (goal <= 1.05);
5. first, the threshold table behind MIN_PREFIX_TOKENS (SmolLM2, in-process): for
   N-token prefixes, plain prefill vs prefill with snapshots, the write, and a hit.

Usage: python benchmarks/bench_prefix_cache.py [--words 1400] [--questions 5] [--reps 3]
       [--max-tokens 16] [--threads N] [--models smollm2,gemma3]
Smoke: python benchmarks/bench_prefix_cache.py --words 200 --questions 2 --reps 1 --max-tokens 2 \
           --threshold-sizes 64
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llama_tools  # noqa: E402
import model_files  # noqa: E402

QUESTIONS = (
    "How do I reset the device?",
    "What does a blinking light mean?",
    "What does the warranty cover?",
    "How do I update the firmware?",
    "Who do I contact for support?",
)
_VOCAB = ("the device reset button error code manual battery light blinks twice when power is low "
          "press hold seconds until screen shows menu select settings factory restore warranty covers "
          "parts labour service centre contact support email phone hours weekday firmware update")


def document(n_words: int) -> str:
    """A manual-like text; about 1.4 tokens per word on SmolLM2's tokenizer."""
    rng = random.Random(42)
    words = _VOCAB.split()
    sentences: list[str] = []
    count = 0
    while count < n_words:
        chosen = [rng.choice(words) for _ in range(rng.randrange(6, 14))]
        sentences.append(" ".join(chosen).capitalize() + ".")
        count += len(chosen)
    return " ".join(sentences)


def kvchat_run(home: Path, model: Path, doc: str, question: str, args: argparse.Namespace,
               *extra: str) -> tuple[dict, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCHAT_")}
    env["KVCHAT_HOME"] = str(home)
    cmd = [sys.executable, "-m", "kvchat", "run", "--json", "--model", str(model), "--ctx", "4096",
           "--temperature", "0", "-n", str(args.max_tokens), "--threads", str(args.threads), question, *extra]
    started = time.perf_counter()
    proc = subprocess.run(cmd, input=doc, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"kvchat run failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout), wall


def state_bytes_per_token(model: Path, doc: str, threads: int) -> tuple[float, int]:
    """llama.cpp's own serialized state size per token after evaluating the document."""
    from kvchat.cache_types import parse_cache_type
    from kvchat.engine import Engine, EngineSettings

    f16 = parse_cache_type("f16")
    with Engine(model, EngineSettings(n_ctx=4096, type_k=f16, type_v=f16, n_threads=threads,
                                      flash_attn="off")) as engine:
        tokens = engine.tokenize(doc, add_special=True)
        engine.eval(tokens)
        return len(engine.state_bytes()) / len(tokens), len(tokens)


def cache_figures(home: Path) -> dict:
    env = dict(os.environ, KVCHAT_HOME=str(home))
    out = subprocess.run([sys.executable, "-m", "kvchat", "cache", "stats", "--json"], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def bench_kvchat(name: str, model: Path, doc: str, args: argparse.Namespace) -> None:
    questions = QUESTIONS[: args.questions]
    home = Path(tempfile.mkdtemp(prefix="kvchat-bench-prefix-"))
    try:
        runs = [kvchat_run(home, model, doc, q, args)[0] for q in questions]
        ttfts = [r["timings"]["ttft_s"] for r in runs]
        restored = [r["cache"]["prefix_cache_tokens"] for r in runs]
        prompt = runs[0]["usage"]["prompt_tokens"]
        later = statistics.mean(ttfts[1:]) if len(ttfts) > 1 else float("nan")
        print(f"\n== {name}: {prompt}-token prompts, {len(questions)} questions ==")
        for i, (r, t, n) in enumerate(zip(runs, ttfts, restored, strict=True), 1):
            cache = r["cache"]
            print(f"  kvchat run {i}: ttft {t:.3f}s  from disk {n:5d} tok  "
                  f"evaluated {cache['evaluated_tokens']:5d} tok  "
                  f"restore {cache['prefix_cache_restore_s']:.3f}s")
        print(f"  ttft runs 2-{len(questions)} / run 1: {later / ttfts[0]:.3f}  (goal <= 0.15)")
        stats = cache_figures(home)
        per_token, n_doc = state_bytes_per_token(model, doc, args.threads)
        disk_per_token = stats["bytes"] / max(stats["tokens"], 1)
        print(f"  disk: {stats['bytes']} bytes for {stats['tokens']} cached tokens = "
              f"{disk_per_token:.0f} B/tok; llama.cpp state {per_token:.0f} B/tok ({n_doc} tok); "
              f"ratio {disk_per_token / per_token:.3f}  (goal <= 1.1)")
        anchor_server(model, doc, questions, args)
        miss_overhead(home, model, doc, args)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def miss_overhead(home: Path, model: Path, doc: str, args: argparse.Namespace) -> None:
    miss_ttft, plain_ttft, miss_wall, plain_wall = [], [], [], []
    env = dict(os.environ, KVCHAT_HOME=str(home))
    def miss(question: str) -> None:
        subprocess.run([sys.executable, "-m", "kvchat", "cache", "clear", "--yes"], env=env,
                       capture_output=True, check=True)
        record, wall = kvchat_run(home, model, doc, question, args)
        assert record["cache"]["prefix_cache_tokens"] == 0
        miss_ttft.append(record["timings"]["ttft_s"])
        miss_wall.append(wall)

    def plain(question: str) -> None:
        record, wall = kvchat_run(home, model, doc, question, args, "--no-prefix-cache")
        plain_ttft.append(record["timings"]["ttft_s"])
        plain_wall.append(wall)

    for i in range(args.reps):
        # Alternate which goes first, so that neither always runs on a machine the
        # other has just warmed or heated.
        for run in (miss, plain) if i % 2 == 0 else (plain, miss):
            run(f"Question {i}: what is the first step?")
    mt, pt = statistics.median(miss_ttft), statistics.median(plain_ttft)
    mw, pw = statistics.median(miss_wall), statistics.median(plain_wall)
    print(f"  miss (lookup + snapshots + store) vs --no-prefix-cache, median of {args.reps}: "
          f"ttft {mt:.3f}s / {pt:.3f}s = {mt / pt:.3f}; process wall {mw:.2f}s / {pw:.2f}s = {mw / pw:.3f}"
          "  (goal <= 1.05)")



def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def anchor_server(model: Path, doc: str, questions: tuple[str, ...], args: argparse.Namespace) -> None:
    tools = llama_tools.built()
    if tools is None:
        print("  llama-server anchor: skipped (not built; run python benchmarks/llama_tools.py)")
        return
    try:
        server = llama_tools.LlamaServer(tools["llama-server"], "-m", str(model), "-c", "4096",
                                         "-t", str(args.threads), "-fa", "off", "--cache-ram", "1024",
                                         startup_s=120).start()
    except RuntimeError:
        print("  llama-server anchor: the server did not start")
        return
    base = server.url
    try:
        prompt_ms = []
        for question in questions:
            reply = _post(base + "/v1/chat/completions", {
                "messages": [{"role": "user", "content": f"{doc}\n\n{question}"}],
                "max_tokens": args.max_tokens, "temperature": 0, "cache_prompt": True,
            })
            timings = reply.get("timings", {})
            prompt_ms.append(float(timings.get("prompt_ms", float("nan"))))
            print(f"  llama-server {len(prompt_ms)}: prompt {timings.get('prompt_ms', float('nan')):.1f} ms  "
                  f"cached {timings.get('cache_n', '?')} tok  evaluated {timings.get('prompt_n', '?')} tok")
        if len(prompt_ms) > 1:
            ratio = statistics.mean(prompt_ms[1:]) / prompt_ms[0]
            print(f"  llama-server prompt time, requests 2-{len(prompt_ms)} / 1: {ratio:.3f} "
                  "(RAM cache, one process)")
    finally:
        server.stop()


def threshold_table(model: Path, doc: str, args: argparse.Namespace) -> None:
    """Why prompts under MIN_PREFIX_TOKENS are not stored: for N-token prefixes, plain
    prefill, prefill with snapshots (a miss), writing them, and restoring them (a hit)."""
    from kvchat.cache_types import parse_cache_type
    from kvchat.engine import Engine, EngineSettings
    from kvchat.prefix_cache import MIN_PREFIX_TOKENS, Fingerprint, PrefixCache, Store

    f16 = parse_cache_type("f16")
    settings = EngineSettings(n_ctx=4096, type_k=f16, type_v=f16, n_threads=args.threads, flash_attn="off")
    print(f"\n== threshold (SmolLM2, in-process; kvchat stores prompts of >= {MIN_PREFIX_TOKENS} tokens) ==")
    with Engine(model, settings) as engine:
        fp = Fingerprint("bench", model.name, "f16", "f16", engine.flash_attn, False, 0, 512, 512, "bench")
        tokens = engine.tokenize(doc, add_special=True)
        engine.eval(tokens[:64])  # page the weights in
        for n in args.threshold_sizes:
            if n + 1 > len(tokens):
                break
            prompt = tokens[: n + 1]
            rows: dict[str, list[float]] = {"prefill": [], "miss": [], "store": [], "hit": []}
            for _ in range(args.reps):
                folder = Path(tempfile.mkdtemp(prefix="kvchat-bench-threshold-"))
                cache = PrefixCache(fp, store=Store(folder), min_tokens=1, block_tokens=1 << 20)
                engine.kv_clear()
                rows["prefill"].append(_timed(engine.eval, prompt))
                engine.kv_clear()
                rows["miss"].append(_timed(cache.prefill, engine, prompt, [n]))
                rows["store"].append(_timed(cache.commit))
                engine.kv_clear()
                rows["hit"].append(_timed(cache.prefill, engine, prompt, [n]))
                shutil.rmtree(folder, ignore_errors=True)
            m = {k: statistics.median(v) * 1000 for k, v in rows.items()}
            cost = m["miss"] + m["store"] - m["prefill"]
            print(f"  {n:5d} tok: prefill {m['prefill']:8.1f} ms  miss {m['miss']:8.1f} ms  "
                  f"store {m['store']:6.1f} ms  hit {m['hit']:6.1f} ms  "
                  f"(a hit saves {m['prefill'] - m['hit']:8.1f} ms; a miss costs {cost:6.1f} ms)")


def _timed(fn: Callable[..., object], *args: object) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--words", type=int, default=1400, help="document length in words (~2,000 tokens)")
    parser.add_argument("--questions", type=int, default=5, choices=range(2, 6))
    parser.add_argument("--reps", type=int, default=3, help="miss vs plain pairs")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--threshold-sizes", default="64,128,256,512,1024",
                        type=lambda v: [int(x) for x in v.split(",")])
    args = parser.parse_args()
    doc = document(args.words)
    smollm2 = model_files.smollm2_path()
    if smollm2 is not None:
        threshold_table(smollm2, document(max(args.words, 800)), args)
    finders = {"smollm2": model_files.smollm2_path, "gemma3": model_files.gemma3_path}
    for name in args.models.split(","):
        path = finders[name]()
        if path is None:
            print(f"\n== {name}: model not installed, skipped ==")
            continue
        bench_kvchat(name, path, doc, args)


if __name__ == "__main__":
    main()
