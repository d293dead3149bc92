"""A stand-in engine whose sequence state has llama.cpp's byte layout (kvchat.kv_state).

Each cell's K row is (token, position) and its transposed V holds two f16-sized
elements per cell derived from the token, so a restored state tells exactly which
tokens it holds. Used for the prefix cache's and the KV store's storage tests
(eviction, corruption, processes racing), which are about files, not about
llama.cpp's numbers; the real model checks that llama.cpp's own states cut, join
and resume exactly.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from kvchat import kv_state

N_LAYER = 2
N_EMBD_V = 3


def _state(cells: Sequence[int], start: int, pad: int = 0) -> bytes:
    """The sequence state of `cells` at positions start, start + 1, ...; `pad` zero
    bytes after each K row give cells a real model's size."""
    n = len(cells)
    fill = bytes(pad)
    out = [struct.pack("<Ii", 0xDEADBEEF, 0), struct.pack("<II", 1, n)]
    out += [struct.pack("<iIi", start + i, 1, 0) for i in range(n)]
    out.append(struct.pack("<II", 1, N_LAYER))
    for layer in range(N_LAYER):
        out.append(struct.pack("<iQ", 1, 8 + pad))
        out += [struct.pack("<ii", tok + layer, start + i) + fill for i, tok in enumerate(cells)]
    for layer in range(N_LAYER):
        out.append(struct.pack("<iII", 1, 2, N_EMBD_V))
        for j in range(N_EMBD_V):
            out += [struct.pack("<H", (tok * 7 + j + layer) & 0xFFFF) for tok in cells]
    return b"".join(out)


def _cells(data: bytes, start: int, end: int) -> list[int]:
    (part,) = kv_state.parse(data).parts
    assert part.positions == tuple(range(start, end)), "cells hold other positions"
    k0 = part.k_layers[0]
    return [struct.unpack_from("<ii", part.blob, k0.offset + k0.row_bytes * i)[0] for i in range(end - start)]


class FakeKvEngine:
    def __init__(self, *, ranges: bool = True, pad: int = 0) -> None:
        self.cells: list[int] = []
        self.evaluated = 0  # tokens evaluated (not restored), over the engine's life
        self.n_past = 0
        self.can_save_ranges = ranges  # False: like a sliding-window model, saved whole
        self.range_reads = 0  # cells read by state_range_bytes, over the engine's life
        self.pad = pad

    def eval(self, tokens: Sequence[int], progress: Callable[[int, int], None] | None = None) -> None:
        self.cells.extend(tokens)
        self.evaluated += len(tokens)
        self.n_past = len(self.cells)
        if progress is not None:
            progress(len(tokens), len(tokens))

    def kv_clear(self) -> None:
        self.cells = []
        self.n_past = 0

    def state_bytes(self) -> bytes:
        return _state(self.cells, 0, self.pad)

    def state_range_bytes(self, start: int, end: int) -> bytes:
        assert self.can_save_ranges and 0 <= start < end <= len(self.cells)
        self.range_reads += end - start
        return _state(self.cells[start:end], start, self.pad)

    def load_state_bytes(self, data: bytes, n_tokens: int) -> None:
        self.cells = _cells(data, 0, n_tokens)
        self.n_past = n_tokens
        # The whole state must be what evaluating those tokens would have written.
        assert data == self.state_bytes(), "restored state differs from an evaluated one"

    def load_state_range(self, data: bytes, start: int, end: int) -> None:
        assert start == len(self.cells), "a range must follow the cells held"
        cells = _cells(data, start, end)
        assert data == _state(cells, start, self.pad), "restored range differs from an evaluated one"
        self.cells.extend(cells)
        self.n_past = end
