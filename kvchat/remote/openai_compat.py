"""Any OpenAI-compatible server (vLLM, ollama, LM Studio, llama-cpp-python's server)
as a `MessageEngine`: streamed chat completions, the server's model list, and its
own counts (`usage`, with `prompt_tokens_details.cached_tokens` where it reports
them; vLLM needs --enable-prompt-tokens-details).

The server renders the template and tokenizes, so kvchat keeps messages and the
server's counts, not a token history; its prefix cache (vLLM's automatic prefix
caching, llama.cpp's cache_prompt) is what keeps earlier turns from being
evaluated again, and `cached_tokens` is the proof where it is reported.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from kvchat.engine_api import ChatUsage, SamplingSettings, TokenEvent
from kvchat.errors import ModelNotFoundError, NetworkError, UsageError
from kvchat.remote.client import ServerClient, ServerHTTPError
from kvchat.remote.metrics import ServerMetrics, vllm_metrics


def _context_of(entry: dict[str, Any]) -> int:
    """A model entry's context: vLLM's max_model_len, llama.cpp's meta.n_ctx (0: unknown)."""
    for value in (entry.get("max_model_len"), (entry.get("meta") or {}).get("n_ctx"),
                  (entry.get("meta") or {}).get("n_ctx_train"), entry.get("context_length")):
        if isinstance(value, int) and value > 0:
            return value
    return 0


class OpenAIChatEngine:
    """Chat completions with one model of one server."""

    kind = "openai"
    renders_messages = True

    def __init__(self, client: ServerClient, model: str | None) -> None:
        started = time.perf_counter()
        self.client = client
        listing = client.get_json("/v1/models")
        entries = [m for m in (listing.get("data") or []) if isinstance(m, dict) and m.get("id")] \
            if isinstance(listing, dict) else []
        ids = [str(m["id"]) for m in entries]
        if not ids:
            raise NetworkError(f"{client.url}/v1/models lists no model", hint="load a model on the server")
        if model is None:
            if len(ids) > 1:
                raise UsageError(f"{client.url} serves {len(ids)} models: {', '.join(ids)}",
                                 hint="pick one with --model")
            model = ids[0]
        elif model not in ids:
            raise ModelNotFoundError(f"{client.url} does not serve model {model!r}",
                                     hint=f"its models: {', '.join(ids)}")
        self.model_name = model
        self.model_path = ""
        self._n_ctx = _context_of(next(m for m in entries if m["id"] == model))
        self._sampling = SamplingSettings()
        self._usage: ChatUsage | None = None
        self._finish: str | None = None
        self._metrics_available: bool | None = None
        self._load_s = time.perf_counter() - started

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def load_s(self) -> float:
        return self._load_s

    @property
    def flash_attn(self) -> str:
        return "auto"

    @property
    def last_usage(self) -> ChatUsage | None:
        return self._usage

    @property
    def last_finish_reason(self) -> str | None:
        return self._finish

    def set_sampling(self, sampling: SamplingSettings) -> None:
        self._sampling = sampling

    def _body(self, messages: Sequence[dict[str, str]], max_tokens: int | None) -> dict[str, Any]:
        s = self._sampling
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": list(messages),
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": s.temperature,
            "top_p": s.top_p,
            # Not in OpenAI's own API; vLLM, llama.cpp and LM Studio take them.
            "top_k": s.top_k,
            "min_p": s.min_p,
        }
        if s.repeat_penalty != 1.0:
            body["repetition_penalty"] = body["repeat_penalty"] = s.repeat_penalty
        if s.seed is not None:
            body["seed"] = s.seed
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        return body

    def chat(self, messages: Sequence[dict[str, str]], max_tokens: int | None) -> Iterator[TokenEvent]:
        self._usage, self._finish = None, None
        try:
            for event in self.client.stream("/v1/chat/completions", self._body(messages, max_tokens)):
                usage = event.get("usage")
                if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
                    details = usage.get("prompt_tokens_details") or {}
                    cached = details.get("cached_tokens") if isinstance(details, dict) else None
                    completion = int(usage.get("completion_tokens") or 0)
                    self._usage = ChatUsage(int(usage["prompt_tokens"]), completion,
                                            cached if isinstance(cached, int) else None)
                for choice in event.get("choices") or []:
                    delta = choice.get("delta") or {}
                    text = delta.get("content") or ""
                    reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
                    finish = choice.get("finish_reason")
                    if finish:
                        self._finish = str(finish)
                    if text or reasoning or finish:
                        yield TokenEvent(-1, str(text), finish == "stop", reasoning_text=str(reasoning))
        except ServerHTTPError as exc:
            if exc.status == 404 and "model" in exc.server_message.lower():
                raise ModelNotFoundError(f"{self.client.url} does not serve model {self.model_name!r}",
                                         hint="see its models with --model at startup") from None
            raise

    def metrics(self) -> ServerMetrics | None:
        """vLLM's KV usage and prefix-cache counters from /metrics; None where the
        server has no such endpoint (asked once)."""
        if self._metrics_available is False:
            return None
        try:
            text = self.client.get_text("/metrics")
        except NetworkError:
            self._metrics_available = False
            return None
        metrics = vllm_metrics(text, self.model_name)
        found = metrics.kv_cache_usage is not None or metrics.prefix_cache_queries is not None
        self._metrics_available = found
        return metrics if self._metrics_available else None

    def close(self) -> None:
        self.client.close()
