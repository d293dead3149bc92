"""Synthetic GGUF files for architectures we cannot download (SWA, MLA, recurrent,
hybrid, per-layer arrays), written with the `gguf` package's GGUFWriter.

Tensors are tiny f32 placeholders: the planner reads their sizes, never their data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFEndian, GGUFWriter


def write_gguf(
    path: Path,
    arch: str,
    kv: dict[str, Any],
    *,
    n_layer: int,
    tensor_elems: int = 32,
    vocab: int = 64,
    tied: bool = False,
    big_endian: bool = False,
) -> Path:
    """A GGUF with `{arch}.<key>` metadata from `kv` (keys without a dot prefix get
    the arch prefix), a token_embd, one tensor per block and an output head."""
    endian = GGUFEndian.BIG if big_endian else GGUFEndian.LITTLE
    writer = GGUFWriter(str(path), arch, endianess=endian)
    writer.add_uint32(f"{arch}.block_count", n_layer)
    writer.add_uint32(f"{arch}.vocab_size", vocab)
    for key, value in kv.items():
        full = key if key.startswith(("general.", "tokenizer.")) else f"{arch}.{key}"
        if isinstance(value, bool):
            writer.add_bool(full, value)
        elif isinstance(value, int):
            writer.add_uint32(full, value)
        elif isinstance(value, float):
            writer.add_float32(full, value)
        elif isinstance(value, str):
            writer.add_string(full, value)
        else:
            writer.add_array(full, list(value))
    writer.add_tensor("token_embd.weight", np.zeros((vocab, 16), dtype=np.float32))
    for il in range(n_layer):
        writer.add_tensor(f"blk.{il}.attn_norm.weight", np.zeros(tensor_elems * (il + 1), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.zeros(16, dtype=np.float32))
    if not tied:
        writer.add_tensor("output.weight", np.zeros((vocab, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_hybrid(path: Path, *, seed: int = 0, n_embd: int = 64, n_ff: int = 128,
                      layers: tuple[str, ...] = ("conv", "attn", "conv", "attn")) -> Path:
    """A tiny random-weight LFM2 GGUF (hybrid memory: short-convolution layers with a
    recurrent state, plus attention layers) that llama.cpp really loads and runs.

    The tensors are those llama_model_lfm2::load_arch_tensors asks for
    (src/models/lfm2.cpp); a layer is recurrent where its head_count_kv is 0. The
    vocabulary is a SentencePiece one with byte fallback and ChatML control
    tokens, so text (and a ChatML template) tokenizes. The weights make nonsense;
    the memory code paths are llama.cpp's own.
    """
    arch = "lfm2"
    rng = np.random.default_rng(seed)
    n_head, head_dim, n_head_kv, l_cache = 4, n_embd // 4, 2, 3
    pieces = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types = [2, 3, 3, 3, 3]  # UNKNOWN, CONTROL...
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256  # BYTE
    words = ["\u2581", *"abcdefghijklmnopqrstuvwxyz", "\u2581the", "\u2581a", "er", "in", "on"]
    pieces += words
    types += [1] * len(words)  # NORMAL
    n_vocab = len(pieces)
    scores = [0.0] * 5 + [0.0] * 256 + [-float(i) for i in range(len(words))]

    writer = GGUFWriter(str(path), arch)
    writer.add_uint32(f"{arch}.block_count", len(layers))
    writer.add_uint32(f"{arch}.context_length", 4096)
    writer.add_uint32(f"{arch}.embedding_length", n_embd)
    writer.add_uint32(f"{arch}.feed_forward_length", n_ff)
    writer.add_uint32(f"{arch}.attention.head_count", n_head)
    head_count_kv = [n_head_kv if kind == "attn" else 0 for kind in layers]
    writer.add_array(f"{arch}.attention.head_count_kv", head_count_kv)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_float32(f"{arch}.rope.freq_base", 10000.0)
    writer.add_uint32(f"{arch}.shortconv.l_cache", l_cache)
    writer.add_uint32(f"{arch}.vocab_size", n_vocab)
    writer.add_string("general.name", "tiny-random-lfm2")
    writer.add_string("tokenizer.ggml.model", "llama")
    writer.add_array("tokenizer.ggml.tokens", pieces)
    writer.add_array("tokenizer.ggml.scores", scores)
    writer.add_array("tokenizer.ggml.token_type", types)
    writer.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    writer.add_uint32("tokenizer.ggml.bos_token_id", 1)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 4)
    writer.add_bool("tokenizer.ggml.add_bos_token", False)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5 / np.sqrt(shape[-1])).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    # numpy shapes are ggml's ne reversed: {n_embd, n_vocab} is (n_vocab, n_embd).
    writer.add_tensor("token_embd.weight", weight(n_vocab, n_embd))
    writer.add_tensor("token_embd_norm.weight", ones(n_embd))
    for il, kind in enumerate(layers):
        blk = f"blk.{il}"
        writer.add_tensor(f"{blk}.attn_norm.weight", ones(n_embd))
        writer.add_tensor(f"{blk}.ffn_norm.weight", ones(n_embd))
        writer.add_tensor(f"{blk}.ffn_gate.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"{blk}.ffn_up.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"{blk}.ffn_down.weight", weight(n_embd, n_ff))
        if kind == "attn":
            writer.add_tensor(f"{blk}.attn_q_norm.weight", ones(head_dim))
            writer.add_tensor(f"{blk}.attn_k_norm.weight", ones(head_dim))
            writer.add_tensor(f"{blk}.attn_q.weight", weight(n_embd, n_embd))
            writer.add_tensor(f"{blk}.attn_k.weight", weight(n_head_kv * head_dim, n_embd))
            writer.add_tensor(f"{blk}.attn_v.weight", weight(n_head_kv * head_dim, n_embd))
            writer.add_tensor(f"{blk}.attn_output.weight", weight(n_embd, n_embd))
        else:
            writer.add_tensor(f"{blk}.shortconv.conv.weight", weight(n_embd, l_cache))
            writer.add_tensor(f"{blk}.shortconv.in_proj.weight", weight(3 * n_embd, n_embd))
            writer.add_tensor(f"{blk}.shortconv.out_proj.weight", weight(n_embd, n_embd))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
