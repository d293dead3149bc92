"""The context llama.cpp creates for a model: kvchat's settings, and llama.cpp's
context parameters made from them, each chosen deliberately."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import llama_cpp.llama_cpp as llama

from kvchat.cache_types import CacheType

_FLASH_ATTN = {
    "auto": llama.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


@dataclass(frozen=True)
class EngineSettings:
    """Everything that shapes the context llama.cpp creates."""

    n_ctx: int
    type_k: CacheType
    type_v: CacheType
    flash_attn: str = "auto"
    n_gpu_layers: int = -1
    n_threads: int = 1
    n_batch: int = 512
    n_ubatch: int = 512
    swa_full: bool = False
    verbose: bool = False
    tensor_split: tuple[float, ...] = ()  # share of layers per GPU, in llama.cpp's device order


def context_params(settings: EngineSettings, flash_attn: str, scratch_sequence: bool) -> Any:
    """llama_context_params for `settings`, flash attention as decided (on/off/auto).

    `scratch_sequence`: a second sequence in one unified stream, through which a turn's
    new cells are read (kvchat.engine.seq_state). With kv_unified off, llama.cpp would
    split the cells into n_seq_max streams of n_ctx / n_seq_max each (llama_context:
    n_ctx_seq), halving seq 0's context.
    """
    cparams = llama.llama_context_default_params()
    cparams.n_ctx = settings.n_ctx
    # A batch larger than the context trips GGML_ASSERT(n_tokens_all <= n_batch)
    # inside llama.cpp once it caps n_batch at n_ctx: cap both here.
    cparams.n_batch = min(settings.n_batch, settings.n_ctx)
    cparams.n_ubatch = min(settings.n_ubatch, cparams.n_batch)
    cparams.n_seq_max = 2 if scratch_sequence else 1
    cparams.kv_unified = scratch_sequence
    cparams.n_threads = cparams.n_threads_batch = settings.n_threads
    cparams.flash_attn_type = _FLASH_ATTN[flash_attn]
    cparams.type_k, cparams.type_v = settings.type_k.ggml_type, settings.type_v.ggml_type
    cparams.swa_full = settings.swa_full
    cparams.no_perf = False
    return cparams
