"""Turning shared options into loaded objects; used by run, chat and bench."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvchat import config
from kvchat.cache_types import (
    CacheType,
    flash_attn_enabled,
    gpu_fused_fa_pair,
    parse_cache_type,
    resolve_flash_attn,
)
from kvchat.errors import OutOfMemoryError, UsageError
from kvchat.registry import resolve_model
from kvchat.ui.environment import Environment


@dataclass(frozen=True)
class LoadRequest:
    """Model and context settings after flag/env/config resolution and checks."""

    model_path: Path
    n_ctx: int
    type_k: CacheType
    type_v: CacheType
    flash_attn: str
    n_gpu_layers: int
    n_threads: int


def _as_int(name: str, value: Any, minimum: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a whole number, got '{value}'") from None
    if number < minimum:
        raise UsageError(f"{name} must be at least {minimum}, got {number}")
    return number


def default_threads() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def resolve_load_request(
    *,
    model: str | None,
    ctx: int | None,
    cache_type_k: str | None,
    cache_type_v: str | None,
    flash_attn: str | None,
    ngl: int | None,
    threads: int | None,
) -> LoadRequest:
    """Validate everything that can be checked before llama.cpp is touched."""
    type_k = parse_cache_type(str(config.setting("cache_type_k", cache_type_k)))
    type_v = parse_cache_type(str(config.setting("cache_type_v", cache_type_v)))
    fa = resolve_flash_attn(str(config.setting("flash_attn", flash_attn)), type_v)
    ctx_value = str(config.setting("ctx", ctx)).strip().lower()
    n_ctx = None if ctx_value == "auto" else parse_ctx(ctx_value)
    n_gpu_layers = _as_int("--ngl", config.setting("ngl", ngl), -1)
    threads_value = config.setting("threads", threads)
    n_threads = default_threads() if threads_value is None else _as_int("--threads", threads_value, 1)
    model_path = resolve_model(config.setting("model", model))
    if n_ctx is None:
        n_ctx, n_gpu_layers = auto_ctx(model_path, type_k, type_v, fa, n_gpu_layers)
    return LoadRequest(model_path, n_ctx, type_k, type_v, fa, n_gpu_layers, n_threads)


def parse_ctx(value: str) -> int:
    """A context length: 4096, or 8k / 32K (x1024)."""
    text = value.strip().lower()
    scale = 1024 if text.endswith("k") else 1
    number = _as_int("--ctx", text[:-1] if scale > 1 else text, 1)
    return number * scale


def auto_ctx(model_path: Path, type_k: CacheType, type_v: CacheType, flash_attn: str,
             n_gpu_layers: int) -> tuple[int, int]:
    """`--ctx auto`: the largest context that fits the memory free now, up to the
    model's training context and the ctx_max setting (the planner, no loading).

    Where the GPUs cannot hold every layer even at 4096 tokens, it follows
    llama.cpp's --fit order instead (context first, then layers back to the CPU)
    and returns the GPU layer count that fits too.
    """
    from kvchat.memory import PlanSettings, detect_budget, fit, largest_ctx
    from kvchat.model_spec import read_spec

    spec = read_spec(str(model_path))
    cap = _as_int("ctx_max", config.setting("ctx_max"), 256)
    cap = min(cap, spec.n_ctx_train or cap)
    budget = detect_budget()
    gpu = bool(budget.gpu_names) and n_gpu_layers != 0
    settings = PlanSettings(type_k=type_k, type_v=type_v, n_gpu_layers=n_gpu_layers,
                            flash_attn=flash_attn_enabled(flash_attn, type_v, gpu=gpu) is not False)
    n_ctx = largest_ctx(spec, settings, budget, max_ctx=cap)
    if budget.gpu_names and (n_ctx is None or n_ctx < min(4096, cap)):
        fitted = fit(spec, settings, budget, max_ctx=cap)
        if fitted is not None:
            return fitted.n_ctx, fitted.n_gpu_layers
    if n_ctx is None:
        raise OutOfMemoryError(
            f"{model_path.name} does not fit in the memory free now, even with a 256-token context",
            hint="close other programs, pick a smaller quant, or see `kvchat estimate`",
        )
    return n_ctx, n_gpu_layers


def load_engine(request: LoadRequest, env: Environment, *, verbose: bool = False):  # noqa: ANN201
    """Load the model; warn on stderr when the context exceeds its training length."""
    from kvchat.engine import Engine, EngineSettings

    engine = Engine(
        request.model_path,
        EngineSettings(
            n_ctx=request.n_ctx,
            type_k=request.type_k,
            type_v=request.type_v,
            flash_attn=request.flash_attn,
            n_gpu_layers=request.n_gpu_layers,
            n_threads=request.n_threads,
            verbose=verbose,
        ),
    )
    from kvchat.monitor import gpu_layers

    offloaded = gpu_layers(engine.load_log)
    if (engine.flash_attn != "off" and offloaded and offloaded[0] > 0
            and not gpu_fused_fa_pair(request.type_k, request.type_v)):
        env.warn(
            f"K {request.type_k.name} / V {request.type_v.name} has no fused GPU flash-attention "
            "kernel in stock builds: attention may run on the CPU, prefill 8-30x slower; "
            "same-type f16, q8_0, q4_0 or bf16 pairs avoid it"
        )
    if engine.n_ctx_train and request.n_ctx > engine.n_ctx_train:
        env.warn(
            f"--ctx {request.n_ctx} is above the model's training context "
            f"({engine.n_ctx_train}); answers may degrade past it"
        )
    return engine


def chat_template_for(engine):  # noqa: ANN001,ANN201
    from kvchat.chat_template import ChatTemplate

    return ChatTemplate(
        engine.chat_template(),
        bos_token=engine.token_text(engine.bos_token),
        eos_token=engine.token_text(engine.eos_token),
    )


@dataclass
class ChatSetup:
    """A loaded engine, its session and (for --session) the named file behind it."""

    engine: Any
    session: Any
    named: Any
    request: LoadRequest
    resumed_tokens: int = 0
    rebuilt_tokens: int = 0

    def save(self) -> int | None:
        if self.named is None:
            return None
        return self.named.save(self.session, self.engine)

    def close(self) -> None:
        try:
            self.engine.close()
        finally:
            if self.named is not None:
                self.named.close()


def open_chat(
    env: Environment,
    *,
    session_name: str | None,
    rebuild: bool,
    overflow: str | None,
    sampling: Any,
    max_tokens: int | None,
    system: str | None,
    verbose: bool,
    **flags: Any,
) -> ChatSetup:
    """Resolve settings (a named session supplies those not given), load the model,
    and restore or start the conversation."""
    from kvchat.named_session import ContextSettings, NamedSession, resolve_against_saved
    from kvchat.session import OVERFLOW_POLICIES, Session

    policy = overflow or "shift"
    if policy not in OVERFLOW_POLICIES:
        raise UsageError(f"unknown --overflow '{policy}'", hint="use shift or stop")
    named = NamedSession(session_name) if session_name else None
    engine = None
    try:
        if named is not None:
            request = resolve_against_saved(named, resolve_load_request, **flags)
            named.check(
                request.model_path,
                ContextSettings(request.n_ctx, request.type_k.name, request.type_v.name,
                                request.flash_attn),
                rebuild=rebuild,
            )
        else:
            request = resolve_load_request(**flags)
        engine = load_engine(request, env, verbose=verbose)
        session = Session(engine, chat_template_for(engine), sampling, max_tokens, policy)
        setup = ChatSetup(engine, session, named, request)
        if named is not None and named.exists:
            setup.rebuilt_tokens = named.attach(session, rebuild=rebuild)
            setup.resumed_tokens = len(session.tokens)
        current = session.messages[0]["content"] if session.messages and \
            session.messages[0]["role"] == "system" else None
        if system and system != current:
            session.set_system(system)
        return setup
    except BaseException:
        if engine is not None:
            engine.close()
        if named is not None:
            named.close()
        raise
