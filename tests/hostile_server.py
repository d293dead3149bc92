"""A fake inference server on 127.0.0.1 that can misbehave on purpose.

It speaks enough of llama-server's API (/health, /props, /tokenize, /detokenize,
/apply-template, streamed /completion, /slots, /v1/models with meta.n_vocab) or of
the OpenAI API (/v1/models, streamed /v1/chat/completions; /props is a 404 there,
which is how kvchat tells the two apart) for `kvchat run --server URL` to chat,
with a model that needs no weights: one token per UTF-8 byte (id 3 + byte), two
special tokens (<|im_start|> = 1, <|im_end|> = 2, the end of a turn), a ChatML
template, and a fixed reply.

`server.faults` (none: a well-behaved server) each name an endpoint and what to do
there instead: send a body or line that never ends, ignore n_predict,
trickle bytes, answer with given JSON or events, redirect, close early. A fault
whose `when` text is set applies only to requests whose body contains it (the turn's
/tokenize, not the ones at startup). Every body byte the server sent is counted in
`sent`, so a test can tell how much a client read before it stopped.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

IM_START, IM_END = 1, 2
N_VOCAB = 3 + 256
N_CTX = 4096
REPLY = "Hello there, friend."
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_SPECIAL = {"<|im_start|>": IM_START, "<|im_end|>": IM_END}


def tokenize(text: str, parse_special: bool = True) -> list[int]:
    tokens: list[int] = []
    i = 0
    while i < len(text):
        special = next((s for s in _SPECIAL if parse_special and text.startswith(s, i)), None)
        if special is not None:
            tokens.append(_SPECIAL[special])
            i += len(special)
            continue
        tokens.extend(3 + b for b in text[i].encode())
        i += 1
    return tokens


def piece(token: int) -> bytes:
    names = {v: k for k, v in _SPECIAL.items()}
    return names[token].encode() if token in names else bytes([token - 3])


@dataclass
class Fault:
    """Misbehave at `path` (a prefix: "/completion", "/props", ...)."""

    path: str
    kind: str  # see Handler._misbehave
    value: Any = None  # the JSON, events or numbers the kind uses
    when: str = ""  # only for requests whose body contains this
    status: int = 200


@dataclass
class Log:
    requests: list[str] = field(default_factory=list)
    sent: int = 0  # body bytes written, all requests together


class HostileServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, mode: str) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.mode = mode  # "llama" or "openai"
        self.faults: list[Fault] = []
        self.log = Log()
        self.lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> HostileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    server: HostileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    # -- plumbing ------------------------------------------------------------------

    def _body(self) -> dict[str, Any]:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        self._raw = raw.decode("utf-8", errors="replace")
        return json.loads(raw) if raw else {}

    def _write(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()
        with self.server.lock:
            self.server.log.sent += len(data)

    def _headers(self, status: int = 200, content_type: str = "application/json",
                 length: int | None = None, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is None:
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(length))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()

    def _json(self, value: Any, status: int = 200) -> None:
        data = json.dumps(value).encode()
        self._headers(status, length=len(data))
        self._write(data)

    def _events(self, events: list[Any], *, done: bool = False) -> None:
        """An SSE stream closed by the server at its end (no length: ends at close)."""
        self._headers(content_type="text/event-stream")
        for event in events:
            data = event if isinstance(event, bytes) else json.dumps(event).encode()
            self._write(b"data: " + data + b"\n\n")
        if done:
            self._write(b"data: [DONE]\n\n")

    # -- routes ------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._raw = ""
        self._route({})

    def do_POST(self) -> None:  # noqa: N802
        self._route(self._body())

    def _route(self, body: dict[str, Any]) -> None:
        path = self.path.split("?", 1)[0]
        self.server.log.requests.append(path)
        fault = next((f for f in self.server.faults if path.startswith(f.path) and f.when in self._raw), None)
        try:
            if fault is not None:
                self._misbehave(fault, body)
            elif self.server.mode == "llama":
                self._llama(path, body)
            else:
                self._openai(path, body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading: what these tests are about

    def _llama(self, path: str, body: dict[str, Any]) -> None:
        if path == "/health":
            self._json({"status": "ok"})
        elif path == "/props":
            self._json({"default_generation_settings": {"n_ctx": N_CTX}, "total_slots": 1,
                        "model_path": "/models/fake-byte-model.gguf", "chat_template": TEMPLATE,
                        "bos_token": "", "eos_token": "<|im_end|>"})
        elif path == "/v1/models":
            self._json({"object": "list", "data": [{"id": "fake-byte-model.gguf", "object": "model",
                                                    "meta": {"n_vocab": N_VOCAB, "n_ctx_train": N_CTX}}]})
        elif path == "/tokenize":
            tokens = tokenize(body["content"], body.get("parse_special", True))
            self._json({"tokens": [{"id": t, "piece": list(piece(t)) if t - 3 >= 128 else piece(t).decode()}
                                   for t in tokens]})
        elif path == "/detokenize":
            self._json({"content": b"".join(piece(t) for t in body["tokens"]).decode(errors="replace")})
        elif path == "/apply-template":
            self._json({"prompt": "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                                          for m in body["messages"]) + "<|im_start|>assistant\n"})
        elif path.startswith("/slots/"):
            self._json({"id_slot": 0, "filename": body.get("filename"), "n_saved": 1, "n_restored": 1})
        elif path == "/completion":
            self._events(self.completion_events(body))
        else:
            self._json({"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}}, 404)

    def completion_events(self, body: dict[str, Any], reply: str = REPLY) -> list[Any]:
        n_prompt = len(body["prompt"])
        events: list[Any] = [{"prompt_progress": {"total": n_prompt, "cache": 0, "processed": n_prompt,
                                                  "time_ms": 1.0}}]
        tokens = [3 + b for b in reply.encode()][: body["n_predict"]]
        for i, token in enumerate(tokens):
            events.append({"content": piece(token).decode(errors="replace"), "tokens": [token], "stop": False,
                           "id_slot": 0, "tokens_predicted": i + 1})
        stop_type = "limit"
        if len(tokens) < body["n_predict"]:
            events.append({"content": "", "tokens": [IM_END], "stop": False, "id_slot": 0,
                           "tokens_predicted": len(tokens) + 1})
            stop_type = "eos"
        events.append({"content": "", "tokens": [], "stop": True, "stop_type": stop_type, "id_slot": 0,
                       "timings": {"cache_n": 0, "prompt_n": n_prompt, "prompt_ms": 1.0,
                                   "predicted_n": len(tokens), "predicted_ms": 1.0}})
        return events

    def _openai(self, path: str, body: dict[str, Any]) -> None:
        if path == "/v1/models":
            self._json({"object": "list",
                        "data": [{"id": "fake-chat", "object": "model", "max_model_len": N_CTX}]})
        elif path == "/v1/chat/completions":
            self._events(self.chat_events(body), done=True)
        else:
            self._json({"detail": "Not Found"}, 404)

    @staticmethod
    def chat_events(body: dict[str, Any], reply: str = REPLY) -> list[Any]:
        words = reply.split(" ")
        limit = body.get("max_tokens") or len(words)
        chunks = [w + " " for w in words[:-1]] + words[-1:]
        events: list[Any] = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "finish_reason": None}], "usage": None}]
        events += [{"choices": [{"index": 0, "delta": {"content": c}, "finish_reason": None}], "usage": None}
                   for c in chunks[:limit]]
        finish = "stop" if len(chunks) <= limit else "length"
        events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}], "usage": None})
        usage = {"prompt_tokens": 40, "completion_tokens": min(limit, len(chunks))}
        events.append({"choices": [], "usage": usage})
        return events

    # -- misbehaving -----------------------------------------------------------------

    def _misbehave(self, fault: Fault, body: dict[str, Any]) -> None:
        kind = fault.kind
        if kind == "json":  # this JSON (any value) as the reply
            data = fault.value if isinstance(fault.value, bytes) else json.dumps(fault.value).encode()
            self._headers(fault.status, length=len(data))
            self._write(data)
        elif kind == "huge-body":  # a body without end, declared (value: bytes) or not
            self._headers(length=fault.value)
            self._write(b'{"pad": "')
            self._endless(b"x" * 65536)
        elif kind == "huge-line":  # one SSE line without end
            self._headers(content_type="text/event-stream")
            self._write(b'data: {"content": "')
            self._endless(b"x" * 65536)
        elif kind == "events":  # these events, then close (value: list; done: [DONE] after)
            self._events(fault.value)
        elif kind == "events-done":
            self._events(fault.value, done=True)
        elif kind == "tokens-forever":  # a reply that ignores n_predict / max_tokens
            self._headers(content_type="text/event-stream")
            for i in _forever():
                if self.server.mode == "llama":
                    event = {"content": "a", "tokens": [3 + ord("a")], "stop": False, "id_slot": 0,
                             "tokens_predicted": i + 1}
                else:
                    event = {"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": None}]}
                self._write(b"data: " + json.dumps(event).encode() + b"\n\n")
        elif kind == "drip":  # value: (events sent whole first, seconds between the trickled bytes)
            first, every = fault.value
            self._headers(content_type="text/event-stream")
            for event in first:
                self._write(b"data: " + json.dumps(event).encode() + b"\n\n")
            for _ in _forever():
                self._write(b" ")
                time.sleep(every)
        elif kind == "drip-headers":  # the status line and headers, a byte at a time
            for byte in b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-Slow: " + b"x" * 10_000:
                self._write(bytes([byte]))
                time.sleep(fault.value)
        elif kind == "redirect":
            status = fault.status if 300 <= fault.status < 400 else 302
            self._headers(status, length=0, extra={"Location": fault.value})
        elif kind == "headers-then-close":  # a chunked stream that ends before its first chunk
            self._headers(content_type="text/event-stream", length=None,
                          extra={"Transfer-Encoding": "chunked"})
            self.wfile.flush()
        elif kind == "empty-stream":
            self._headers(content_type="text/event-stream", length=0)
        elif kind == "reply-then-close":  # the good reply's first `value` events, no end
            events = (self.completion_events(body) if self.server.mode == "llama" else self.chat_events(body))
            self._events(events[: fault.value])
        else:
            raise AssertionError(f"unknown fault {kind}")

    def _endless(self, block: bytes) -> None:
        for _ in _forever():
            self._write(block)


def _forever() -> Iterator[int]:
    i = 0
    while True:
        yield i
        i += 1
