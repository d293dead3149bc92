"""`/info` and the chat banner: a backend's facts (kvchat.app.backends) as rows of text."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvchat.registry import model_name
from kvchat.ui.render import safe_text
from kvchat.units import format_bytes

if TYPE_CHECKING:
    from kvchat.app import LocalFacts, ServerFacts

# The engine's memory kinds as `kvchat show` names them.
MEMORY_LABELS = {"kv": "standard", "swa": "sliding-window", "recurrent": "recurrent", "hybrid": "hybrid"}


def local_rows(f: LocalFacts, *, kv_total: float,
               checkpoints: tuple[int, int] | None) -> list[tuple[str, str]]:
    """A model loaded here. `checkpoints`: (count, bytes) kept, where the memory needs them."""
    req = f.request
    on_gpu = (f"{f.gpu_layers[0]}/{f.gpu_layers[1]} offloaded" if f.gpu_layers
              else "none (llama.cpp built without a GPU backend)" if not f.gpu_build
              else f"none (--ngl {req.n_gpu_layers})")
    per_cell = f.bytes_per_cell or 0.0
    memory = MEMORY_LABELS.get(f.memory_kind, f.memory_kind)
    if checkpoints is not None:
        memory += f" · {checkpoints[0]} checkpoints, {format_bytes(checkpoints[1])}"
    return [
        ("model", safe_text(model_name(req.model_path))),
        ("file", str(req.model_path)),
        ("context", f"{f.n_ctx} tokens (trained on {f.n_ctx_train})"),
        ("KV cache", f"K {req.type_k.name}, V {req.type_v.name} · {format_bytes(kv_total)} "
                     f"({per_cell / 1024:.1f} KiB per cell)"),
        ("flash attention", f"{f.flash_attn} (asked: {req.flash_attn})"),
        ("memory", memory),
        ("layers", f"{f.n_layer} · on GPU: {on_gpu}"),
        ("threads", str(req.n_threads)),
    ]


def server_rows(f: ServerFacts) -> list[tuple[str, str]]:
    """A server: what it reports, and what it does not as such."""
    counts = f.counts

    def known(value: Any, fmt: str = "{}") -> str:
        return "not reported" if value is None else fmt.format(value)

    if f.total_slots is not None:  # llama-server: slots and its own timings
        slot = f.id_slot if f.id_slot is not None and f.id_slot >= 0 else "not yet chosen"
        last = ("no reply yet" if counts is None else
                f"{counts['cached_tokens']} prompt tokens from its cache, {counts['evaluated_tokens']} "
                f"evaluated, decode {counts['predicted_per_second']:.1f} tok/s (server's figure)")
        rows = [("server", f"{f.url} ({f.api}, {f.total_slots} slots; this chat on slot {slot})"),
                ("model", f.model_name),
                ("file", f.model_path or "not reported"),
                ("context", f"{f.n_ctx} tokens per slot"),
                ("last reply", last)]
    else:
        counts = counts or {}
        rows = [("server", f"{f.url} ({f.api})"),
                ("model", f.model_name),
                ("context", f"{f.n_ctx} tokens" if f.n_ctx else "not reported"),
                ("last reply", f"{known(counts.get('cached_tokens'))} prompt tokens from its prefix cache"),
                ("server KV", f"{known(counts.get('kv_cache_usage'), '{:.0%}')} in use, prefix cache hit "
                              f"rate {known(counts.get('prefix_cache_hit_rate'), '{:.0%}')}")]
    return [(key, safe_text(value)) for key, value in rows]


def speculative_line(mode: str, counters: Any) -> str:
    """The drafting mode and what it did in this process (kvchat.speculative.SpecCounters)."""
    if counters is None:
        return mode
    return (f"{mode} · {counters.accepted}/{counters.drafted} draft tokens accepted "
            f"({counters.acceptance:.0%}) in {counters.steps} steps")
