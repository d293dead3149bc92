"""KV cache types: names, ggml type ids, block geometry and validation.

Figures mirror ggml's type traits (ggml/src/ggml.c, `type_traits`).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvchat.errors import UsageError


@dataclass(frozen=True)
class CacheType:
    """One ggml tensor type usable for the K or V cache."""

    name: str
    ggml_type: int
    block_size: int
    bytes_per_block: int

    @property
    def quantized(self) -> bool:
        return self.block_size > 1

    @property
    def bytes_per_element(self) -> float:
        return self.bytes_per_block / self.block_size

    def row_bytes(self, n_elements: int) -> int:
        """Bytes of a row of `n_elements` (ggml_row_size); n must fill whole blocks."""
        if n_elements % self.block_size:
            raise UsageError(
                f"{self.name} needs rows that are a multiple of {self.block_size} "
                f"elements, got {n_elements}",
                hint="pick f16 or q8_0 for this model's head size",
            )
        return self.bytes_per_block * n_elements // self.block_size


# ggml_type ids from ggml.h (enum ggml_type).
CACHE_TYPES: dict[str, CacheType] = {
    t.name: t
    for t in (
        CacheType("f32", 0, 1, 4),
        CacheType("f16", 1, 1, 2),
        CacheType("bf16", 30, 1, 2),
        CacheType("q8_0", 8, 32, 34),
        CacheType("q4_0", 2, 32, 18),
        CacheType("q4_1", 3, 32, 20),
        CacheType("iq4_nl", 20, 32, 18),
        CacheType("q5_0", 6, 32, 22),
        CacheType("q5_1", 7, 32, 24),
    )
}


def valid_names() -> str:
    return ", ".join(CACHE_TYPES)


def parse_cache_type(name: str) -> CacheType:
    """Look a cache type up by name, case-insensitively."""
    cache_type = CACHE_TYPES.get(name.strip().lower())
    if cache_type is None:
        raise UsageError(
            f"unknown cache type '{name}'", hint=f"valid types: {valid_names()}"
        )
    return cache_type


def resolve_flash_attn(mode: str, type_v: CacheType) -> str:
    """Decide the flash-attention mode that llama.cpp is asked for.

    A quantized V cache only works with flash attention (llama.cpp refuses the
    context otherwise), so `auto` becomes `on` for it and `off` is refused before
    anything loads. Otherwise `auto` is left to llama.cpp.
    """
    mode = mode.strip().lower()
    if mode not in ("auto", "on", "off"):
        raise UsageError(f"unknown --flash-attn value '{mode}'", hint="use auto, on or off")
    if type_v.quantized:
        if mode == "off":
            raise UsageError(
                f"a {type_v.name} V cache needs flash attention, but --flash-attn is off",
                hint="use --flash-attn auto/on, or --cache-type-v f16",
            )
        return "on"
    return mode


def flash_attn_enabled(mode: str, type_v: CacheType, *, gpu: bool) -> bool | None:
    """Whether flash attention runs, for a mode already checked by resolve_flash_attn.

    `auto` without a GPU is off: on the CPU, llama.cpp's flash-attention path made
    prompt chunks and decoding slower as the context grew (measured on SmolLM2,
    2 threads: 32 tokens at depth 2048 took 415-496 ms with it, 232 ms without;
    decoding at depth 2048 ran 35-41 tok/s with it, 48-53 without). With a GPU,
    `auto` is left to llama.cpp (None), which enables it where kernels exist.
    """
    if mode == "on" or type_v.quantized:
        return True
    if mode == "off":
        return False
    return None if gpu else False


# Stock CUDA builds have fused flash-attention kernels only for these K = V types
# (ggml-cuda/fattn.cu); other pairs silently run attention on the CPU.
GPU_FUSED_FA_TYPES = frozenset({"f16", "q8_0", "q4_0", "bf16"})


def gpu_fused_fa_pair(type_k: CacheType, type_v: CacheType) -> bool:
    """Whether a K/V pair has a fused flash-attention kernel on NVIDIA GPUs."""
    return type_k == type_v and type_k.name in GPU_FUSED_FA_TYPES


def fused_kernel_warning(type_k: CacheType, type_v: CacheType) -> str | None:
    """The one wording of the warning for a K/V pair without a fused GPU kernel."""
    if gpu_fused_fa_pair(type_k, type_v):
        return None
    return (f"K {type_k.name} / V {type_v.name} has no fused GPU flash-attention kernel in stock "
            "builds: attention may run on the CPU, prefill 8-30x slower; same-type f16, q8_0, q4_0 "
            "or bf16 pairs avoid it")
