"""A stand-in engine whose sequence state has llama.cpp's byte layout (kvchat.kv_state).

Each cell's K row is (token, position) and its transposed V holds two f16-sized
elements per cell derived from the token, so a restored state tells exactly which
tokens it holds. Used for the prefix cache's storage tests (eviction, corruption,
processes racing), which are about files, not about llama.cpp's numbers; the
real model checks that llama.cpp's own states cut, join and resume exactly.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from kvchat import kv_state

N_LAYER = 2
N_EMBD_V = 3


class FakeKvEngine:
    def __init__(self) -> None:
        self.cells: list[int] = []
        self.evaluated = 0  # tokens evaluated (not restored), over the engine's life
        self.n_past = 0

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
        n = len(self.cells)
        out = [struct.pack("<Ii", 0xDEADBEEF, 0), struct.pack("<II", 1, n)]
        out += [struct.pack("<iIi", pos, 1, 0) for pos in range(n)]
        out.append(struct.pack("<II", 1, N_LAYER))
        for layer in range(N_LAYER):
            out.append(struct.pack("<iQ", 1, 8))
            out += [struct.pack("<ii", tok + layer, pos) for pos, tok in enumerate(self.cells)]
        for layer in range(N_LAYER):
            out.append(struct.pack("<iII", 1, 2, N_EMBD_V))
            for j in range(N_EMBD_V):
                out += [struct.pack("<H", (tok * 7 + j + layer) & 0xFFFF) for tok in self.cells]
        return b"".join(out)

    def load_state_bytes(self, data: bytes, n_tokens: int) -> None:
        state = kv_state.parse(data)
        (part,) = state.parts
        assert part.positions == tuple(range(n_tokens))
        k0 = part.k_layers[0]
        cells = [struct.unpack_from("<ii", part.blob, k0.offset + 8 * i)[0] for i in range(n_tokens)]
        self.cells = cells
        self.n_past = n_tokens
        # The whole state must be what evaluating those tokens would have written.
        assert data == self.state_bytes(), "restored state differs from an evaluated one"
