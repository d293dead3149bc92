"""Choosing a KV cache type with evidence: memory, speed and quality per K/V pair.

For each K/V cache pair the bench loads one engine and measures

* KV memory: planned (`kvchat.memory`) and as llama.cpp reports it;
* speed: prefill tok/s over a long prompt, time to first token and decode tok/s
  after it, as medians over repeats that follow a warm-up;
* quality against the f16/f16 cache: the same tokens of a fixed public-domain text
  (`kvchat/data/bench_text.txt`, Lewis Carroll, 1865) are teacher-forced through
  each context, and every position's next-token distribution is compared with the
  reference run's: mean and 99th-percentile KL(f16 || pair), top-1 agreement, and
  each run's perplexity, as llama.cpp's `llama-perplexity --kl-divergence` does.

The reference run's logits are spooled to an unnamed temporary file (float32, as
llama.cpp returned them) so that one engine at a time is alive and the comparison
is exact: an f16 run compared with another f16 run gives KL 0 and 100% agreement.

Library only: nothing here prints. Engines come from a factory, so the CLI decides
how models load and tests can pass their own.
"""

from __future__ import annotations

import importlib.resources
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvchat.bench_quality import QUALITY_ROWS, QualityResult, compare_with_reference, record_reference
from kvchat.cache_types import CacheType, parse_cache_type
from kvchat.errors import UsageError

if TYPE_CHECKING:
    from kvchat.engine import Engine
    from kvchat.remote.llama_server import LlamaServerEngine

SCHEMA = "kvchat.bench/1"
DEFAULT_PAIRS = "f16,q8_0,q4_0,q8_0/q4_0"
REFERENCE = ("f16", "f16")
_WARMUP_TOKENS = 32
# Speed differences are compared only when both pairs' spreads (half the min-max range)
# are within this, and the difference is larger than the wider of the two.
MAX_SPREAD_PCT = 10.0


@dataclass(frozen=True)
class CachePair:
    type_k: CacheType
    type_v: CacheType

    @property
    def name(self) -> str:
        return f"{self.type_k.name}/{self.type_v.name}"

    @property
    def is_reference(self) -> bool:
        return (self.type_k.name, self.type_v.name) == REFERENCE


EngineFactory = Callable[[CachePair], "Engine"]
"""Loads an engine for a pair, with the flash-attention mode `kvchat run` would use."""
Progress = Callable[[int, str], None]
"""Called with (steps just done, what runs now); `plan_steps` gives the total."""


@dataclass(frozen=True)
class BenchSettings:
    n_ctx: int = 4096
    prompt_tokens: int = 512
    decode_tokens: int = 64
    repeats: int = 3
    quality_tokens: int = 1024
    speed: bool = True
    quality: bool = True


@dataclass(frozen=True)
class Spread:
    """A median with the samples it came from."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def spread_pct(self) -> float:
        """Half the min-max range, as a percentage of the median."""
        return 50.0 * (self.max - self.min) / self.median if self.median else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "median": round(self.median, 4),
            "min": round(self.min, 4),
            "max": round(self.max, 4),
            "samples": [round(s, 4) for s in self.samples],
        }


@dataclass(frozen=True)
class SpeedResult:
    prefill_tok_s: Spread
    decode_tok_s: Spread
    ttft_s: Spread


@dataclass
class PairResult:
    pair: CachePair
    kv_bytes_reported: int
    kv_bytes_planned: int | None
    load_s: float
    speed: SpeedResult | None = None
    quality: QualityResult | None = None
    flash_attn: str = ""  # as the engine ran it: on / off / auto (left to llama.cpp)


@dataclass(frozen=True)
class Recommendation:
    """The best-quality pair for a KV budget (the pareto front of KV bytes and KL)."""

    pair: CachePair
    kv_bytes: int
    text: str


@dataclass
class BenchResult:
    model_path: Path
    settings: BenchSettings
    n_ctx: int
    n_threads: int
    flash_attn: str
    pairs: list[PairResult]
    total_s: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def reference(self) -> PairResult:
        return next(r for r in self.pairs if r.pair.is_reference)


# -- parsing -------------------------------------------------------------------


def parse_cache_pairs(text: str) -> list[CachePair]:
    """'f16,q8_0,q8_0/q4_0' -> pairs; a lone type means the same K and V type.

    The f16/f16 reference is always measured first (quality is relative to it).
    """
    pairs: list[CachePair] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        k_name, _, v_name = item.partition("/")
        pair = CachePair(parse_cache_type(k_name), parse_cache_type(v_name or k_name))
        if pair not in pairs:
            pairs.append(pair)
    if not pairs:
        raise UsageError("--cache-types names no cache type", hint=f"e.g. {DEFAULT_PAIRS}")
    reference = CachePair(parse_cache_type(REFERENCE[0]), parse_cache_type(REFERENCE[1]))
    return [reference] + [p for p in pairs if p != reference]


def check_settings(settings: BenchSettings) -> None:
    """Refuse settings that cannot run, before any model loads."""
    if settings.repeats < 1:
        raise UsageError("--repeats must be at least 1")
    if not (settings.speed or settings.quality):
        raise UsageError("--no-speed and --no-quality leave nothing to measure")
    if settings.speed and settings.prompt_tokens + settings.decode_tokens > settings.n_ctx:
        raise UsageError(
            f"a {settings.prompt_tokens}-token prompt and {settings.decode_tokens} decoded "
            f"tokens do not fit the {settings.n_ctx}-token context",
            hint="raise --ctx or lower --prompt-tokens",
        )
    if settings.quality and settings.quality_tokens > settings.n_ctx:
        raise UsageError(
            f"{settings.quality_tokens} quality tokens do not fit the {settings.n_ctx}-token context",
            hint="raise --ctx or lower --quality-tokens",
        )
    if settings.quality and settings.quality_tokens < 2:
        raise UsageError("--quality-tokens must be at least 2")


def bench_text() -> str:
    """The bundled public-domain text (Alice's Adventures in Wonderland, ch. I-II)."""
    return importlib.resources.files("kvchat").joinpath("data/bench_text.txt").read_text("utf-8")


def bench_tokens(engine: Engine | LlamaServerEngine, n_tokens: int) -> list[int]:
    tokens = engine.tokenize(bench_text(), add_special=True)
    if len(tokens) < n_tokens:
        raise UsageError(
            f"the bundled text is {len(tokens)} tokens for this model, fewer than {n_tokens}",
            hint=f"use --quality-tokens / --prompt-tokens of at most {len(tokens)}",
        )
    return tokens[:n_tokens]


def plan_steps(settings: BenchSettings, n_pairs: int) -> int:
    """How many progress steps `run_bench` reports, for a progress bar's total."""
    per_pair = 1  # load
    if settings.speed:
        per_pair += 1 + settings.repeats  # warm-up, repeats
    if settings.quality:
        per_pair += -(-settings.quality_tokens // QUALITY_ROWS)
    return per_pair * n_pairs


# -- quality maths -----------------------------------------------------------------


def _warm_up(engine: Engine | LlamaServerEngine, prompt: Sequence[int], progress: Progress | None) -> None:
    """Greedy sampling, and one untimed short run (first-use allocations)."""
    from kvchat.engine_api import SamplingSettings

    engine.set_sampling(SamplingSettings(temperature=0.0))
    engine.kv_clear()
    engine.eval(prompt[:_WARMUP_TOKENS])
    for _ in engine.generate(4, stop_at_eog=False):
        pass
    if progress:
        progress(1, "speed")


def _decode_timing(events: Iterator[object], since: float) -> tuple[float, float]:
    """When the first event came (`since` if none did), and decode tok/s: between
    the first and the last event, one fewer tokens than events were decoded."""
    first = last = since
    n_events = 0
    for _event in events:
        last = time.perf_counter()
        if n_events == 0:
            first = last
        n_events += 1
    return first, (n_events - 1) / (last - first) if n_events > 1 and last > first else 0.0


def measure_speed(
    engine: Engine, prompt: Sequence[int], decode_tokens: int, repeats: int,
    progress: Progress | None = None,
) -> SpeedResult:
    """Prefill, time to first token and decode speed, after one untimed warm-up.

    Each repeat starts from an empty cache, evaluates the prompt, then samples
    greedily (without stopping at end of generation, like llama-bench's tg test).
    """

    _warm_up(engine, prompt, progress)
    prefill, decode, ttft = [], [], []
    for _ in range(repeats):
        engine.kv_clear()
        started = time.perf_counter()
        engine.eval(prompt)
        prefilled = time.perf_counter()
        first, tok_s = _decode_timing(engine.generate(decode_tokens, stop_at_eog=False), prefilled)
        prefill.append(len(prompt) / (prefilled - started))
        ttft.append(first - started)
        decode.append(tok_s)
        if progress:
            progress(1, "speed")
    engine.kv_clear()
    return SpeedResult(Spread(tuple(prefill)), Spread(tuple(decode)), Spread(tuple(ttft)))


@dataclass(frozen=True)
class ServerSpeed:
    """`kvchat bench --server`: speed measured by kvchat on the stream, beside the
    server's own figures (llama-server's timings) for the same requests."""

    url: str
    model: str
    prompt_tokens: int
    decode_tokens: int
    ttft_s: Spread  # request sent to first token streamed back
    decode_tok_s: Spread  # on the stream, first to last token
    server_prefill_tok_s: Spread  # timings.prompt_per_second
    server_decode_tok_s: Spread  # timings.predicted_per_second

    def to_json(self) -> dict[str, Any]:
        return {"server": self.url, "model": self.model, "prompt_tokens": self.prompt_tokens,
                "decode_tokens": self.decode_tokens, "ttft_s": self.ttft_s.to_json(),
                "decode_tok_s": self.decode_tok_s.to_json(),
                "server_prefill_tok_s": self.server_prefill_tok_s.to_json(),
                "server_decode_tok_s": self.server_decode_tok_s.to_json()}


def measure_server_speed(engine: LlamaServerEngine, prompt: Sequence[int], decode_tokens: int, repeats: int,
                         progress: Progress | None = None) -> ServerSpeed:
    """Like measure_speed on llama-server: its prompt cache is turned off for these
    requests, so each repeat evaluates the whole prompt."""

    engine.cache_prompt = False
    try:
        _warm_up(engine, prompt, progress)
        ttft, decode, server_prefill, server_decode = [], [], [], []
        for _ in range(repeats):
            engine.kv_clear()
            started = time.perf_counter()
            engine.eval(prompt)  # evaluated by the server with the request
            first, tok_s = _decode_timing(engine.generate(decode_tokens, stop_at_eog=False), started)
            ttft.append(first - started)
            decode.append(tok_s)
            timings = engine.last_timings
            server_prefill.append(timings.prompt_per_second if timings else 0.0)
            server_decode.append(timings.predicted_per_second if timings else 0.0)
            if progress:
                progress(1, "speed")
    finally:
        engine.cache_prompt = True
        engine.kv_clear()
    return ServerSpeed(engine.client.url, engine.model_name, len(prompt), decode_tokens, Spread(tuple(ttft)),
                       Spread(tuple(decode)), Spread(tuple(server_prefill)), Spread(tuple(server_decode)))


# -- the whole bench ---------------------------------------------------------------------


def _labelled(progress: Progress | None, pair: CachePair) -> Progress:
    """A progress callback that names the pair being measured."""

    def step(done: int, what: str) -> None:
        if progress:
            progress(done, f"{pair.name} {what}")

    return step


def run_bench(
    factory: EngineFactory,
    pairs: Sequence[CachePair],
    settings: BenchSettings,
    *,
    model_path: Path,
    n_threads: int,
    flash_attn: str,
    planned_kv: Callable[[CachePair], int | None] = lambda pair: None,
    progress: Progress | None = None,
) -> BenchResult:
    """Measure every pair, one engine alive at a time; the reference pair comes first."""
    check_settings(settings)
    if not pairs or not pairs[0].is_reference:
        raise UsageError("the f16/f16 reference must be measured first")
    started = time.perf_counter()
    result = BenchResult(model_path, settings, settings.n_ctx, n_threads, flash_attn, [])
    with tempfile.TemporaryFile(prefix="kvchat-bench-") as spool:
        for pair in pairs:
            step = _labelled(progress, pair)
            step(0, "load")
            engine = factory(pair)
            try:
                kv_reported = sum(engine.buffers.kv.values())
                row = PairResult(pair, kv_reported, planned_kv(pair), engine.load_s,
                                 flash_attn=str(getattr(engine, "flash_attn", "")))
                result.n_ctx = engine.n_ctx
                step(1, "loaded")
                if settings.speed:
                    prompt = bench_tokens(engine, settings.prompt_tokens)
                    row.speed = measure_speed(engine, prompt, settings.decode_tokens, settings.repeats, step)
                if settings.quality:
                    tokens = bench_tokens(engine, settings.quality_tokens)
                    if pair.is_reference:
                        row.quality = record_reference(engine, tokens, spool, step)
                    else:
                        row.quality = compare_with_reference(engine, tokens, spool, step)
            finally:
                engine.close()
            result.pairs.append(row)
    result.total_s = time.perf_counter() - started
    return result


# -- reading the results ----------------------------------------------------------------


def _pct(value: float, base: float) -> str:
    change = 100.0 * (value - base) / base if base else 0.0
    return f"{change:+.1f}%".replace("-", "\u2212")


def speed_difference(value: Spread, base: Spread) -> str:
    """`decode −12.3%`, or why the two medians cannot be told apart."""
    if len(value.samples) < 2 or len(base.samples) < 2:
        return "not compared (one run: no spread to judge by; use --repeats 3 or more)"
    widest = max(value.spread_pct, base.spread_pct)
    if widest > MAX_SPREAD_PCT:
        return f"not compared (spread ±{widest:.1f}% too wide; rerun on a quiet machine)"
    change = 100.0 * (value.median - base.median) / base.median if base.median else 0.0
    if abs(change) <= widest:
        return f"within the spread (±{widest:.1f}%)"
    return _pct(value.median, base.median)


def recommend(result: BenchResult) -> list[Recommendation]:
    """One line per memory budget: the lowest-KL pair that fits it.

    Pairs are taken from the largest KV cache down; a pair is listed only when it
    saves memory over every pair listed before it and no smaller pair is at least
    as good (lower or equal KL). Without quality figures, each memory step is listed.
    """
    ref = result.reference
    by_size = sorted(
        result.pairs,
        key=lambda r: (-r.kv_bytes_reported, r.quality.kl_mean if r.quality else 0.0, r is not ref),
    )
    lines: list[Recommendation] = []
    for i, row in enumerate(by_size):
        if lines and row.kv_bytes_reported >= lines[-1].kv_bytes:
            continue
        if row.quality is not None and any(
            other.quality is not None
            and other.kv_bytes_reported < row.kv_bytes_reported
            and other.quality.kl_mean <= row.quality.kl_mean
            for other in by_size[i + 1 :]
        ):
            continue
        parts = [f"{row.pair.name}:"]
        if row is ref:
            parts.append("reference")
        else:
            parts.append(f"{_pct(row.kv_bytes_reported, ref.kv_bytes_reported)} KV,")
            if row.quality is not None:
                parts.append(f"KL {row.quality.kl_mean:.4f},")
            if row.speed is not None and ref.speed is not None:
                parts.append(f"decode {speed_difference(row.speed.decode_tok_s, ref.speed.decode_tok_s)}")
        text = " ".join(parts).rstrip(",")
        lines.append(Recommendation(row.pair, row.kv_bytes_reported, text))
    return lines


def to_json(result: BenchResult) -> dict[str, Any]:
    """The --json record; `schema` names its version."""
    s = result.settings

    def speed(row: PairResult) -> dict[str, Any] | None:
        if row.speed is None:
            return None
        return {
            "prefill_tok_s": row.speed.prefill_tok_s.to_json(),
            "decode_tok_s": row.speed.decode_tok_s.to_json(),
            "ttft_s": row.speed.ttft_s.to_json(),
        }

    return {
        "schema": SCHEMA,
        "model": str(result.model_path),
        "settings": {
            "n_ctx": result.n_ctx,
            "n_threads": result.n_threads,
            "flash_attn": result.flash_attn,
            "prompt_tokens": s.prompt_tokens if s.speed else None,
            "decode_tokens": s.decode_tokens if s.speed else None,
            "repeats": s.repeats if s.speed else None,
            "quality_tokens": s.quality_tokens if s.quality else None,
            "quality_text": "kvchat/data/bench_text.txt",
        },
        "reference": result.reference.pair.name,
        "results": [
            {
                "cache_type_k": row.pair.type_k.name,
                "cache_type_v": row.pair.type_v.name,
                "kv_bytes": {"planned": row.kv_bytes_planned, "reported": row.kv_bytes_reported},
                "load_s": round(row.load_s, 4),
                "flash_attn": row.flash_attn,
                "speed": speed(row),
                "quality": None if row.quality is None else row.quality.to_json(),
            }
            for row in result.pairs
        ],
        "recommendations": [
            {"cache_type_k": r.pair.type_k.name, "cache_type_v": r.pair.type_v.name,
             "kv_bytes": r.kv_bytes, "text": r.text}
            for r in recommend(result)
        ],
        "warnings": list(result.warnings),
        "total_s": round(result.total_s, 2),
    }
