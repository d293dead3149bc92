"""`kvchat serve`: an OpenAI-compatible HTTP server over the application layer.

- `protocol`: request bodies checked into `kvchat.app.serving.Request`, replies,
  stream chunks and OpenAI-shaped errors (no HTTP framework needed);
- `tool_calls`: the model's tool calls (Qwen/Hermes tags, Llama 3.x JSON) as
  OpenAI `tool_calls`;
- `server`: the Starlette routes, the request queue, /metrics.

Starlette and uvicorn are the `serve` extra: only `kvchat serve` imports them.
This package reaches the model only through `kvchat.app`.
"""
