"""A `ChatEngine` as the KV store reads and writes it (kvchat.kv_store's RangeSource
and RangeSink).

An engine that reads and restores ranges of cells (kvchat.engine.Engine on a plain
KV cache: `can_save_ranges`) has a save read only the cells a previous save did not
cover. Any other engine (a sliding window, recurrent memory, llama-server's slot
record) is read and restored whole.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from kvchat.engine_api import ChatEngine
from kvchat.errors import SessionError


@runtime_checkable
class RangeEngine(Protocol):
    """Capability: read and append ranges of cells (kvchat.engine.Engine)."""

    @property
    def can_save_ranges(self) -> bool: ...

    def state_range_bytes(self, start: int, end: int) -> bytes | bytearray: ...
    def load_state_range(self, data: bytes, start: int, end: int) -> None: ...


class EngineState:
    """One engine, as a range source and sink."""

    def __init__(self, engine: ChatEngine) -> None:
        self.engine = engine
        self._ranges = engine if isinstance(engine, RangeEngine) else None

    @property
    def can_save_ranges(self) -> bool:
        return self._ranges is not None and self._ranges.can_save_ranges

    def state_range_bytes(self, start: int, end: int) -> bytes | bytearray:
        assert self._ranges is not None, "a range read on an engine that reads whole states"
        return self._ranges.state_range_bytes(start, end)

    def state_bytes(self) -> bytes:
        return self.engine.state_bytes()

    def kv_clear(self) -> None:
        self.engine.kv_clear()

    def load_state_range(self, data: bytes, start: int, end: int) -> None:
        if self._ranges is None:
            raise SessionError("this engine restores whole KV states only", hint="use --rebuild")
        self._ranges.load_state_range(data, start, end)

    def load_state_bytes(self, data: bytes, n_tokens: int) -> None:
        self.engine.load_state_bytes(data, n_tokens)
