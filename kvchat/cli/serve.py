"""`kvchat serve`: an OpenAI-compatible server on this machine (kvchat.serve)."""

from __future__ import annotations

import contextlib
import inspect
import ipaddress
import socket
import sys
from typing import Annotated, Any, Optional

import typer

from kvchat.cli import app
from kvchat.cli.options import (
    BATCH,
    CACHE_TYPES,
    CHECKPOINTS,
    CTX,
    DEVICES,
    FLASH_ATTN,
    MODEL,
    PREFIX_CACHE,
    SAMPLING,
    SPECULATIVE,
    TEMPLATE,
    THREADS,
    VERBOSE,
    shared_options,
)
from kvchat.errors import UsageError
from kvchat.ui.environment import Environment

# The key clients must send: the `api_key` setting (also KVCHAT_API_KEY), which for
# the client commands is the key of the server they talk to.
API_KEY = (inspect.Parameter("api_key", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
    Optional[str], typer.Option("--api-key", help="Key clients must send (Authorization: Bearer KEY); "
                                "needed to listen on anything but this machine (or KVCHAT_API_KEY).")]),)
SERVE_OPTIONS = (*MODEL, *CTX, *CACHE_TYPES, *FLASH_ATTN, *DEVICES, *THREADS, *BATCH, *SAMPLING,
                 *PREFIX_CACHE, *TEMPLATE, *CHECKPOINTS, *SPECULATIVE, *API_KEY, *VERBOSE)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a port in use fails at once."""
    try:
        found = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = found[0]
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: {exc.strerror}", hint="give an address of this machine") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}",
                         hint="pick another --port (0: any free one), or stop what uses it") from None
    return sock


@app.command()
@shared_options(SERVE_OPTIONS)
def serve(
    model_arg: Annotated[
        Optional[str], typer.Argument(metavar="[MODEL]", help="A .gguf path or model reference.")
    ] = None,
    *,
    flags: dict[str, Any],
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: any free one).")] = 8080,
    verbose: bool = False,
) -> None:
    """Serve a model over the OpenAI API, its KV cache kept across calls and restarts.

    Clients (editors, agents, the openai SDK) are told the base URL
    http://HOST:PORT/v1 and, with --api-key, the key. A conversation resent with
    each call evaluates only what is new, also after a restart: each reply's
    new KV cells are kept on disk (kv-store/, beside the prefix cache that
    `kvchat paths` shows; --no-prefix-cache: nothing kept).
    Requests run one at a time; GET /metrics shows the queue and the cache.

    \b
    Examples:
      kvchat serve
      kvchat serve qwen3-0.6b --ctx 16k --port 8081
      kvchat serve ./model.gguf --host 0.0.0.0 --api-key "$(openssl rand -hex 16)"
    """
    from kvchat import settings

    if model_arg is not None and flags["model"] is not None:
        raise UsageError("give the model once: as the argument or with --model")
    s = settings.resolve({**flags, "model": model_arg or flags["model"]})
    if not is_loopback(host) and not s.api_key:
        raise UsageError(f"--host {host} lets other machines in: give clients a key with --api-key",
                         hint="or listen on this machine only (--host 127.0.0.1)")
    try:
        import uvicorn

        from kvchat.serve.server import build_app
    except ImportError as exc:
        raise UsageError(f"kvchat serve needs {exc.name}", hint="pip install 'kvchat[serve]'") from None
    env = Environment()
    sock = bind(host, port)
    try:
        from kvchat.app.serving import open_served
        from kvchat.ui.progress import LoadProgress
        from kvchat.ui.render import safe_text

        def log(line: str) -> None:
            with contextlib.suppress(OSError, ValueError):
                env.stderr.write(f"kvchat serve: {safe_text(line, 2000)}\n")
                env.stderr.flush()

        with LoadProgress(env, enabled=not verbose) as progress:
            served = open_served(s, env.warn, verbose=verbose)
            progress.done()
        try:
            where = sock.getsockname()
            shown = f"[{where[0]}]" if ":" in where[0] else where[0]
            key = ", API key required" if s.api_key else ""
            log(f"{served.model_id} at http://{shown}:{where[1]}/v1 (context {served.n_ctx} tokens{key}); "
                "Ctrl-C stops")
            config = uvicorn.Config(build_app(served, api_key=s.api_key, log=log), log_level="info"
                                    if verbose else "warning", timeout_graceful_shutdown=5, lifespan="on")
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            served.close()
    finally:
        sock.close()
    sys.stderr.flush()
