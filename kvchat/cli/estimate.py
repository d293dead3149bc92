"""`kvchat estimate`: what a model costs at a context and cache types, before loading it.

Reads only the GGUF header (kvchat.gguf), plans with kvchat.memory, and never
imports llama_cpp unless `--exact` asks llama.cpp for its own figures.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from kvchat import config
from kvchat.cache_types import CACHE_TYPES, flash_attn_enabled, parse_cache_type, resolve_flash_attn
from kvchat.cli import app
from kvchat.cli.options import CacheTypeKOpt, CacheTypeVOpt, FlashAttnOpt
from kvchat.errors import UsageError
from kvchat.gguf import GGUFHeader, merge_split_headers, read_header, read_model_header_file
from kvchat.hub import open_remote_file
from kvchat.memory import (
    CPU,
    DEFAULT_MARGIN,
    Budget,
    MemoryPlan,
    PlanSettings,
    detect_budget,
    fit,
    fit_gpu_layers,
    largest_ctx,
    parse_size,
    plan_memory,
)
from kvchat.model_spec import ModelSpec, spec_from_header
from kvchat.registry import find_local, parse_ref, resolve_model
from kvchat.ui.environment import Environment
from kvchat.ui.render import format_bytes

COMPARE_PAIRS = (("f16", "f16"), ("q8_0", "q8_0"), ("q8_0", "q4_0"), ("q4_0", "q4_0"))
COMPONENTS = ("weights", "k", "v", "recurrent", "output", "compute")
_LABELS = {"weights": "weights", "k": "K cache", "v": "V cache", "recurrent": "recurrent state",
           "output": "output (logits)", "compute": "compute"}


def parse_ctx_list(text: str) -> list[int]:
    """'4096', '4k,8k,32k', '131072' -> token counts ('k' means 1024)."""
    values = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        scale = 1024 if part.endswith("k") else 1
        number = part[:-1] if part.endswith("k") else part
        try:
            value = int(number) * scale
        except ValueError:
            raise UsageError(f"--ctx: '{part}' is not a token count", hint="e.g. --ctx 4096,8k,32k") from None
        if value < 1:
            raise UsageError(f"--ctx values must be positive, got {part}")
        values.append(value)
    if not values:
        raise UsageError("--ctx needs at least one value", hint="e.g. --ctx 4096,8k")
    return values


def compare_contexts(n_ctx_train: int) -> list[int]:
    """4k, 8k, 16k, 32k, 64k, 128k... up to the training length (which is included)."""
    out, n = [], 4096
    while n < n_ctx_train:
        out.append(n)
        n *= 2
    out.append(n_ctx_train or 4096)
    return out


def _budget(ram: str | None, vram: str | None, margin: str | None) -> Budget:
    margin_bytes = parse_size(margin) if margin else DEFAULT_MARGIN
    detected = detect_budget(margin_bytes)
    if vram is not None:
        vram_bytes = parse_size(vram)
        names = detected.gpu_names or ("GPU0",)
        detected = replace(detected, vram=(vram_bytes,) * len(names), gpu_names=names)
    if ram is not None:
        detected = replace(detected, ram=parse_size(ram))
    return detected


def _read_remote_header(ref: str) -> tuple[GGUFHeader, Path, int]:
    """Header of a Hub model through HTTP range requests, every part of a split model
    merged; returns it, the first part's name and the bytes fetched."""
    from kvchat.registry import resolve_remote

    target = resolve_remote(ref)
    headers, fetched = [], 0
    for part in target.parts:
        with open_remote_file(target.repo, part, target.commit) as remote:
            headers.append(read_header(remote))
            fetched += remote.bytes_fetched
    return merge_split_headers(headers), Path(f"{target.repo}/{target.parts[0]}"), fetched


def _ngl(value: str | None, has_gpu: bool) -> int | None:
    """--ngl: a count, -1 for all, or 'auto' (None: fit it to the budget)."""
    if value is None:
        value = str(config.setting("ngl"))
    if value.strip().lower() == "auto":
        return None
    try:
        number = int(value)
    except ValueError:
        raise UsageError(f"--ngl must be a number or 'auto', got '{value}'") from None
    if number < -1:
        raise UsageError(f"--ngl must be -1 (all), 0 or more, got {number}")
    return number if has_gpu else 0


def _plan_dict(plan: MemoryPlan) -> dict[str, Any]:
    s = plan.settings
    return {
        "n_ctx": plan.n_ctx,
        "n_ctx_seq": plan.n_ctx_seq,
        "kv_cells": plan.kv_cells,
        "swa_cells": plan.swa_cells,
        "cache_type_k": s.type_k.name,
        "cache_type_v": s.type_v.name,
        "flash_attn": s.flash_attn,
        "n_gpu_layers": plan.n_gpu_layers,
        "n_ubatch": plan.n_ubatch,
        "devices": {
            d.name: {**{c: getattr(d, c) for c in COMPONENTS}, "total": d.total} for d in plan.devices
        },
        "total": {**{c: getattr(plan, c) for c in COMPONENTS}, "total": plan.total},
        "warnings": plan.warnings,
    }


def _plan_table(plan: MemoryPlan):  # noqa: ANN202
    from rich.table import Table

    table = Table()
    table.add_column("component")
    for dev in plan.devices:
        table.add_column(dev.name, justify="right")
    if len(plan.devices) > 1:
        table.add_column("total", justify="right")
    for comp in COMPONENTS:
        if comp == "recurrent" and not plan.recurrent:
            continue
        label = "V cache (none: MLA)" if comp == "v" and not plan.v and plan.k else _LABELS[comp]
        row = [label] + [format_bytes(getattr(d, comp)) for d in plan.devices]
        if len(plan.devices) > 1:
            row.append(format_bytes(getattr(plan, comp)))
        table.add_row(*row)
    total_row = ["[bold]total[/bold]"] + [f"[bold]{format_bytes(d.total)}[/bold]" for d in plan.devices]
    if len(plan.devices) > 1:
        total_row.append(f"[bold]{format_bytes(plan.total)}[/bold]")
    table.add_row(*total_row, end_section=True)
    return table


def _title(spec: ModelSpec, plan: MemoryPlan) -> str:
    s = plan.settings
    cells = f"{plan.kv_cells} cells"
    if plan.swa_cells:
        cells += f", SWA {plan.swa_cells}"
    gpu = f", {plan.n_gpu_layers}/{spec.n_layer + 1} layers on GPU" if s.gpus else ""
    return (
        f"n_ctx {plan.n_ctx} ({cells}) · K {s.type_k.name} · V {s.type_v.name} · "
        f"flash attention {'on' if s.flash_attn else 'off'}{gpu}"
    )


def _compare_table(spec: ModelSpec, base: PlanSettings, contexts: list[int], budget: Budget):  # noqa: ANN202
    from rich.table import Table

    table = Table(title="KV cache (and total) by cache types and context", title_justify="left")
    table.add_column("K / V")
    for n in contexts:
        table.add_column(f"{n // 1024}k" if n % 1024 == 0 else str(n), justify="right")
    table.add_column("largest ctx that fits", justify="right")
    rows = []
    for k_name, v_name in COMPARE_PAIRS:
        type_k, type_v = CACHE_TYPES[k_name], CACHE_TYPES[v_name]
        settings = replace(base, type_k=type_k, type_v=type_v, flash_attn=base.flash_attn or type_v.quantized)
        cells, record = [], {"cache_type_k": k_name, "cache_type_v": v_name, "plans": []}
        try:
            for n in contexts:
                plan = plan_memory(spec, replace(settings, n_ctx=n))
                cells.append(f"{format_bytes(plan.kv + plan.recurrent)}\n({format_bytes(plan.total)})")
                record["plans"].append(_plan_dict(plan))
            best = largest_ctx(spec, settings, budget)
        except UsageError as exc:
            table.add_row(f"{k_name} / {v_name}", *(["—"] * len(contexts)), exc.message)
            continue
        record["largest_ctx"] = best
        table.add_row(f"{k_name} / {v_name}", *cells, "none" if best is None else str(best))
        rows.append(record)
    return table, rows


def _exact(model_path: Path, plan: MemoryPlan) -> dict[str, int]:
    """Load the model with llama.cpp and return its reported buffer sizes, in bytes."""
    import re

    from kvchat.cli.common import default_threads
    from kvchat.engine import Engine, EngineSettings

    s = plan.settings
    settings = EngineSettings(
        n_ctx=s.n_ctx, type_k=s.type_k, type_v=s.type_v, flash_attn="on" if s.flash_attn else "off",
        n_gpu_layers=plan.n_gpu_layers if s.gpus else 0, n_threads=default_threads(),
        n_batch=s.n_batch, n_ubatch=s.n_ubatch, swa_full=s.swa_full,
    )
    with Engine(model_path, settings) as engine:
        b = engine.buffers
        output = 0
        for line in engine.load_log:
            match = re.search(r"output buffer size =\s*([\d.]+) MiB", line)
            if match:
                output += round(float(match[1]) * 1024 * 1024)
        return {
            "weights": sum(b.model.values()),
            "kv": sum(b.kv.values()),
            "k": b.k,
            "v": b.v,
            "recurrent": sum(b.recurrent.values()),
            "output": output or sum(b.output.values()),
            "compute": sum(b.compute.values()),
            "kv_cells": b.kv_cells,
        }


def _exact_table(plan: MemoryPlan, exact: dict[str, int]):  # noqa: ANN202
    from rich.table import Table

    table = Table(title="plan vs llama.cpp (--exact)", title_justify="left")
    for col in ("component", "plan", "llama.cpp", "difference"):
        table.add_column(col, justify="left" if col == "component" else "right")
    planned = {c: getattr(plan, c) for c in COMPONENTS}
    planned["kv"] = plan.kv
    ours_total = plan.total
    theirs_total = sum(exact[c] for c in ("weights", "kv", "recurrent", "output", "compute"))
    for comp in ("weights", "k", "v", "kv", "recurrent", "output", "compute"):
        ours, theirs = planned[comp], exact[comp]
        if comp == "recurrent" and not ours and not theirs:
            continue
        label = _LABELS.get(comp, "K + V")
        table.add_row(label, format_bytes(ours), format_bytes(theirs), _diff(ours, theirs))
    table.add_row(
        "total", format_bytes(ours_total), format_bytes(theirs_total), _diff(ours_total, theirs_total)
    )
    return table


def _diff(ours: int, theirs: int) -> str:
    delta = ours - theirs
    pct = f" ({100 * delta / theirs:+.1f}%)" if theirs else ""
    sign = "+" if delta >= 0 else "-"
    return f"{sign}{format_bytes(abs(delta))}{pct}"


@app.command()
def estimate(
    model: Annotated[
        Optional[str], typer.Argument(metavar="[MODEL]", help="A .gguf path (default: bundled SmolLM2-135M).")
    ] = None,
    ctx: Annotated[
        Optional[str], typer.Option("--ctx", "-c", help="Context length(s): 4096 or 4k,8k,32k.")
    ] = None,
    cache_type_k: CacheTypeKOpt = None,
    cache_type_v: CacheTypeVOpt = None,
    flash_attn: FlashAttnOpt = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="Cache types x contexts up to the training length.")
    ] = False,
    ngl: Annotated[
        Optional[str], typer.Option("--ngl", help="GPU layers: a count, -1 (all) or auto (most that fit).")
    ] = None,
    vram: Annotated[
        Optional[str], typer.Option("--vram", help="VRAM per GPU, e.g. 8GB (default: free now).")
    ] = None,
    ram: Annotated[
        Optional[str], typer.Option("--ram", help="RAM, e.g. 16GiB (default: available now).")
    ] = None,
    margin: Annotated[
        Optional[str], typer.Option("--margin", help="Memory to leave free per device (default 1GiB).")
    ] = None,
    batch: Annotated[int, typer.Option("--batch", "-b", help="Logical batch size.", min=1)] = 512,
    ubatch: Annotated[int, typer.Option("--ubatch", "-ub", help="Micro-batch size.", min=1)] = 512,
    parallel: Annotated[int, typer.Option("--parallel", "-np", help="Sequences in parallel.", min=1)] = 1,
    swa_full: Annotated[bool, typer.Option("--swa-full", help="Full-size cache for SWA layers.")] = False,
    exact: Annotated[
        bool, typer.Option("--exact", help="Also load the model and print llama.cpp's own figures.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead.")] = False,
) -> None:
    """Memory a model needs — weights, KV cache, compute — per device, from its header alone.

    \b
    Examples:
      kvchat estimate ./model.gguf --ctx 8k,32k -ctk q8_0 -ctv q8_0
      kvchat estimate ./model.gguf --compare --vram 8GB
      kvchat estimate ./model.gguf --ngl auto --vram 6GiB --json
    """
    env = Environment()
    type_k = parse_cache_type(str(config.setting("cache_type_k", cache_type_k)))
    type_v = parse_cache_type(str(config.setting("cache_type_v", cache_type_v)))
    fa_mode = resolve_flash_attn(str(config.setting("flash_attn", flash_attn)), type_v)
    ref = config.setting("model", model)
    fetched = None
    if not exact and find_local(ref) is None and parse_ref(ref).kind == "hub":
        header, model_path, fetched = _read_remote_header(ref)
        env.stderr.write(f"kvchat: read {format_bytes(fetched)} of {model_path} (header only)\n")
    else:
        model_path = resolve_model(ref)
        header = read_model_header_file(model_path)
    spec = spec_from_header(header)
    budget = _budget(ram, vram, margin)
    ctx_value = ctx or str(config.setting("ctx"))
    auto_ctx = ctx_value.strip().lower() == "auto"
    contexts = [min(4096, spec.n_ctx_train or 4096)] if auto_ctx else parse_ctx_list(ctx_value)
    gpu_layers = _ngl(ngl, bool(budget.gpu_names))
    # The engine's rule: auto is off on the CPU; with GPUs llama.cpp turns it on.
    fa = flash_attn_enabled(fa_mode, type_v, gpu=bool(budget.gpu_names) and gpu_layers != 0) is not False
    base = PlanSettings(
        n_ctx=contexts[0], type_k=type_k, type_v=type_v, flash_attn=fa, swa_full=swa_full,
        n_batch=batch, n_ubatch=ubatch, n_gpu_layers=-1 if gpu_layers is None else gpu_layers,
        gpus=budget.gpu_names, n_seq=parallel,
    )
    if auto_ctx:
        # What `run --ctx auto` would pick: the largest context that fits, up to the
        # training length and ctx_max (with --ngl auto, llama.cpp's --fit order:
        # context first, then layers); if nothing fits, show why at 4096.
        cap = int(config.setting("ctx_max"))
        cap = min(cap, spec.n_ctx_train or cap)
        if gpu_layers is None and budget.gpu_names:
            fitted_auto = fit(spec, base, budget, max_ctx=cap)
            if fitted_auto is not None:
                gpu_layers = fitted_auto.n_gpu_layers
                base = replace(base, n_ctx=fitted_auto.n_ctx, n_gpu_layers=gpu_layers)
        else:
            chosen = largest_ctx(spec, base, budget, max_ctx=cap)
            if chosen:
                base = replace(base, n_ctx=chosen)
        contexts = [base.n_ctx]
    if gpu_layers is None:
        found = fit_gpu_layers(spec, base, budget)
        base = replace(base, n_gpu_layers=found if found is not None else 0)
        if found is None:
            env.warn("the model does not fit this memory even with every layer on the CPU")

    plans = [plan_memory(spec, replace(base, n_ctx=n)) for n in contexts]
    best = largest_ctx(spec, base, budget)
    fitted = fit(spec, base, budget) if budget.gpu_names else None
    record: dict[str, Any] = {
        "model": str(model_path),
        "remote_bytes_fetched": fetched,
        "architecture": spec.architecture,
        "name": spec.name,
        "n_layer": spec.n_layer,
        "n_ctx_train": spec.n_ctx_train,
        "n_vocab": spec.n_vocab,
        "budget": {"ram": budget.ram, "vram": dict(zip(budget.gpu_names, budget.vram, strict=True)),
                   "margin": budget.margin},
        "plans": [_plan_dict(p) for p in plans],
        "largest_ctx": best,
        "fit": None if fitted is None else {"n_ctx": fitted.n_ctx, "n_gpu_layers": fitted.n_gpu_layers},
    }
    compare_rows = None
    compare_table = None
    if compare:
        compare_table, compare_rows = _compare_table(spec, base, compare_contexts(spec.n_ctx_train), budget)
        record["compare"] = compare_rows
    exact_figures = []
    if exact:
        for plan in plans:
            exact_figures.append(_exact(model_path, plan))
        record["exact"] = exact_figures

    for plan in plans:
        for warning in plan.warnings:
            env.warn(warning)
    if as_json:
        env.stdout.write(json.dumps(record) + "\n")
        env.stdout.flush()
        return
    out = env.out_console()
    out.print(
        f"[bold]{spec.name or model_path.name}[/bold] · {spec.architecture} · {spec.n_layer} layers · "
        f"trained on {spec.n_ctx_train} tokens · weights {format_bytes(spec.weights_bytes)}"
    )
    for i, plan in enumerate(plans):
        out.print(_title(spec, plan))
        out.print(_plan_table(plan))
        if exact:
            out.print(_exact_table(plan, exact_figures[i]))
    if compare_table is not None:
        out.print(compare_table)
    limits = f"RAM {format_bytes(budget.limit(CPU))}" + "".join(
        f", {name} {format_bytes(budget.limit(name))}" for name in budget.gpu_names
    )
    fit_line = f"largest context for K {type_k.name} / V {type_v.name}: " + (
        "none fits" if best is None else f"{best} tokens"
    )
    if budget.gpu_names:
        fit_line += f" with {base.n_gpu_layers if base.n_gpu_layers >= 0 else spec.n_layer + 1} GPU layers"
        if fitted is not None:
            fit_line += f"; llama.cpp --fit style: n_ctx {fitted.n_ctx}, {fitted.n_gpu_layers} GPU layers"
    out.print(f"{fit_line} (budget after margin: {limits})")

