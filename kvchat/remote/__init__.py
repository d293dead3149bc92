"""Engines that run on a server kvchat talks to, never one it builds.

- `llama_server`: llama-server's own API, with kvchat's exact token history.
- `openai_compat` (vLLM, ollama, LM Studio, llama-cpp-python's server): chat
  completions; the server renders and tokenizes.
- `metrics`: Prometheus text (vLLM's /metrics) read for KV usage and prefix hits.
- `client`: HTTP, streaming, retries, and the errors a user understands.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvchat.remote.client import ServerOptions
    from kvchat.remote.llama_server import LlamaServerEngine


def open_llama_server(options: ServerOptions) -> LlamaServerEngine:
    """Connect to llama-server at `options.url` (its /props answered as llama-server does)."""
    from kvchat.remote.client import ServerClient
    from kvchat.remote.llama_server import LlamaServerEngine

    client = ServerClient(options)
    try:
        return LlamaServerEngine(client)
    except BaseException:
        client.close()
        raise
