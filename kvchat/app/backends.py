"""What runs the model behind a conversation: here (llama.cpp in this process), on
llama-server, or on a server that renders messages itself (an OpenAI-compatible
API). Each backend answers the questions the rest of kvchat asks about it —
its name, what a saved session depends on, its memory figures, what `--json`
reports of where the turn ran, what `/info` shows — and makes the conversation
of its kind. Nothing above this module asks which backend it has.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from kvchat import hardware
from kvchat.conversation import Conversation
from kvchat.engine_api import ChatEngine, SamplingSettings

if TYPE_CHECKING:
    from kvchat.app.load import LoadRequest, Warn
    from kvchat.chat_template import TemplateModel
    from kvchat.engine import Engine
    from kvchat.engine_api import CheckpointingEngine, MessageEngine, ShiftingEngine
    from kvchat.engine_state import RangeEngine
    from kvchat.named_session import ContextSettings, NamedSession
    from kvchat.prefix_cache import PrefixCache
    from kvchat.remote.llama_server import LlamaServerEngine
    from kvchat.remote.openai_compat import OpenAIChatEngine
    from kvchat.session import Session
    from kvchat.settings import Settings
    from kvchat.speculative import SpecCounters
    from kvchat.speculative_engine import SpeculativeEngine


@dataclass(frozen=True)
class MemoryFigures:
    """What a conversation costs now: context, KV cells and bytes, RSS, VRAM.

    On a server, KV bytes and VRAM are the server's and it does not report them:
    None (shown as unknown); `rss_bytes` is then None too (this process's RSS is
    not the model's).
    """

    n_ctx: int
    kv_cells_used: int
    kv_bytes: int | None  # KV and recurrent-state buffers llama.cpp allocated
    rss_bytes: int | None
    vram_used_bytes: int | None  # all NVIDIA GPUs together; None without NVML


@dataclass(frozen=True)
class LocalFacts:
    """A model loaded here, as /info and the banner show it."""

    request: LoadRequest
    n_ctx: int
    n_ctx_train: int
    flash_attn: str  # the mode that runs
    gpu_layers: tuple[int, int] | None  # (offloaded, total) from llama.cpp's log
    gpu_build: bool
    n_layer: int
    memory_kind: str
    needs_checkpoints: bool
    bytes_per_cell: float | None
    speculative_counters: SpecCounters | None  # None: no speculative decoding


@dataclass(frozen=True)
class ServerFacts:
    """A model on a server, as /info shows it: what the server reports, None where
    it does not."""

    url: str
    api: str  # "llama-server" or "OpenAI-compatible chat API"
    model_name: str
    model_path: str | None
    n_ctx: int  # 0: not reported
    total_slots: int | None
    id_slot: int | None  # None: no slots; -1: not yet chosen
    counts: dict[str, Any] | None  # what the server said the last reply cost


class Backend(Protocol):
    """What runs a conversation's model (see the module docstring)."""

    @property
    def label(self) -> str:
        """The model's name where it runs (progress lines, banners)."""
        ...
    @property
    def model_ref(self) -> str:
        """The model in `--json` records."""
        ...
    @property
    def n_ctx(self) -> int: ...
    @property
    def load_s(self) -> float: ...
    @property
    def speculative_mode(self) -> str: ...

    def facts(self) -> LocalFacts | ServerFacts: ...
    def identity(self) -> dict[str, Any]:
        """What a saved session's tokens depend on (kvchat.session_store.model_identity)."""
        ...
    def context_settings(self) -> ContextSettings:
        """What a saved KV state depends on, with the flash-attention mode that ran."""
        ...
    def where(self) -> dict[str, Any]:
        """Where the turn ran, for the `settings` of a `--json` record."""
        ...
    def memory(self, conversation: Conversation) -> MemoryFigures: ...
    def server_counts(self) -> dict[str, Any] | None:
        """What a server itself says the last reply cost (None: not a server)."""
        ...
    def conversation(self, s: Settings, sampling: SamplingSettings, warn: Warn) -> Conversation:
        """A new, empty conversation of this backend's kind (notices go to `warn`)."""
        ...
    def resume_notice(self, n_tokens: int) -> str | None:
        """What resuming `n_tokens` of history will cost, where that is not obvious."""
        ...
    def before_save(self, named: NamedSession) -> None: ...
    def set_json_schema(self, schema: str) -> None:
        """Constrain every reply to this JSON Schema (JSON text): a grammar here, the
        server's own constraint on a server."""
        ...
    def close(self) -> None: ...


def _vram_used() -> int | None:
    nvml = hardware.open_nvml()
    if nvml is None:
        return None
    try:
        reading = nvml.read()
        return reading.used if reading is not None else None
    finally:
        nvml.close()


def _token_session(engine: ChatEngine, template_model: TemplateModel, s: Settings,
                   sampling: SamplingSettings, warn: Warn) -> Session:
    """A token-exact conversation over `engine`, rendered with the template chosen
    from `template_model` and the settings."""
    from kvchat.app.load import chat_template_for
    from kvchat.session import Session

    template = chat_template_for(template_model, s.chat_template, raw=s.raw, think=s.think, warn=warn)
    return Session(engine, template, sampling, s.max_tokens, s.overflow, checkpoint_max=s.checkpoints,
                   checkpoint_mib=s.checkpoint_mib)


class LocalBackend:
    """A model loaded in this process (kvchat.engine.Engine); `chat_engine` is what the
    conversation runs on: the engine itself, or it wrapped for speculative decoding."""

    def __init__(self, engine: Engine, request: LoadRequest, s: Settings,
                 chat_engine: Engine | SpeculativeEngine | None = None) -> None:
        self.engine = engine
        self.chat_engine: Engine | SpeculativeEngine = chat_engine if chat_engine is not None else engine
        self.request = request
        self._settings = s
        self.prefix_cache: PrefixCache | None = None
        self._kv_digest: bytes | None = None

    @property
    def label(self) -> str:
        return self.request.model_path.name

    @property
    def model_ref(self) -> str:
        return str(self.request.model_path)

    @property
    def n_ctx(self) -> int:
        return int(self.engine.n_ctx)

    @property
    def load_s(self) -> float:
        return float(self.engine.load_s)

    @property
    def speculative_mode(self) -> str:
        from kvchat.app.speculation import speculative_mode

        return speculative_mode(self.chat_engine)

    def facts(self) -> LocalFacts:
        from kvchat.app.speculation import speculation_counters
        from kvchat.engine import supports_gpu_offload
        from kvchat.monitor import kv_bytes_per_cell

        e = self.engine
        return LocalFacts(self.request, e.n_ctx, e.n_ctx_train, e.flash_attn, e.gpu_layers,
                          supports_gpu_offload(), e.n_layer, e.memory_kind, e.needs_checkpoints,
                          kv_bytes_per_cell(e.buffers, e.n_ctx),
                          speculation_counters(self.chat_engine))

    def identity(self) -> dict[str, Any]:
        from kvchat.session_store import model_identity

        return model_identity(self.request.model_path)

    def context_settings(self) -> ContextSettings:
        from kvchat.named_session import ContextSettings

        r = self.request
        return ContextSettings(r.n_ctx, r.type_k.name, r.type_v.name, self.engine.flash_attn)

    def where(self) -> dict[str, Any]:
        r = self.request
        return {"n_ctx": self.engine.n_ctx, "cache_type_k": r.type_k.name, "cache_type_v": r.type_v.name,
                "flash_attn": self.engine.flash_attn, "n_gpu_layers": r.n_gpu_layers,
                "n_threads": r.n_threads, "n_batch": r.n_batch}

    def memory(self, conversation: Conversation) -> MemoryFigures:
        buffers = self.engine.buffers
        return MemoryFigures(self.engine.n_ctx, conversation.n_kv,
                             sum(buffers.kv.values()) + sum(buffers.recurrent.values()),
                             hardware.rss_bytes(), _vram_used())

    def server_counts(self) -> dict[str, Any] | None:
        return None

    def conversation(self, s: Settings, sampling: SamplingSettings, warn: Warn) -> Conversation:
        session = _token_session(self.chat_engine, self.engine, s, sampling, warn)
        session.prefix_cache = self.prefix_cache
        return session

    def resume_notice(self, n_tokens: int) -> str | None:
        return None  # the KV state is restored here, or --rebuild said what it re-evaluates

    def before_save(self, named: NamedSession) -> None:
        # Blocks keyed as the prefix cache keys them: a session that starts with a
        # cached prompt names the cache's blocks instead of writing them again.
        if self._kv_digest is None:
            from kvchat.app.load import kv_fingerprint

            self._kv_digest = kv_fingerprint(self.engine, self.request).digest()
        named.kv_digest = self._kv_digest

    def set_json_schema(self, schema: str) -> None:
        from kvchat.errors import UsageError

        if self.chat_engine is not self.engine:  # a grammar cannot take back rejected draft tokens
            raise UsageError("--schema does not go with speculative decoding", hint="add --speculative off")
        self.engine.set_json_schema(schema)

    def close(self) -> None:
        self.chat_engine.close()  # a speculative wrapper closes the engine it wraps


def server_identity(url: str, label: str) -> dict[str, Any]:
    """A saved session's model on a server: the model file's path there, which is what
    the server says about it (its tokens are only valid for that model)."""
    return {"path": f"{url} {label}", "size": 0,
            "sha256": "llama-server:" + hashlib.sha256(label.encode()).hexdigest(), "server": url}


class _ServerBase:
    """What the two kinds of server have in common."""

    def __init__(self, engine: LlamaServerEngine | OpenAIChatEngine) -> None:
        self._server = engine

    @property
    def label(self) -> str:
        return f"{self._server.model_name} on {self._server.client.url}"

    @property
    def model_ref(self) -> str:
        return self._server.model_path or self._server.model_name

    @property
    def n_ctx(self) -> int:
        return self._server.n_ctx

    @property
    def load_s(self) -> float:
        return self._server.load_s

    @property
    def speculative_mode(self) -> str:
        return "off"  # the server decides; it does not say

    def identity(self) -> dict[str, Any]:
        return server_identity(self._server.client.url, self._server.model_path or self._server.model_name)

    def context_settings(self) -> ContextSettings:
        from kvchat.named_session import ContextSettings

        return ContextSettings(self._server.n_ctx, "server", "server", "auto")

    def where(self) -> dict[str, Any]:
        # The server decides (and does not report) cache types, layers, threads.
        return {"server": self._server.client.url, "n_ctx": self._server.n_ctx}

    def memory(self, conversation: Conversation) -> MemoryFigures:
        return MemoryFigures(self._server.n_ctx, conversation.n_kv, None, None, None)

    def set_json_schema(self, schema: str) -> None:
        self._server.set_json_schema(schema)

    def close(self) -> None:
        self._server.close()


class LlamaServerBackend(_ServerBase):
    """A token-exact conversation evaluated on llama-server (one slot)."""

    def __init__(self, engine: LlamaServerEngine) -> None:
        super().__init__(engine)
        self.engine = engine

    def facts(self) -> ServerFacts:
        e = self.engine
        return ServerFacts(e.client.url, "llama-server", e.model_name, e.model_path or None, e.n_ctx,
                           e.total_slots, e.id_slot, self.server_counts())

    def server_counts(self) -> dict[str, Any] | None:
        """llama-server's own figures of the last reply: prompt tokens found in its
        slot's cache (`cache_n`) and evaluated (`prompt_n`)."""
        t = self.engine.last_timings
        return None if t is None else {
            "cached_tokens": t.cache_n, "evaluated_tokens": t.prompt_n, "predicted_tokens": t.predicted_n,
            "prompt_ms": round(t.prompt_ms, 2), "predicted_per_second": round(t.predicted_per_second, 2),
            "unstreamed_tokens": self.engine.unstreamed_tokens, "id_slot": self.engine.id_slot,
        }

    def conversation(self, s: Settings, sampling: SamplingSettings, warn: Warn) -> Conversation:
        return _token_session(self.engine, self.engine, s, sampling, warn)

    def before_save(self, named: NamedSession) -> None:
        # The slot goes to this session's own file on the server.
        self.engine.slot_file = named.server_file_name()

    def resume_notice(self, n_tokens: int) -> str | None:
        """A resumed session: restored from the slot file, or what the first turn
        will re-evaluate on the server."""
        action = self.engine.last_slot_action
        if not n_tokens or (action is not None and action.ok):
            return None
        reason = action.reason if action is not None else "no saved slot"
        return (f"the server re-evaluates up to {n_tokens} tokens of this session with the next message, "
                f"unless its prompt cache still holds them ({reason})")


class MessageServerBackend(_ServerBase):
    """A server that renders and tokenizes messages itself (OpenAI chat API)."""

    def __init__(self, engine: OpenAIChatEngine) -> None:
        super().__init__(engine)
        self.engine = engine

    def facts(self) -> ServerFacts:
        e = self.engine
        return ServerFacts(e.client.url, "OpenAI-compatible chat API", e.model_name, None, e.n_ctx,
                           None, None, self.server_counts())

    def server_counts(self) -> dict[str, Any] | None:
        """`usage.prompt_tokens_details.cached_tokens` (None where the server does not
        report them), and vLLM's KV usage and prefix-cache hits from /metrics."""
        usage = self.engine.last_usage
        metrics = self.engine.metrics()
        return {
            "cached_tokens": None if usage is None else usage.cached_tokens,
            "evaluated_tokens": None if usage is None or usage.cached_tokens is None
            else usage.prompt_tokens - usage.cached_tokens,
            "kv_cache_usage": None if metrics is None else metrics.kv_cache_usage,
            "prefix_cache_hit_rate": None if metrics is None else metrics.prefix_hit_rate,
        }

    def conversation(self, s: Settings, sampling: SamplingSettings, warn: Warn) -> Conversation:
        from kvchat.message_session import MessageSession

        if s.chat_template or s.raw or s.think:
            warn("--chat-template, --raw and --think: this server renders messages with its own template; "
                 "ignored")
        return MessageSession(self.engine, sampling, s.max_tokens, s.overflow)

    def resume_notice(self, n_tokens: int) -> str | None:
        return None  # its own prefix cache decides what the next message re-evaluates

    def before_save(self, named: NamedSession) -> None:
        return None


if TYPE_CHECKING:
    def _claims(local: Engine, server: LlamaServerEngine, api: OpenAIChatEngine, request: LoadRequest,
                s: Settings, speculative: SpeculativeEngine) -> None:
        """mypy checks here that each engine implements the protocols it claims, and
        each backend the Backend protocol (a structural mismatch is a type error)."""
        chat: tuple[ChatEngine, ChatEngine, ChatEngine] = (local, server, speculative)
        capabilities: tuple[ShiftingEngine, CheckpointingEngine, ShiftingEngine, CheckpointingEngine] = (
            local, local, speculative, speculative)
        message: MessageEngine = api
        ranges: tuple[RangeEngine, RangeEngine] = (local, speculative)
        backends: tuple[Backend, Backend, Backend] = (LocalBackend(local, request, s),
                                                      LlamaServerBackend(server), MessageServerBackend(api))
        del chat, capabilities, message, ranges, backends
