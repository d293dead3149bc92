"""GGUF container reader: the header only (metadata and tensor infos), never tensor data.

It works on any binary stream with `read` (and, when available, `seek`/`tell`), so a
local file and a remote reader that serves HTTP range requests share one parser.
Every length read from the file is checked against the bytes that remain before it
is trusted, so a truncated or hostile file raises `ModelFormatError` instead of
hanging, crashing or allocating gigabytes.

Layout (ggml/docs/gguf.md, ggml/src/gguf.cpp): magic "GGUF", version (2 or 3),
tensor count, key/value count, the key/values, the tensor infos, padding up to
`general.alignment`, then the tensor data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, overload

from kvchat.errors import ModelFormatError

# A local file or a remote range reader (kvchat.hub_remote.RemoteFile): read, seek, tell.
Stream = IO[bytes] | io.RawIOBase

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# ggml's GGML_MAX_DIMS: a tensor has at most four dimensions.
MAX_DIMS = 4
# Caps on a single item, far above anything real, so a lying length fails fast even
# on a stream whose total size is unknown.
MAX_STRING_BYTES = 64 * 1024 * 1024
MAX_ARRAY_ITEMS = 1 << 28
MAX_ITEMS = 1 << 24  # key/value pairs or tensors
_CHUNK = 64 * 1024
MIN_ALIGNMENT = 8
MAX_ALIGNMENT = 1 << 20
# Bytes tolerated after the end of the last tensor's data (padding, a stray footer).
MAX_TRAILING_BYTES = 16 * 1024 * 1024

# (block size in elements, bytes per block) for every ggml type id
# (ggml/include/ggml.h enum ggml_type; sizes from the block structs in ggml-common.h).
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
    42: ("Q2_0", 64, 18),
}

# GGUF value types (gguf.h enum gguf_type): struct format of the scalar ones.
_SCALARS: dict[int, str] = {
    0: "B",  # uint8
    1: "b",  # int8
    2: "H",  # uint16
    3: "h",  # int16
    4: "I",  # uint32
    5: "i",  # int32
    6: "f",  # float32
    7: "?",  # bool
    10: "Q",  # uint64
    11: "q",  # int64
    12: "d",  # float64
}
_STRING = 8
_ARRAY = 9


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it; `offset` is relative to the data section."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]

    @property
    def n_elements(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n

    @property
    def n_bytes(self) -> int:
        """ggml_nbytes: rows of whole blocks."""
        _, block, block_bytes = GGML_TYPES[self.ggml_type]
        return self.n_elements // block * block_bytes


@dataclass
class GGUFHeader:
    """Everything before the tensor data."""

    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    alignment: int
    header_size: int  # bytes consumed: up to the end of the tensor infos
    data_offset: int  # header_size padded to the alignment: where tensor data starts
    file_size: int | None = None
    big_endian: bool = False
    value_types: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise ModelFormatError(
                "GGUF header has no general.architecture", hint="the file is not a llama.cpp model"
            )
        return arch

    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)


class StringArray(Sequence[str]):
    """A GGUF array of strings, kept as its raw bytes and decoded on first use."""

    def __init__(self, raw: bytes, count: int, endian: str = "<") -> None:
        self._raw = raw
        self._count = count
        self._endian = endian
        self._items: list[str] | None = None

    def _decoded(self) -> list[str]:
        if self._items is None:
            unpack = struct.Struct(self._endian + "Q").unpack_from
            raw, at, items = self._raw, 0, []
            for _ in range(self._count):
                (length,) = unpack(raw, at)
                items.append(raw[at + 8 : at + 8 + length].decode("utf-8", errors="replace"))
                at += 8 + length
            self._items = items
        return self._items

    def raw_items(self) -> Iterator[bytes]:
        """The items as stored (bytes), without decoding."""
        unpack = struct.Struct(self._endian + "Q").unpack_from
        raw, at = self._raw, 0
        for _ in range(self._count):
            (length,) = unpack(raw, at)
            yield raw[at + 8 : at + 8 + length]
            at += 8 + length

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        return self._decoded()[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (StringArray, list)):
            return list(self) == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"StringArray({self._count} items)"


class _Reader:
    """Sequential reads over a stream, each length checked against what remains.

    Reads ahead in chunks of at most 64 KiB so that a remote stream sees few
    requests; `pos` is the logical position (bytes the parser consumed).
    """

    def __init__(self, stream: Stream, start: int, size: int | None) -> None:
        self._stream = stream
        self.buf = b""
        self.at = 0
        self.pos = start
        self.size = size  # total stream size, when the stream can tell it

    def remaining(self) -> int | None:
        return None if self.size is None else self.size - self.pos

    def check(self, n: int, what: str) -> None:
        left = self.remaining()
        if n < 0 or (left is not None and n > left):
            raise ModelFormatError(
                f"GGUF header is truncated or corrupt: {what} needs {n} bytes at offset "
                f"{self.pos}, only {left} remain",
                hint="the file is damaged or incomplete; download it again",
            )

    def fill(self, n: int, what: str) -> None:
        """Make the next `n` bytes available in `buf[at:]`, reading more as needed."""
        have = len(self.buf) - self.at
        if have >= n:
            return
        self.check(n, what)
        parts = [self.buf[self.at :]]
        need = n - have
        while need > 0:
            left = self.remaining()
            # known size: what is needed plus read-ahead, never past the end;
            # unknown size: chunks, so a lying length costs no more memory than
            # the data that really came
            ask = min(max(need, _CHUNK), left - n + need) if left is not None else min(need, _CHUNK)
            chunk = self._stream.read(ask)
            if not chunk:
                raise ModelFormatError(
                    f"GGUF header is truncated: {what} needs {n} bytes at offset {self.pos}",
                    hint="the file is damaged or incomplete; download it again",
                )
            parts.append(chunk)
            need -= len(chunk)
        self.buf = b"".join(parts)
        self.at = 0

    def take(self, n: int, what: str) -> bytes:
        self.fill(n, what)
        out = self.buf[self.at : self.at + n]
        self.at += n
        self.pos += n
        return out


def _stream_size(stream: Stream) -> tuple[int, int | None]:
    """(current position, total size) of the stream; size None when it cannot seek."""
    try:
        start = stream.tell()
        end = stream.seek(0, 2)
        stream.seek(start)
        return start, end
    except (AttributeError, OSError, ValueError):
        return 0, None


class _Parser:
    def __init__(self, reader: _Reader, endian: str) -> None:
        self.r = reader
        self.e = endian

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        return struct.unpack(self.e + fmt, self.r.take(size, what))[0]

    def count(self, what: str, item_bytes: int, cap: int) -> int:
        n = self.scalar("Q", what)
        if n > cap:
            raise ModelFormatError(
                f"GGUF header is corrupt: {what} is {n}, more than kvchat accepts ({cap})",
                hint="the file is damaged or not a GGUF model",
            )
        self.r.check(n * item_bytes, what)
        return int(n)

    def string(self, what: str) -> str:
        n = self.count(f"length of {what}", 1, MAX_STRING_BYTES)
        raw = self.r.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def strings(self, n: int, what: str) -> StringArray:
        """`n` length-prefixed strings (the tokenizer's vocabulary and merges).

        Only the lengths are walked here, in a tight loop; the strings are decoded
        when first used, which an estimate never does.
        """
        r = self.r
        unpack = struct.Struct(self.e + "Q").unpack_from
        parts: list[bytes] = []
        buf, at = r.buf, r.at
        base = r.pos - at  # file position of buf[0]
        first = at  # where the not-yet-saved part of buf starts
        for i in range(n):
            end = at + 8
            if end > len(buf):
                parts.append(buf[first:at])
                r.at, r.pos = at, base + at
                r.fill(8, f"item {i} of {what}")
                buf, at, base, first = r.buf, 0, r.pos, 0
                end = 8
            (length,) = unpack(buf, at)
            if length > MAX_STRING_BYTES:
                raise ModelFormatError(
                    f"GGUF header is corrupt: item {i} of {what} claims {length} bytes",
                    hint="the file is damaged or not a GGUF model",
                )
            stop = end + length
            if stop > len(buf):
                parts.append(buf[first:at])
                r.at, r.pos = at, base + at
                r.fill(8 + length, f"item {i} of {what}")
                buf, at, base, first = r.buf, 0, r.pos, 0
                stop = 8 + length
            at = stop
        parts.append(buf[first:at])
        r.at, r.pos = at, base + at
        return StringArray(b"".join(parts), n, self.e)

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            item_type = self.scalar("I", f"item type of {what}")
            if item_type == _ARRAY:
                raise ModelFormatError(
                    f"GGUF header is corrupt: {what} is an array of arrays",
                    hint="the file is damaged or not a GGUF model",
                )
            if item_type in _SCALARS:
                fmt = _SCALARS[item_type]
                size = struct.calcsize(fmt)
                n = self.count(f"length of {what}", size, MAX_ARRAY_ITEMS)
                raw = self.r.take(n * size, what)
                return list(struct.unpack(f"{self.e}{n}{fmt}", raw))
            if item_type == _STRING:
                # each string is at least its 8-byte length
                n = self.count(f"length of {what}", 8, MAX_ARRAY_ITEMS)
                return self.strings(n, what)
            raise ModelFormatError(
                f"GGUF header is corrupt: {what} has unknown item type {item_type}",
                hint="the file is damaged, or written by a newer GGUF version",
            )
        raise ModelFormatError(
            f"GGUF header is corrupt: {what} has unknown value type {vtype}",
            hint="the file is damaged, or written by a newer GGUF version",
        )


def read_header(stream: Stream) -> GGUFHeader:
    """Parse the GGUF header from the stream's current position (normally 0).

    Reads sequentially and never past what the header needs plus one read-ahead
    chunk; when the stream can seek, it is left positioned at the header's end.
    Raises ModelFormatError for anything that is not a well-formed GGUF v2/v3 header.
    """
    start, size = _stream_size(stream)
    reader = _Reader(stream, start, size)
    remaining = reader.remaining()
    magic = reader.take(4, "magic") if remaining is None or remaining >= 4 else b""
    if magic != GGUF_MAGIC:
        raise ModelFormatError("not a GGUF file (bad magic)", hint="kvchat reads GGUF models; pick a .gguf")
    raw_version = reader.take(4, "version")
    endian = "<"
    version = struct.unpack("<I", raw_version)[0]
    if version not in SUPPORTED_VERSIONS and struct.unpack(">I", raw_version)[0] in SUPPORTED_VERSIONS:
        endian = ">"
        version = struct.unpack(">I", raw_version)[0]
    if version not in SUPPORTED_VERSIONS:
        raise ModelFormatError(
            f"unsupported GGUF version {version}",
            hint="kvchat reads GGUF v2 and v3; re-convert the model with a current llama.cpp",
        )
    p = _Parser(reader, endian)
    # a tensor info is at least 8 (name len) + 4 (n_dims) + 4 (type) + 8 (offset) bytes,
    # a key/value at least 8 (key len) + 4 (type) + 1 (value)
    n_tensors = p.count("tensor count", 24, MAX_ITEMS)
    n_kv = p.count("metadata count", 13, MAX_ITEMS)

    metadata: dict[str, Any] = {}
    value_types: dict[str, int] = {}
    for i in range(n_kv):
        key = p.string(f"key {i}")
        vtype = p.scalar("I", f"type of '{key}'")
        if key in metadata:
            raise ModelFormatError(
                f"GGUF header is corrupt: key '{key}' appears twice", hint="the file is damaged"
            )
        metadata[key] = p.value(vtype, f"'{key}'")
        value_types[key] = vtype

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    # gguf.md: "a power of two ... must be a multiple of 8"; llama.cpp's mmap'd tensors
    # need it (ggml asserts on misaligned data, general.alignment=1 aborted the process).
    if (not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < MIN_ALIGNMENT
            or alignment > MAX_ALIGNMENT or alignment & (alignment - 1)):
        raise ModelFormatError(
            f"GGUF header is corrupt: general.alignment {_short(alignment)} is not a power of two "
            f"from {MIN_ALIGNMENT} to {MAX_ALIGNMENT}",
            hint="the file is damaged",
        )

    tensors: list[TensorInfo] = []
    names: set[str] = set()
    for i in range(n_tensors):
        tensors.append(_tensor_info(p, i, names, alignment))

    header_size = reader.pos - start
    data_offset = -(-header_size // alignment) * alignment
    file_size = None if size is None else size - start
    if file_size is not None:
        data_end = data_offset
        for t in tensors:
            end = data_offset + t.offset + t.n_bytes
            if end > file_size:
                raise ModelFormatError(
                    f"GGUF file is truncated: tensor '{t.name}' ends past the end of the file",
                    hint="the download is incomplete; fetch the file again",
                )
            data_end = max(data_end, end)
        # llama.cpp maps the whole file with MAP_POPULATE: gigabytes of junk after the
        # last tensor would all be read into memory (a 64 GiB tail reached 20 GiB RSS).
        if tensors and file_size - data_end > MAX_TRAILING_BYTES:
            raise ModelFormatError(
                f"GGUF file has {file_size - data_end} bytes after its last tensor",
                hint="the file is damaged (or two files were joined); download it again",
            )
    with contextlib.suppress(AttributeError, OSError, ValueError):
        stream.seek(reader.pos)  # leave the stream at the header's end
    return GGUFHeader(
        version=version,
        metadata=metadata,
        tensors=tensors,
        alignment=alignment,
        header_size=header_size,
        data_offset=data_offset,
        file_size=file_size,
        big_endian=endian == ">",
        value_types=value_types,
    )


def _short(value: object, limit: int = 60) -> str:
    """A value from the file for an error message: repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _tensor_info(p: _Parser, i: int, names: set[str], alignment: int) -> TensorInfo:
    name = p.string(f"name of tensor {i}")
    if name in names:
        raise ModelFormatError(
            f"GGUF header is corrupt: tensor '{name}' appears twice", hint="the file is damaged"
        )
    names.add(name)
    n_dims = p.scalar("I", f"dimension count of '{name}'")
    if not 1 <= n_dims <= MAX_DIMS:
        raise ModelFormatError(
            f"GGUF header is corrupt: tensor '{name}' has {n_dims} dimensions",
            hint="the file is damaged or not a GGUF model",
        )
    shape = tuple(p.scalar("Q", f"shape of '{name}'") for _ in range(n_dims))
    ggml_type = p.scalar("I", f"type of '{name}'")
    offset = p.scalar("Q", f"offset of '{name}'")
    if ggml_type not in GGML_TYPES:
        raise ModelFormatError(
            f"tensor '{name}' has unknown ggml type {ggml_type}",
            hint="the file is damaged, or needs a newer kvchat/llama.cpp",
        )
    _, block, _ = GGML_TYPES[ggml_type]
    n_elements = 1
    for dim in shape:
        n_elements *= dim
    if any(d == 0 for d in shape) or n_elements >= 1 << 62 or shape[0] % block:
        raise ModelFormatError(
            f"GGUF header is corrupt: tensor '{name}' has shape {shape} for type {GGML_TYPES[ggml_type][0]}",
            hint="the file is damaged",
        )
    if offset % alignment:
        raise ModelFormatError(
            f"GGUF header is corrupt: tensor '{name}' data offset {offset} is not aligned",
            hint="the file is damaged",
        )
    return TensorInfo(name, shape, ggml_type, offset)


def read_header_file(path: str | Path) -> GGUFHeader:
    """Read the header of a local GGUF file (once per process for an unchanged file:
    validating a model, resolving it and planning it all need the same header)."""
    try:
        stat = os.stat(path)
        return _read_header_cached(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    except FileNotFoundError:
        from kvchat.errors import ModelNotFoundError

        raise ModelNotFoundError(f"no such model file: {path}", hint="check the path") from None
    except IsADirectoryError:
        raise ModelFormatError(f"{path} is a directory", hint="pass a .gguf file") from None


SPLIT_NAME_RE = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)


@functools.lru_cache(maxsize=8)
def _read_header_cached(path: str, size: int, mtime_ns: int) -> GGUFHeader:
    with open(path, "rb") as fh:
        return read_header(fh)


def merge_split_headers(headers: Sequence[GGUFHeader]) -> GGUFHeader:
    """One header for a split model: part 1's metadata with every part's tensors
    (each part's header lists only the tensors stored in it)."""
    first = headers[0]
    if len(headers) == 1:
        return first
    tensors = [t for h in headers for t in h.tensors]
    file_size = None if any(h.file_size is None for h in headers) else sum(h.file_size or 0 for h in headers)
    return dataclasses.replace(first, tensors=tensors, file_size=file_size)


def split_count(header: GGUFHeader) -> int:
    """How many files the model is split into (`split.count`; 1 when not split)."""
    count = header.metadata.get("split.count", 1)
    return count if isinstance(count, int) and count > 0 else 1


def split_part_paths(path: Path, count: int) -> list[Path]:
    """The sibling files of a split model, named like llama.cpp's llama_split_path."""
    match = SPLIT_NAME_RE.match(path.name)
    if count <= 1 or match is None:
        return [path]
    return [path.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def read_model_header_file(path: str | Path) -> GGUFHeader:
    """The header of a local model, every part of a split model merged."""
    first = read_header_file(path)
    parts = split_part_paths(Path(path), split_count(first))
    if len(parts) == 1:
        return first
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise ModelFormatError(
            f"split model is incomplete: {', '.join(missing)} missing next to {Path(path).name}",
            hint="download every part (kvchat pull does)",
        )
    return merge_split_headers([first, *(read_header_file(p) for p in parts[1:])])


def iter_layer_tensors(tensors: list[TensorInfo]) -> Iterator[tuple[int | None, TensorInfo]]:
    """Each tensor with its block index (`blk.N.`), or None for non-layer tensors."""
    for t in tensors:
        layer: int | None = None
        if t.name.startswith("blk."):
            head = t.name[4:].split(".", 1)[0]
            if head.isdigit():
                layer = int(head)
        yield layer, t
