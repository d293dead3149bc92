"""A conversation's life: resolve settings once, load the model (or connect to a
server), start or resume the conversation (a named session supplies the settings
the flags leave out), save it, save it under another name, close it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvchat import hardware
from kvchat import settings as settings_mod
from kvchat.app.backends import Backend, LlamaServerBackend, LocalBackend, MessageServerBackend
from kvchat.app.load import (
    Warn,
    expected_context,
    load_engine,
    resolve_load,
    sampling_of,
    warn_if_cores_contended,
)
from kvchat.app.speculation import resolve_speculation, start_speculation
from kvchat.conversation import Conversation
from kvchat.engine_api import SamplingSettings
from kvchat.settings import Settings

if TYPE_CHECKING:
    from kvchat.app.load import LoadRequest
    from kvchat.engine import Engine
    from kvchat.named_session import NamedSession
    from kvchat.prefix_cache import Fingerprint, PrefixCache


@dataclass
class Chat:
    """An open conversation: its backend, the conversation, and (for --session) the
    named file behind it."""

    backend: Backend
    session: Conversation
    named: NamedSession | None
    settings: Settings
    resumed_tokens: int = 0
    rebuilt_tokens: int = 0

    @property
    def model_label(self) -> str:
        return self.backend.label

    def save(self) -> int | None:
        """Save a named conversation (no-op for an unnamed one); returns bytes written."""
        if self.named is None:
            return None
        return self.save_into(self.named)

    def save_into(self, named: NamedSession) -> int:
        """Write the conversation into `named` (its identity and settings checked)."""
        self.backend.before_save(named)
        return named.save(self.session, self.backend.n_ctx)

    def save_as(self, name: str, *, replace_existing: bool = False) -> int:
        """Save under another name without switching to it; returns bytes written."""
        from kvchat.errors import SessionError
        from kvchat.named_session import NamedSession

        target = NamedSession(name)
        try:
            if target.exists and not replace_existing:
                raise SessionError(f"session '{name}' already exists",
                                   hint=f"pick another name, /load {name}, or `kvchat sessions rm {name}`")
            target.check(self.backend.identity(), self.backend.context_settings(), rebuild=True)
            return self.save_into(target)
        finally:
            target.close()

    def close(self) -> None:
        try:
            self.backend.close()
        finally:
            if self.named is not None:
                self.named.close()


def open_conversation(
    flags: Mapping[str, Any],
    warn: Warn,
    *,
    session_name: str | None = None,
    rebuild: bool = False,
    verbose: bool = False,
    sampling: SamplingSettings | None = None,
) -> Chat:
    """Resolve settings once (a named session supplies those the flags leave out),
    load the model, and restore or start the conversation. `sampling` (the REPL's
    current values when it switches sessions) wins over resolved sampling."""
    from kvchat.named_session import NamedSession
    from kvchat.session_store import model_identity

    named = NamedSession(session_name) if session_name else None
    backend: Backend | None = None
    try:
        saved = named.saved_values() if named is not None else {}
        s = settings_mod.resolve(flags, saved)
        for message in s.overridden:
            warn(message)
        if s.server is not None:
            backend = open_server(s, warn)
            if named is not None:
                named.check(backend.identity(), backend.context_settings(), rebuild=rebuild)
            return _start(backend, named, s, sampling, warn, rebuild=rebuild)

        def check(request: LoadRequest) -> None:
            if named is not None:
                # The saved flash-attention mode is the one that ran: compare like with like.
                named.check(model_identity(request.model_path), expected_context(request), rebuild=rebuild)

        backend = load_local(s, warn, verbose=verbose, check=check)
        return _start(backend, named, s, sampling, warn, rebuild=rebuild)
    except BaseException:
        if backend is not None:
            backend.close()
        if named is not None:
            named.close()
        raise


def load_local(s: Settings, warn: Warn, *, verbose: bool = False,
               check: Callable[[LoadRequest], None] | None = None) -> LocalBackend:
    """Load the model here: every check first (`check` adds the caller's, before
    llama.cpp is touched), then the engine, its speculator and its prefix cache."""
    request = resolve_load(s, warn)
    speculation = resolve_speculation(s)
    if check is not None:
        check(request)
    probe = hardware.CpuLoadProbe()
    engine = load_engine(request, warn, verbose=verbose)
    local = LocalBackend(engine, request, s)
    try:
        warn_if_cores_contended(probe, request.n_threads, warn)
        start_speculation(engine, request, speculation, warn, verbose=verbose)
        local.prefix_cache = open_prefix_cache(engine, request, s)
    except BaseException:
        local.close()
        raise
    return local


def _start(backend: Backend, named: NamedSession | None, s: Settings, sampling: SamplingSettings | None,
           warn: Warn, *, rebuild: bool) -> Chat:
    """The conversation on a loaded backend, the named session's saved conversation
    put into it, the system prompt."""
    chat = Chat(backend, backend.conversation(s, sampling or sampling_of(s), warn), named, s)
    session = chat.session
    if named is not None:
        named.settings = backend.context_settings()
        if named.exists:
            chat.rebuilt_tokens = named.attach(session, rebuild=rebuild)
            chat.resumed_tokens = session.n_tokens - chat.rebuilt_tokens
            notice = backend.resume_notice(session.n_tokens)
            if notice:
                warn(notice)
    current = session.messages[0]["content"] if session.messages and \
        session.messages[0]["role"] == "system" else None
    if s.system and s.system != current:
        session.set_system(s.system)
    return chat


# Settings that size or place a model loaded here; a server decides them itself.
_LOCAL_ONLY = ("ctx", "cache_type_k", "cache_type_v", "flash_attn", "ngl", "threads", "batch", "draft",
               "prefix_cache", "checkpoints")


def open_server(s: Settings, warn: Warn) -> LlamaServerBackend | MessageServerBackend:
    """Connect to `s.server`; say which local settings the server decides instead."""
    from kvchat.remote import open_server_engine
    from kvchat.remote.client import ServerOptions
    from kvchat.remote.llama_server import LlamaServerEngine

    assert s.server is not None
    engine = open_server_engine(ServerOptions(s.server, s.api_key, s.server_timeout, s.tls_verify), s.model)
    ignored = [settings_mod.SETTINGS[k].flag or k for k in _LOCAL_ONLY
               if s.sources.get(k) in ("flag", "env") and k in s.sources]
    if s.sources.get("speculative") in ("flag", "env") and s.speculative != "off":
        ignored.append("--speculative")
    if ignored:
        warn(f"{', '.join(str(i) for i in ignored)}: decided by the server, not here (start llama-server "
             f"with the matching options; its context is {engine.n_ctx} tokens)")
    if s.model is not None and s.sources.get("model") == "flag" and \
            s.model not in (engine.model_name, engine.model_path) and \
            not engine.model_path.endswith(s.model):
        warn(f"--model {s.model}: this llama-server serves {engine.model_name}; using it")
    if isinstance(engine, LlamaServerEngine):
        return LlamaServerBackend(engine)
    return MessageServerBackend(engine)


def open_prefix_cache(engine: Engine, request: LoadRequest, s: Settings) -> PrefixCache | None:
    """The persistent prefix cache for this engine (None when turned off): its key
    from the model file's hash and the settings the context was really created with."""
    from kvchat.prefix_cache import PrefixCache

    if not s.prefix_cache or s.prefix_cache_size == 0:
        return None
    return PrefixCache(kv_fingerprint(engine, request), limit_bytes=s.prefix_cache_size,
                       memory_kind=engine.memory_kind)


def kv_fingerprint(engine: Engine, request: LoadRequest) -> Fingerprint:
    """Everything that changes the KV bytes of a prefix for this engine: the model
    file's hash and the settings the context was really created with."""
    from kvchat.engine import backend_version, supports_gpu_offload
    from kvchat.prefix_cache import Fingerprint
    from kvchat.session_store import model_identity

    e = engine.settings
    return Fingerprint(
        model_sha256=model_identity(request.model_path)["sha256"],
        model_name=request.model_path.name,
        type_k=e.type_k.name,
        type_v=e.type_v.name,
        flash_attn=engine.flash_attn,
        swa_full=e.swa_full,
        n_gpu_layers=e.n_gpu_layers if supports_gpu_offload() else 0,
        n_batch=e.n_batch,
        n_ubatch=e.n_ubatch,
        backend=backend_version(),
    )


def switch_conversation(flags: Mapping[str, Any], warn: Warn, name: str | None, sampling: SamplingSettings,
                        max_tokens: int | None, *, verbose: bool = False) -> Chat:
    """Open another conversation from inside a chat (/load NAME, or back to an unsaved
    one): a saved session's own model and context settings win over the flags the
    chat was started with; the current sampling and reply limit carry over."""
    given = {k: (None if name and k in settings_mod.LOAD_KEYS else v) for k, v in flags.items()}
    return open_conversation({**given, "max_tokens": max_tokens}, warn, session_name=name, verbose=verbose,
                             sampling=sampling)
