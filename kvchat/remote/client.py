"""HTTP to an inference server, and its failures as errors a user understands.

One `ServerClient` per server: JSON requests, server-sent-event streams, the API
key as a bearer token, a connect timeout and a read timeout (the longest wait for
the next byte, so a long prefill that streams its progress never times out),
TLS verification on unless turned off. A 503 (the server is loading or every slot
is busy) is retried with backoff a bounded number of times; everything else is
translated once, here, into a `NetworkError` (exit 6) or `UsageError` that names
the next step.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx2

from kvchat.errors import KvchatError, NetworkError, UsageError

RETRY_503 = 4  # attempts in all for a busy server; waits 0.5, 1, 2 s between them
CONNECT_TIMEOUT_S = 10.0


class ContextExceededError(KvchatError):
    """The server refused a prompt longer than its context."""

    exit_code = UsageError.exit_code


class StreamDropped(NetworkError):
    """The connection ended in the middle of a reply; what came is kept."""


class ServerHTTPError(NetworkError):
    """An HTTP error status with the server's own message (status kept for callers)."""

    def __init__(self, message: str, *, status: int, server_message: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.server_message = server_message


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


def _server_message(response: httpx2.Response) -> str:
    """The server's error text: OpenAI's {"error": {"message"}}, or the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300]
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message") or error.get("detail") or error)
        return str(error)
    return str(body)


def _error_type(response: httpx2.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    return str(error.get("type", "")) if isinstance(error, dict) else ""


class ServerClient:
    """Requests to one server; `path` is appended to the base URL."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.url = check_url(options.url)
        headers = {"Accept": "application/json"}
        if options.api_key:
            headers["Authorization"] = f"Bearer {options.api_key}"
        self._http = httpx2.Client(
            base_url=self.url, headers=headers, verify=options.verify_tls,
            timeout=httpx2.Timeout(options.timeout_s, connect=CONNECT_TIMEOUT_S),
        )

    def close(self) -> None:
        self._http.close()

    # -- requests ----------------------------------------------------------------

    def get_json(self, path: str) -> Any:
        return _json(self._request("GET", path), self.url + path)

    def get_text(self, path: str) -> str:
        return self._request("GET", path).text

    def post_json(self, path: str, body: dict[str, Any]) -> Any:
        return _json(self._request("POST", path, body), self.url + path)

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST `body` and yield each server-sent event's JSON; closing the iterator
        closes the connection (llama-server and vLLM then stop generating)."""
        for attempt in range(RETRY_503):
            try:
                with self._http.stream("POST", path, json=body) as response:
                    if response.status_code == 503 and attempt + 1 < RETRY_503:
                        time.sleep(0.5 * 2**attempt)
                        continue
                    if response.status_code >= 400:
                        response.read()
                        raise self._status_error(response, path)
                    received = False
                    try:
                        for line in response.iter_lines():
                            if not line.startswith("data:"):
                                continue
                            data = line[5:].strip()
                            if data == "[DONE]":
                                return
                            event = json.loads(data)
                            if isinstance(event, dict) and "error" in event:
                                raise self._stream_error(event)
                            received = True
                            yield event
                    except (httpx2.TransportError, json.JSONDecodeError) as exc:
                        if not received:
                            raise
                        raise StreamDropped(
                            f"the connection to {self.url} broke in the middle of the reply ({_reason(exc)})",
                            hint="the partial reply is kept; check the server, then send again",
                        ) from None
                    return
            except httpx2.TransportError as exc:
                raise self._transport_error(exc) from None

    # -- errors --------------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx2.Response:
        for attempt in range(RETRY_503):
            try:
                response = self._http.request(method, path, json=body)
            except httpx2.TransportError as exc:
                raise self._transport_error(exc) from None
            if response.status_code == 503 and attempt + 1 < RETRY_503:
                time.sleep(0.5 * 2**attempt)
                continue
            if response.status_code >= 400:
                raise self._status_error(response, path)
            return response
        raise AssertionError("unreachable")

    def _transport_error(self, exc: httpx2.TransportError) -> NetworkError:
        host = urlsplit(self.url).hostname or self.url
        text = _reason(exc)
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
        return NetworkError(f"cannot reach {self.url}: {text}", hint="check the server and the network")

    def _status_error(self, response: httpx2.Response, path: str) -> KvchatError:
        status = response.status_code
        message = _server_message(response)
        if status in (401, 403):
            given = "the API key was refused" if self.options.api_key else "the server wants an API key"
            return ServerHTTPError(f"{self.url}: {given} (HTTP {status})", status=status,
                                   server_message=message, hint="set KVCHAT_API_KEY or pass --api-key")
        lowered = message.lower()
        too_long = "context" in lowered and any(w in lowered for w in ("exceed", "too long", "maximum"))
        if _error_type(response) == "exceed_context_size_error" or too_long:
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
        message = str(error.get("message", error)) if isinstance(error, dict) else str(error)
        if isinstance(error, dict) and error.get("type") == "exceed_context_size_error":
            return ContextExceededError(f"the server refused the prompt: {message}",
                                        hint="start a new conversation or send a shorter message")
        return NetworkError(f"the server stopped the reply: {message}", hint="see the server's log")


def _json(response: httpx2.Response, where: str) -> Any:
    try:
        return response.json()
    except ValueError:
        raise NetworkError(f"{where} sent a reply that is not JSON",
                           hint="is --server the address of an inference server?") from None


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    return text
