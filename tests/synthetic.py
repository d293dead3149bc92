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
