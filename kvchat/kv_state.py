"""llama.cpp's sequence-state bytes, read well enough to cut and join them by position.

`llama_state_seq_get_data` (llama-context.cpp, `state_seq_get_data`) writes a u32
magic and the i32 sequence id, then each KV cache of the context in turn
(`llama_kv_cache::state_write`, llama-kv-cache.cpp): one for a plain model, two
for a sliding-window model (the full-attention layers, then the window layers;
llama-kv-cache-iswa.cpp). Each cache ("part" here) is, little-endian:

    u32 n_stream (1: kvchat uses one sequence)
    u32 cell_count
    cell_count x (i32 pos, u32 n_seq_id = 1, i32 seq_id)
    u32 v_trans, u32 n_layer
    n_layer x (i32 k_type, u64 k_row_bytes, cell_count rows)
    v_trans == 0: n_layer x (i32 v_type, u64 v_row_bytes, cell_count rows)
    v_trans == 1: n_layer x (i32 v_type, u32 elem_bytes, u32 n_embd_v, n_embd_v rows of
                              cell_count elements)

A part whose cells hold positions 0..n-1 in order is *complete*: cells [a, b) cut
from it form a valid part of their own, and consecutive cuts join back into the
part a single evaluation would have written. That is what lets the prefix cache
store each token block once. Anything this reader does not recognise (recurrent
state, M-RoPE cell extensions, MLA caches without V, another stream count) raises
`StateFormatError`, and the caller declines to cut instead of guessing.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_K_HEAD = struct.Struct("<iQ")
_V_TRANS_HEAD = struct.Struct("<iII")


class StateFormatError(ValueError):
    """Bytes that are not a sequence state this module knows how to cut."""


@dataclass(frozen=True)
class _Layer:
    head: bytes  # the layer's header as written (type and sizes)
    offset: int  # where its rows start in the blob
    row_bytes: int  # bytes per cell (K, or V not transposed) or per element (V transposed)
    n_rows: int  # 1, or n_embd_v for a transposed V


@dataclass(frozen=True)
class Part:
    """One KV cache's cells for the sequence, as offsets into the state bytes."""

    blob: memoryview
    positions: tuple[int, ...]
    v_trans: int
    k_layers: tuple[_Layer, ...]
    v_layers: tuple[_Layer, ...]
    end: int

    @property
    def n_cells(self) -> int:
        return len(self.positions)

    @property
    def complete(self) -> bool:
        """Cells hold positions 0..n-1 in order (not a sliding window)."""
        return self.positions == tuple(range(len(self.positions)))

    def layout(self) -> tuple[object, ...]:
        """What must match for two parts to be joined (types, sizes, layer counts)."""
        return (self.v_trans, tuple(x.head[:4] + x.row_bytes.to_bytes(8, "little") for x in self.k_layers),
                tuple(x.head[:4] + x.row_bytes.to_bytes(8, "little") + x.n_rows.to_bytes(4, "little")
                      for x in self.v_layers))


@dataclass(frozen=True)
class SeqState:
    header: bytes  # magic + sequence id
    parts: tuple[Part, ...]


def _take(blob: memoryview, at: int, n: int) -> memoryview:
    if at + n > len(blob):
        raise StateFormatError("state ends early")
    return blob[at : at + n]


def parse_part(blob: memoryview, at: int = 0, seq_id: int = 0) -> Part:
    """One KV cache part starting at `at`, its cells held by `seq_id` alone."""
    (n_stream,) = _U32.unpack(_take(blob, at, 4))
    if n_stream != 1:
        raise StateFormatError(f"{n_stream} streams, expected 1")
    (n_cells,) = _U32.unpack(_take(blob, at + 4, 4))
    at += 8
    if n_cells == 0:
        return Part(blob, (), 0, (), (), at)
    meta = array("i")
    meta.frombytes(_take(blob, at, 12 * n_cells))
    if any(n != 1 for n in meta[1::3]) or any(s != seq_id for s in meta[2::3]):
        raise StateFormatError("cells are not plain single-sequence cells")
    positions = tuple(meta[0::3])
    at += 12 * n_cells
    v_trans, n_layer = struct.unpack("<II", _take(blob, at, 8))
    if v_trans not in (0, 1) or n_layer == 0 or n_layer > 4096:
        raise StateFormatError("implausible layer header")
    at += 8
    k_layers = []
    for _ in range(n_layer):
        head = bytes(_take(blob, at, _K_HEAD.size))
        _, row = _K_HEAD.unpack(head)
        at += _K_HEAD.size
        k_layers.append(_Layer(head, at, row, 1))
        at += row * n_cells
    v_layers = []
    for _ in range(n_layer):
        if v_trans:
            head = bytes(_take(blob, at, _V_TRANS_HEAD.size))
            _, elem, n_embd = _V_TRANS_HEAD.unpack(head)
            at += _V_TRANS_HEAD.size
            v_layers.append(_Layer(head, at, elem, n_embd))
            at += elem * n_embd * n_cells
        else:
            head = bytes(_take(blob, at, _K_HEAD.size))
            _, row = _K_HEAD.unpack(head)
            at += _K_HEAD.size
            v_layers.append(_Layer(head, at, row, 1))
            at += row * n_cells
    if at > len(blob):
        raise StateFormatError("state ends early")
    return Part(blob, positions, v_trans, tuple(k_layers), tuple(v_layers), at)


def parse(data: bytes | bytearray | memoryview, seq_id: int = 0) -> SeqState:
    """Split a sequence state into its parts; raises StateFormatError when unsure."""
    blob = memoryview(data)
    header = bytes(_take(blob, 0, 8))
    at = 8
    parts = []
    while at < len(blob):
        part = parse_part(blob, at, seq_id)
        parts.append(part)
        at = part.end
        if len(parts) > 2:
            raise StateFormatError("more than two KV caches")
    if not parts:
        raise StateFormatError("no KV cache in the state")
    return SeqState(header, tuple(parts))


def part_bytes(part: Part, start: int = 0) -> bytes:
    """The part exactly as written, or (start > 0) its cells [start, n) as a part of its own."""
    if start == 0:
        begin = part.end - _part_length(part)
        return bytes(part.blob[begin : part.end])
    return cut(part, start, part.n_cells)


def _part_length(part: Part) -> int:
    n = part.n_cells
    if n == 0:
        return 8
    length = 8 + 12 * n + 8
    for layer in part.k_layers:
        length += len(layer.head) + layer.row_bytes * n
    for layer in part.v_layers:
        length += len(layer.head) + layer.row_bytes * layer.n_rows * n
    return length


def cut(part: Part, start: int, end: int) -> bytes:
    """Cells [start, end) of a complete part, as a valid part."""
    if not part.complete or not 0 <= start < end <= part.n_cells:
        raise StateFormatError(f"cannot cut cells {start}..{end} of this part")
    return join([(part, start, end)])


def join(pieces: list[tuple[Part, int, int]]) -> bytes:
    """Concatenate cell ranges of parts with the same layout into one part.

    The ranges' positions must follow each other (the result is checked: its cells
    hold consecutive positions from the first range's start).
    """
    first = pieces[0][0]
    layout = first.layout()
    if any(p.layout() != layout for p, _, _ in pieces[1:]):
        raise StateFormatError("parts with different layouts cannot be joined")
    positions: list[int] = []
    for p, a, b in pieces:
        positions.extend(p.positions[a:b])
    if positions != list(range(positions[0], positions[0] + len(positions))):
        raise StateFormatError("joined cells do not hold consecutive positions")
    n = len(positions)
    out: list[bytes | memoryview] = [_U32.pack(1), _U32.pack(n)]
    meta = array("i", [0]) * (3 * n)
    meta[0::3] = array("i", positions)
    meta[1::3] = array("i", [1]) * n
    out.append(meta.tobytes())
    out.append(struct.pack("<II", first.v_trans, len(first.k_layers)))
    for i, layer in enumerate(first.k_layers):
        out.append(layer.head)
        for p, a, b in pieces:
            src = p.k_layers[i]
            out.append(p.blob[src.offset + a * src.row_bytes : src.offset + b * src.row_bytes])
    for i, layer in enumerate(first.v_layers):
        out.append(layer.head)
        if not first.v_trans:
            for p, a, b in pieces:
                src = p.v_layers[i]
                out.append(p.blob[src.offset + a * src.row_bytes : src.offset + b * src.row_bytes])
            continue
        for j in range(layer.n_rows):
            for p, a, b in pieces:
                src = p.v_layers[i]
                row = src.offset + j * p.n_cells * src.row_bytes
                out.append(p.blob[row + a * src.row_bytes : row + b * src.row_bytes])
    return b"".join(out)


def as_seq0(data: bytearray, seq_id: int, start: int, end: int) -> bytearray:
    """Make the state of one KV cache holding cells of positions [start, end) in
    order, written for sequence `seq_id`, sequence 0's state of those cells, in
    place: the bytes a cut of sequence 0's own state would give (llama.cpp ignores
    the ids on load). Raises StateFormatError for anything else."""
    state = parse(data, seq_id)
    if len(state.parts) != 1:
        raise StateFormatError(f"{len(state.parts)} KV caches in the state")
    if state.parts[0].positions != tuple(range(start, end)):
        raise StateFormatError(f"the cells do not hold positions {start}..{end} in order")
    del state  # its views of `data` end here
    ids = memoryview(data)[8 + 8 : 8 + 8 + 12 * (end - start)].cast("i")
    ids[2::3] = array("i", [0]) * (end - start)  # (pos, n_seq_id, seq_id) per cell
    ids.release()
    data[4:8] = struct.pack("<i", 0)
    return data
