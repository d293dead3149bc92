"""The application layer: what every command does with a model and a conversation.

It sits between the CLI (parse flags, render) and the core (settings, planner,
engine, session): plan a load from resolved settings, load the engine, open or
resume a conversation, save it, save it under another name, close it, and build
the JSON record of a turn. `run`, `chat`, the REPL, `bench` and `estimate` call
it. It never prints: warnings go to the `warn` callback the caller passes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard, cast

from kvchat import hardware
from kvchat import settings as settings_mod
from kvchat.cache_types import CacheType, flash_attn_enabled, fused_kernel_warning, resolve_flash_attn
from kvchat.engine_api import SamplingSettings
from kvchat.errors import OutOfMemoryError
from kvchat.limits import check_explicit_ctx, forced
from kvchat.settings import Settings

if TYPE_CHECKING:
    from kvchat.bench import CachePair, EngineFactory
    from kvchat.chat_template import ChatTemplate
    from kvchat.engine import Engine
    from kvchat.engine_api import ChatEngine
    from kvchat.memory import Budget, FitResult, MemoryPlan, PlanSettings
    from kvchat.model_spec import ModelSpec
    from kvchat.named_session import ContextSettings, NamedSession
    from kvchat.prefix_cache import PrefixCache
    from kvchat.remote.llama_server import LlamaServerEngine
    from kvchat.remote.openai_compat import OpenAIChatEngine

    ServerEngine = LlamaServerEngine | OpenAIChatEngine
    from kvchat.session import Session, TurnStats
    from kvchat.speculative import SpecCounters
    from kvchat.speculative_engine import SpeculativeEngine

Warn = Callable[[str], None]


@dataclass(frozen=True)
class LoadRequest:
    """What the engine is asked to load, after every check that needs no llama.cpp."""

    model_path: Path
    n_ctx: int
    type_k: CacheType
    type_v: CacheType
    flash_attn: str  # the mode asked for, checked against the V type (auto/on/off)
    n_gpu_layers: int
    n_threads: int
    n_batch: int
    gpus: tuple[str, ...] = ()  # GPUs found when planning (NVML names: CUDA0, ...)


def sampling_of(s: Settings) -> SamplingSettings:
    return SamplingSettings(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p,
                            repeat_penalty=s.repeat_penalty, seed=s.seed)


def context_cap(s: Settings, spec: ModelSpec) -> int:
    """The largest context `--ctx auto` may pick: ctx_max, and the training length."""
    return min(s.ctx_max, spec.n_ctx_train or s.ctx_max)


def plan_settings(s: Settings, *, gpu: bool, n_ctx: int | None = None) -> PlanSettings:
    """Planner settings for resolved settings; flash attention decided by the engine's rule."""
    from kvchat.memory import PlanSettings

    n_gpu_layers = -1 if s.ngl is None else s.ngl
    fa = flash_attn_enabled(s.flash_attn, s.cache_type_v, gpu=gpu and n_gpu_layers != 0) is not False
    plan = PlanSettings(type_k=s.cache_type_k, type_v=s.cache_type_v, n_gpu_layers=n_gpu_layers,
                        flash_attn=fa, n_batch=s.batch)
    return plan if n_ctx is None else replace(plan, n_ctx=n_ctx)


def auto_context(spec: ModelSpec, base: PlanSettings, budget: Budget, cap: int,
                 *, fit_layers: bool) -> tuple[int | None, int]:
    """`--ctx auto`: the largest context that fits `budget`, up to `cap`, and the GPU
    layers to use. Where GPUs cannot hold every layer even at 4096 tokens (or
    `fit_layers`, for --ngl auto) it follows llama.cpp's --fit order: context first,
    then layers back to the CPU. (None, layers) when nothing fits."""
    from kvchat.memory import fit, largest_ctx

    if budget.gpu_names and fit_layers:
        fitted = fit(spec, base, budget, max_ctx=cap)
        return (None, 0) if fitted is None else (fitted.n_ctx, fitted.n_gpu_layers)
    n_ctx = largest_ctx(spec, base, budget, max_ctx=cap)
    if budget.gpu_names and (n_ctx is None or n_ctx < min(4096, cap)):
        fitted = fit(spec, base, budget, max_ctx=cap)
        if fitted is not None:
            return fitted.n_ctx, fitted.n_gpu_layers
    return n_ctx, base.n_gpu_layers


def gpu_layers_that_fit(spec: ModelSpec, base: PlanSettings, budget: Budget) -> int | None:
    """`--ngl auto` at a given context: the most layers that fit, None if not even 0."""
    from kvchat.memory import fit_gpu_layers

    return fit_gpu_layers(spec, base, budget) if budget.gpu_names else 0


def threads_for(s: Settings, warn: Warn) -> int:
    """Threads: the setting, else physical cores; never more than logical cores."""
    cores = hardware.logical_cores()
    wanted = s.threads or hardware.physical_cores()
    if wanted > cores:
        warn(f"--threads {wanted} is more than this machine's {cores} logical cores; using {cores}")
        wanted = cores
    return wanted


def warn_if_cores_contended(probe: hardware.CpuLoadProbe, n_threads: int, warn: Warn) -> None:
    """Say so when other programs kept cores busy that llama.cpp's threads need."""
    busy = probe.others_busy_cores()
    cores = hardware.logical_cores()
    if busy >= 0.75 and n_threads + busy > cores + 0.25:
        warn(f"other programs keep about {busy:.1f} core(s) busy: llama.cpp's threads spin while they "
             f"wait, so decoding may be much slower; try --threads {max(1, cores - round(busy))}")


def resolve_load(s: Settings, warn: Warn) -> LoadRequest:
    """Everything that can be checked before llama.cpp is touched: the model (its
    header read and checked on every path), context, layers, threads."""
    from kvchat.model_spec import read_spec
    from kvchat.registry import resolve_model

    fa = resolve_flash_attn(s.flash_attn, s.cache_type_v)
    model_path = resolve_model(s.model)
    spec = read_spec(str(model_path))
    budget = hardware.detect_budget()
    base = plan_settings(s, gpu=bool(budget.gpu_names))
    n_gpu_layers = base.n_gpu_layers
    if s.ctx is None:
        n_ctx, n_gpu_layers = auto_context(spec, base, budget, context_cap(s, spec), fit_layers=s.ngl is None)
        if n_ctx is None:
            raise OutOfMemoryError(
                f"{model_path.name} does not fit in the memory free now, even with a 256-token context",
                hint="close other programs, pick a smaller quant, or see `kvchat estimate`",
            )
    else:
        n_ctx = s.ctx
        if s.ngl is None:
            found = gpu_layers_that_fit(spec, replace(base, n_ctx=n_ctx), budget)
            n_gpu_layers = 0 if found is None else found
        for warning in check_explicit_ctx(spec, replace(base, n_gpu_layers=n_gpu_layers), budget, n_ctx,
                                          force=forced()):
            warn(warning)
        if spec.n_ctx_train and n_ctx > spec.n_ctx_train:
            warn(f"--ctx {n_ctx} is above the model's training context ({spec.n_ctx_train}); "
                 "answers may degrade past it")
    return LoadRequest(model_path, n_ctx, s.cache_type_k, s.cache_type_v, fa, n_gpu_layers,
                       threads_for(s, warn), min(s.batch, n_ctx), budget.gpu_names)


def load_engine(request: LoadRequest, warn: Warn, *, verbose: bool = False) -> Engine:
    """Load the model; warn where a GPU will run attention without a fused kernel."""
    from kvchat.engine import Engine, EngineSettings

    engine = Engine(
        request.model_path,
        EngineSettings(n_ctx=request.n_ctx, type_k=request.type_k, type_v=request.type_v,
                       flash_attn=request.flash_attn, n_gpu_layers=request.n_gpu_layers,
                       n_threads=request.n_threads, n_batch=request.n_batch,
                       n_ubatch=request.n_batch, verbose=verbose),
    )
    offloaded = engine.gpu_layers
    if engine.flash_attn != "off" and offloaded and offloaded[0] > 0:
        warning = fused_kernel_warning(request.type_k, request.type_v)
        if warning:
            warn(warning)
    return engine


@dataclass(frozen=True)
class SpeculationRequest:
    """--speculative / --draft after resolution: the mode to run and the draft model."""

    mode: str  # ngram, draft or off
    draft_path: Path | None
    asked: bool  # named by a flag, variable, config file or session (not the built-in auto)


def resolve_speculation(s: Settings) -> SpeculationRequest:
    """The speculative mode and draft model, checked before anything loads."""
    from kvchat.registry import resolve_model
    from kvchat.speculative import parse_mode

    mode = parse_mode(s.speculative, has_draft_model=s.draft is not None)
    draft_path = resolve_model(s.draft) if mode == "draft" else None
    asked = s.sources.get("speculative", "default") != "default" or s.draft is not None
    return SpeculationRequest(mode, draft_path, asked)


def start_speculation(engine: Engine, request: LoadRequest, spec: SpeculationRequest, warn: Warn,
                      *, verbose: bool = False) -> Engine | SpeculativeEngine:
    """The engine to chat with: `engine` wrapped for speculative decoding (the wrapper
    owns and closes it, its speculator and a draft model), or `engine` itself where
    speculation is off; say once why it stays off where the model rules it out."""
    from kvchat.errors import UsageError
    from kvchat.speculative import ModelDrafter, NgramDrafter, Speculator, vocab_mismatch
    from kvchat.speculative_engine import SpeculativeEngine, speculation_blocker

    if spec.mode == "off":
        return engine
    blocker = speculation_blocker(engine)
    if blocker is not None:
        if spec.asked:
            warn(f"speculative decoding stays off: {blocker}")
        return engine
    if spec.draft_path is None:
        return SpeculativeEngine(engine, Speculator(NgramDrafter()))
    draft_engine = load_engine(replace(request, model_path=spec.draft_path), warn, verbose=verbose)
    try:
        mismatch = vocab_mismatch(engine, draft_engine)
        if mismatch is not None:
            raise UsageError(
                f"draft model {spec.draft_path.name} cannot draft for {request.model_path.name}: "
                f"{mismatch}",
                hint="pick a smaller model of the same family (same tokenizer), or --speculative ngram",
            )
        draft_engine.set_sampling(SamplingSettings(temperature=0))
        return SpeculativeEngine(engine, Speculator(ModelDrafter(draft_engine, engine.n_vocab)))
    except BaseException:
        draft_engine.close()
        raise


def chat_template_for(engine: ChatEngine, override: str | None = None, *, raw: bool = False,
                      think: str | None = None, warn: Warn | None = None) -> ChatTemplate:
    """The template to chat with (kvchat.chat_template.select_template); its notices
    (a fallback to ChatML, a --think the template cannot switch) go to `warn`."""
    from kvchat.chat_template import select_template

    variables = {} if think is None else {"enable_thinking": think == "on"}
    template, notice = select_template(engine, override, raw=raw, variables=variables)
    if warn is not None:
        if notice:
            warn(notice)
        if think is not None and not raw and not template.supports_thinking:
            warn(f"--think {think}: this chat template has no thinking switch (enable_thinking); ignored")
    return template


@dataclass
class Conversation:
    """A loaded engine, its session and (for --session) the named file behind it.

    Exactly one of `request` (a model loaded here) and `server` (a conversation on
    llama-server) is set; `engine` is that model's or that server's engine.
    """

    engine: Engine | SpeculativeEngine | ServerEngine
    session: Session
    named: NamedSession | None
    request: LoadRequest | None
    settings: Settings
    resumed_tokens: int = 0
    rebuilt_tokens: int = 0
    server: ServerEngine | None = None

    @property
    def local(self) -> Engine | None:
        """The in-process engine (under speculative decoding, the one it wraps), None on a server."""
        from kvchat.speculative_engine import SpeculativeEngine

        if self.server is not None:
            return None
        engine = self.engine
        return cast("Engine", engine.target if isinstance(engine, SpeculativeEngine) else engine)

    @property
    def model_label(self) -> str:
        if self.server is not None:
            return f"{self.server.model_name} on {self.server.client.url}"
        assert self.request is not None
        return self.request.model_path.name

    def model_identity(self) -> dict[str, Any]:
        """What a saved session's tokens depend on: the model file (its hash), or the
        server's model (its path there: the server does not say more)."""
        from kvchat.session_store import model_identity

        if self.server is not None:
            return server_identity(self.server)
        assert self.request is not None
        return model_identity(self.request.model_path)

    def context_settings(self) -> ContextSettings:
        """What a saved KV state depends on, with the flash-attention mode that ran."""
        from kvchat.named_session import ContextSettings

        if self.server is not None:
            return ContextSettings(self.server.n_ctx, "server", "server", "auto")
        r = self.request
        assert r is not None
        return ContextSettings(r.n_ctx, r.type_k.name, r.type_v.name, self.engine.flash_attn)

    def save(self) -> int | None:
        """Save a named conversation (no-op for an unnamed one); returns bytes written."""
        if self.named is None:
            return None
        return self.named.save(self.session, self.engine)

    def save_as(self, name: str, *, replace_existing: bool = False) -> int:
        """Save under another name without switching to it; returns bytes written."""
        from kvchat.errors import SessionError
        from kvchat.named_session import NamedSession

        target = NamedSession(name)
        try:
            if target.exists and not replace_existing:
                raise SessionError(f"session '{name}' already exists",
                                   hint=f"pick another name, /load {name}, or `kvchat sessions rm {name}`")
            target.check(self.model_identity(), self.context_settings(), rebuild=True)
            return target.save(self.session, self.engine)
        finally:
            target.close()

    def close(self) -> None:
        try:
            self.engine.close()
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
) -> Conversation:
    """Resolve settings once (a named session supplies those the flags leave out),
    load the model, and restore or start the conversation. `sampling` (the REPL's
    current values when it switches sessions) wins over resolved sampling."""
    from kvchat.named_session import NamedSession
    from kvchat.session_store import model_identity

    named = NamedSession(session_name) if session_name else None
    engine: Engine | SpeculativeEngine | ServerEngine | None = None
    try:
        saved = named.saved_values() if named is not None else {}
        s = settings_mod.resolve(flags, saved)
        for message in s.overridden:
            warn(message)
        if s.server is not None:
            server = engine = open_server(s, warn)
            return _start_conversation(server, None, named, s, sampling, warn, rebuild=rebuild, server=server)
        request = resolve_load(s, warn)
        speculation = resolve_speculation(s)
        if named is not None:
            # The saved flash-attention mode is the one that ran: compare like with like.
            named.check(model_identity(request.model_path), _expected_context(request), rebuild=rebuild)
        probe = hardware.CpuLoadProbe()
        local = engine = load_engine(request, warn, verbose=verbose)
        warn_if_cores_contended(probe, request.n_threads, warn)
        engine = start_speculation(local, request, speculation, warn, verbose=verbose)
        return _start_conversation(engine, request, named, s, sampling, warn, rebuild=rebuild)
    except BaseException:
        if engine is not None:
            engine.close()
        if named is not None:
            named.close()
        raise


def _start_conversation(engine: Engine | SpeculativeEngine | ServerEngine, request: LoadRequest | None,
                        named: NamedSession | None, s: Settings, sampling: SamplingSettings | None,
                        warn: Warn, *, rebuild: bool,
                        server: ServerEngine | None = None) -> Conversation:
    """The session on a loaded engine (here or on a server): template, prefix cache,
    the named session's saved conversation, the system prompt."""
    from kvchat.chat_template import ChatTemplate
    from kvchat.session import Session

    if getattr(engine, "renders_messages", False):
        if s.chat_template or s.raw or s.think:
            warn("--chat-template, --raw and --think: this server renders messages with its own template; "
                 "ignored")
        template = ChatTemplate(None, origin="the server's own (it renders the messages)")
    else:
        template = chat_template_for(cast("ChatEngine", engine), s.chat_template, raw=s.raw, think=s.think,
                                     warn=warn)
    session = Session(cast("ChatEngine", engine), template, sampling or sampling_of(s), s.max_tokens,
                      s.overflow, checkpoint_max=s.checkpoints, checkpoint_mib=s.checkpoint_mib)
    conv = Conversation(engine, session, named, request, s, server=server)
    if request is not None and conv.local is not None:
        session.prefix_cache = open_prefix_cache(conv.local, request, s)
    if named is not None:
        if request is None:
            named.check(conv.model_identity(), conv.context_settings(), rebuild=rebuild)
        named.settings = conv.context_settings()
        if named.exists:
            conv.rebuilt_tokens = named.attach(session, rebuild=rebuild)
            conv.resumed_tokens = len(session.tokens) - conv.rebuilt_tokens
            if conv.server is not None:
                _say_resume_cost(conv, warn)
    current = session.messages[0]["content"] if session.messages and \
        session.messages[0]["role"] == "system" else None
    if s.system and s.system != current:
        session.set_system(s.system)
    return conv


# --- conversations on a server ----------------------------------------------------------

# Settings that size or place a model loaded here; a server decides them itself.
_LOCAL_ONLY = ("ctx", "cache_type_k", "cache_type_v", "flash_attn", "ngl", "threads", "batch", "draft",
               "prefix_cache", "checkpoints")


def open_server(s: Settings, warn: Warn) -> ServerEngine:
    """Connect to `s.server`; say which local settings the server decides instead."""
    from kvchat.remote import open_server_engine
    from kvchat.remote.client import ServerOptions

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
    return engine


def server_identity(server: ServerEngine) -> dict[str, Any]:
    """A saved session's model on a server: the model file's path there, which is what
    the server says about it (its tokens are only valid for that model)."""
    import hashlib

    label = server.model_path or server.model_name
    return {"path": f"{server.client.url} {label}", "size": 0,
            "sha256": "llama-server:" + hashlib.sha256(label.encode()).hexdigest(),
            "server": server.client.url}


def _say_resume_cost(conv: Conversation, warn: Warn) -> None:
    """A resumed session on a server: restored from the slot file, or what the first
    turn will re-evaluate."""
    from kvchat.remote.llama_server import LlamaServerEngine

    if not isinstance(conv.server, LlamaServerEngine):
        return  # a server that renders messages: its own prefix cache decides
    action = conv.server.last_slot_action
    n = len(conv.session.tokens)
    if n and (action is None or not action.ok):
        reason = action.reason if action is not None else "no saved slot"
        warn(f"the server re-evaluates up to {n} tokens of this session with the next message, unless "
             f"its prompt cache still holds them ({reason})")


def open_prefix_cache(engine: Engine, request: LoadRequest, s: Settings) -> PrefixCache | None:
    """The persistent prefix cache for this engine (None when turned off): its key
    from the model file's hash and the settings the context was really created with."""
    from kvchat.engine import backend_version, supports_gpu_offload
    from kvchat.prefix_cache import Fingerprint, PrefixCache
    from kvchat.session_store import model_identity

    if not s.prefix_cache or s.prefix_cache_size == 0:
        return None
    e = engine.settings
    fingerprint = Fingerprint(
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
    return PrefixCache(fingerprint, limit_bytes=s.prefix_cache_size, memory_kind=engine.memory_kind)


def switch_conversation(flags: Mapping[str, Any], warn: Warn, name: str | None, sampling: SamplingSettings,
                        max_tokens: int | None, *, verbose: bool = False) -> Conversation:
    """Open another conversation from inside a chat (/load NAME, or back to an unsaved
    one): a saved session's own model and context settings win over the flags the
    chat was started with; the current sampling and reply limit carry over."""
    given = {k: (None if name and k in settings_mod.LOAD_KEYS else v) for k, v in flags.items()}
    return open_conversation({**given, "max_tokens": max_tokens}, warn, session_name=name, verbose=verbose,
                             sampling=sampling)


def _expected_context(request: LoadRequest) -> ContextSettings:
    """The context settings a load will have, before loading: flash attention as the
    engine will decide it (on the CPU, auto is off; with GPUs llama.cpp decides)."""
    from kvchat.named_session import ContextSettings

    gpu = bool(request.gpus) and request.n_gpu_layers != 0
    enabled = flash_attn_enabled(request.flash_attn, request.type_v, gpu=gpu)
    fa = "auto" if enabled is None else ("on" if enabled else "off")
    return ContextSettings(request.n_ctx, request.type_k.name, request.type_v.name, fa)


@dataclass(frozen=True)
class MemoryFigures:
    """What a conversation costs now: context, KV cells and bytes, RSS, VRAM.

    On a server, KV bytes and VRAM are the server's and it does not report them:
    None (shown as unknown); RSS is this process's.
    """

    n_ctx: int
    kv_cells_used: int
    kv_bytes: int | None  # KV and recurrent-state buffers llama.cpp allocated
    rss_bytes: int
    vram_used_bytes: int | None  # all NVIDIA GPUs together; None without NVML


def memory_figures(conv: Conversation) -> MemoryFigures:
    local = conv.local
    if local is None:
        return MemoryFigures(conv.engine.n_ctx, conv.session.n_kv, None, hardware.rss_bytes(), None)
    buffers = local.buffers
    vram = None
    nvml = hardware.open_nvml()
    if nvml is not None:
        try:
            reading = nvml.read()
            vram = reading.used if reading is not None else None
        finally:
            nvml.close()
    return MemoryFigures(local.n_ctx, conv.session.n_kv,
                         sum(buffers.kv.values()) + sum(buffers.recurrent.values()),
                         hardware.rss_bytes(), vram)


def rebuilt_cache_counts(reused: int, evaluated: int, rebuilt: int) -> dict[str, int]:
    """A turn's cache figures where tokens `--rebuild` re-evaluated before the turn
    count as evaluated (llama.cpp did that work in this run), not as reused."""
    moved = min(rebuilt, reused)
    return {"reused_tokens": reused - moved, "evaluated_tokens": evaluated + moved, "rebuilt_tokens": moved}


def turn_record(conv: Conversation, turn: TurnStats, text: str, reasoning: str = "") -> dict[str, Any]:
    """The JSON record of one turn (`run --json`); a thinking model's reasoning apart."""
    engine, request, session = conv.engine, conv.request, conv.session
    sampling = session.sampling
    memory = memory_figures(conv)
    if request is not None:
        model = str(request.model_path)
        where: dict[str, Any] = {
            "n_ctx": engine.n_ctx,
            "cache_type_k": request.type_k.name,
            "cache_type_v": request.type_v.name,
            "flash_attn": engine.flash_attn,
            "n_gpu_layers": request.n_gpu_layers,
            "n_threads": request.n_threads,
            "n_batch": request.n_batch,
        }
    else:  # the server decides (and does not report) cache types, layers, threads
        assert conv.server is not None
        model = conv.server.model_path or conv.server.model_name
        where = {"server": conv.server.client.url, "n_ctx": engine.n_ctx}
    return {
        "text": text,
        "reasoning": reasoning,
        "model": model,
        "settings": {
            **where,
            "temperature": sampling.temperature,
            "top_k": sampling.top_k,
            "top_p": sampling.top_p,
            "min_p": sampling.min_p,
            "repeat_penalty": sampling.repeat_penalty,
            "seed": sampling.seed,
            "max_tokens": session.max_tokens,
        },
        "usage": {
            "prompt_tokens": turn.prompt_tokens if turn.usage_reported else None,
            "completion_tokens": turn.completion_tokens,
            "reasoning_tokens": turn.reasoning_tokens,
        },
        "cache": {
            **(rebuilt_cache_counts(turn.reused_tokens, turn.evaluated_tokens, conv.rebuilt_tokens)
               if turn.usage_reported
               else {"reused_tokens": None, "evaluated_tokens": None, "rebuilt_tokens": 0}),
            "prefix_cache_tokens": turn.prefix_cache_tokens,
            "prefix_cache_restore_s": round(turn.prefix_cache_restore_s, 4),
            **({"prefix_cache_skipped": turn.prefix_cache_skipped} if turn.prefix_cache_skipped else {}),
            "reevaluated_tokens": turn.reevaluated_tokens,
            **(server_cache_counts(conv.server) if conv.server is not None else {}),
        },
        "memory": {
            "n_ctx": memory.n_ctx,
            "kv_cells_used": memory.kv_cells_used,
            "kv_bytes": memory.kv_bytes,
            "rss_bytes": memory.rss_bytes,
            "vram_used_bytes": memory.vram_used_bytes,
        },
        "timings": {
            "load_s": round(engine.load_s, 4),
            "ttft_s": round(turn.ttft_s, 4),
            "prefill_tok_s": round(turn.prefill_tok_s, 2),
            "decode_tok_s": round(turn.decode_tok_s, 2),
        },
        "speculative": {
            "mode": speculative_mode(cast("ChatEngine", engine)),
            "drafted_tokens": turn.drafted_tokens,
            "accepted_tokens": turn.accepted_tokens,
            "acceptance": round(turn.acceptance, 4),
        },
        "stop_reason": turn.stop_reason,
    }


def server_cache_counts(server: ServerEngine) -> dict[str, Any]:
    """What the server itself says the last reply cost. llama-server: prompt tokens
    found in its slot's cache (`cache_n`) and evaluated (`prompt_n`). An OpenAI-
    compatible server: `usage.prompt_tokens_details.cached_tokens` (None where it does
    not report them), and vLLM's KV usage and prefix-cache hits from /metrics."""
    from kvchat.remote.llama_server import LlamaServerEngine

    if isinstance(server, LlamaServerEngine):
        t = server.last_timings
        return {"server": None if t is None else {
            "cached_tokens": t.cache_n, "evaluated_tokens": t.prompt_n, "predicted_tokens": t.predicted_n,
            "prompt_ms": round(t.prompt_ms, 2), "predicted_per_second": round(t.predicted_per_second, 2),
            "unstreamed_tokens": server.unstreamed_tokens, "id_slot": server.id_slot,
        }}
    usage = server.last_usage
    metrics = server.metrics()
    return {"server": {
        "cached_tokens": None if usage is None else usage.cached_tokens,
        "evaluated_tokens": None if usage is None or usage.cached_tokens is None
        else usage.prompt_tokens - usage.cached_tokens,
        "kv_cache_usage": None if metrics is None else metrics.kv_cache_usage,
        "prefix_cache_hit_rate": None if metrics is None else metrics.prefix_hit_rate,
    }}


def server_rows(server: ServerEngine) -> list[tuple[str, str]]:
    """What /info says about a server: what it reports, and what it does not as such."""
    from kvchat.remote.llama_server import LlamaServerEngine

    counts = server_cache_counts(server)["server"]
    if isinstance(server, LlamaServerEngine):
        slot = server.id_slot if server.id_slot >= 0 else "not yet chosen"
        last = ("no reply yet" if counts is None else
                f"{counts['cached_tokens']} prompt tokens from its cache, {counts['evaluated_tokens']} "
                f"evaluated, decode {counts['predicted_per_second']:.1f} tok/s (server's figure)")
        return [("server", f"{server.client.url} (llama-server, {server.total_slots} slots; this chat on "
                           f"slot {slot})"),
                ("model", server.model_name),
                ("file", server.model_path or "not reported"),
                ("context", f"{server.n_ctx} tokens per slot"),
                ("last reply", last)]
    def known(value: Any, fmt: str = "{}") -> str:
        return "not reported" if value is None else fmt.format(value)

    return [("server", f"{server.client.url} (OpenAI-compatible chat API)"),
            ("model", server.model_name),
            ("context", f"{server.n_ctx} tokens" if server.n_ctx else "not reported"),
            ("last reply", f"{known(counts['cached_tokens'])} prompt tokens from its prefix cache"),
            ("server KV", f"{known(counts['kv_cache_usage'], '{:.0%}')} in use, prefix cache hit rate "
                          f"{known(counts['prefix_cache_hit_rate'], '{:.0%}')}")]


def speculative_mode(engine: object) -> str:
    """ngram, draft, or off (any other engine: plain decoding, a server)."""
    from kvchat.speculative_engine import SpeculativeEngine

    return engine.mode if isinstance(engine, SpeculativeEngine) else "off"


def speculation_counters(engine: object) -> SpecCounters | None:
    """What speculative decoding did in `engine`'s lifetime; None where it is off."""
    from kvchat.speculative_engine import SpeculativeEngine

    return engine.counters if isinstance(engine, SpeculativeEngine) else None


# --- what the CLI and the REPL ask of the engines, without importing them ----------------


def gpu_offload_supported() -> bool:
    """Whether the llama.cpp kvchat loads models with has a GPU backend."""
    from kvchat.engine import supports_gpu_offload

    return supports_gpu_offload()


def is_llama_server(server: ServerEngine) -> TypeGuard[LlamaServerEngine]:
    """Whether `server` is llama-server (token prompts, slots and its own timings), not
    another OpenAI-compatible server."""
    from kvchat.remote.llama_server import LlamaServerEngine

    return isinstance(server, LlamaServerEngine)


def bench_engine_factory(request: LoadRequest, flash_attn: Mapping[CachePair, str], warn: Warn,
                         *, verbose: bool = False) -> EngineFactory:
    """`kvchat bench`'s loads: the model of `request` with each cache pair's K and V
    types and that pair's flash-attention mode."""
    def load(pair: CachePair) -> Engine:
        asked = replace(request, type_k=pair.type_k, type_v=pair.type_v, flash_attn=flash_attn[pair])
        return load_engine(asked, warn, verbose=verbose)

    return load


# --- estimates: what a model will cost, from its header alone -------------------------


@dataclass
class Estimate:
    """Plans for one model at one or more contexts, and what fits the budget."""

    spec: ModelSpec
    model_label: Path  # the local file, or repo/file for a header read over HTTP
    remote_bytes_fetched: int | None
    budget: Budget
    base: PlanSettings
    plans: list[MemoryPlan]
    largest_ctx: int | None
    fitted: FitResult | None
    warnings: list[str]


def read_model_spec(ref: str | None, *, allow_remote: bool) -> tuple[ModelSpec, Path, int | None]:
    """The spec of a local model, or (allow_remote) of a Hub model through HTTP range
    requests for its header(s) only; returns it, a label and the bytes fetched."""
    from kvchat.gguf import merge_split_headers, read_header, read_model_header_file
    from kvchat.model_spec import spec_from_header
    from kvchat.registry import find_local, parse_ref, resolve_model, resolve_remote

    if allow_remote and find_local(ref) is None and parse_ref(ref).kind == "hub":
        from kvchat.hub import open_remote_file

        assert ref is not None
        target = resolve_remote(ref)
        headers, fetched = [], 0
        for part in target.parts:
            with open_remote_file(target.repo, part, target.commit) as remote:
                headers.append(read_header(remote))
                fetched += remote.bytes_fetched
        label = Path(f"{target.repo}/{target.parts[0]}")
        return spec_from_header(merge_split_headers(headers)), label, fetched
    path = resolve_model(ref)
    return spec_from_header(read_model_header_file(path)), path, None


def estimate(s: Settings, contexts: list[int] | None, budget: Budget, *, swa_full: bool = False,
             n_ubatch: int = 512, n_seq: int = 1, allow_remote: bool = True,
             tensor_split: tuple[float, ...] = ()) -> Estimate:
    """Plan memory at `contexts` (None: the context `run --ctx auto` would pick) with
    the GPU layers asked for (`--ngl auto`: the most that fit), as `run` would load:
    over the budget's devices, split by `tensor_split` (default: by their memory, as
    llama.cpp splits by free memory)."""
    from kvchat.devices import served_by_llama_server
    from kvchat.memory import fit, largest_ctx, plan_memory

    spec, label, fetched = read_model_spec(s.model, allow_remote=allow_remote)
    warnings: list[str] = []
    base = replace(plan_settings(s, gpu=bool(budget.gpu_names)), swa_full=swa_full, n_ubatch=n_ubatch,
                   n_seq=n_seq, gpus=budget.gpu_names, tensor_split=tensor_split or budget.split(),
                   n_outputs_max=n_seq if served_by_llama_server(budget.gpu_names) else 0)
    if not budget.gpu_names:
        base = replace(base, n_gpu_layers=0)
    if contexts is None:
        n_ctx, layers = auto_context(spec, replace(base, n_ctx=min(4096, spec.n_ctx_train or 4096)), budget,
                                     context_cap(s, spec), fit_layers=s.ngl is None)
        # Nothing fits: show why at 4096 (or the training length, if smaller).
        contexts = [n_ctx or min(4096, spec.n_ctx_train or 4096)]
        base = replace(base, n_gpu_layers=layers if s.ngl is None and n_ctx else base.n_gpu_layers)
    elif s.ngl is None:
        found = gpu_layers_that_fit(spec, replace(base, n_ctx=contexts[0]), budget)
        base = replace(base, n_gpu_layers=found if found is not None else 0)
        if found is None:
            warnings.append("the model does not fit this memory even with every layer on the CPU")
    base = replace(base, n_ctx=contexts[0])
    plans = [plan_memory(spec, replace(base, n_ctx=n)) for n in contexts]
    for plan in plans:
        warnings.extend(plan.warnings)
    # A model without a training length (context_length 0) is capped as `run --ctx auto`
    # caps it (ctx_max), so the plan above and "largest context" agree.
    top = largest_ctx_cap(s, spec)
    fitted = fit(spec, base, budget, max_ctx=top) if budget.gpu_names else None
    return Estimate(spec, label, fetched, budget, base, plans, largest_ctx(spec, base, budget, max_ctx=top),
                    fitted, warnings)


def largest_ctx_cap(s: Settings, spec: ModelSpec) -> int:
    """The top of estimate's "largest context" search: the training length, or
    ctx_max for a model that states none."""
    return spec.n_ctx_train or s.ctx_max


def draft_estimate(ref: str, est: Estimate, *, allow_remote: bool = True) -> tuple[Path, list[MemoryPlan]]:
    """A speculative draft model's plans beside `est`: it runs a context as long as the
    target's, with the same cache types and GPU layer count (start_speculation)."""
    from kvchat.memory import plan_memory

    spec, label, _fetched = read_model_spec(ref, allow_remote=allow_remote)
    return label, [plan_memory(spec, plan.settings) for plan in est.plans]


def exact_buffers(model_path: Path, plan: MemoryPlan) -> dict[str, Any]:
    """Load the model with llama.cpp as `plan` describes (GPU layers and their split)
    and return the buffer sizes it reported, in bytes (`estimate --exact`)."""
    from kvchat.engine import Engine, EngineSettings

    s = plan.settings
    settings = EngineSettings(
        n_ctx=s.n_ctx, type_k=s.type_k, type_v=s.type_v, flash_attn="on" if s.flash_attn else "off",
        n_gpu_layers=plan.n_gpu_layers if s.gpus else 0, n_threads=hardware.physical_cores(),
        n_batch=s.n_batch, n_ubatch=s.n_ubatch, swa_full=s.swa_full,
        tensor_split=s.tensor_split if s.gpus else (),
    )
    with Engine(model_path, settings) as engine:
        b = engine.buffers
        kinds = {"weights": b.model, "kv": b.kv, "recurrent": b.recurrent, "output": b.output,
                 "compute": b.compute}
        names = sorted({name for sizes in kinds.values() for name in sizes})
        return {
            # per buffer, as llama.cpp names them (CPU_Mapped, CUDA0, CUDA_Host, ...)
            "buffers": {name: {kind: sizes.get(name, 0) for kind, sizes in kinds.items()} for name in names},
            "weights": sum(b.model.values()),
            "kv": sum(b.kv.values()),
            "k": b.k,
            "v": b.v,
            "recurrent": sum(b.recurrent.values()),
            "output": sum(b.output.values()),
            "compute": sum(b.compute.values()),
            "kv_cells": b.kv_cells,
        }
