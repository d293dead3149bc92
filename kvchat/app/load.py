"""Loading a model here: every check that needs no llama.cpp (model, context,
layers, threads), the load itself, and the chat template to talk to it with."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from kvchat import hardware
from kvchat.cache_types import CacheType, flash_attn_enabled, fused_kernel_warning, resolve_flash_attn
from kvchat.errors import OutOfMemoryError
from kvchat.limits import check_explicit_ctx, forced
from kvchat.settings import Settings

if TYPE_CHECKING:
    from kvchat.bench import CachePair, EngineFactory
    from kvchat.chat_template import ChatTemplate, TemplateModel
    from kvchat.engine import Engine
    from kvchat.engine_api import SamplingSettings
    from kvchat.memory import Budget, PlanSettings
    from kvchat.model_spec import ModelSpec
    from kvchat.named_session import ContextSettings
    from kvchat.prefix_cache import Fingerprint

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
    # Imported here, not above: `kvchat estimate` imports this module and never samples,
    # and engine_api's protocols and dataclasses cost it 2% more instructions.
    from kvchat.engine_api import SamplingSettings
    from kvchat.settings import keys_in

    return SamplingSettings(**{key: getattr(s, key) for key in keys_in("sampling")})


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


# The same advice again within a day teaches nothing: it is given once, then again
# only when it changes (other threads, another suggestion) or the day is over.
_ADVICE_QUIET_S = 24 * 3600.0


def _advised_lately(advice: str) -> bool:
    """Whether `advice` was given in the last `_ADVICE_QUIET_S` (remembered in the data
    folder; a file that cannot be read or written only means it is given again)."""
    import json
    import os
    import time

    from kvchat import config

    path = config.paths().data_dir / "advice.json"
    now = time.time()
    try:
        given = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        given = {}
    if not isinstance(given, dict):
        given = {}
    at = given.get(advice)
    if isinstance(at, (int, float)) and 0 <= now - at < _ADVICE_QUIET_S:
        return True
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temp.write_text(json.dumps({**given, advice: now}), encoding="utf-8")
        os.replace(temp, path)
    except OSError:
        pass
    return False


def resolve_schema(value: str) -> str:
    """--schema JSON|FILE: the JSON Schema as compact JSON text, checked to be one that
    llama.cpp can turn into a grammar (a usage error otherwise, before anything loads)."""
    import json

    from kvchat.engine import schema_grammar
    from kvchat.errors import UsageError

    path = Path(value).expanduser()
    text = value
    if not value.lstrip().startswith(("{", "[")) and path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--schema {value}: cannot read it: {exc}", hint="check the file") from None
    try:
        schema = json.loads(text)
    except ValueError as exc:
        where = "the file" if text is not value else "neither a file nor JSON"
        raise UsageError(f"--schema {value[:60]!r}: {where} ({exc})",
                         hint='give a JSON Schema or its file: --schema \'{"type": "object"}\'') from None
    if not isinstance(schema, dict):
        raise UsageError(f"--schema: a JSON Schema is an object ({{...}}), not {type(schema).__name__}",
                         hint='e.g. --schema \'{"type": "object", "properties": {"a": {"type": "string"}}}\'')
    compact = json.dumps(schema, ensure_ascii=False)
    schema_grammar(compact)
    return compact


def warn_if_cores_contended(probe: hardware.CpuLoadProbe, n_threads: int, warn: Warn) -> None:
    """Say so when other programs kept cores busy that llama.cpp's threads need (once:
    the same advice is not repeated on every run)."""
    busy = probe.others_busy_cores()
    cores = hardware.logical_cores()
    if busy >= 0.75 and n_threads + busy > cores + 0.25:
        threads = max(1, cores - round(busy))
        if _advised_lately(f"busy cores: --threads {n_threads} -> {threads}"):
            return
        warn(f"other programs keep about {busy:.1f} core(s) busy: llama.cpp's threads spin while they "
             f"wait, so decoding may be much slower; try --threads {threads}")


def resolve_load(s: Settings, warn: Warn) -> LoadRequest:
    """Everything that can be checked before llama.cpp is touched: the model (its
    header read and checked on every path), context, layers, threads."""
    from kvchat.model_spec import read_spec
    from kvchat.registry import resolve_model

    fa = resolve_flash_attn(s.flash_attn, s.cache_type_v)
    model_path = resolve_model(s.model)
    spec = read_spec(str(model_path))
    from kvchat.memory import scratch_seqs

    budget = hardware.detect_budget()
    base = replace(plan_settings(s, gpu=bool(budget.gpu_names)), scratch_seqs=scratch_seqs(spec))
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




def expected_context(request: LoadRequest) -> ContextSettings:
    """The context settings a load will have, before loading: flash attention as the
    engine will decide it (on the CPU, auto is off; with GPUs llama.cpp decides)."""
    from kvchat.named_session import ContextSettings

    gpu = bool(request.gpus) and request.n_gpu_layers != 0
    enabled = flash_attn_enabled(request.flash_attn, request.type_v, gpu=gpu)
    fa = "auto" if enabled is None else ("on" if enabled else "off")
    return ContextSettings(request.n_ctx, request.type_k.name, request.type_v.name, fa)


def chat_template_for(engine: TemplateModel, override: str | None = None, *, raw: bool = False,
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


def gpu_offload_supported() -> bool:
    """Whether the llama.cpp kvchat loads models with has a GPU backend."""
    from kvchat.engine import supports_gpu_offload

    return supports_gpu_offload()


def bench_engine_factory(request: LoadRequest, flash_attn: Mapping[CachePair, str], warn: Warn,
                         *, verbose: bool = False) -> EngineFactory:
    """`kvchat bench`'s loads: the model of `request` with each cache pair's K and V
    types and that pair's flash-attention mode."""
    def load(pair: CachePair) -> Engine:
        asked = replace(request, type_k=pair.type_k, type_v=pair.type_v, flash_attn=flash_attn[pair])
        return load_engine(asked, warn, verbose=verbose)

    return load


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
