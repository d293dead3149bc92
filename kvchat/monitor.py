"""What the machine is doing while the model talks: RSS, VRAM, tok/s, KV fill.

Sampling is kept off the decode path: `HardwareSampler` reads RSS (psutil) and
VRAM (NVML, when an NVIDIA driver is present) on a background thread every
`interval_s`, and readers only look at the last sample. `TokenMeter` does two
subtractions per token and nothing else. No llama_cpp import here.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvchat.hardware import HardwareSample, NvmlReader, memory_kind

if TYPE_CHECKING:
    from kvchat.llama_log import BufferSizes


class HardwareSampler:
    """Reads RSS and VRAM on a daemon thread every `interval_s`; `latest` is free.

    Use as a context manager around a reply. The first sample is taken in
    `start()` so the status line has figures from its first frame.
    """

    def __init__(self, interval_s: float = 0.25, nvml: NvmlReader | None = None) -> None:
        import psutil

        self.interval_s = interval_s
        self._nvml = nvml
        self._kind = memory_kind(nvml)
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.latest: HardwareSample = self.sample()
        self.samples = 0

    def sample(self) -> HardwareSample:
        vram = self._nvml.read() if self._nvml is not None else None
        return HardwareSample(int(self._process.memory_info().rss), vram, self._kind, time.monotonic())

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.latest = self.sample()
            self.samples += 1

    def start(self) -> HardwareSampler:
        if self._thread is None:
            self.latest = self.sample()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="kvchat-monitor", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def __enter__(self) -> HardwareSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TokenMeter:
    """Live timings of one reply, from the caller's clock.

    `start()` when the prompt goes in, `token()` for every token out. TTFT (and
    with it the prefill speed) is fixed at the first token; decode speed counts the tokens
    after it, as `session.TurnStats.decode_tok_s` does. With speculative decoding,
    `token()` also adds up the draft tokens verified and accepted.
    """

    def __init__(self, clock: Any = time.perf_counter) -> None:
        self._clock = clock
        self.started = 0.0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.tokens = 0
        self.drafted = 0
        self.accepted = 0

    def start(self) -> None:
        self.started = self._clock()
        self.first_at = self.last_at = None
        self.tokens = self.drafted = self.accepted = 0

    def token(self, drafted: int = 0, accepted: int = 0) -> None:
        now = self._clock()
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        self.tokens += 1
        self.drafted += drafted
        self.accepted += accepted

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_at is None else self.first_at - self.started

    def elapsed_s(self) -> float:
        return float(self._clock() - self.started)

    def prefill_tok_s(self, prefill_tokens: int) -> float | None:
        """Speed of the prompt evaluation, `prefill_tokens` long, up to the first token."""
        ttft = self.ttft_s
        if ttft is None or ttft <= 0 or prefill_tokens <= 0:
            return None
        return prefill_tokens / ttft

    def decode_tok_s(self) -> float | None:
        if self.first_at is None or self.last_at is None or self.tokens < 2:
            return None
        span = self.last_at - self.first_at
        return (self.tokens - 1) / span if span > 0 else None


@dataclass(frozen=True)
class KvFill:
    """Cells of the KV cache in use and what they weigh at the chosen types."""

    cells: int
    n_ctx: int
    bytes_per_cell: float | None  # None: not known (a server that does not report it)

    @property
    def used_bytes(self) -> float | None:
        return None if self.bytes_per_cell is None else self.cells * self.bytes_per_cell

    @property
    def total_bytes(self) -> float | None:
        return None if self.bytes_per_cell is None else self.n_ctx * self.bytes_per_cell

    @property
    def fraction(self) -> float:
        return self.cells / self.n_ctx if self.n_ctx else 0.0


def kv_bytes_per_cell(buffers: BufferSizes, n_ctx: int) -> float:
    """Bytes one KV cell costs on average, from what llama.cpp reported allocating.

    The one source is the KV buffers' total (what /info prints), spread over the
    n_ctx cells, so that `KvFill.total_bytes` equals it exactly. Sliding-window
    layers hold fewer cells than n_ctx, so on such models this is an average. The
    `llama_kv_cache: size = ...` summaries (K + V over their cells) are the fallback.
    """
    total = sum(buffers.kv.values())
    if total and n_ctx:
        return total / n_ctx
    if buffers.kv_cells and (buffers.k or buffers.v):
        return float(buffers.k + buffers.v) / buffers.kv_cells
    return 0.0
