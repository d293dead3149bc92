"""The memory planner against llama.cpp's own figures and against hand computation."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from kvchat.cache_types import CACHE_TYPES
from kvchat.errors import UsageError
from kvchat.memory import (
    Budget,
    MiB,
    PlanSettings,
    fit,
    fit_gpu_layers,
    largest_ctx,
    parse_size,
    plan_memory,
    round_ctx,
)
from kvchat.model_spec import ModelSpec, read_spec
from tests.synthetic import write_gguf

F16, Q8, Q4 = CACHE_TYPES["f16"], CACHE_TYPES["q8_0"], CACHE_TYPES["q4_0"]

# (K, V, flash attention): a quantized V needs flash attention
TYPE_GRID = [(F16, F16, False), (F16, F16, True), (Q8, F16, False), (Q8, Q8, True), (Q4, Q4, True)]
CTX_GRID = [512, 4096]


def _mib(n: int) -> str:
    """The figure as llama.cpp prints it: MiB with two decimals."""
    return f"{n / MiB:.2f}"


@pytest.fixture(scope="module")
def spec(model_path: Path) -> ModelSpec:
    return read_spec(str(model_path))


@pytest.fixture(scope="module")
def ground_truth(model_path: Path) -> dict[tuple, dict[str, str | int]]:
    """Load the real model through the engine once per grid point; keep llama.cpp's figures."""
    from kvchat.engine import Engine, EngineSettings

    out = {}
    for n_ctx in CTX_GRID:
        for type_k, type_v, fa in TYPE_GRID:
            settings = EngineSettings(n_ctx=n_ctx, type_k=type_k, type_v=type_v,
                                      flash_attn="on" if fa else "off", n_gpu_layers=0, n_threads=1)
            with Engine(model_path, settings) as engine:
                log = "\n".join(engine.load_log)
                b = engine.buffers
                summary = re.search(r"K \(\w+\):\s*([\d.]+) MiB, V \(\w+\):\s*([\d.]+) MiB", log)
                output = re.search(r"output buffer size =\s*([\d.]+) MiB", log)
                assert summary and output, log
                out[(n_ctx, type_k.name, type_v.name, fa)] = {
                    "k": summary[1],
                    "v": summary[2],
                    "kv": re.search(r"KV buffer size =\s*([\d.]+) MiB", log)[1],
                    "cells": b.kv_cells,
                    "total": sum(b.model.values()) + sum(b.kv.values()) + sum(b.compute.values())
                    + round(float(output[1]) * MiB),
                }
    return out


@pytest.mark.parametrize("n_ctx", CTX_GRID)
@pytest.mark.parametrize(("type_k", "type_v", "fa"), TYPE_GRID, ids=lambda x: getattr(x, "name", str(x)))
def test_kv_matches_llama_cpp_exactly(spec: ModelSpec, ground_truth: dict, n_ctx: int, type_k, type_v,
                                      fa: bool) -> None:  # noqa: ANN001
    truth = ground_truth[(n_ctx, type_k.name, type_v.name, fa)]
    plan = plan_memory(spec, PlanSettings(n_ctx=n_ctx, type_k=type_k, type_v=type_v, flash_attn=fa))
    assert plan.kv_cells == truth["cells"]
    assert (_mib(plan.k), _mib(plan.v), _mib(plan.kv)) == (truth["k"], truth["v"], truth["kv"])


@pytest.mark.parametrize("n_ctx", CTX_GRID)
@pytest.mark.parametrize(("type_k", "type_v", "fa"), TYPE_GRID, ids=lambda x: getattr(x, "name", str(x)))
def test_total_within_five_percent(spec: ModelSpec, ground_truth: dict, n_ctx: int, type_k, type_v,
                                   fa: bool) -> None:  # noqa: ANN001
    truth = ground_truth[(n_ctx, type_k.name, type_v.name, fa)]
    plan = plan_memory(spec, PlanSettings(n_ctx=n_ctx, type_k=type_k, type_v=type_v, flash_attn=fa))
    assert abs(plan.total - truth["total"]) / truth["total"] < 0.05


def test_ctx_rounding() -> None:
    assert round_ctx(1000, 8192) == (1024, 1024)
    assert round_ctx(0, 8192) == (8192, 8192)  # 0: the training context
    assert round_ctx(4096, 8192, n_seq=3) == (4608, 1536)  # PAD(4096/3, 256) per sequence
    assert round_ctx(4096, 8192, n_seq=3, kv_unified=True) == (4096, 4096)


def test_quantized_v_without_flash_attention_is_refused(spec: ModelSpec) -> None:
    with pytest.raises(UsageError, match="flash attention"):
        plan_memory(spec, PlanSettings(type_v=Q8, flash_attn=False))


# -- synthetic architectures, computed by hand ------------------------------------------

ATTN = {"context_length": 131072, "embedding_length": 256, "attention.head_count": 4}


def _spec(tmp_path: Path, arch: str, kv: dict, n_layer: int) -> ModelSpec:
    return read_spec(str(write_gguf(tmp_path / f"{arch}.gguf", arch, kv, n_layer=n_layer)))


def test_swa_cache(tmp_path: Path) -> None:
    # gemma3, 12 layers: 10 SWA (window 512) + 2 global, 2 KV heads of 64 -> 128 values per cell
    kv = {**ATTN, "attention.head_count_kv": 2, "attention.sliding_window": 512}
    spec = _spec(tmp_path, "gemma3", kv, 12)
    plan = plan_memory(spec, PlanSettings(n_ctx=8192, flash_attn=True))
    assert (plan.kv_cells, plan.swa_cells) == (8192, 1024)  # PAD(min(8192, 512 + 512), 256)
    row = 128 * 2  # f16
    assert plan.k == 2 * row * 8192 + 10 * row * 1024 == plan.v
    full = plan_memory(spec, PlanSettings(n_ctx=8192, flash_attn=True, swa_full=True))
    assert full.k == 12 * row * 8192
    # a window larger than the context: the SWA cache is the context
    small = plan_memory(spec, PlanSettings(n_ctx=600, flash_attn=True))
    assert small.swa_cells == small.kv_cells == 768
    # a smaller micro-batch shrinks the SWA cache: PAD(512 + 128, 256)
    assert plan_memory(spec, PlanSettings(n_ctx=8192, n_ubatch=128)).swa_cells == 768


def test_mla_cache_has_no_v(tmp_path: Path) -> None:
    kv = {**ATTN, "attention.head_count_kv": 1, "attention.key_length": 576, "attention.value_length": 512,
          "attention.key_length_mla": 192, "attention.value_length_mla": 128, "attention.kv_lora_rank": 512}
    spec = _spec(tmp_path, "deepseek2", kv, 4)
    plan = plan_memory(spec, PlanSettings(n_ctx=4096))
    assert plan.k == 4 * 576 * 2 * 4096 and plan.v == 0
    q8 = plan_memory(spec, PlanSettings(n_ctx=4096, type_k=Q8))
    assert q8.k == 4 * (576 // 32 * 34) * 4096


def test_recurrent_state_ignores_context_and_types(tmp_path: Path) -> None:
    kv = {"context_length": 1048576, "embedding_length": 256, "ssm.conv_kernel": 4, "ssm.inner_size": 512,
          "ssm.state_size": 16, "ssm.time_step_rank": 16}
    spec = _spec(tmp_path, "mamba", kv, 4)
    state = 4 * 4 * (3 * 512 + 16 * 512)  # layers * f32 * (conv + ssm)
    for n_ctx, type_k in ((512, F16), (65536, Q4)):
        plan = plan_memory(spec, PlanSettings(n_ctx=n_ctx, type_k=type_k))
        assert plan.recurrent == state and plan.kv == 0
    assert plan_memory(spec, PlanSettings(n_seq=3)).recurrent == 3 * state


def test_hybrid_cache(tmp_path: Path) -> None:
    kv = {**ATTN, "attention.head_count_kv": [0, 0, 0, 2, 0, 0, 0, 2], "ssm.conv_kernel": 4,
          "ssm.inner_size": 512, "ssm.state_size": 16, "ssm.time_step_rank": 16}
    spec = _spec(tmp_path, "jamba", kv, 8)
    plan = plan_memory(spec, PlanSettings(n_ctx=4096))
    assert plan.k == plan.v == 2 * 128 * 2 * 4096  # two attention layers
    assert plan.recurrent == 6 * 4 * (3 * 512 + 16 * 512)  # six Mamba layers


def test_per_layer_heads_pad_v_without_flash_attention(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "llama", {**ATTN, "attention.head_count_kv": [1, 4, 2, 4]}, 4)
    fa = plan_memory(spec, PlanSettings(n_ctx=1024, flash_attn=True))
    assert fa.k == fa.v == (1 + 4 + 2 + 4) * 64 * 2 * 1024
    no_fa = plan_memory(spec, PlanSettings(n_ctx=1024, flash_attn=False))
    assert no_fa.k == fa.k
    assert no_fa.v == 4 * (4 * 64) * 2 * 1024  # every layer padded to the widest V row


def test_parallel_sequences(spec: ModelSpec) -> None:
    one = plan_memory(spec, PlanSettings(n_ctx=4096))
    three = plan_memory(spec, PlanSettings(n_ctx=4096, n_seq=3))
    assert (three.n_ctx, three.kv_cells, three.n_stream) == (4608, 1536, 3)
    assert three.kv == one.kv // 4096 * 4608
    assert three.output == 3 * one.output


# -- placement ---------------------------------------------------------------------


def test_gpu_placement(spec: ModelSpec) -> None:
    """llama_model::load_tensors: the output layer counts as layer n_layer, so --ngl N puts the
    output head and the last N-1 blocks on the GPU; the embeddings never leave the CPU."""
    gpu = ("CUDA0",)
    partial = plan_memory(spec, PlanSettings(n_ctx=4096, gpus=gpu, n_gpu_layers=10))
    cpu, cuda = partial.cpu, partial.device("CUDA0")
    per_layer_kv = spec.n_embd_k_gqa(0) * 2 * 4096
    assert cuda.k == 9 * per_layer_kv and cpu.k == 21 * per_layer_kv  # blocks 21..29
    assert partial.output_on_gpu
    assert cuda.weights == sum(spec.layer_bytes[21:]) + spec.output_bytes + spec.tied_output_bytes
    assert cpu.weights == spec.input_bytes + sum(spec.layer_bytes[:21])
    zero = plan_memory(spec, PlanSettings(gpus=gpu, n_gpu_layers=0))
    assert zero.device("CUDA0").total == 0 and not zero.output_on_gpu
    full = plan_memory(spec, PlanSettings(n_ctx=4096, gpus=gpu, n_gpu_layers=-1))
    assert full.output_on_gpu and full.n_gpu_layers == 31
    assert full.cpu.weights == spec.input_bytes  # embeddings stay on the CPU
    # the tied output head is a copy of token_embd on the GPU
    assert full.device("CUDA0").weights == sum(spec.layer_bytes) + spec.output_bytes + spec.tied_output_bytes
    thirty = plan_memory(spec, PlanSettings(gpus=gpu, n_gpu_layers=30))
    assert thirty.output_on_gpu and thirty.cpu.k == per_layer_kv  # block 0 stays on the CPU
    no_offload = plan_memory(spec, PlanSettings(gpus=gpu, offload_kqv=False))
    assert no_offload.device("CUDA0").kv == 0
    two = plan_memory(spec, PlanSettings(gpus=("CUDA0", "CUDA1"), tensor_split=(1, 3)))
    assert two.device("CUDA0").k * 3 < two.device("CUDA1").k * 1.2


# -- fitting -----------------------------------------------------------------------


def test_largest_ctx(spec: ModelSpec) -> None:
    settings = PlanSettings()
    at_2048 = plan_memory(spec, replace(settings, n_ctx=2048)).total
    budget = Budget(ram=at_2048 + 1000, margin=0)
    assert largest_ctx(spec, settings, budget) == 2048
    assert largest_ctx(spec, settings, Budget(ram=10**12, margin=0)) == spec.n_ctx_train
    assert largest_ctx(spec, settings, Budget(ram=MiB, margin=0)) is None
    # smaller cache types fit more context in the same memory
    assert largest_ctx(spec, replace(settings, type_k=Q4, type_v=Q4), budget) > 2048


def test_fit_gpu_layers_and_fit(spec: ModelSpec) -> None:
    settings = PlanSettings(n_ctx=4096, gpus=("CUDA0",))
    ten = plan_memory(spec, replace(settings, n_gpu_layers=10)).device("CUDA0").total
    budget = Budget(ram=10**12, vram=(ten + 1000,), gpu_names=("CUDA0",), margin=0)
    assert fit_gpu_layers(spec, settings, budget) == 10
    result = fit(spec, settings, budget)
    assert result is not None and result.n_gpu_layers == 10 and result.n_ctx == 4096
    roomy = Budget(ram=10**12, vram=(10**12,), gpu_names=("CUDA0",), margin=0)
    result = fit(spec, settings, roomy)
    assert result is not None and (result.n_ctx, result.n_gpu_layers) == (spec.n_ctx_train, 31)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8GB", 8 * 1024**3), ("6.5GiB", int(6.5 * 1024**3)), ("512MiB", 512 * MiB), ("512M", 512 * MiB),
     ("1024B", 1024), ("0", 0), (" 2 gb ", 2 * 1024**3), ("1.5T", int(1.5 * 1024**4)), ("64kb", 65536)],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "8XB", "-1GB", "eight gigs", "1.2.3GB", "8", "1024", "0.5"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


def test_a_bare_number_says_which_units_to_use() -> None:
    with pytest.raises(UsageError) as caught:
        parse_size("8")
    assert "no unit" in str(caught.value) and "8GiB" in str(caught.value)
