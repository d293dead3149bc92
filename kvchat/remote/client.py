"""HTTP to an inference server, and its failures as errors a user understands.

One `ServerClient` per server: JSON requests, server-sent-event streams, the API
key as a bearer token, TLS verification on unless turned off. A 503 (the server
is loading or every slot is busy) is retried with backoff a bounded number of
times; everything else is translated once, here, into a `NetworkError` (exit 6)
or `UsageError` that names the next step.

A server is not trusted to be well behaved. Each reply is bounded: a JSON body at
MAX_BODY_BYTES, one line of an event stream at MAX_EVENT_BYTES (kvchat stops
reading there, so memory stays bounded whatever is sent). The timeout is a
deadline, not a wait per byte: for a whole JSON reply, and for each next event of
a stream (a long prefill that streams its progress never times out; a server
that trickles a byte at a time does). Redirects are refused, and what comes back
is checked for the shapes the APIs promise (`reply_*` below) before kvchat uses it.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx2

from kvchat.errors import KvchatError, NetworkError, UsageError

RETRY_503 = 4  # attempts in all for a busy server; waits 0.5, 1, 2 s between them
CONNECT_TIMEOUT_S = 10.0
# kvchat's own replies are kilobytes (/props with its template, /v1/models); a
# /tokenize reply grows with the text sent and gets its own bound (see reply_limit).
MAX_BODY_BYTES = 16 * 2**20
# One server-sent event: a token, or a final event that may repeat the prompt's text.
MAX_EVENT_BYTES = 16 * 2**20
MAX_ERROR_BYTES = 64 * 2**10  # an error reply: only its message is shown
MAX_TOKEN_ID = 2**31 - 1  # what a session file stores (int32), when the vocabulary is unknown


class ContextExceededError(KvchatError):
    """The server refused a prompt longer than its context."""

    exit_code = UsageError.exit_code


class StreamDropped(NetworkError):
    """The reply ended before its end (the connection broke, the stream stopped, the
    deadline passed); what came is kept."""


class BadReply(NetworkError):
    """A reply that is not what the server's API promises (not JSON, wrong types,
    out-of-range values, too large): kvchat uses none of it."""


class ServerHTTPError(NetworkError):
    """An HTTP error status with the server's own message (status kept for callers)."""

    def __init__(self, message: str, *, status: int, server_message: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.server_message = server_message


_KEPT_HINT = "the partial reply is kept; check the server, then send again"


def check_url(url: str) -> str:
    """A server base URL: http(s)://host[:port][/prefix], without a trailing slash."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--server {url!r} is not an http:// or https:// URL",
                         hint="e.g. --server http://gpu-box:8080")
    try:
        _ = parts.port  # raises on a bad port
    except ValueError:
        raise UsageError(f"--server {url!r} has a bad port",
                         hint="e.g. --server http://gpu-box:8080") from None
    return url.strip().rstrip("/")


@dataclass(frozen=True)
class ServerOptions:
    """How to reach a server: the settings server, api_key, server_timeout, tls_verify."""

    url: str
    api_key: str | None
    timeout_s: float
    verify_tls: bool


def clip(text: str | bytes, limit: int = 60) -> str:
    """Text from a server for an error message, as it came: short, escaped, on one line."""
    if isinstance(text, bytes):
        text = text[: limit * 4].decode("utf-8", errors="replace")
    shown = repr(text[: limit * 4])[1:-1]
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def excerpt(value: Any, limit: int = 60) -> str:
    """A JSON value from a server for an error message, written as JSON: short, on one line."""
    if isinstance(value, str):
        value = value[: limit * 4]
    return clip(json.dumps(value, ensure_ascii=True, default=repr), limit)


def size_text(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:g} MiB" if n_bytes >= 2**20 else f"{n_bytes} bytes"


def _server_message(raw: bytes) -> str:
    """The server's error text: OpenAI's {"error": {"message"}}, or the body."""
    text = raw.decode("utf-8", errors="replace")
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        return clip(" ".join(text.split()), 300)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            error = error.get("message") or error.get("detail") or error
        return clip(error, 300) if isinstance(error, str) else excerpt(error, 300)
    return excerpt(body, 300)


def _error_type(raw: bytes) -> str:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    return str(error.get("type", "")) if isinstance(error, dict) else ""


class _Deadline:
    """One request's deadline, watched from a thread: past it the client's sockets are
    shut down, so a read blocked on a server that trickles bytes (or sends none) ends
    at once instead of after another whole read timeout. A stream's next event gets
    its own deadline (`restart`); while the caller holds an event the clock is
    stopped (`pause`: a terminal paused with Ctrl-S is not the server's fault)."""

    def __init__(self, seconds: float, shut_down: Callable[[], None]) -> None:
        self.seconds = seconds
        self.fired = False
        self.bytes = 0  # received since the deadline (re)started, for the message
        self._shut_down = shut_down
        self._at: float | None = time.monotonic() + seconds  # None: paused
        self._stopped = False
        self._changed = threading.Condition()
        threading.Thread(target=self._watch, name="kvchat-server-deadline", daemon=True).start()

    def _watch(self) -> None:
        with self._changed:
            while not self._stopped:
                if self._at is None:
                    self._changed.wait()
                elif (left := self._at - time.monotonic()) > 0:
                    self._changed.wait(left)
                else:
                    # Under the lock: once stop() returns, no later request's socket is shut.
                    self.fired = True
                    self._shut_down()
                    return

    def restart(self) -> None:
        with self._changed:
            self._at = time.monotonic() + self.seconds
            self.bytes = 0
            self._changed.notify()

    def pause(self) -> None:
        with self._changed:
            self._at = None

    def passed(self) -> bool:
        at = self._at
        return self.fired or (at is not None and time.monotonic() > at)

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify()


class ServerClient:
    """Requests to one server, one at a time; `path` is appended to the base URL."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.url = check_url(options.url)
        # identity: a compressed reply could expand past the bounds within one read.
        headers = {"Accept": "application/json", "Accept-Encoding": "identity"}
        if options.api_key:
            headers["Authorization"] = f"Bearer {options.api_key}"
        self._http = httpx2.Client(
            base_url=self.url, headers=headers, verify=options.verify_tls, follow_redirects=False,
            timeout=httpx2.Timeout(options.timeout_s, connect=CONNECT_TIMEOUT_S),
        )
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._sockets_lock = threading.Lock()
        self._extensions = {"trace": self._trace}

    def close(self) -> None:
        self._http.close()

    # -- requests ----------------------------------------------------------------

    def get_json(self, path: str) -> Any:
        return _json(self._fetch("GET", path), self.url + path)

    def get_text(self, path: str) -> str:
        return self._fetch("GET", path).decode("utf-8", errors="replace")

    def post_json(self, path: str, body: dict[str, Any], *, limit: int = MAX_BODY_BYTES) -> Any:
        return _json(self._fetch("POST", path, body, limit), self.url + path)

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST `body` and yield each server-sent event's JSON object until `[DONE]` or
        the end of the stream (the caller knows whether its API's last event came);
        closing the iterator closes the connection (llama-server and vLLM then stop
        generating)."""
        for attempt in range(RETRY_503):
            deadline = _Deadline(self.options.timeout_s, self._shut_sockets)
            try:
                with self._http.stream("POST", path, json=body, extensions=self._extensions) as response:
                    if not (response.status_code == 503 and attempt + 1 < RETRY_503):
                        self._check_status(response, path, deadline)
                        yield from self._events(response, self.url + path, deadline)
                        return
            except httpx2.TransportError as exc:
                raise self._transport_error(exc, path, deadline) from None
            finally:
                deadline.stop()
            time.sleep(0.5 * 2**attempt)

    # -- reading, bounded --------------------------------------------------------

    def _fetch(self, method: str, path: str, body: dict[str, Any] | None = None,
               limit: int = MAX_BODY_BYTES) -> bytes:
        """A whole reply's body, within `limit` bytes and the deadline."""
        for attempt in range(RETRY_503):
            deadline = _Deadline(self.options.timeout_s, self._shut_sockets)
            try:
                with self._http.stream(method, path, json=body, extensions=self._extensions) as response:
                    if not (response.status_code == 503 and attempt + 1 < RETRY_503):
                        self._check_status(response, path, deadline)
                        return self._read(response, self.url + path, limit, deadline)
            except httpx2.TransportError as exc:
                raise self._transport_error(exc, path, deadline) from None
            finally:
                deadline.stop()
            time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def _read(self, response: httpx2.Response, where: str, limit: int, deadline: _Deadline,
              *, quiet: bool = False) -> bytes:
        """The body, up to `limit` bytes (more: BadReply, or the first `limit` if `quiet`)."""
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit and not quiet:
            raise _too_large(where, f"a reply of {size_text(int(declared))}", limit)
        data = bytearray()
        for chunk in response.iter_bytes():
            data += chunk
            deadline.bytes += len(chunk)
            if len(data) > limit:
                if quiet:
                    return bytes(data[:limit])
                raise _too_large(where, "a reply", limit)
            if deadline.passed():
                raise self._late(where, deadline, "its reply")
        return bytes(data)

    def _events(self, response: httpx2.Response, where: str, deadline: _Deadline) -> Iterator[dict[str, Any]]:
        received = False
        try:
            for line in self._lines(response, where, deadline):
                if not line.startswith(b"data:"):
                    continue  # comments (keep-alive pings), event names, blank separators
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                try:
                    event = json.loads(data)
                except (ValueError, RecursionError):
                    raise BadReply(f"{where} sent an event that is not JSON ({clip(data)})",
                                   hint=_KEPT_HINT if received else "see the server's log") from None
                if not isinstance(event, dict):
                    raise BadReply(f"{where} sent an event that is not a JSON object ({clip(data)})",
                                   hint=_KEPT_HINT if received else "see the server's log")
                if "error" in event:
                    raise self._stream_error(event)
                received = True
                deadline.pause()  # the time the caller takes is not the server's
                yield event
                deadline.restart()
        except httpx2.TransportError as exc:
            if deadline.fired:
                what = "the next event" if received else "its first event"
                raise self._late(where, deadline, what) from None
            when = "in the middle of" if received else "before the start of"
            raise StreamDropped(f"the connection to {self.url} broke {when} the reply ({_reason(exc)})",
                                hint=_KEPT_HINT) from None
        if deadline.fired:  # a stream without framing ends at the shutdown like any other
            raise self._late(where, deadline, "the next event" if received else "its first event")

    def _lines(self, response: httpx2.Response, where: str, deadline: _Deadline) -> Iterator[bytes]:
        """The stream's lines (CR LF or LF), none longer than MAX_EVENT_BYTES."""
        pending = bytearray()
        for chunk in response.iter_bytes():
            deadline.bytes += len(chunk)
            start, scanned = 0, len(pending)
            pending += chunk
            while (end := pending.find(b"\n", scanned)) >= 0:
                yield bytes(pending[start:end]).rstrip(b"\r")
                start = scanned = end + 1
            del pending[:start]
            if len(pending) > MAX_EVENT_BYTES:
                raise _too_large(where, "an event-stream line", MAX_EVENT_BYTES)
            if deadline.passed():
                raise self._late(where, deadline, "the next event")
        if pending:
            yield bytes(pending)

    # -- sockets and deadlines ---------------------------------------------------

    def _trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace hook: note each connection's socket as it is opened (the TLS
        socket replaces the plain one), for the deadline to shut down."""
        if event.endswith(("connect_tcp.complete", "start_tls.complete")):
            stream: Any = info.get("return_value")
            sock = stream.get_extra_info("socket") if hasattr(stream, "get_extra_info") else None
            if isinstance(sock, socket.socket):
                with self._sockets_lock:
                    self._sockets.add(sock)

    def _shut_sockets(self) -> None:
        # Requests are one at a time, so any open socket is the late request's (the
        # pool drops the others as closed and reconnects).
        with self._sockets_lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _late(self, where: str, deadline: _Deadline, what: str) -> StreamDropped:
        came = f" ({size_text(deadline.bytes)} of it came)" if deadline.bytes else ""
        return StreamDropped(
            f"{where} did not send {what} within the {deadline.seconds:g} s timeout{came}",
            hint="check the server, or raise server_timeout (KVCHAT_SERVER_TIMEOUT); a partial reply is kept")

    # -- errors --------------------------------------------------------------------

    def _check_status(self, response: httpx2.Response, path: str, deadline: _Deadline) -> None:
        status = response.status_code
        if 300 <= status < 400:
            location = response.headers.get("location", "")
            to = f" to {clip(location, 120)}" if location else ""
            raise ServerHTTPError(f"{self.url}{path} redirects{to} (HTTP {status}); kvchat does not follow "
                                  "redirects", status=status, server_message="",
                                  hint="put the address it names in --server (or KVCHAT_SERVER)")
        if status >= 400:
            raw = self._read(response, self.url + path, MAX_ERROR_BYTES, deadline, quiet=True)
            raise self._status_error(status, raw, path)

    def _transport_error(self, exc: httpx2.TransportError, path: str, deadline: _Deadline) -> NetworkError:
        host = urlsplit(self.url).hostname or self.url
        text = _reason(exc)
        if deadline.fired:
            return self._late(self.url + path, deadline, "its reply")
        if isinstance(exc, httpx2.TimeoutException):
            what = "did not connect" if isinstance(exc, httpx2.ConnectTimeout) else "stopped answering"
            return NetworkError(f"{self.url} {what} within the timeout",
                                hint="check the server, or raise server_timeout (KVCHAT_SERVER_TIMEOUT)")
        lowered = text.lower()
        if "name or service not known" in lowered or "nodename nor servname" in lowered \
                or "temporary failure in name resolution" in lowered or "getaddrinfo" in lowered:
            return NetworkError(f"cannot resolve the server name {host!r}",
                                hint="check the host in --server (or KVCHAT_SERVER)")
        if "certificate" in lowered or "ssl" in lowered:
            return NetworkError(f"TLS to {self.url} failed: {text}",
                                hint="fix the server's certificate, or set SSL_CERT_FILE to its CA bundle")
        if "refused" in lowered:
            return NetworkError(f"nothing answers at {self.url} (connection refused)",
                                hint="start the server there, or fix --server (or KVCHAT_SERVER)")
        if isinstance(exc, (httpx2.RemoteProtocolError, httpx2.ReadError)):
            return NetworkError(f"{self.url}{path} closed the connection without a complete reply ({text})",
                                hint="check the server and the network")
        return NetworkError(f"cannot reach {self.url}: {text}", hint="check the server and the network")

    def _status_error(self, status: int, raw: bytes, path: str) -> KvchatError:
        message = _server_message(raw)
        if status in (401, 403):
            given = "the API key was refused" if self.options.api_key else "the server wants an API key"
            return ServerHTTPError(f"{self.url}: {given} (HTTP {status})", status=status,
                                   server_message=message, hint="set KVCHAT_API_KEY or pass --api-key")
        lowered = message.lower()
        too_long = "context" in lowered and any(w in lowered for w in ("exceed", "too long", "maximum"))
        if _error_type(raw) == "exceed_context_size_error" or too_long:
            return ContextExceededError(f"the server refused the prompt: {message}",
                                        hint="start a new conversation or send a shorter message")
        if status == 503:
            return ServerHTTPError(f"{self.url} is busy or still loading (HTTP 503, tried {RETRY_503} times)",
                                   status=status, server_message=message, hint="try again in a moment")
        if status == 404:
            return ServerHTTPError(f"{self.url}{path}: not found (HTTP 404): {message}", status=status,
                                   server_message=message,
                                   hint="check --server and the model name (`--model`)")
        return ServerHTTPError(f"{self.url}{path}: HTTP {status}: {message}", status=status,
                               server_message=message, hint="see the server's log")

    def _stream_error(self, event: dict[str, Any]) -> KvchatError:
        error = event.get("error")
        error = error.get("message", error) if isinstance(error, dict) else error
        message = clip(error, 300) if isinstance(error, str) else excerpt(error, 300)
        if isinstance(error, dict) and error.get("type") == "exceed_context_size_error":
            return ContextExceededError(f"the server refused the prompt: {message}",
                                        hint="start a new conversation or send a shorter message")
        return NetworkError(f"the server stopped the reply: {message}", hint="see the server's log")


def _too_large(where: str, what: str, limit: int) -> BadReply:
    return BadReply(f"{where} sent {what} over kvchat's {size_text(limit)} bound; kvchat stopped reading it",
                    hint="is --server the address of an inference server? see the server's log")


def _json(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise BadReply(f"{where} sent a reply that is not JSON ({clip(raw)})",
                       hint="is --server the address of an inference server?") from None


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    return text


# -- what a reply holds ------------------------------------------------------------
#
# Each reads one field of a server's JSON object and raises BadReply, naming the
# endpoint, the field and what came, when it is not what the API promises. A field
# that is absent or null takes `default` where one is given.


def reply_object(value: Any, where: str, what: str = "reply") -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadReply(f"{where} sent a {what} that is not a JSON object ({excerpt(value)})",
                       hint="see the server's log")
    return value


def _missing(where: str, key: str) -> BadReply:
    return BadReply(f"{where} sent no {key!r}", hint="see the server's log")


def _wrong(where: str, key: str, value: Any, kind: str) -> BadReply:
    return BadReply(f"{where} sent {key!r} = {excerpt(value)}, not {kind}", hint="see the server's log")


def reply_int(obj: dict[str, Any], key: str, where: str, *, default: int | None = None, low: int = 0,
              high: int = MAX_TOKEN_ID) -> int:
    """An integer in [low, high] (a float with no fraction is accepted: JSON has one number type)."""
    value = obj.get(key)
    if value is None:
        if default is None:
            raise _missing(where, key)
        return default
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _wrong(where, key, value, f"a whole number from {low} to {high}")
    return value


def reply_number(obj: dict[str, Any], key: str, where: str) -> float:
    """A finite, non-negative number (a count or a duration); absent or null is 0."""
    value = obj.get(key)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise _wrong(where, key, value, "a finite number of at least 0")
    return float(value)


def reply_str(obj: dict[str, Any], key: str, where: str, *, default: str | None = None) -> str:
    value = obj.get(key)
    if value is None:
        if default is None:
            raise _missing(where, key)
        return default
    if not isinstance(value, str):
        raise _wrong(where, key, value, "text")
    # JSON may escape lone surrogates, which no terminal or file takes: U+FFFD instead.
    return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def reply_list(obj: dict[str, Any], key: str, where: str) -> list[Any]:
    """A list; absent or null is an empty one."""
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _wrong(where, key, value, "a list")
    return value


def reply_dict(obj: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    """An object; absent or null is an empty one."""
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _wrong(where, key, value, "an object")
    return value
