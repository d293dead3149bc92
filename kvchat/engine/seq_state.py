"""A sequence's state through llama.cpp's state API: whole, partial (a checkpoint),
or a range of cells read and appended through a scratch sequence."""

from __future__ import annotations

import ctypes
from typing import Any

import llama_cpp.llama_cpp as llama

from kvchat import kv_state

# The scratch sequence through which a range of seq 0's cells is read or appended
# (kvchat.engine.Engine opens a plain KV cache with two sequences in one stream).
SCRATCH = 1


def read(ctx: Any, seq: int, *, partial: bool = False) -> bytes:
    """The state of `seq` (partial: only what cannot roll back, the SWA window or the
    recurrent state: LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY).

    Copied out through a memoryview, not ctypes.string_at: string_at takes a C int,
    so a state over 2 GiB (16k tokens of an 8B model's KV) failed there."""
    flags = llama.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY if partial else 0
    size = llama.llama_state_seq_get_size_ext(ctx, seq, flags)
    buf = (ctypes.c_uint8 * size)()
    written = llama.llama_state_seq_get_data_ext(ctx, buf, size, seq, flags)
    with memoryview(buf) as view:
        return view[:written].tobytes()


def write(ctx: Any, data: bytes, seq: int, *, partial: bool = False) -> bool:
    """Load `data` into `seq` (llama.cpp clears the sequence first); False if refused."""
    flags = llama.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY if partial else 0
    buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    return bool(llama.llama_state_seq_set_data_ext(ctx, buf, len(data), seq, flags))


def read_range(ctx: Any, memory: Any, start: int, end: int) -> bytearray:
    """The cells of positions [start, end) of seq 0, as the sequence state llama.cpp
    writes for them alone: what kv_state.cut would take from seq 0's whole state,
    without reading the other cells.

    Why it is exact: llama_memory_seq_cp(0 -> SCRATCH, start, end) on a unified
    cache only adds the scratch id to those cells' metadata (llama_kv_cache::seq_cp,
    same stream: no data copied). llama_state_seq_get_data(SCRATCH) then writes the
    cells carrying that id, in cell order, with their K and V rows read from the
    cache tensors (llama_kv_cache::state_write: the very rows seq 0's state holds).
    seq_rm(SCRATCH) drops the id again; a cell is freed only when no sequence holds
    it, and seq 0 still does. The cell records say seq 1 (llama.cpp reads the
    destination from the caller on load, not from the bytes); kv_state.as_seq0 writes
    0 there, so the result is byte for byte the cut of seq 0's own state. The bytes
    are written by llama.cpp straight into the buffer returned: a save holds one
    copy of the new cells, never the history.

    Raises kv_state.StateFormatError when the cells are not [start, end) in order
    (after a context shift the cells no longer follow positions). Cost: one pass
    over the cells' metadata (n_ctx), and the range's bytes.
    """
    llama.llama_memory_seq_rm(memory, SCRATCH, -1, -1)
    llama.llama_memory_seq_cp(memory, 0, SCRATCH, start, end)
    try:
        size = llama.llama_state_seq_get_size(ctx, SCRATCH)
        data = bytearray(size)
        target = (ctypes.c_uint8 * size).from_buffer(data)
        written = llama.llama_state_seq_get_data(ctx, target, size, SCRATCH)
    finally:
        llama.llama_memory_seq_rm(memory, SCRATCH, -1, -1)
    if written != size:
        raise kv_state.StateFormatError(f"llama.cpp wrote {written} of {size} state bytes")
    return kv_state.as_seq0(data, SCRATCH, start, end)


def load_range(ctx: Any, memory: Any, data: bytes, start: int, end: int) -> bool:
    """Append cells [start, end) to seq 0; False where llama.cpp refused them.

    Loading into seq 0 would first clear it (llama_kv_cache::state_read_meta removes
    the destination sequence), so the range goes into the scratch sequence: llama.cpp
    puts the cells in free cells with their saved positions and K/V rows;
    seq_cp(SCRATCH -> 0) then gives them to seq 0 (metadata only) and seq_rm(SCRATCH)
    drops the scratch id. Ranges loaded in order after a clear fill the cells in
    order: the cache then holds the bytes it held when saved.
    """
    buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    try:
        read = llama.llama_state_seq_set_data(ctx, buf, len(data), SCRATCH)
        span = (llama.llama_memory_seq_pos_min(memory, SCRATCH),
                llama.llama_memory_seq_pos_max(memory, SCRATCH))
        if read == 0 or span != (start, end - 1):
            return False
        llama.llama_memory_seq_cp(memory, SCRATCH, 0, -1, -1)
        return True
    finally:
        llama.llama_memory_seq_rm(memory, SCRATCH, -1, -1)
