"""The HTTP side of `kvchat serve`: Starlette routes over `kvchat.app.serving`.

Requests are queued on one lock (one model, one context) and run one at a time
in one thread, the only one that touches llama.cpp; the event loop only speaks
HTTP. Every reply watches its connection, from the moment it is queued: a client
that goes away (a streamed reply closed, a whole one given up: a timeout, a
cancelled call) leaves the queue, or sets the request's stop flag and the turn is
closed where it is; the cache stays exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from kvchat.app.serving import Delta, Outcome, Request, ServedModel
from kvchat.errors import KvchatError, ModelFormatError, SessionError, UsageError
from kvchat.serve import protocol
from kvchat.serve.protocol import ApiError, Call
from kvchat.serve.tool_calls import ToolCallStream, parse_tool_calls

MAX_BODY_BYTES = 16 * 1024 * 1024
# The status a request whose client went away is counted under (nginx's; never sent).
CLIENT_GONE = 499
Log = Callable[[str], None]
T = TypeVar("T")


class ClientGone(Exception):
    """The client closed its connection before its reply was ready."""


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has closed its connection (the body already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_gone(receive: Receive, work: Coroutine[Any, Any, T]) -> T:
    """`work`'s result, or ClientGone (`work` cancelled) as soon as the client leaves:
    a request waiting in the queue, or evaluating a long prompt, or generating a reply
    nobody will read, stops there instead of holding the model for nothing."""
    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
        with contextlib.suppress(BaseException):
            await watcher
    if not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise ClientGone
    return task.result()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Worker:
    """Runs requests on the model one at a time, in one thread."""

    def __init__(self, served: ServedModel, log: Log) -> None:
        self.served = served
        self.log = log
        self.lock = asyncio.Lock()
        self.waiting = 0
        self.running = 0
        self.stops: set[threading.Event] = set()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="kvchat-model")

    async def run(self, request: Request) -> AsyncGenerator[Delta | Outcome, None]:
        """The reply's pieces, then its Outcome. Leaving early (a client gone) stops
        the reply; the lock is held until the turn has been saved."""
        self.waiting += 1
        try:
            await self.lock.acquire()
        finally:
            self.waiting -= 1
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta | Outcome | _Failure] = asyncio.Queue()
        stop = threading.Event()

        def work() -> None:
            try:
                for item in self.served.run(request, stop):
                    loop.call_soon_threadsafe(queue.put_nowait, item)
            except BaseException as exc:  # handed to the request; logged where it has gone
                if stop.is_set():
                    self.log(f"internal error after a reply: {type(exc).__name__}: {exc}")
                loop.call_soon_threadsafe(queue.put_nowait, _Failure(exc))

        def finished(_: object) -> None:
            self.running -= 1
            self.stops.discard(stop)
            self.lock.release()

        self.running += 1
        self.stops.add(stop)
        loop.run_in_executor(self.executor, work).add_done_callback(finished)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
                if isinstance(item, Outcome):
                    return
        finally:
            stop.set()

    def shutdown(self) -> None:
        for stop in list(self.stops):
            stop.set()
        self.executor.shutdown(wait=True)


async def _outcome(first: Delta | Outcome, items: AsyncGenerator[Delta | Outcome, None]) -> Outcome:
    """A reply's Outcome, its pieces read (a whole reply)."""
    item = first
    while not isinstance(item, Outcome):
        item = await items.__anext__()
    return item


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def api_error(exc: BaseException) -> ApiError:
    """What a failure before the reply began is to a client: its request's fault (4xx)
    where the conversation cannot be answered as sent, else the server's (500)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, (UsageError, SessionError)):  # the context cannot hold it
        return ApiError(400, f"the conversation does not fit the model's context: {exc.message} (send less, "
                        "or start kvchat serve with a larger --ctx)", code="context_length_exceeded",
                        param="messages")
    if isinstance(exc, ModelFormatError):  # the chat template refused the messages
        return ApiError(400, str(exc), param="messages", code="invalid_messages")
    what = str(exc) if isinstance(exc, KvchatError) else f"{type(exc).__name__}: {exc}"
    return ApiError(500, f"the model failed: {what[:500]}", type="server_error")


def _sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


class EventStream(StreamingResponse):
    """A server-sent event stream that watches its connection whatever the ASGI
    version: when the client goes away, `on_disconnect` runs and the events stop
    being read (Starlette leaves that to a failed send under ASGI 2.4, which never
    comes while the model is still evaluating the prompt)."""

    def __init__(self, events: AsyncIterator[bytes], on_disconnect: Callable[[], Awaitable[None]]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = events
        self.on_disconnect = on_disconnect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

        async def pump() -> None:
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        pumping, watching = asyncio.ensure_future(pump()), asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pumping, watching):
                task.cancel()
            gone = not pumping.done() or pumping.cancelled() or pumping.exception() is not None
            with contextlib.suppress(BaseException):
                await pumping
            with contextlib.suppress(BaseException):
                await watching
            if gone:
                await self.on_disconnect()


class Api:
    """The routes, over one served model."""

    def __init__(self, served: ServedModel, *, api_key: str | None, log: Log) -> None:
        self.served = served
        self.api_key = api_key
        self.log = log
        self.worker = Worker(served, log)
        self.requests: dict[tuple[str, int], int] = {}

    # -- plumbing ---------------------------------------------------------------------------

    def _count(self, path: str, status: int) -> None:
        self.requests[(path, status)] = self.requests.get((path, status), 0) + 1

    def _authorised(self, request: HttpRequest) -> bool:
        if self.api_key is None:
            return True
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and \
            hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def _body(self, request: HttpRequest) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise ApiError(413, f"the body is over {MAX_BODY_BYTES} bytes", code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise ApiError(413, f"the body is over {MAX_BODY_BYTES} bytes", code="body_too_large")
            chunks.append(chunk)
        return protocol.parse_body(b"".join(chunks))

    def route(self, handler: Callable[[HttpRequest], Awaitable[Response]], *, open_: bool = False
              ) -> Callable[[HttpRequest], Awaitable[Response]]:
        """A handler with the key checked, every failure an OpenAI error, and counted."""

        async def endpoint(request: HttpRequest) -> Response:
            path = request.url.path
            try:
                if not open_ and not self._authorised(request):
                    raise ApiError(401, "a valid API key is needed: send the header "
                                   "'Authorization: Bearer KEY' with the key kvchat serve was given",
                                   code="invalid_api_key")
                response = await handler(request)
            except ClientGone:  # nobody to answer
                response = Response(status_code=CLIENT_GONE)
            except Exception as exc:  # never a crash, never a bare 500 page
                error = api_error(exc)
                if error.status >= 500:
                    self.log(f"{request.method} {path}: {error.message}")
                response = error_response(error)
            self._count(path, response.status_code)
            return response

        return endpoint

    # -- endpoints ----------------------------------------------------------------------------

    async def health(self, request: HttpRequest) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(self, request: HttpRequest) -> Response:
        s = self.served
        return JSONResponse({"object": "list", "data": [{
            "id": s.model_id, "object": "model", "created": protocol.now(), "owned_by": "kvchat",
            "max_model_len": s.n_ctx, "meta": {"n_ctx": s.n_ctx},
        }]})

    async def metrics(self, request: HttpRequest) -> Response:
        return PlainTextResponse(self.metrics_text(), media_type="text/plain; version=0.0.4")

    async def chat(self, request: HttpRequest) -> Response:
        s = self.served
        call = protocol.chat_call(await self._body(request), s.model_names, s.default_sampling,
                                  s.default_max_tokens)
        if call.request.tools and not s.takes_tools:
            raise ApiError(400, "this model's chat template takes no tools, so they cannot be given to it; "
                           "send the request without 'tools', or serve a model whose template has them",
                           param="tools", code="tools_not_supported")
        return await self._answer(call, request.receive, chat=True)

    async def completions(self, request: HttpRequest) -> Response:
        s = self.served
        return await self._answer(protocol.completion_call(await self._body(request), s.model_names,
                                                           s.default_sampling), request.receive, chat=False)

    async def _answer(self, call: Call, receive: Receive, *, chat: bool) -> Response:
        started = time.perf_counter()
        items = self.worker.run(call.request)
        try:
            first = await unless_gone(receive, items.__anext__())
            if call.stream:  # from here on the stream watches the connection
                return EventStream(self._stream(call, first, items, chat=chat, started=started), items.aclose)
            outcome = await unless_gone(receive, _outcome(first, items))
        except ClientGone:
            self.log(f"a client went away before its reply was ready ({time.perf_counter() - started:.2f} s)")
            await items.aclose()
            raise
        except BaseException:
            await items.aclose()
            raise
        await items.aclose()
        self._log_reply(outcome, started)
        return JSONResponse(self._whole(call, outcome, chat=chat))

    def _whole(self, call: Call, outcome: Outcome, *, chat: bool) -> dict[str, Any]:
        model = self.served.model_id
        usage = protocol.usage(outcome)
        if not chat:
            choice = {"index": 0, "text": outcome.text, "logprobs": None,
                      "finish_reason": outcome.finish_reason}
            return {"id": protocol.new_id("cmpl"), "object": "text_completion", "created": protocol.now(),
                    "model": model, "usage": usage, "choices": [choice]}
        message: dict[str, Any] = {"role": "assistant", "content": outcome.text}
        finish = outcome.finish_reason
        names = protocol.tool_names(call.request.tools)
        if names:
            content, calls = parse_tool_calls(outcome.text, names)
            if calls:
                message["content"] = content or None
                message["tool_calls"] = [c.to_openai() for c in calls]
                finish = "tool_calls"
        if outcome.reasoning:
            message["reasoning_content"] = outcome.reasoning
        return {"id": protocol.new_id("chatcmpl"), "object": "chat.completion", "created": protocol.now(),
                "model": model, "usage": usage,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}]}

    async def _stream(self, call: Call, first: Delta | Outcome, items: AsyncGenerator[Delta | Outcome, None],
                      *, chat: bool, started: float) -> AsyncIterator[bytes]:
        cid = protocol.new_id("chatcmpl" if chat else "cmpl")
        created, model = protocol.now(), self.served.model_id
        names = protocol.tool_names(call.request.tools)
        tools = ToolCallStream(names) if chat and names else None
        if chat:
            yield _sse(protocol.chat_chunk(cid, created, model, {"role": "assistant", "content": ""}))
        item = first
        try:
            while not isinstance(item, Outcome):
                text = tools.feed(item.text) if tools is not None else item.text
                if not chat:
                    yield _sse(protocol.text_chunk(cid, created, model, text))
                elif text or item.reasoning:
                    delta = {"content": text} if text else {}
                    yield _sse(protocol.chat_chunk(cid, created, model, {
                        **delta, **({"reasoning_content": item.reasoning} if item.reasoning else {})}))
                item = await items.__anext__()
        except Exception as exc:  # the reply broke after it began: say so in the stream
            yield _sse(api_error(exc).body())
            yield _sse("[DONE]")
            return
        finish = item.finish_reason
        if tools is not None:
            rest, calls = tools.finish()
            if rest:
                yield _sse(protocol.chat_chunk(cid, created, model, {"content": rest}))
            if calls:
                finish = "tool_calls"
                yield _sse(protocol.chat_chunk(cid, created, model, {
                    "tool_calls": [c.to_openai(i) for i, c in enumerate(calls)]}))
        yield _sse(protocol.chat_chunk(cid, created, model, {}, finish) if chat
                   else protocol.text_chunk(cid, created, model, "", finish))
        if call.include_usage:
            obj = "chat.completion.chunk" if chat else "text_completion"
            yield _sse(protocol.usage_chunk(cid, created, model, obj, item))
        yield _sse("[DONE]")
        self._log_reply(item, started)

    def _log_reply(self, outcome: Outcome, started: float) -> None:
        restored = f", {outcome.restored_tokens} from the KV store" if outcome.restored_tokens else ""
        self.log(f"reply: prompt {outcome.prompt_tokens} tokens ({outcome.cached_tokens} cached{restored}), "
                 f"{outcome.completion_tokens} generated, {time.perf_counter() - started:.2f} s, "
                 f"{outcome.finish_reason}")

    # -- /metrics -----------------------------------------------------------------------------

    def metrics_text(self) -> str:
        c = self.served.counters
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, value: float, labels: str = "") -> None:
            if not any(line.startswith(f"# TYPE kvchat_{name} ") for line in lines):
                lines.extend([f"# HELP kvchat_{name} {help_}", f"# TYPE kvchat_{name} {kind}"])
            lines.append(f"kvchat_{name}{labels} {value:g}")

        for (path, status), n in sorted(self.requests.items()):
            metric("requests_total", "counter", "HTTP requests answered, by path and status.", n,
                   f'{{path="{path}",status="{status}"}}')
        if not self.requests:
            metric("requests_total", "counter", "HTTP requests answered, by path and status.", 0)
        metric("replies_total", "counter", "Replies generated (streamed or not).", c.replies)
        metric("prompt_tokens_total", "counter", "Prompt tokens of all replies.", c.prompt_tokens)
        metric("cached_tokens_total", "counter", "Prompt tokens not evaluated: found in the KV cache, "
               "the KV store or the prefix cache.", c.cached_tokens)
        metric("evaluated_tokens_total", "counter", "Prompt tokens evaluated.",
               c.prompt_tokens - c.cached_tokens)
        metric("generated_tokens_total", "counter", "Tokens generated.", c.generated_tokens)
        metric("prefix_cache_hits_total", "counter", "Replies whose prompt start came from the prefix cache.",
               c.prefix_cache_hits)
        metric("kv_store_restores_total", "counter", "Conversations read back from the KV store.",
               c.store_restores)
        metric("kv_store_restored_tokens_total", "counter", "Tokens read back from the KV store.",
               c.store_restored_tokens)
        metric("kv_store_errors_total", "counter", "Conversations that could not be saved.", c.store_errors)
        metric("kv_store_conversations", "gauge", "Conversations kept in the KV store for this model.",
               self.served.stored_conversations)
        metric("kv_cells_in_use", "gauge", "KV cache cells in use.", self.served.kv_cells_in_use)
        metric("kv_cells", "gauge", "KV cache cells (the context).", self.served.n_ctx)
        metric("queue_depth", "gauge", "Requests waiting for the model.", self.worker.waiting)
        metric("requests_running", "gauge", "Requests running on the model (0 or 1).", self.worker.running)
        return "\n".join(lines) + "\n"


def build_app(served: ServedModel, *, api_key: str | None, log: Log) -> Starlette:
    api = Api(served, api_key=api_key, log=log)
    routes = [Route("/health", api.route(api.health, open_=True), methods=["GET"]),
              Route("/metrics", api.route(api.metrics), methods=["GET"])]
    # Clients are configured with a base URL that ends in /v1 or not: both work.
    for prefix in ("/v1", ""):
        routes += [Route(f"{prefix}/models", api.route(api.models), methods=["GET"]),
                   Route(f"{prefix}/chat/completions", api.route(api.chat), methods=["POST"]),
                   Route(f"{prefix}/completions", api.route(api.completions), methods=["POST"])]

    async def http_error(request: HttpRequest, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        api._count(request.url.path if status != 404 else "other", status)
        message = {404: f"no such endpoint: {request.method} {request.url.path[:200]}",
                   405: f"{request.method} is not served at {request.url.path[:200]}"}.get(status, "error")
        return error_response(ApiError(status, message, code="not_found" if status == 404 else None))

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            api.worker.shutdown()

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    app.state.api = api
    return app
