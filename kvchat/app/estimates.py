"""Estimates: what a model will cost, from its header alone (`kvchat estimate`),
and llama.cpp's own figures for the same load (`--exact`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvchat import hardware
from kvchat.app.load import auto_context, context_cap, gpu_layers_that_fit, plan_settings
from kvchat.settings import Settings

if TYPE_CHECKING:
    from kvchat.memory import Budget, FitResult, MemoryPlan, PlanSettings
    from kvchat.model_spec import ModelSpec


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
        from kvchat.hub_remote import open_remote_file

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
    from kvchat.memory import fit, largest_ctx, plan_memory, scratch_seqs

    spec, label, fetched = read_model_spec(s.model, allow_remote=allow_remote)
    warnings: list[str] = []
    base = replace(plan_settings(s, gpu=bool(budget.gpu_names)), swa_full=swa_full, n_ubatch=n_ubatch,
                   n_seq=n_seq, gpus=budget.gpu_names, tensor_split=tensor_split or budget.split(),
                   n_outputs_max=n_seq if served_by_llama_server(budget.gpu_names) else 0,
                   # what kvchat's own load adds (one sequence: not a llama-server plan)
                   scratch_seqs=0 if n_seq > 1 or served_by_llama_server(budget.gpu_names)
                   else scratch_seqs(spec))
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
    from kvchat.speculative import check_draft_vocabulary

    spec, label, _fetched = read_model_spec(ref, allow_remote=allow_remote)
    check_draft_vocabulary(est.spec, spec, est.model_label.name, label.name)
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
