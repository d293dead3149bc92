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

import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

from kvchat.engine_api import ChatUsage, SamplingSettings, TokenEvent
from kvchat.errors import ModelNotFoundError, NetworkError, UsageError
from kvchat.remote.client import (
    BadReply,
    ServerClient,
    ServerHTTPError,
    StreamDropped,
    reply_dict,
    reply_int,
    reply_list,
    reply_object,
    reply_str,
)
from kvchat.remote.metrics import ServerMetrics, vllm_metrics
from kvchat.settings import MAX_CTX


def _context_of(entry: dict[str, Any], where: str) -> int:
    """A model entry's context: vLLM's max_model_len, llama.cpp's meta.n_ctx (0: unknown)."""
    meta = reply_dict(entry, "meta", where)
    for source, key in ((entry, "max_model_len"), (meta, "n_ctx"), (meta, "n_ctx_train"),
                        (entry, "context_length")):
        value = reply_int(source, key, where, default=0, high=MAX_CTX)
        if value > 0:
            return value
    return 0


_KEPT = "the reply so far is kept; check the server, then send again"


def _text(obj: dict[str, Any], key: str, where: str) -> str:
    return reply_str(obj, key, where, default="")


class OpenAIChatEngine:
    """Chat completions with one model of one server."""

    kind = "openai"
    renders_messages = True

    def __init__(self, client: ServerClient, model: str | None) -> None:
        started = time.perf_counter()
        self.client = client
        where = client.url + "/v1/models"
        listing = reply_object(client.get_json("/v1/models"), where)
        models = [reply_object(m, where, "model entry") for m in reply_list(listing, "data", where)]
        entries = {reply_str(entry, "id", where, default=""): entry for entry in models}
        entries.pop("", None)  # an entry without an id is no model to ask for
        ids = list(entries)
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
        self._n_ctx = _context_of(entries[model], where)
        self._sampling = SamplingSettings()
        self._json_schema: Any = None  # set_json_schema's, parsed
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

    def set_json_schema(self, schema: str | None) -> None:
        """Constrain replies to a JSON Schema (JSON text): OpenAI's structured outputs,
        `response_format` (vLLM, llama.cpp and LM Studio take it)."""
        self._json_schema = json.loads(schema) if schema is not None else None

    def _body(self, messages: Sequence[dict[str, str]], max_tokens: int | None) -> dict[str, Any]:
        s = self._sampling
        body: dict[str, Any] = {
            "model": self.model_name,
            # role and content only: what kvchat keeps besides (a cut reply's mark) is its own
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
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
        if s.presence_penalty:  # OpenAI's own: every compatible server takes them
            body["presence_penalty"] = s.presence_penalty
        if s.frequency_penalty:
            body["frequency_penalty"] = s.frequency_penalty
        if s.seed is not None:
            body["seed"] = s.seed
        if self._json_schema is not None:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "reply", "schema": self._json_schema}}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        return body

    def chat(self, messages: Sequence[dict[str, str]], max_tokens: int | None) -> Iterator[TokenEvent]:
        """Stream the reply. Every chunk is checked before it is used; the reply must end
        with a finish_reason within the tokens asked for (a chunk with text holds at
        least one token): a stream that ends before it, or that goes past max_tokens,
        is a StreamDropped/BadReply with the reply so far kept."""
        self._usage, self._finish = None, None
        where = self.client.url + "/v1/chat/completions"
        limit = max_tokens if max_tokens is not None else self._n_ctx or None
        asked = "asked for (it ignores max_tokens)" if max_tokens is not None else "its context holds"
        pieces = events = after_finish = 0
        try:
            for event in self.client.stream("/v1/chat/completions", self._body(messages, max_tokens)):
                events += 1
                after_finish += self._finish is not None
                # After the finish come its usage and [DONE]: a few events at most. Before
                # it, empty chunks are few (a role, a finish): at most one per token and some.
                if after_finish > 8 or (limit is not None and events > 2 * limit + 16):
                    what = "after the reply's end (finish_reason)" if after_finish > 8 else \
                        f"for a reply of at most {limit} tokens"
                    raise BadReply(f"{where} sent {events} events {what}; kvchat stopped reading there",
                                   hint=_KEPT)
                usage = reply_dict(event, "usage", where)
                if usage:
                    self._usage = self._read_usage(usage, where)
                for choice in reply_list(event, "choices", where):
                    choice = reply_object(choice, where, "choice")
                    delta = reply_dict(choice, "delta", where)
                    text = _text(delta, "content", where)
                    reasoning = _text(delta, "reasoning_content", where) or _text(delta, "reasoning", where)
                    finish = _text(choice, "finish_reason", where)
                    if (text or reasoning) and self._finish is not None:
                        raise BadReply(f"{where} sent more text after the reply's end (finish_reason "
                                       f"{self._finish!r})", hint=_KEPT)
                    pieces += bool(text or reasoning)
                    if limit is not None and pieces > limit:
                        raise BadReply(f"{where} sent more than the {limit} tokens {asked}; kvchat stopped "
                                       "reading there", hint=_KEPT)
                    if finish:
                        self._finish = finish
                    if text or reasoning or finish:
                        yield TokenEvent(-1, text, finish == "stop", reasoning_text=reasoning)
        except ServerHTTPError as exc:
            if exc.status == 404 and "model" in exc.server_message.lower():
                raise ModelNotFoundError(f"{self.client.url} does not serve model {self.model_name!r}",
                                         hint="see its models with --model at startup") from None
            raise
        if self._finish is None:
            raise StreamDropped(f"{where} ended the stream before the reply's end (no finish_reason)",
                                hint=_KEPT)

    @staticmethod
    def _read_usage(usage: dict[str, Any], where: str) -> ChatUsage | None:
        if usage.get("prompt_tokens") is None:
            return None
        details = reply_dict(usage, "prompt_tokens_details", where)
        prompt = reply_int(usage, "prompt_tokens", where, high=MAX_CTX)
        cached = reply_int(details, "cached_tokens", where, default=-1, low=-1, high=prompt)
        return ChatUsage(prompt, reply_int(usage, "completion_tokens", where, default=0, high=MAX_CTX),
                         cached if cached >= 0 else None)

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
