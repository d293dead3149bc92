"""Sessions: turn-20 vs turn-1 time to first token, resume vs cold prefill, file size.

Printed side by side in one run:

1. TTFT of turn 20 over turn 1 (user messages of equal size, greedy, fixed reply
   length) for kvchat's Session and for llama-cpp-python's streaming
   `create_chat_completion` (target for kvchat: <= 1.3);
2. a ~2,000-token named session: TTFT after resuming it from its file (new
   engine, KV state restored) over TTFT after a cold re-prefill of the same
   history (target <= 0.1);
3. session file size over (KV bytes in use + transcript) (target <= 1.1).

Usage: python benchmarks/bench_session.py [--model PATH] [--threads N] [--turns 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from kvchat.app import chat_template_for
from kvchat.cache_types import parse_cache_type
from kvchat.engine import Engine, EngineSettings
from kvchat.engine_api import SamplingSettings
from kvchat.registry import default_model_path
from kvchat.session import Session

F16 = parse_cache_type("f16")
REPLY_TOKENS = 24
N_CTX = 4096


def _message(i: int) -> str:
    return f"Question number {i:02d}: give me one short fact about the sea, please."


def _settings(threads: int) -> EngineSettings:
    return EngineSettings(n_ctx=N_CTX, type_k=F16, type_v=F16, n_threads=threads)


def _median_per_turn(rounds: list[list[float]]) -> list[float]:
    return [statistics.median(values) for values in zip(*rounds, strict=True)]


def kvchat_turn_ttfts(model: Path, threads: int, turns: int, rounds: int) -> list[float]:
    with Engine(model, _settings(threads)) as engine:
        session = Session(engine, chat_template_for(engine), SamplingSettings(temperature=0), REPLY_TOKENS)
        for _ in session.send("Warm up."):  # first use pages the weights in; not a turn
            pass
        all_rounds = []
        for _ in range(rounds):
            session.clear()
            ttfts = []
            for i in range(turns):
                turn = session.send(_message(i))
                for _ in turn:
                    pass
                ttfts.append(turn.stats.ttft_s)
            all_rounds.append(ttfts)
    return _median_per_turn(all_rounds)


def llama_cpp_python_turn_ttfts(model: Path, threads: int, turns: int, rounds: int) -> list[float]:
    from llama_cpp import Llama

    llm = Llama(str(model), n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads, verbose=False)
    all_rounds = []
    try:
        for _ in llm.create_chat_completion(
            messages=[{"role": "user", "content": "Warm up."}], stream=True, max_tokens=REPLY_TOKENS
        ):
            pass
        for _ in range(rounds):
            llm.reset()
            messages: list[dict[str, str]] = []
            ttfts = []
            for i in range(turns):
                messages.append({"role": "user", "content": _message(i)})
                started = time.perf_counter()
                first = None
                reply = []
                for chunk in llm.create_chat_completion(
                    messages=messages, stream=True, temperature=0, max_tokens=REPLY_TOKENS
                ):
                    delta = chunk["choices"][0]["delta"].get("content")
                    if delta:
                        if first is None:
                            first = time.perf_counter() - started
                        reply.append(delta)
                ttfts.append(first or 0.0)
                messages.append({"role": "assistant", "content": "".join(reply)})
            all_rounds.append(ttfts)
    finally:
        llm.close()
    return _median_per_turn(all_rounds)


def resume_vs_cold(model: Path, threads: int, home: Path) -> dict[str, float]:
    os.environ["KVCHAT_HOME"] = str(home)
    from kvchat import saved_sessions
    from kvchat.named_session import ContextSettings, NamedSession
    from kvchat.session_store import model_identity

    long_text = " ".join(f"Fact {i}: the river number {i} flows into the sea." for i in range(150))
    settings = ContextSettings(N_CTX, "f16", "f16", "auto")
    with Engine(model, _settings(threads)) as engine, NamedSession("bench") as named:
        session = Session(engine, chat_template_for(engine), SamplingSettings(temperature=0), REPLY_TOKENS)
        for _ in session.send("Read this and remember it.\n" + long_text):
            pass
        named.check(model_identity(model), settings, rebuild=False)
        size = named.save(session, engine.n_ctx)
        n_tokens = len(session.tokens)
        kv_bytes = engine.n_past * (engine.buffers.k + engine.buffers.v) / engine.buffers.kv_cells
        transcript = len(json.dumps(session.messages).encode())

    question = "What flows into the sea?"
    # Cold: a new process-like start that has only the transcript's tokens.
    saved = saved_sessions.load_existing("bench")
    with Engine(model, _settings(threads)) as engine:
        session = Session(engine, chat_template_for(engine), SamplingSettings(temperature=0), 1)
        started = time.perf_counter()
        session.restore(saved.record, saved.tokens, None)  # re-evaluates the history
        for _ in session.send(question):
            pass
        cold = time.perf_counter() - started
    # Resume: read the file and restore the KV state, then the same question.
    with Engine(model, _settings(threads)) as engine:
        session = Session(engine, chat_template_for(engine), SamplingSettings(temperature=0), 1)
        started = time.perf_counter()
        with NamedSession("bench") as named:  # the store's streamed restore
            named.check(model_identity(model), settings, rebuild=False)
            named.attach(session, rebuild=False)
        for _ in session.send(question):
            pass
        resumed = time.perf_counter() - started
    return {"tokens": n_tokens, "cold_s": cold, "resume_s": resumed, "size": size,
            "kv_bytes": kv_bytes, "transcript": transcript}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 1)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="conversations; per-turn medians")
    args = parser.parse_args()

    ours = kvchat_turn_ttfts(args.model, args.threads, args.turns, args.rounds)
    theirs = llama_cpp_python_turn_ttfts(args.model, args.threads, args.turns, args.rounds)
    print(f"turn-{args.turns} TTFT / turn-1 TTFT, equal-size messages, {REPLY_TOKENS}-token replies, "
          f"median of {args.rounds} conversations:")
    print(f"  kvchat Session            {ours[-1] * 1000:7.1f} ms / {ours[0] * 1000:7.1f} ms = "
          f"{ours[-1] / ours[0]:.2f}  (target <= 1.3)")
    print(f"  llama-cpp-python chat     {theirs[-1] * 1000:7.1f} ms / {theirs[0] * 1000:7.1f} ms = "
          f"{theirs[-1] / theirs[0]:.2f}")
    with tempfile.TemporaryDirectory() as home:
        r = resume_vs_cold(args.model, args.threads, Path(home))
    print(f"{r['tokens']}-token session, time to first token of the next turn:")
    print(f"  resume from file {r['resume_s'] * 1000:7.1f} ms, cold re-prefill {r['cold_s'] * 1000:7.1f} ms, "
          f"ratio {r['resume_s'] / r['cold_s']:.3f}  (target <= 0.1)")
    print(f"  file {r['size'] / 1024:.0f} KiB, KV in use {r['kv_bytes'] / 1024:.0f} KiB + transcript "
          f"{r['transcript'] / 1024:.1f} KiB, ratio {r['size'] / (r['kv_bytes'] + r['transcript']):.3f} "
          f"(target <= 1.1)")


if __name__ == "__main__":
    main()
