"""The GGUF header reader: real files, synthetic ones, and hostile or truncated bytes."""

from __future__ import annotations

import contextlib
import io
import struct
import time
from pathlib import Path

import gguf as gguf_pkg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvchat.errors import ModelFormatError, ModelNotFoundError
from kvchat.gguf import StringArray, read_header, read_header_file
from tests.synthetic import write_gguf


class Unseekable(io.RawIOBase):
    """A forward-only stream, like a pipe: no seek, no tell, no size."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._at = 0
        self.reads: list[int] = []

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        self.reads.append(n)
        end = len(self._data) if n < 0 else self._at + n
        out = bytes(self._data[self._at : end])
        self._at += len(out)
        return out


class RangeReader(io.RawIOBase):
    """A seekable reader that records every read, like a remote range-request file."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = {0: offset, 1: self._pos + offset, 2: len(self._data) + offset}[whence]
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        out = self._data[self._pos : end]
        self._pos += len(out)
        self.bytes_read += len(out)
        return out


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A small file with every value type."""
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    writer = gguf_pkg.GGUFWriter(str(path), "llama")
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -5)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -300)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -7)
    writer.add_float32("t.f32", 1.5)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo")
    writer.add_uint64("t.u64", 2**40)
    writer.add_int64("t.i64", -(2**40))
    writer.add_float64("t.f64", 0.25)
    writer.add_array("t.arr_i", [1, 2, 3])
    writer.add_array("t.arr_s", ["a", "bb", ""])
    writer.add_uint32("llama.block_count", 2)
    import numpy as np

    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def test_reads_every_value_type(small_gguf: bytes) -> None:
    h = read_header(io.BytesIO(small_gguf))
    md = h.metadata
    assert h.version == 3
    assert md["general.architecture"] == "llama"
    assert (md["t.u8"], md["t.i8"], md["t.u16"], md["t.i16"]) == (200, -5, 60000, -300)
    assert (md["t.u32"], md["t.i32"], md["t.u64"], md["t.i64"]) == (4_000_000_000, -7, 2**40, -(2**40))
    assert md["t.f32"] == 1.5 and md["t.f64"] == 0.25 and md["t.bool"] is True
    assert md["t.str"] == "héllo"
    assert md["t.arr_i"] == [1, 2, 3]
    assert isinstance(md["t.arr_s"], StringArray) and list(md["t.arr_s"]) == ["a", "bb", ""]
    names = [t.name for t in h.tensors]
    assert names == ["token_embd.weight", "blk.0.attn_q.weight"]
    embd, q = h.tensors
    assert embd.shape == (32, 4) and embd.n_bytes == 512
    assert q.type_name == "F16" and q.n_bytes == 2048
    assert h.data_offset % h.alignment == 0 and h.data_offset >= h.header_size
    assert h.file_size == len(small_gguf)


def test_v2_header_reads_like_v3(small_gguf: bytes) -> None:
    v2 = small_gguf[:4] + struct.pack("<I", 2) + small_gguf[8:]
    assert read_header(io.BytesIO(v2)).version == 2


@pytest.mark.parametrize("version", [1, 4, 0xFFFF])
def test_other_versions_are_refused(small_gguf: bytes, version: int) -> None:
    data = small_gguf[:4] + struct.pack("<I", version) + small_gguf[8:]
    with pytest.raises(ModelFormatError, match="version"):
        read_header(io.BytesIO(data))


def test_big_endian_file(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "be.gguf", "llama", {"context_length": 2048}, n_layer=2, big_endian=True)
    h = read_header_file(path)
    assert h.big_endian and h.metadata["llama.context_length"] == 2048


def test_real_model_header(model_path: Path) -> None:
    h = read_header_file(model_path)
    assert h.metadata["general.architecture"] == "llama"
    assert len(h.metadata["tokenizer.ggml.tokens"]) == 49152
    assert h.metadata["tokenizer.ggml.tokens"][0] == "<|endoftext|>"
    assert len(h.tensors) == 272
    # tensor data fills the file exactly after the header
    assert h.data_offset + max(t.offset + t.n_bytes for t in h.tensors) == h.file_size
    reference = gguf_pkg.GGUFReader(str(model_path))
    assert h.data_offset == reference.data_offset
    assert {t.name: t.n_bytes for t in h.tensors} == {t.name: int(t.n_bytes) for t in reference.tensors}


def test_stream_is_left_at_header_end_and_tensor_data_is_not_read(model_path: Path) -> None:
    data = model_path.read_bytes()
    reader = RangeReader(data)
    h = read_header(reader)
    assert reader.tell() == h.header_size
    # the read-ahead is bounded: far less than the 92 MiB of tensor data
    assert reader.bytes_read <= h.header_size + 64 * 1024


def test_forward_only_stream(model_path: Path) -> None:
    data = model_path.read_bytes()[:3_000_000]
    stream = Unseekable(data)
    h = read_header(stream)
    assert len(h.tensors) == 272 and h.file_size is None
    assert max(n for n in stream.reads) <= 64 * 1024


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        read_header_file(tmp_path / "nope.gguf")
    with pytest.raises(ModelFormatError):
        read_header_file(tmp_path)


def test_not_gguf() -> None:
    with pytest.raises(ModelFormatError, match="magic"):
        read_header(io.BytesIO(b"PK\x03\x04" + b"\0" * 100))
    with pytest.raises(ModelFormatError):
        read_header(io.BytesIO(b""))


def _header(n_tensors: int, n_kv: int, body: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + body


@pytest.mark.parametrize(
    "data",
    [
        _header(2**60, 0),  # absurd tensor count
        _header(0, 2**60),  # absurd metadata count
        _header(0, 1, struct.pack("<Q", 2**63) + b"key"),  # key length past the end
        _header(0, 1, struct.pack("<Q", 1) + b"k" + struct.pack("<IQ", 8, 2**62)),  # string
        _header(0, 1, struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 4, 2**61)),  # u32 array
        _header(0, 1, struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 8, 2**40)),  # string array
        _header(0, 1, struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 9, 1)),  # array of arrays
        _header(0, 1, struct.pack("<Q", 1) + b"k" + struct.pack("<I", 99)),  # unknown value type
        _header(1, 0, struct.pack("<Q", 1) + b"t" + struct.pack("<I", 7)),  # 7 dimensions
        _header(1, 0, struct.pack("<Q", 1) + b"t" + struct.pack("<IQIQ", 1, 32, 77, 0)),  # unknown type
        _header(1, 0, struct.pack("<Q", 1) + b"t" + struct.pack("<IQIQ", 1, 32, 0, 5)),  # misaligned
    ],
)
def test_hostile_headers_fail_fast(data: bytes) -> None:
    started = time.perf_counter()
    with pytest.raises(ModelFormatError):
        read_header(io.BytesIO(data + b"\0" * 64))
    with pytest.raises(ModelFormatError):
        read_header(Unseekable(data + b"\0" * 64))
    assert time.perf_counter() - started < 1.0


def test_tensor_past_the_end_of_a_sized_stream() -> None:
    data = _header(1, 0, struct.pack("<Q", 1) + b"t" + struct.pack("<IQIQ", 1, 2**40, 0, 0))
    with pytest.raises(ModelFormatError, match="truncated"):
        read_header(io.BytesIO(data + b"\0" * 64))


def test_every_truncation_is_a_clean_error(small_gguf: bytes) -> None:
    """Cut the file anywhere inside the header: always ModelFormatError."""
    h = read_header(io.BytesIO(small_gguf))
    for cut in range(h.header_size):
        with pytest.raises(ModelFormatError):
            read_header(io.BytesIO(small_gguf[:cut]))
        with pytest.raises(ModelFormatError):
            read_header(Unseekable(small_gguf[:cut]))


def test_every_single_byte_corruption_is_handled(small_gguf: bytes) -> None:
    """Set each header byte to 0xFF in turn: the reader parses or raises ModelFormatError."""
    h = read_header(io.BytesIO(small_gguf))
    for i in range(h.header_size):
        data = bytearray(small_gguf)
        data[i] = 0xFF if data[i] != 0xFF else 0x00
        with contextlib.suppress(ModelFormatError):
            read_header(io.BytesIO(bytes(data)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_headers_never_crash(small_gguf: bytes, data: st.DataObject) -> None:
    """Random overwrites, insertions and cuts: a header or ModelFormatError, quickly."""
    h = read_header(io.BytesIO(small_gguf))
    blob = bytearray(small_gguf[: h.data_offset + 2560])
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, h.header_size - 1))
        kind = data.draw(st.sampled_from(["overwrite", "insert", "cut", "u64"]))
        if kind == "overwrite":
            blob[at] = data.draw(st.integers(0, 255))
        elif kind == "insert":
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif kind == "cut":
            del blob[at : at + data.draw(st.integers(1, 16))]
        else:
            blob[at : at + 8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    started = time.perf_counter()
    with contextlib.suppress(ModelFormatError):
        read_header(io.BytesIO(bytes(blob)))
    assert time.perf_counter() - started < 1.0
