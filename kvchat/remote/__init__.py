"""Engines that run on a server kvchat talks to, never one it builds.

- `llama_server`: llama-server's own API, with kvchat's exact token history.
- `openai_compat` (vLLM, ollama, LM Studio, llama-cpp-python's server): chat
  completions; the server renders and tokenizes.
- `metrics`: Prometheus text (vLLM's /metrics) read for KV usage and prefix hits.
- `client`: HTTP, streaming, retries, bounds and deadlines on what a server sends,
  checks of its replies, and the errors a user understands.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvchat.remote.client import ServerOptions
    from kvchat.remote.llama_server import LlamaServerEngine
    from kvchat.remote.openai_compat import OpenAIChatEngine


def open_server_engine(options: ServerOptions, model: str | None) -> LlamaServerEngine | OpenAIChatEngine:
    """Connect to the server at `options.url`: llama-server (its /props says so) gets
    the exact token path; any other server the OpenAI chat API, with `model`."""
    from kvchat.remote.client import ServerClient, ServerHTTPError
    from kvchat.remote.llama_server import LlamaServerEngine, looks_like_llama_server
    from kvchat.remote.openai_compat import OpenAIChatEngine

    client = ServerClient(options)
    try:
        try:
            props = client.get_json("/props")
        except ServerHTTPError as exc:
            if exc.status in (401, 403) or 300 <= exc.status < 400:  # refused or elsewhere: say so
                raise
            props = None
        if looks_like_llama_server(props):
            return LlamaServerEngine(client, props)
        return OpenAIChatEngine(client, model)
    except BaseException:
        client.close()
        raise
