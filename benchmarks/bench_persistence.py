"""Saving a conversation's KV: what a turn costs on disk, before (the whole state in
one .kvs file, as kvchat wrote it up to issue 22) and after (the KV store: the turn's
new cells, read when the reply ends, written on a thread).

For each history length (default 1k / 4k / 8k / 16k tokens), --turns short turns
(5; their medians: one save is milliseconds), then:

- bytes written by the save, from the kernel's counter (/proc/self/io write_bytes:
  every thread of the process, fsyncs included), not file sizes;
- the save's time (before: state_bytes + session_store.save; after: the engine read
  and the write) and the time from the reply's end to the next prompt (before: the
  whole save; after: the engine read only, the write goes on in the background);
- peak RSS during the save over RSS before it (sampled every 2 ms);
- resume: a named session restored into an empty cache, against a cold prefill of
  the same tokens (timed only at the history closest to --cold-at, 8k by default:
  a cold prefill of 16k tokens of a 32-layer model takes many minutes on 2 cores).

Then the disk used by N recent chats of T tokens sharing a common start (their
system prompt and first message), before (the .kvs files' sizes, each file written
and deleted again) and after (the store's size).

Models: SmolLM2-135M (22.5 KiB of KV per token) and a random-weight llama GGUF
written here with the `gguf` package whose KV is 128 KiB per token at f16 (32
layers x 8 KV heads x 128 dims, Llama-3-8B's; a 64-wide embedding and a small
vocabulary keep its weights ~40 MB). Goals printed with the ratios: bytes and save
time per turn flat in history (16k / 1k <= 1.5), next prompt <= 50 ms at 16k,
resume at 8k <= 0.1 x a cold prefill.

Usage: python benchmarks/bench_persistence.py [--model smollm2|random|both]
       [--sizes 1024,4096,8192,16384] [--threads N] [--recent 20] [--recent-tokens 4096]
       [--cold-at 8192] (--recent 0 skips the recent chats)
Timings need a quiet machine; `--sizes 256,512 --recent 3 --recent-tokens 512`
checks that it runs.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psutil

F16_NAME = "f16"
REPLY_TOKENS = 16
WORDS = ["\u2581the", "\u2581a", "er", "in", "on"] + list("abcdefghijklmnopqrstuvwxyz")


def write_random_llama(path: Path, *, n_layer: int = 32, n_head_kv: int = 8, head_dim: int = 128,
                       n_embd: int = 64, n_ff: int = 128, seed: int = 0) -> Path:
    """A random-weight llama GGUF whose KV is n_layer x 2 x n_head_kv x head_dim x 2
    bytes per token at f16 (128 KiB with the defaults). Heads are head_dim wide
    whatever the embedding (attention.key_length/value_length), so the weights stay
    small; the tokenizer is SentencePiece with byte fallback (tests/synthetic.py's)."""
    from gguf import GGUFWriter

    arch, n_head = "llama", n_head_kv
    rng = np.random.default_rng(seed)
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + WORDS
    types = [2, 3, 3] + [6] * 256 + [1] * len(WORDS)
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(WORDS))]
    writer = GGUFWriter(str(path), arch)
    for key, value in (("block_count", n_layer), ("context_length", 32768), ("embedding_length", n_embd),
                       ("feed_forward_length", n_ff), ("attention.head_count", n_head),
                       ("attention.head_count_kv", n_head_kv), ("attention.key_length", head_dim),
                       ("attention.value_length", head_dim), ("rope.dimension_count", head_dim),
                       ("vocab_size", len(pieces))):
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_float32(f"{arch}.rope.freq_base", 10000.0)
    writer.add_string("general.name", "random-llama-128k-kv")
    writer.add_string("tokenizer.ggml.model", "llama")
    writer.add_array("tokenizer.ggml.tokens", pieces)
    writer.add_array("tokenizer.ggml.scores", scores)
    writer.add_array("tokenizer.ggml.token_type", types)
    writer.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    writer.add_uint32("tokenizer.ggml.bos_token_id", 1)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 2)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5 / np.sqrt(shape[-1])).astype(np.float16)

    ones = np.ones(n_embd, dtype=np.float32)
    writer.add_tensor("token_embd.weight", weight(len(pieces), n_embd))
    writer.add_tensor("output_norm.weight", ones)
    writer.add_tensor("output.weight", weight(len(pieces), n_embd))
    q = n_head * head_dim
    for il in range(n_layer):
        blk = f"blk.{il}"
        writer.add_tensor(f"{blk}.attn_norm.weight", ones)
        writer.add_tensor(f"{blk}.ffn_norm.weight", ones)
        # numpy shapes are ggml's ne reversed
        writer.add_tensor(f"{blk}.attn_q.weight", weight(q, n_embd))
        writer.add_tensor(f"{blk}.attn_k.weight", weight(n_head_kv * head_dim, n_embd))
        writer.add_tensor(f"{blk}.attn_v.weight", weight(n_head_kv * head_dim, n_embd))
        writer.add_tensor(f"{blk}.attn_output.weight", weight(n_embd, q))
        writer.add_tensor(f"{blk}.ffn_gate.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"{blk}.ffn_up.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"{blk}.ffn_down.weight", weight(n_embd, n_ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_model() -> Path:
    from model_files import models_cache

    path = models_cache() / "random-llama-128k-kv.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        write_random_llama(tmp)
        tmp.rename(path)
    return path


# -- measuring ---------------------------------------------------------------------------


def write_bytes() -> int:
    with open("/proc/self/io") as fh:
        for line in fh:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/self/io")


@contextmanager
def measured() -> Iterator[dict[str, float]]:
    """Seconds, bytes written and peak RSS growth of the block."""
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out: dict[str, float] = {}
    written, started = write_bytes(), time.perf_counter()
    try:
        yield out
    finally:
        out["s"] = time.perf_counter() - started
        out["bytes"] = write_bytes() - written
        stop.set()
        sampler.join()
        out["rss"] = max(peak[0], proc.memory_info().rss) - base


def text_of(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join("".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 4)) for _ in range(n_words))


# -- one model ------------------------------------------------------------------------------


class Bench:
    def __init__(self, model: Path, threads: int, n_ctx: int) -> None:
        from kvchat.app import chat_template_for
        from kvchat.cache_types import parse_cache_type
        from kvchat.engine import Engine, EngineSettings
        from kvchat.named_session import ContextSettings
        from kvchat.session_store import model_identity

        f16 = parse_cache_type(F16_NAME)
        self.engine = Engine(model, EngineSettings(n_ctx=n_ctx, type_k=f16, type_v=f16, n_threads=threads))
        self.template = chat_template_for(self.engine, raw=True)
        self.identity = model_identity(model)
        self.settings = ContextSettings(n_ctx, F16_NAME, F16_NAME, self.engine.flash_attn)

    def session(self) -> Any:
        from kvchat.engine_api import SamplingSettings
        from kvchat.session import Session

        self.engine.kv_clear()
        return Session(self.engine, self.template, SamplingSettings(temperature=0), REPLY_TOKENS)

    def named(self, name: str) -> Any:
        from kvchat.named_session import NamedSession

        named = NamedSession(name)
        named.check(self.identity, self.settings, rebuild=False)
        named.settings = self.settings
        return named

    def grow(self, session: Any, n_tokens: int, seed: int) -> None:
        """Turns of ~1,000 tokens until the history holds n_tokens."""
        while len(session.tokens) < n_tokens:
            words = max(16, min(1000, n_tokens - len(session.tokens)) // 5)
            session.send(text_of(words, seed + len(session.tokens))).text()

    def per_turn(self, sizes: list[int], folder: Path, cold_at: int, n_turns: int = 5,
                 profile: bool = False) -> list[dict[str, Any]]:
        from kvchat import session_store

        rows = []
        session = self.session()
        named = self.named("bench")
        cold_size = min(sizes, key=lambda size: abs(size - cold_at))
        for size in sizes:
            self.grow(session, size, seed=size)
            named.save(session, self.engine.n_ctx)  # the history saved as of the last turn
            turns = []
            for turn in range(n_turns):  # short turns; the figures are their medians
                session.send(text_of(8, size + 1 + turn)).text()
                profiler = cProfile.Profile() if profile and size == sizes[-1] and turn == 0 else None
                with measured() as sync:
                    if profiler is not None:
                        profiler.enable()
                    pending = named.prepare_save(session, self.engine.n_ctx)  # reply end -> prompt
                    if profiler is not None:
                        profiler.disable()
                with measured() as write:
                    writer = threading.Thread(target=named.finish_save, args=(pending,))
                    writer.start()
                    writer.join()
                if profiler is not None:  # where the reply-end-to-prompt time goes at the longest history
                    pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
                # the turn's cells as llama.cpp serialises them
                turns.append({"new": pending.new_bytes, "sync_s": sync["s"], "write_s": write["s"],
                              "bytes": write["bytes"], "rss": max(sync["rss"], write["rss"])})
            median = {k: statistics.median(t[k] for t in turns) for k in turns[0]}
            median["s"] = statistics.median(t["sync_s"] + t["write_s"] for t in turns)
            record = {**session.to_record(), "model": self.identity, "settings": self.settings.as_record()}
            with measured() as before:
                state = self.engine.state_bytes()
                session_store.save(folder / "before.kvs", record, list(session.tokens), state)
            del state
            (folder / "before.kvs").unlink()
            n_kv, tokens = self.engine.n_past, list(session.tokens)
            cold = {"s": float("nan")}
            if size == cold_size:
                self.engine.kv_clear()
                with measured() as cold:
                    self.engine.eval(tokens[:n_kv])
            resumed = self.session()
            named.close()
            with measured() as resume:  # as `chat --session bench` does: read, restore
                named = self.named("bench")
                named.attach(resumed, rebuild=False)
            assert resumed.tokens == session.tokens and self.engine.n_past == n_kv
            rows.append({"history": n_kv, "new_cells_bytes": median["new"],
                         "before_bytes": before["bytes"], "before_s": before["s"],
                         "before_rss": before["rss"], "after_bytes": median["bytes"],
                         "after_bytes_max": max(t["bytes"] for t in turns),
                         "after_s": median["s"], "after_rss": median["rss"],
                         "next_prompt_before_s": before["s"], "next_prompt_after_s": median["sync_s"],
                         "resume_s": resume["s"], "cold_prefill_s": cold["s"]})
            session = resumed
        named.close()
        return rows

    def recent_chats(self, n: int, n_tokens: int, folder: Path) -> dict[str, int]:
        """n recent chats of n_tokens sharing their first quarter: disk used."""
        from kvchat import saved_sessions, session_store
        from kvchat.kv_store import KvStore

        before, stored = 0, KvStore().usage().total  # the store holds per_turn's session already
        for i in range(n):
            session = self.session()
            self.grow(session, n_tokens // 4, seed=7)  # the same start in every chat
            self.grow(session, n_tokens, seed=1000 * (i + 1))
            with self.named(saved_sessions.recent_name(time.time())) as named:
                named.save(session, self.engine.n_ctx)
            record = {**session.to_record(), "model": self.identity, "settings": self.settings.as_record()}
            path = folder / "recent.kvs"
            before += session_store.save(path, record, list(session.tokens), self.engine.state_bytes())
            path.unlink()
        after = KvStore().usage().total - stored
        return {"chats": n, "tokens": n_tokens, "before_bytes": before, "after_bytes": after}

    def close(self) -> None:
        self.engine.close()


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "n/a"


def report(name: str, rows: list[dict[str, Any]], recent: dict[str, int]) -> None:
    mib = 1024 * 1024
    print(f"\n== {name}")
    print(f"{'history':>8} {'before MiB':>10} {'after MiB':>9} {'before s':>8} {'after s':>7} "
          f"{'prompt before':>13} {'prompt after':>12} {'RSS+ before':>11} {'RSS+ after':>10} "
          f"{'resume s':>8} {'cold s':>7}")
    for r in rows:
        print(f"{r['history']:>8} {r['before_bytes'] / mib:>10.1f} {r['after_bytes'] / mib:>9.2f} "
              f"{r['before_s']:>8.3f} {r['after_s']:>7.3f} {r['next_prompt_before_s'] * 1000:>11.1f}ms "
              f"{r['next_prompt_after_s'] * 1000:>10.1f}ms {r['before_rss'] / mib:>9.1f}Mi "
              f"{r['after_rss'] / mib:>8.1f}Mi {r['resume_s']:>8.3f} {r['cold_prefill_s']:>7.3f}")
    first, last = rows[0], rows[-1]
    span = f"{last['history']}/{first['history']}"
    print(f"bytes per save {span}: after {ratio(last['after_bytes'], first['after_bytes'])}"
          f" (goal <= 1.5), before {ratio(last['before_bytes'], first['before_bytes'])}")
    print(f"save time {span}: after {ratio(last['after_s'], first['after_s'])}"
          f" (goal <= 1.5), before {ratio(last['before_s'], first['before_s'])}")
    print(f"next prompt at {last['history']}: {last['next_prompt_after_s'] * 1000:.1f} ms (goal <= 50), "
          f"before {last['next_prompt_before_s'] * 1000:.1f} ms")
    worst = max(rows, key=lambda r: r["after_bytes"] - 1.1 * r["new_cells_bytes"])
    print("bytes written / the turn's new cells: "
          + ", ".join(f"{r['after_bytes'] / r['new_cells_bytes']:.2f} at {r['history']}" for r in rows)
          + f" (goal: <= 1.1 x + a small constant; beyond 1.1 x at worst ({worst['history']}): "
          f"{(worst['after_bytes'] - 1.1 * worst['new_cells_bytes']) / 1024:.0f} KiB)")
    print("largest save of the turns (the manifest's log written whole again, if that fell among them): "
          + ", ".join(f"{r['after_bytes_max'] / mib:.2f} MiB at {r['history']}" for r in rows))
    mid = next(r for r in rows if r["cold_prefill_s"] == r["cold_prefill_s"])  # the row timed cold
    print(f"resume / cold prefill at {mid['history']}: {ratio(mid['resume_s'], mid['cold_prefill_s'])} "
          "(goal <= 0.1)")
    if recent["chats"]:
        print(f"{recent['chats']} recent chats of {recent['tokens']} tokens: "
              f"before {recent['before_bytes'] / mib:.1f} MiB, after {recent['after_bytes'] / mib:.1f} MiB")


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from model_files import smollm2_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["smollm2", "random", "both"], default="both")
    parser.add_argument("--sizes", default="1024,4096,8192,16384")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--recent", type=int, default=20)
    parser.add_argument("--recent-tokens", type=int, default=4096)
    parser.add_argument("--cold-at", type=int, default=8192, help="time a cold prefill at this history only")
    parser.add_argument("--turns", type=int, default=5, help="short turns saved per history length (medians)")
    parser.add_argument("--profile", action="store_true", help="profile the save's read at the last size")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    models: list[tuple[str, Callable[[], Path | None]]] = []
    if args.model in ("smollm2", "both"):
        models.append(("SmolLM2-135M (22.5 KiB KV/token)", smollm2_path))
    if args.model in ("random", "both"):
        models.append(("random llama, 128 KiB KV/token", random_model))
    results = {}
    for label, locate in models:
        model = locate()
        if model is None:
            print(f"skipped {label}: model not installed")
            continue
        with tempfile.TemporaryDirectory() as home:
            os.environ["KVCHAT_HOME"] = home
            n_ctx = ((max(max(sizes), args.recent_tokens) + 1024) // 256 + 1) * 256
            bench = Bench(model, args.threads, n_ctx)
            try:
                rows = bench.per_turn(sizes, Path(home), args.cold_at, args.turns, args.profile)
                recent = bench.recent_chats(args.recent, args.recent_tokens, Path(home))
            finally:
                bench.close()
        report(label, rows, recent)
        results[label] = {"per_turn": rows, "recent": recent}
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
