"""ModelSpec from GGUF metadata: the real model and synthetic architectures."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvchat.errors import ModelFormatError
from kvchat.gguf import read_header_file
from kvchat.model_spec import ModelSpec, read_spec, spec_from_header
from tests.synthetic import write_gguf

ATTN = {"context_length": 8192, "embedding_length": 256, "attention.head_count": 4}


def spec_of(tmp_path: Path, arch: str, kv: dict, n_layer: int, **kw) -> ModelSpec:  # noqa: ANN003
    return read_spec(str(write_gguf(tmp_path / f"{arch}.gguf", arch, kv, n_layer=n_layer, **kw)))


def test_real_model(model_path: Path) -> None:
    spec = read_spec(str(model_path))
    assert spec.architecture == "llama"
    assert (spec.n_layer, spec.n_embd, spec.n_vocab, spec.n_ctx_train) == (30, 576, 49152, 8192)
    assert set(spec.n_head) == {9} and set(spec.n_head_kv) == {3}
    assert set(spec.head_dim_k) == {64} and set(spec.head_dim_v) == {64}
    assert all(spec.has_kv) and not any(spec.is_swa) and not any(spec.is_recurrent) and not spec.is_mla
    assert spec.output_is_tied  # SmolLM2 has no output.weight
    header = read_header_file(model_path)
    assert spec.weights_bytes == header.tensor_bytes()
    assert spec.input_bytes == header.tensors[0].n_bytes  # token_embd


def test_defaults_head_sizes_and_kv_heads(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, "llama", ATTN, 2)
    assert spec.n_head_kv == (4, 4)  # head_count_kv defaults to head_count
    assert spec.head_dim_k == (64, 64)  # embedding_length / head_count


def test_per_layer_kv_heads(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, "llama", {**ATTN, "attention.head_count_kv": [2, 4, 0, 1]}, 4)
    assert spec.n_head_kv == (2, 4, 0, 1)
    assert spec.has_kv == (True, True, False, True)
    assert spec.n_embd_v_gqa_max() == 256


def test_array_length_must_match_layers(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="entries"):
        spec_of(tmp_path, "llama", {**ATTN, "attention.head_count_kv": [2, 4]}, 4)


def test_missing_required_key(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="embedding_length"):
        spec_of(tmp_path, "llama", {"context_length": 4096}, 2)


@pytest.mark.parametrize(
    ("arch", "extra", "n_layer", "expected_swa"),
    [
        ("gemma3", {"attention.sliding_window": 512}, 12, [il % 6 < 5 for il in range(12)]),
        ("gemma3", {}, 12, [False] * 12),  # no window: plain attention
        ("gemma2", {"attention.sliding_window": 4096}, 4, [True, False, True, False]),
        ("cohere2", {"attention.sliding_window": 4096}, 8, [il % 4 < 3 for il in range(8)]),
        ("gpt-oss", {"attention.sliding_window": 128}, 4, [True, False, True, False]),
        ("gemma3", {"attention.sliding_window": 512, "attention.sliding_window_pattern": 3}, 6,
         [True, True, False, True, True, False]),
        ("gemma3", {"attention.sliding_window": 512,
                    "attention.sliding_window_pattern": [True, False, False, True]}, 4,
         [True, False, False, True]),
    ],
)
def test_sliding_window_layers(tmp_path: Path, arch: str, extra: dict, n_layer: int,
                               expected_swa: list[bool]) -> None:
    spec = spec_of(tmp_path, arch, {**ATTN, **extra}, n_layer)
    assert list(spec.is_swa) == expected_swa
    if any(expected_swa):
        assert spec.n_swa == extra["attention.sliding_window"]


def test_gemma2_default_window(tmp_path: Path) -> None:
    assert spec_of(tmp_path, "gemma2", ATTN, 2).n_swa == 4096


def test_swa_head_sizes(tmp_path: Path) -> None:
    kv = {**ATTN, "attention.sliding_window": 512, "attention.key_length": 128, "attention.value_length": 128,
          "attention.key_length_swa": 64, "attention.value_length_swa": 32}
    spec = spec_of(tmp_path, "gemma3", kv, 6)
    assert spec.head_dim_k == (64, 64, 64, 64, 64, 128)
    assert spec.head_dim_v == (32, 32, 32, 32, 32, 128)


def test_mla(tmp_path: Path) -> None:
    kv = {"context_length": 163840, "embedding_length": 2048, "attention.head_count": 16,
          "attention.head_count_kv": 1, "attention.key_length": 576, "attention.value_length": 512,
          "attention.key_length_mla": 192, "attention.value_length_mla": 128, "attention.kv_lora_rank": 512,
          "rope.dimension_count": 64}
    spec = spec_of(tmp_path, "deepseek2", kv, 4)
    assert spec.is_mla and spec.n_embd_k_gqa(0) == 576


def test_mamba_state(tmp_path: Path) -> None:
    kv = {"context_length": 1048576, "embedding_length": 256, "ssm.conv_kernel": 4, "ssm.inner_size": 512,
          "ssm.state_size": 16, "ssm.time_step_rank": 16}
    spec = spec_of(tmp_path, "mamba", kv, 4)
    assert all(spec.is_recurrent) and not any(spec.has_kv)
    assert (spec.n_embd_r, spec.n_embd_s) == (3 * 512, 16 * 512)


def test_mamba2_groups(tmp_path: Path) -> None:
    kv = {"context_length": 4096, "embedding_length": 256, "ssm.conv_kernel": 4, "ssm.inner_size": 512,
          "ssm.state_size": 128, "ssm.group_count": 2, "ssm.time_step_rank": 8}
    spec = spec_of(tmp_path, "mamba2", kv, 2)
    assert (spec.n_embd_r, spec.n_embd_s) == (3 * (512 + 2 * 2 * 128), 128 * 512)


def test_rwkv_state(tmp_path: Path) -> None:
    kv = {"context_length": 4096, "embedding_length": 256, "wkv.head_size": 64}
    spec = spec_of(tmp_path, "rwkv7", kv, 2)
    assert (spec.n_embd_r, spec.n_embd_s) == (2 * 256, 256 * 64)


def test_jamba_hybrid_layers(tmp_path: Path) -> None:
    kv = {**ATTN, "attention.head_count_kv": [0, 0, 0, 2, 0, 0, 0, 2], "ssm.conv_kernel": 4,
          "ssm.inner_size": 512, "ssm.state_size": 16, "ssm.time_step_rank": 16}
    spec = spec_of(tmp_path, "jamba", kv, 8)
    assert spec.is_hybrid
    assert spec.has_kv == tuple(il % 4 == 3 for il in range(8))
    assert spec.is_recurrent == tuple(il % 4 != 3 for il in range(8))


def test_qwen3next_interval(tmp_path: Path) -> None:
    kv = {**ATTN, "attention.head_count_kv": 2, "full_attention_interval": 4, "ssm.conv_kernel": 4,
          "ssm.inner_size": 512, "ssm.state_size": 128, "ssm.group_count": 16, "ssm.time_step_rank": 32}
    spec = spec_of(tmp_path, "qwen3next", kv, 8)
    assert spec.has_kv == tuple((il + 1) % 4 == 0 for il in range(8))


def test_gemma3n_layers_without_kv(tmp_path: Path) -> None:
    kv = {**ATTN, "attention.sliding_window": 512}
    spec = spec_of(tmp_path, "gemma3n", kv, 30)
    assert spec.has_kv == tuple(il < 20 for il in range(30))


def test_encoder_has_no_kv(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, "bert", ATTN, 2)
    assert not spec.has_memory and not any(spec.has_kv)


def test_vocab_from_tokens_and_tied_output(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "t.gguf", "llama", {**ATTN, "tokenizer.ggml.tokens": ["a", "b", "c"]},
                      n_layer=2, tied=True)
    header = read_header_file(path)
    del header.metadata["llama.vocab_size"]
    spec = spec_from_header(header)
    assert spec.n_vocab == 3 and spec.output_is_tied
    assert spec.layer_bytes == (32 * 4, 64 * 4)
