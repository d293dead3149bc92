"""Prometheus text exposition (a server's /metrics), read for what kvchat shows.

vLLM exposes `vllm:kv_cache_usage_perc` (a gauge, 0-1), the prefix cache's
`vllm:prefix_cache_queries_total` / `vllm:prefix_cache_hits_total` (counters, in
tokens) and `vllm:num_requests_running` / `_waiting`. Series carry labels
(model_name, engine); kvchat sums a name's series, or takes the one for its model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# name{labels} value [timestamp]; label values may hold escaped quotes.
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?\s+(\S+)(?:\s+\S+)?$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_exposition(text: str) -> list[Sample]:
    """Every sample in `text`; comments, blank and malformed lines are skipped."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, raw = match.group(1), match.group(2) or "", match.group(3)
        try:
            value = float(raw)
        except ValueError:
            continue
        samples.append(Sample(name, {k: v.replace('\\"', '"') for k, v in _LABEL.findall(labels)}, value))
    return samples


@dataclass(frozen=True)
class ServerMetrics:
    """What kvchat shows from a vLLM server; None where the server does not expose it."""

    kv_cache_usage: float | None  # fraction of the KV cache blocks in use, 0-1
    prefix_cache_queries: float | None  # tokens looked up in the prefix cache, since start
    prefix_cache_hits: float | None  # tokens found there
    requests_running: float | None
    requests_waiting: float | None

    @property
    def prefix_hit_rate(self) -> float | None:
        if not self.prefix_cache_queries or self.prefix_cache_hits is None \
                or self.prefix_cache_hits > self.prefix_cache_queries:
            return None
        return self.prefix_cache_hits / self.prefix_cache_queries


def _value(samples: list[Sample], names: tuple[str, ...], model: str | None, *,
           high: float = math.inf) -> float | None:
    """The names' series summed (the model's own where labelled); None where there are
    none. A sample that cannot be what the name means (negative, infinite, above
    `high`) is a server's mistake and left out."""
    found = [s for s in samples if s.name in names]
    if model is not None and any(s.labels.get("model_name") == model for s in found):
        found = [s for s in found if s.labels.get("model_name") == model]
    values = [s.value for s in found if 0 <= s.value <= high and math.isfinite(s.value)]
    total = sum(values)
    return total if values and math.isfinite(total) else None


def vllm_metrics(text: str, model: str | None = None) -> ServerMetrics:
    """vLLM's figures from its /metrics text (both the v1 names and the older ones)."""
    samples = parse_exposition(text)
    usage = _value(samples, ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"), model, high=1.0)
    return ServerMetrics(
        kv_cache_usage=usage,
        prefix_cache_queries=_value(samples, ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_queries"),
                                    model),
        prefix_cache_hits=_value(samples, ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_hits"), model),
        requests_running=_value(samples, ("vllm:num_requests_running",), model),
        requests_waiting=_value(samples, ("vllm:num_requests_waiting",), model),
    )
