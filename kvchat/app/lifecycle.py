"""A conversation's life: resolve settings once, load the model (or connect to a
server), start or resume the conversation (a named session supplies the settings
the flags leave out), save it, save it under another name, close it."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvchat import hardware
from kvchat import settings as settings_mod
from kvchat.app.backends import Backend, LlamaServerBackend, LocalBackend, MessageServerBackend
from kvchat.app.load import (
    Warn,
    expected_context,
    kv_fingerprint,
    load_engine,
    resolve_load,
    sampling_of,
    warn_if_cores_contended,
)
from kvchat.app.saving import SaveWriter
from kvchat.app.speculation import resolve_speculation, start_speculation
from kvchat.conversation import Conversation
from kvchat.engine_api import SamplingSettings
from kvchat.settings import Settings

if TYPE_CHECKING:
    from kvchat.app.load import LoadRequest
    from kvchat.engine import Engine
    from kvchat.kv_evict import Keeper
    from kvchat.kv_files import Manifest
    from kvchat.kv_store import KvStore
    from kvchat.named_session import NamedSession
    from kvchat.prefix_cache import PrefixCache


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
    rebuild_s: float = 0.0  # the time re-evaluating `rebuilt_tokens` took, before the first turn

    @property
    def model_label(self) -> str:
        return self.backend.label

    # Notices of the store's own (over budget, a damaged block): None drops them.
    warn: Warn | None = None
    # Called once when a wait for a background write takes a while (the REPL's line).
    on_wait: Callable[[], None] | None = None
    writer: SaveWriter = field(default_factory=SaveWriter)
    # The last manifest this conversation was saved as, under any name: a save under
    # another name (/save NAME, a recent chat) shares its blocks.
    last_manifest: Manifest | None = None
    # What a background write had to say, told on the main thread by the next wait.
    _notices: list[str] = field(default_factory=list)
    _keeper: Keeper | None = None  # the store's budget, kept across this chat's saves

    def save(self, *, background: bool = False) -> int | None:
        """Save a named conversation (no-op for an unnamed one); returns bytes written
        (None: written in the background, see `save_into`)."""
        if self.named is None:
            return None
        return self.save_into(self.named, background=background)

    def save_into(self, named: NamedSession, *, background: bool = False,
                  then: Callable[[], None] | None = None) -> int | None:
        """Write the conversation into `named` (its identity and settings checked).

        The conversation's state is read now; with `background` the files are written
        on a thread (returns None; `wait_saved` waits, and an error is reported by the
        next save or wait), else before returning (returns bytes written). `then` runs
        after the write, on the same thread."""
        self._settle()
        self.backend.before_save(named)
        named.rendering = rendering_of(self.settings)
        pending = named.prepare_save(self.session, self.backend.n_ctx, base=self.last_manifest)
        written = 0

        def write() -> None:
            nonlocal written
            result = named.finish_save(pending)
            self.last_manifest = result.manifest
            written = result.bytes_written
            self._evict(named.store, written)
            if then is not None:
                then()

        if background:
            self.writer.submit(write)
            return None
        write()
        self.wait_saved()  # its notices
        return written

    def _evict(self, store: KvStore, written: int) -> None:
        """Keep the store under its budget (a full pass only when this process's writes
        may have filled it: kvchat.kv_evict.Keeper); say so when named sessions alone
        exceed it."""
        from kvchat.kv_evict import Keeper

        if self._keeper is None or self._keeper.store.root != store.root:
            self._keeper = Keeper(store, self.settings.store_budget)
        report = self._keeper.wrote(written)
        notice = report.warning() if report is not None else None
        if notice:
            self._notices.append(notice + " — remove some with `kvchat sessions rm NAME`, or raise "
                                 "kv_store_size")

    def wait_saved(self) -> None:
        """Until a background save is durable (its error raised, its notices told)."""
        try:
            self.writer.wait(self.on_wait)
        finally:
            notices, self._notices = self._notices, []
            for notice in notices:
                if self.warn is not None:
                    self.warn(notice)

    def _settle(self) -> None:
        """Wait for the write in flight; its error becomes a warning (this save goes on)."""
        from kvchat.errors import KvchatError

        try:
            self.wait_saved()
        except KvchatError as exc:
            if self.warn is None:
                raise
            self.warn(str(exc))

    def save_as(self, name: str, *, replace_existing: bool = False) -> int:
        """Save under another name without switching to it; returns bytes written."""
        from kvchat.errors import SessionError
        from kvchat.named_session import NamedSession

        self._settle()
        target = NamedSession(name)
        try:
            if target.exists and not replace_existing:
                raise SessionError(f"session '{name}' already exists",
                                   hint=f"pick another name, /load {name}, or `kvchat sessions rm {name}`")
            target.check(self.backend.identity(), self.backend.context_settings(), rebuild=True)
            return self.save_into(target) or 0
        finally:
            target.close()

    def close(self) -> None:
        try:
            self._settle()
        finally:
            self._close()

    def _close(self) -> None:
        try:
            self.backend.close()
        finally:
            if self.named is not None:
                self.named.close()


def rendering_of(s: Settings) -> dict[str, Any]:
    """How the transcript is rendered (the settings' "rendering" group), as a session
    keeps it: a template file by its absolute path, so that it is found from anywhere."""
    from pathlib import Path

    values = {key: getattr(s, key) for key in settings_mod.keys_in("rendering")}
    template = values.get("chat_template")
    if isinstance(template, str) and Path(template).expanduser().is_file():
        values["chat_template"] = str(Path(template).expanduser().resolve())
    return values


def open_conversation(
    flags: Mapping[str, Any],
    warn: Warn,
    *,
    session_name: str | None = None,
    rebuild: bool = False,
    verbose: bool = False,
    sampling: SamplingSettings | None = None,
    answers: bool = True,
) -> Chat:
    """Resolve settings once (a named session supplies those the flags leave out),
    load the model, and restore or start the conversation. `sampling` (the REPL's
    current values when it switches sessions) wins over resolved sampling. `answers`
    False: nothing will be generated (`run --undo` alone), so how busy the cores are
    does not matter."""
    from kvchat.named_session import NamedSession
    from kvchat.session_store import model_identity

    named = NamedSession(session_name) if session_name else None
    backend: Backend | None = None
    try:
        saved = named.saved_values(rebuild=rebuild) if named is not None else {}
        s = settings_mod.resolve(flags, saved)
        for message in s.overridden:
            warn(message)
        if s.server is not None:
            backend = open_server(s, warn)
            if named is not None:
                rebuild = _moved(named, backend.identity(), backend.label, warn) or rebuild
                named.check(backend.identity(), backend.context_settings(), rebuild=rebuild)
            return _start(backend, named, s, sampling, warn, rebuild=rebuild)
        rebuild_here = rebuild

        def check(request: LoadRequest) -> None:
            nonlocal rebuild_here
            if named is not None:
                identity = model_identity(request.model_path)
                rebuild_here = _moved(named, identity, request.model_path.name, warn) or rebuild_here
                # The saved flash-attention mode is the one that ran: compare like with like.
                named.check(identity, expected_context(request), rebuild=rebuild_here)

        backend = load_local(s, warn, verbose=verbose, check=check, answers=answers)
        return _start(backend, named, s, sampling, warn, rebuild=rebuild_here)
    except BaseException:
        if backend is not None:
            backend.close()
        if named is not None:
            named.close()
        raise


def _moved(named: NamedSession, identity: dict[str, Any], label: str, warn: Warn) -> bool:
    """A session made on a server and resumed here, or the other way round, or on
    another server: its KV state is of no use where it runs now, so its transcript is
    re-evaluated (said once). Returns whether it moved."""
    where = named.moved_from(identity)
    if where is None:
        return False
    now = label if identity.get("server") else f"{label} on this machine"
    back = f" (--server {where} resumes it there)" if where != "this machine" else ""
    warn(f"session '{named.name}' was made on {where}; its transcript is re-evaluated with {now}{back}")
    return True


def load_local(s: Settings, warn: Warn, *, verbose: bool = False,
               check: Callable[[LoadRequest], None] | None = None, answers: bool = True) -> LocalBackend:
    """Load the model here: every check first (`check` adds the caller's, before
    llama.cpp is touched), then the engine, its speculator and its prefix cache.
    `answers`: the model will answer (not only, say, undo a turn): a warning about
    busy cores is worth giving."""
    request = resolve_load(s, warn)
    speculation = resolve_speculation(s)
    if check is not None:
        check(request)
    probe = hardware.CpuLoadProbe()
    engine = load_engine(request, warn, verbose=verbose)
    local = LocalBackend(engine, request, s)
    try:
        if answers:
            warn_if_cores_contended(probe, request.n_threads, warn)
        local.chat_engine = start_speculation(engine, request, speculation, warn, verbose=verbose)
        local.prefix_cache = open_prefix_cache(engine, request, s)
    except BaseException:
        local.close()
        raise
    return local


def _start(backend: Backend, named: NamedSession | None, s: Settings, sampling: SamplingSettings | None,
           warn: Warn, *, rebuild: bool) -> Chat:
    """The conversation on a loaded backend, the named session's saved conversation
    put into it, the system prompt."""
    chat = Chat(backend, backend.conversation(s, sampling or sampling_of(s), warn), named, s, warn=warn)
    session = chat.session
    if named is not None:
        named.settings = backend.context_settings()
        if named.exists:
            started = time.perf_counter()
            chat.rebuilt_tokens = named.attach(session, rebuild=rebuild)
            chat.resumed_tokens = session.n_tokens - chat.rebuilt_tokens
            if chat.rebuilt_tokens:
                chat.rebuild_s = time.perf_counter() - started
            chat.last_manifest = named.manifest
            if named.damage_notice:
                warn(named.damage_notice)
            notice = backend.resume_notice(session.n_tokens)
            if notice:
                warn(notice)
    current = session.messages[0]["content"] if session.messages and \
        session.messages[0]["role"] == "system" else None
    if s.system and s.system != current:
        session.set_system(s.system)
    return chat


def open_server(s: Settings, warn: Warn) -> LlamaServerBackend | MessageServerBackend:
    """Connect to `s.server`; say which local settings the server decides instead."""
    from kvchat.remote import open_server_engine
    from kvchat.remote.client import ServerOptions
    from kvchat.remote.llama_server import LlamaServerEngine

    assert s.server is not None
    # A session made here saved a model file's path: no name a server knows.
    model = s.model if s.sources.get("model") != "session" else None
    engine = open_server_engine(ServerOptions(s.server, s.api_key, s.server_timeout, s.tls_verify), model)
    ignored = [settings_mod.SETTINGS[k].flag or k for k in settings_mod.keys_in("local")
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
    from kvchat.kv_store import KvStore, effective_budget
    from kvchat.prefix_cache import PrefixCache

    if not s.prefix_cache or s.prefix_cache_size == 0:
        return None
    store = KvStore()
    # The cache's segments live in the KV store and count against its one budget: a
    # store evicts there (least recently used segments and unreferenced blocks first),
    # never waiting on a save in progress.
    return PrefixCache(kv_fingerprint(engine, request), memory_kind=engine.memory_kind, store=store.prefix,
                       evict=lambda: store.evict(effective_budget(s.store_budget, store), wait=False))


def switch_conversation(flags: Mapping[str, Any], warn: Warn, name: str | None, sampling: SamplingSettings,
                        max_tokens: int | None, *, verbose: bool = False) -> Chat:
    """Open another conversation from inside a chat (/load NAME, or back to an unsaved
    one): a saved session's own model and context settings win over the flags the
    chat was started with; the current sampling and reply limit carry over."""
    given = {k: (None if name and k in settings_mod.LOAD_KEYS else v) for k, v in flags.items()}
    return open_conversation({**given, "max_tokens": max_tokens}, warn, session_name=name, verbose=verbose,
                             sampling=sampling)
