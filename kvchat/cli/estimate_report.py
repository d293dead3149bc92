"""What `kvchat estimate` prints: the plans, tables and JSON record of an estimate.

Imported only when the command runs (kvchat.cli.estimate declares it), so that the
planner's modules cost no other command's start-up.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from kvchat.cache_types import CACHE_TYPES
from kvchat.devices import Device, device_budget, parse_devices, parse_tensor_split
from kvchat.errors import OutOfMemoryError, UsageError
from kvchat.hardware import available_ram, detect_budget
from kvchat.memory import (
    CPU,
    DEFAULT_MARGIN,
    Budget,
    MemoryPlan,
    PlanSettings,
    fits,
    largest_ctx,
    parse_size,
    plan_memory,
)
from kvchat.model_spec import ModelSpec
from kvchat.registry import model_name, remote_model_name
from kvchat.ui.environment import Environment
from kvchat.ui.render import safe_text
from kvchat.ui.tables import TableData, print_table
from kvchat.units import format_bytes

if TYPE_CHECKING:
    from pathlib import Path

    from kvchat.app.estimates import Estimate

COMPARE_PAIRS = (("f16", "f16"), ("q8_0", "q8_0"), ("q8_0", "q4_0"), ("q4_0", "q4_0"))
COMPONENTS = ("weights", "k", "v", "recurrent", "output", "compute")
_LABELS = {"weights": "weights", "k": "K cache", "v": "V cache", "recurrent": "recurrent state",
           "output": "output (logits)", "compute": "compute"}


def parse_ctx_list(text: str) -> list[int]:
    """'4096', '4k,8k,32k', '131072' -> token counts ('k' means 1024), each checked
    as any --ctx value is (kvchat.settings)."""
    from kvchat.settings import parse_value

    values = [parse_value("ctx", part.strip(), "flag") for part in text.split(",") if part.strip()]
    if not values or None in values:
        raise UsageError(f"--ctx '{text}' is not a list of token counts", hint="e.g. --ctx 4096,8k,32k")
    return [v for v in values if v is not None]


def compare_contexts(n_ctx_train: int) -> list[int]:
    """4k, 8k, 16k, 32k, 64k, 128k... up to the training length (which is included)."""
    out, n = [], 4096
    while n < n_ctx_train:
        out.append(n)
        n *= 2
    out.append(n_ctx_train or 4096)
    return out


def _budget(ram: str | None, vram: str | None, margin: str | None, devices: list[Device]) -> Budget:
    margin_bytes = parse_size(margin) if margin else DEFAULT_MARGIN
    if devices and vram is not None:
        raise UsageError("give --vram or --device, not both",
                         hint="--device NAME=SIZE gives each device's memory")
    for flag, given in (("--vram", vram), ("--ram", ram)):
        if given is not None and parse_size(given) <= margin_bytes:
            raise UsageError(
                f"{flag} {given.strip()} leaves nothing after the {format_bytes(margin_bytes)} kept free",
                hint=f"give more, or a smaller --margin (e.g. {flag} {given.strip()} --margin 0)",
            )
    for dev in devices:
        if dev.size <= margin_bytes:
            raise UsageError(
                f"--device {dev.name} ({format_bytes(dev.size)}) leaves nothing after the "
                f"{format_bytes(margin_bytes)} kept free per device",
                hint="give it more memory, or a smaller --margin (e.g. --margin 0)",
            )
    if devices:  # given devices replace the GPUs found here
        return device_budget(devices, parse_size(ram) if ram is not None else available_ram(), margin_bytes)
    detected = detect_budget(margin_bytes)
    if vram is not None:
        vram_bytes = parse_size(vram)
        names = detected.gpu_names or ("GPU0",)
        detected = replace(detected, vram=(vram_bytes,) * len(names), gpu_names=names)
    if ram is not None:
        detected = replace(detected, ram=parse_size(ram))
    return detected


def _tensor_split(text: str | None, budget: Budget) -> tuple[float, ...]:
    if text is None:
        return ()
    if not budget.gpu_names:
        raise UsageError("--tensor-split needs devices to split over, and none are planned",
                         hint="name them with --device NAME=SIZE")
    return parse_tensor_split(text, len(budget.gpu_names))


def _check_exact_devices(devices: list[Device], est: Estimate) -> None:
    """--exact loads through llama-cpp-python on this machine: it has no RPC client
    (its rpc_servers parameter is gone) and sees only the GPUs here. Say what cannot
    be checked, and how to check it, rather than compare with another load."""
    from kvchat.app import gpu_offload_supported
    from kvchat.hardware import free_vram

    plan = est.plans[0]
    rpc = [d for d in devices if d.is_rpc]
    if rpc:
        model = est.model_label
        unit = min((share for share in plan.settings.tensor_split if share > 0), default=1.0)
        shares = ",".join(f"{share / unit:g}" for share in plan.settings.tensor_split)
        raise UsageError(
            f"--exact cannot load onto {', '.join(d.name for d in rpc)}: kvchat loads models through "
            "llama-cpp-python, which has no RPC client",
            hint=f"check this split with llama.cpp's own tools: start rpc-server on each worker, run "
            f"`llama-server -m {model} --rpc {','.join(d.endpoint for d in rpc)} -ngl {plan.n_gpu_layers} "
            f"-c {plan.n_ctx} -np {plan.settings.n_seq} -b {plan.n_batch} -ub {plan.n_ubatch} -ts {shares} "
            f"-fa {'on' if plan.settings.flash_attn else 'off'} --fit off` and "
            "compare its per-device 'model/KV/compute buffer size' lines with this estimate",
        )
    here = free_vram()
    if tuple(here) != est.budget.gpu_names:
        missing = [d.name for d in devices if d.name not in here]
        raise UsageError(
            f"--exact loads onto this machine's GPUs ({', '.join(here) or 'none found'}), not the ones "
            f"given{' (' + ', '.join(missing) + ' not here)' if missing else ''}",
            hint="run it on the machine with those GPUs, naming every one of them, or drop --exact",
        )
    if not gpu_offload_supported():
        raise UsageError("--exact cannot load onto GPUs: this llama-cpp-python build has no GPU backend",
                         hint="install a GPU build of llama-cpp-python (e.g. CMAKE_ARGS=-DGGML_CUDA=on), "
                         "or drop --exact")


def _plan_dict(plan: MemoryPlan, budget: Budget) -> dict[str, Any]:
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
        "n_outputs_max": s.n_outputs_max or plan.n_batch,
        "tensor_split": _shares(plan),
        "output_device": plan.output_device,
        "devices": {
            d.name: {"layers": d.layers, **{c: getattr(d, c) for c in COMPONENTS}, "total": d.total,
                     "limit": budget.limit(d.name), "fits": d.total <= budget.limit(d.name)}
            for d in plan.devices
        },
        "fits": fits(plan, budget),
        "total": {**{c: getattr(plan, c) for c in COMPONENTS}, "total": plan.total},
        "warnings": plan.warnings,
    }


def _shares(plan: MemoryPlan) -> list[float]:
    """Each GPU's share of the offloaded layers, normalised (empty without GPUs)."""
    s = plan.settings
    shares = list(s.tensor_split) if s.tensor_split else [1.0] * len(s.gpus)
    return [share / sum(shares) for share in shares] if s.gpus else []


def _checkpoints(spec: ModelSpec, plan: MemoryPlan, count: int, cap_mib: float) -> dict[str, Any]:
    """Checkpoint memory (host RAM, outside the total): one, and at most all of them."""
    from kvchat.memory import checkpoint_bytes

    one = checkpoint_bytes(spec, plan.settings)
    most = min(one * count, int(cap_mib * 1024 * 1024 // one) * one) if one else 0
    return {"memory_type": spec.memory_type, "checkpoint_bytes": one, "checkpoints": count,
            "checkpoints_max_bytes": most}


def _checkpoint_line(record: dict[str, Any]) -> str | None:
    if not record["checkpoint_bytes"]:
        return None
    return (f"{record['memory_type']} memory: KV checkpoints at turn boundaries (undo, retry, interrupted "
            f"prefill) take {format_bytes(record['checkpoint_bytes'])} each, up to "
            f"{format_bytes(record['checkpoints_max_bytes'])} ({record['checkpoints']} max, --checkpoints / "
            "--checkpoint-mib), host RAM outside the total")


def _plan_table(plan: MemoryPlan, budget: Budget | None = None) -> TableData:
    """Bytes per component and device; with GPUs, the layers each holds and, given a
    budget, whether each device's total fits its memory after the margin."""
    columns = ["component"] + [dev.name for dev in plan.devices]
    if len(plan.devices) > 1:
        columns.append("total")
    table = TableData(columns, right=frozenset(columns[1:]))
    if plan.gpus:
        n_layer = sum(d.layers for d in plan.devices)
        table.add_row("layers", *[f"{d.layers}{' + output' if plan.output_device == d.name else ''}"
                                  for d in plan.devices], f"{n_layer} + output")
    for comp in COMPONENTS:
        if comp == "recurrent" and not plan.recurrent:
            continue
        label = "V cache (none: MLA)" if comp == "v" and not plan.v and plan.k else _LABELS[comp]
        row = [label] + [format_bytes(getattr(d, comp)) for d in plan.devices]
        if len(plan.devices) > 1:
            row.append(format_bytes(getattr(plan, comp)))
        table.add_row(*row)
    total_row = ["total"] + [format_bytes(d.total) for d in plan.devices]
    if len(plan.devices) > 1:
        total_row.append(format_bytes(plan.total))
    table.add_row(*total_row, bold=True)
    if budget is not None and plan.gpus:
        cells = [_fits_cell(d.total, budget.limit(d.name)) for d in plan.devices]
        table.add_row("fits (after margin)", *cells, "yes" if fits(plan, budget) else "no")
    return table


def _fits_cell(total: int, limit: int) -> str:
    if total <= limit:
        return f"yes, of {format_bytes(limit)}"
    return f"no, over by {format_bytes(total - limit)}"


def _title(spec: ModelSpec, plan: MemoryPlan) -> str:
    s = plan.settings
    cells = f"{plan.kv_cells} cells"
    if plan.swa_cells:
        cells += f", SWA {plan.swa_cells}"
    gpu = f", {plan.n_gpu_layers}/{spec.n_layer + 1} layers on GPU" if s.gpus else ""
    server = " · as llama-server runs it (logits for one token per slot)" if s.n_outputs_max else ""
    return (
        f"n_ctx {plan.n_ctx} ({cells}) · K {s.type_k.name} · V {s.type_v.name} · "
        f"flash attention {'on' if s.flash_attn else 'off'}{gpu}{server}"
    )


def _compare_table(spec: ModelSpec, base: PlanSettings, contexts: list[int],
                   budget: Budget, top: int) -> tuple[TableData, list[dict[str, Any]]]:
    heads = [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in contexts]
    table = TableData(["K / V", *heads, "largest ctx that fits"], right=frozenset(heads),
                      title="KV cache (and total) by cache types and context")
    rows: list[dict[str, Any]] = []
    for k_name, v_name in COMPARE_PAIRS:
        type_k, type_v = CACHE_TYPES[k_name], CACHE_TYPES[v_name]
        settings = replace(base, type_k=type_k, type_v=type_v, flash_attn=base.flash_attn or type_v.quantized)
        cells: list[str] = []
        plans: list[dict[str, Any]] = []
        record: dict[str, Any] = {"cache_type_k": k_name, "cache_type_v": v_name, "plans": plans}
        try:
            for n in contexts:
                plan = plan_memory(spec, replace(settings, n_ctx=n))
                cells.append(f"{format_bytes(plan.kv + plan.recurrent)}\n({format_bytes(plan.total)})")
                plans.append(_plan_dict(plan, budget))
            best = largest_ctx(spec, settings, budget, max_ctx=top)
        except UsageError as exc:
            table.add_row(f"{k_name} / {v_name}", *(["—"] * len(contexts)), exc.message)
            continue
        record["largest_ctx"] = best
        table.add_row(f"{k_name} / {v_name}", *cells, "none" if best is None else str(best))
        rows.append(record)
    return table, rows


def _exact_table(plan: MemoryPlan, exact: dict[str, Any]) -> TableData:
    table = TableData(("component", "plan", "llama.cpp", "difference"),
                      right=frozenset({"plan", "llama.cpp", "difference"}),
                      title="plan vs llama.cpp (--exact)")
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


def _display_name(ref: str, label: Path) -> str:
    """How `kvchat list` names the model (registry.model_name), or will name a Hub
    model read without downloading it (`label` is then repo/file, not a file here)."""
    return model_name(label) if label.is_file() else remote_model_name(ref, label.name)


def _record(est: Estimate, name: str) -> dict[str, Any]:
    spec, budget = est.spec, est.budget
    return {
        "model": str(est.model_label),
        "remote_bytes_fetched": est.remote_bytes_fetched,
        "architecture": spec.architecture,
        "name": name,
        "general_name": spec.name,
        "n_layer": spec.n_layer,
        "n_ctx_train": spec.n_ctx_train,
        "n_vocab": spec.n_vocab,
        "budget": {"ram": budget.ram, "vram": dict(zip(budget.gpu_names, budget.vram, strict=True)),
                   "margin": budget.margin},
        "plans": [_plan_dict(p, budget) for p in est.plans],
        "largest_ctx": est.largest_ctx,
        "fit": None if est.fitted is None else {"n_ctx": est.fitted.n_ctx,
                                                "n_gpu_layers": est.fitted.n_gpu_layers},
    }


def _render(env: Environment, est: Estimate, name: str, limits: str, exact_figures: list[dict[str, Any]],
            compare_table: TableData | None, checkpoint_lines: list[str | None],
            drafts: tuple[str, list[MemoryPlan]] | None = None) -> None:
    """The report; piped, each table row is one tab-separated line."""
    spec, budget, base = est.spec, est.budget, est.base
    out = env.out_console()
    # The weights figure is the plan's, as in the table below (with GPUs it counts what is
    # placed on each device, e.g. a tied embedding kept on the CPU and copied for the output).
    out.print(
        f"{safe_text(name)} · {safe_text(spec.architecture)} · {spec.n_layer} layers · "
        f"trained on {spec.n_ctx_train} tokens · weights {format_bytes(est.plans[0].weights)}",
        style="bold", markup=False, soft_wrap=True,
    )
    for i, plan in enumerate(est.plans):
        out.print(_title(spec, plan), markup=False, soft_wrap=True)
        print_table(_plan_table(plan, budget), env.stdout, out)
        if checkpoint_lines[i]:
            out.print(checkpoint_lines[i], markup=False, soft_wrap=True)
        if exact_figures:
            print_table(_exact_table(plan, exact_figures[i]), env.stdout, out)
        if drafts is not None:
            out.print(f"draft model {safe_text(drafts[0])} at the same settings:", markup=False,
                      soft_wrap=True)
            print_table(_plan_table(drafts[1][i]), env.stdout, out)
            out.print(f"target + draft: {format_bytes(plan.total + drafts[1][i].total)}", style="bold",
                      markup=False, soft_wrap=True)
    if compare_table is not None:
        print_table(compare_table, env.stdout, out)
    fit_line = f"largest context for K {base.type_k.name} / V {base.type_v.name}: " + (
        "none fits" if est.largest_ctx is None else f"{est.largest_ctx} tokens"
    )
    if budget.gpu_names:
        fit_line += f" with {base.n_gpu_layers if base.n_gpu_layers >= 0 else spec.n_layer + 1} GPU layers"
        if est.fitted is not None:
            fit_line += (f"; llama.cpp --fit style: n_ctx {est.fitted.n_ctx}, "
                         f"{est.fitted.n_gpu_layers} GPU layers")
    out.print(f"{fit_line} (budget after margin: {limits})", markup=False, soft_wrap=True)


def run(model_arg: str | None, flags: dict[str, Any], *, compare: bool, vram: str | None, ram: str | None,
        margin: str | None, ubatch: int, parallel: int, swa_full: bool, exact: bool, device: list[str] | None,
        tensor_split: str | None, as_json: bool) -> None:
    """The estimate the command's options ask for, printed (see kvchat.cli.estimate)."""
    from kvchat.app.estimates import draft_estimate, exact_buffers, largest_ctx_cap
    from kvchat.app.estimates import estimate as plan_estimate
    from kvchat.settings import resolve

    if model_arg is not None and flags["model"] is not None:
        raise UsageError("give the model once: as the argument or with --model")
    ctx_text = flags["ctx"]
    contexts = parse_ctx_list(ctx_text) if ctx_text and "," in ctx_text else None
    s = resolve({**flags, "model": model_arg or flags["model"], "ctx": None if contexts else ctx_text})
    if contexts is None and s.ctx is not None:
        contexts = [s.ctx]
    env = Environment()
    devices = parse_devices(device or [])
    budget = _budget(ram, vram, margin, devices)
    split = _tensor_split(tensor_split, budget)
    est = plan_estimate(s, contexts, budget, swa_full=swa_full, n_ubatch=ubatch, n_seq=parallel,
                        allow_remote=not exact, tensor_split=split)
    if exact and devices:
        _check_exact_devices(devices, est)
    if est.remote_bytes_fetched is not None:
        env.stderr.write(f"kvchat: read {format_bytes(est.remote_bytes_fetched)} of {est.model_label} "
                         "(header only)\n")
    name = _display_name(str(s.model), est.model_label)
    record = _record(est, name)
    if devices:
        record["budget"]["devices"] = [
            {"name": d.name, "kind": "rpc" if d.is_rpc else "gpu", "size": d.size,
             "llama_cpp_buffer": d.buffer_name} for d in devices]
    for plan_record, plan in zip(record["plans"], est.plans, strict=True):
        plan_record["checkpoints"] = _checkpoints(est.spec, plan, s.checkpoints, s.checkpoint_mib)
    drafts = draft_estimate(s.draft, est, allow_remote=not exact) if s.draft is not None else None
    draft_name = None if drafts is None else _display_name(str(s.draft), drafts[0])
    if drafts is not None:
        record["draft"] = {
            "model": str(drafts[0]),
            "name": draft_name,
            "plans": [_plan_dict(p, est.budget) for p in drafts[1]],
            "total_with_target": [p.total + d.total for p, d in zip(est.plans, drafts[1], strict=True)],
        }
    compare_table = None
    if compare:
        compare_table, record["compare"] = _compare_table(est.spec, est.base,
                                                          compare_contexts(est.spec.n_ctx_train), est.budget,
                                                          largest_ctx_cap(s, est.spec))
    exact_figures = [exact_buffers(est.model_label, plan) for plan in est.plans] if exact else []
    if exact:
        record["exact"] = exact_figures
    for warning in est.warnings:
        env.warn(warning)
    limits = f"RAM {format_bytes(max(est.budget.limit(CPU), 0))}" + "".join(
        f", {gpu} {format_bytes(max(est.budget.limit(gpu), 0))}" for gpu in est.budget.gpu_names
    )
    if as_json:
        env.stdout.write(json.dumps(record) + "\n")
        env.stdout.flush()
    else:
        _render(env, est, name, limits, exact_figures, compare_table,
                [_checkpoint_line(p["checkpoints"]) for p in record["plans"]],
                None if drafts is None or draft_name is None else (draft_name, drafts[1]))
    if est.largest_ctx is None:
        raise OutOfMemoryError(
            f"{name} does not fit the budget ({limits}) at any context, even with every layer on the CPU",
            hint="give more memory (--ram/--vram with a unit, e.g. 16GiB), a smaller --margin, "
            "a smaller quant or quantized cache types",
        )
