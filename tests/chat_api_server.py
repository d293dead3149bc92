"""A small OpenAI-compatible chat server on 127.0.0.1 (real sockets), for the
command line's own behaviour on a server without a model: `/props` is 404 (not
llama-server), `/v1/models` lists one model, `/v1/chat/completions` streams a
scripted reply as server-sent events with `usage`. Every request body is kept.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ChatApiServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, model: str = "tiny-chat") -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.model = model
        self.bodies: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def reply_to(self, body: dict[str, Any]) -> str:
        """The reply: JSON when asked for it (response_format), else words about the last message."""
        if "response_format" in body:
            return '{"city": "Paris"}'
        return f"reply {len(self.bodies)} to {body['messages'][-1]['content']}"


class _Handler(BaseHTTPRequestHandler):
    server: ChatApiServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def _json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.server.model, "max_model_len": 2048}]})
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length))
        if self.path != "/v1/chat/completions":
            self._json(404, {"error": {"message": "not found"}})
            return
        self.server.bodies.append(body)
        words = self.server.reply_to(body).split(" ")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        prompt = sum(len(m["content"].split()) for m in body["messages"])
        events: list[dict[str, Any]] = [
            {"choices": [{"index": 0, "delta": {"content": word if i == 0 else " " + word}}]}
            for i, word in enumerate(words)
        ]
        events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        events.append({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": len(words)}})
        for event in events:
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


@contextmanager
def chat_api_server(model: str = "tiny-chat") -> Iterator[ChatApiServer]:
    server = ChatApiServer(model)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
