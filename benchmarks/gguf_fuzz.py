"""Damaged GGUF files for fuzzing `kvchat run`, and a harness that runs one file.

The base is a tiny but real llama model (SmolLM2's tokenizer, 2 layers 32 wide,
random weights: about 3.5 MB), so that llama.cpp really loads and runs what
kvchat lets through. Mutations of it are of two kinds: structured ones (one
metadata value set to a boundary, a key dropped, the alignment changed, hostile
text, a huge sparse tail) written by the small GGUF writer below, and random ones
(bytes flipped, a u32/u64 field overwritten with a boundary value, a truncation)
in the header. Shared by tests/test_fuzz_run.py and benchmarks/fuzz_run.py.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvchat.gguf import StringArray, read_header_file

# GGUF value types (gguf.h)
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {
    U8: "B",
    I8: "b",
    U16: "H",
    I16: "h",
    U32: "I",
    I32: "i",
    F32: "f",
    BOOL: "?",
    U64: "Q",
    I64: "q",
    F64: "d",
}
F32_TYPE, F16_TYPE = 0, 1

N_EMBD, N_HEAD, N_HEAD_KV, N_FF, N_LAYER = 32, 2, 1, 64, 2
_TOKENIZER_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.chat_template",
)


@dataclass
class Value:
    """A typed GGUF metadata value; `item` is the item type of an array."""

    vtype: int
    value: Any
    item: int = 0


def _string(text: str | bytes) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _value(v: Value) -> bytes:
    if v.vtype == STR:
        return _string(v.value)
    if v.vtype == ARR:
        out = [struct.pack("<IQ", v.item, len(v.value))]
        if v.item == STR:
            out.extend(_string(s) for s in v.value)
        else:
            out.append(struct.pack(f"<{len(v.value)}{_FMT[v.item]}", *v.value))
        return b"".join(out)
    return struct.pack("<" + _FMT[v.vtype], v.value)


def write_gguf_bytes(
    metadata: dict[str, Value], tensors: list[tuple[str, np.ndarray, int]], alignment: int = 32
) -> bytes:
    """A GGUF v3 file: metadata as given (no checks at all), tensors (name, array, ggml type)."""
    parts = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    for key, v in metadata.items():
        parts += [_string(key), struct.pack("<I", v.vtype), _value(v)]
    offset = 0
    blobs = []
    for name, array, ggml_type in tensors:
        data = array.astype(np.float16 if ggml_type == F16_TYPE else np.float32).tobytes()
        dims = tuple(reversed(array.shape))  # ggml order: fastest dimension first
        parts += [
            _string(name),
            struct.pack("<I", len(dims)),
            struct.pack(f"<{len(dims)}Q", *dims),
            struct.pack("<IQ", ggml_type, offset),
        ]
        blobs.append((offset, data))
        offset += -(-len(data) // max(alignment, 1)) * max(alignment, 1)
    header = b"".join(parts)
    step = max(alignment, 1)
    header += b"\0" * (-len(header) % step)
    body = bytearray(offset)
    for at, data in blobs:
        body[at : at + len(data)] = data
    return header + bytes(body)


def tiny_model_parts(tokenizer_model: Path) -> tuple[dict[str, Value], list[tuple[str, np.ndarray, int]]]:
    """Metadata and tensors of the tiny llama model, SmolLM2's tokenizer included."""
    header = read_header_file(tokenizer_model)
    md: dict[str, Value] = {
        "general.architecture": Value(STR, "llama"),
        "general.name": Value(STR, "kvchat fuzz base"),
        "llama.block_count": Value(U32, N_LAYER),
        "llama.context_length": Value(U32, 2048),
        "llama.embedding_length": Value(U32, N_EMBD),
        "llama.feed_forward_length": Value(U32, N_FF),
        "llama.attention.head_count": Value(U32, N_HEAD),
        "llama.attention.head_count_kv": Value(U32, N_HEAD_KV),
        "llama.rope.dimension_count": Value(U32, N_EMBD // N_HEAD),
        "llama.rope.freq_base": Value(F32, 10000.0),
        "llama.attention.layer_norm_rms_epsilon": Value(F32, 1e-5),
        "general.file_type": Value(U32, 0),
    }
    for key in _TOKENIZER_KEYS:
        value = header.metadata.get(key)
        if value is None:
            continue
        if isinstance(value, StringArray):
            md[key] = Value(ARR, list(value), STR)
        elif isinstance(value, list):
            md[key] = Value(ARR, value, I32)
        elif isinstance(value, str):
            md[key] = Value(STR, value)
        elif isinstance(value, int):
            md[key] = Value(U32, value)
    n_vocab = len(header.metadata["tokenizer.ggml.tokens"])
    rng = np.random.default_rng(7)
    tensors: list[tuple[str, np.ndarray, int]] = [
        ("token_embd.weight", rng.normal(0, 0.02, (n_vocab, N_EMBD)), F16_TYPE),
        ("output_norm.weight", np.ones(N_EMBD), F32_TYPE),
    ]
    head_dim = N_EMBD // N_HEAD
    for il in range(N_LAYER):
        tensors += [
            (f"blk.{il}.attn_norm.weight", np.ones(N_EMBD), F32_TYPE),
            (f"blk.{il}.attn_q.weight", rng.normal(0, 0.02, (N_EMBD, N_EMBD)), F32_TYPE),
            (f"blk.{il}.attn_k.weight", rng.normal(0, 0.02, (N_HEAD_KV * head_dim, N_EMBD)), F32_TYPE),
            (f"blk.{il}.attn_v.weight", rng.normal(0, 0.02, (N_HEAD_KV * head_dim, N_EMBD)), F32_TYPE),
            (f"blk.{il}.attn_output.weight", rng.normal(0, 0.02, (N_EMBD, N_EMBD)), F32_TYPE),
            (f"blk.{il}.ffn_norm.weight", np.ones(N_EMBD), F32_TYPE),
            (f"blk.{il}.ffn_gate.weight", rng.normal(0, 0.02, (N_FF, N_EMBD)), F32_TYPE),
            (f"blk.{il}.ffn_up.weight", rng.normal(0, 0.02, (N_FF, N_EMBD)), F32_TYPE),
            (f"blk.{il}.ffn_down.weight", rng.normal(0, 0.02, (N_EMBD, N_FF)), F32_TYPE),
        ]
    return md, tensors


_BOUNDARY_U32 = (0, 1, 2, 3, 31, 32, 511, 512, 513, 65535, 2**31 - 1, 2**31, 2**32 - 1)
_BOUNDARY_U64 = (0, 1, 2**31, 2**32, 2**32 + 1, 2**62, 2**63, 2**64 - 1)


def structured_cases(tokenizer_model: Path) -> Iterator[tuple[str, bytes, int]]:
    """(label, file bytes, sparse tail bytes) for each structured mutation."""
    md, tensors = tiny_model_parts(tokenizer_model)

    def build(
        label: str,
        changes: dict[str, Value | None],
        *,
        alignment: int = 32,
        tensor_list: list[tuple[str, np.ndarray, int]] | None = None,
        tail: int = 0,
    ) -> tuple[str, bytes, int]:
        meta = dict(md)
        for key, v in changes.items():
            if v is None:
                meta.pop(key, None)
            else:
                meta[key] = v
        if alignment != 32:
            meta["general.alignment"] = Value(U32, alignment)
        return label, write_gguf_bytes(meta, tensor_list or tensors, alignment), tail

    yield build("base", {})
    for key in (
        "llama.block_count",
        "llama.context_length",
        "llama.embedding_length",
        "llama.feed_forward_length",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.rope.dimension_count",
    ):
        for value in (0, 1, 3, 513, 2**31, 2**32 - 1):
            yield build(f"{key}={value}", {key: Value(U32, value)})
        yield build(f"{key} missing", {key: None})
        yield build(f"{key} as string", {key: Value(STR, "12")})
    for eps in (0.0, -1.0, float("nan"), float("inf")):
        yield build(f"rms_eps={eps}", {"llama.attention.layer_norm_rms_epsilon": Value(F32, eps)})
    yield build("rope.freq_base=0", {"llama.rope.freq_base": Value(F32, 0.0)})
    for alignment in (1, 2, 4, 8, 16, 64, 4096, 1 << 20):
        yield build(f"alignment={alignment}", {}, alignment=alignment)
    for key in (
        "tokenizer.ggml.model",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
        "general.architecture",
    ):
        yield build(f"{key} missing", {key: None})
    yield build("tokenizer model unknown", {"tokenizer.ggml.model": Value(STR, "nope")})
    yield build("tokens empty", {"tokenizer.ggml.tokens": Value(ARR, [], STR)})
    yield build("token_type short", {"tokenizer.ggml.token_type": Value(ARR, [1, 1, 1], I32)})
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        for value in (2**31 - 1, 2**32 - 1, 10**6):
            yield build(f"{key}={value}", {key: Value(U32, value)})
    yield build("architecture unknown", {"general.architecture": Value(STR, "nonesuch")})
    yield build("architecture gemma3", {"general.architecture": Value(STR, "gemma3")})
    yield build("general.name 1 MiB", {"general.name": Value(STR, "n" * (1 << 20))})
    yield build("general.name ANSI/OSC", {"general.name": Value(STR, "\x1b]0;pwned\x07\x1b[31mred\x1b[0m")})
    yield build("key of 8 MiB", {"x" * (8 << 20): Value(U8, 1)})
    for template in (
        "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
        "{{ 'x' * 100000000 }}",
        "{{ raise_exception('no') }}",
        "{% for %}",
        "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
        "",
    ):
        yield build(f"chat_template {template[:30]!r}", {"tokenizer.chat_template": Value(STR, template)})
    yield build("sparse 1 GiB tail", {}, tail=1 << 30)
    yield build("sparse 64 GiB tail", {}, tail=64 << 30)
    bad_shapes = [(n, np.ones(N_EMBD + 1) if n == "output_norm.weight" else a, t) for n, a, t in tensors]
    yield build("output_norm wrong shape", {}, tensor_list=bad_shapes)
    yield build("no tensors", {}, tensor_list=[tensors[0]])
    missing_layer = [t for t in tensors if not t[0].startswith("blk.1.")]
    yield build("layer 1 tensors missing", {}, tensor_list=missing_layer)


def random_cases(base: bytes, n: int, seed: int) -> Iterator[tuple[str, bytes, int]]:
    """Random damage to the header of `base` (flips, boundary overwrites, truncations)."""
    import io

    from kvchat.gguf import read_header

    header_size = read_header(io.BytesIO(base)).header_size
    rng = random.Random(seed)
    for i in range(n):
        data = bytearray(base)
        kind = i % 4
        if kind == 0:
            for _ in range(rng.randint(1, 8)):
                at = rng.randrange(header_size)
                data[at] ^= 1 << rng.randrange(8)
            label = "flips"
        elif kind == 1:
            at = rng.randrange(0, header_size - 8)
            struct.pack_into("<Q", data, at, rng.choice(_BOUNDARY_U64))
            label = f"u64 at {at}"
        elif kind == 2:
            at = rng.randrange(0, header_size - 4)
            struct.pack_into("<I", data, at, rng.choice(_BOUNDARY_U32))
            label = f"u32 at {at}"
        else:
            cut = rng.choice((rng.randrange(header_size), rng.randrange(header_size, len(base))))
            del data[cut:]
            label = f"truncated at {cut}"
        yield f"random {i} {label}", bytes(data), 0


@dataclass
class Outcome:
    label: str
    returncode: int
    verdict: str  # ok, clean-error, abort, hang, traceback, internal-error, noisy
    wall_s: float
    max_rss_kib: int  # the child's VmHWM, polled every 50 ms while it runs
    first_line: str
    # wait4's ru_maxrss: never below the true peak, but Linux carries the parent's
    # RSS at spawn into it (exec keeps signal->maxrss), so it is only an upper bound
    rusage_maxrss_kib: int = 0


def write_case(path: Path, data: bytes, tail: int) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        if tail:
            fh.truncate(len(data) + tail)  # sparse: no disk used


def run_case(
    label: str, path: Path, *, env: dict[str, str], timeout: float, extra_args: tuple[str, ...] = ()
) -> Outcome:
    """`kvchat run -m PATH` with a small context and two tokens; its verdict, time and
    peak RSS (the child's own ru_maxrss, from wait4)."""
    import tempfile

    args = [
        sys.executable,
        "-m",
        "kvchat",
        "run",
        "-m",
        str(path),
        "--ctx",
        "256",
        "--max-tokens",
        "2",
        "--temperature",
        "0",
        *extra_args,
        "Hello",
    ]
    started = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, start_new_session=True
        )
        verdict = ""
        hwm_kib = 0
        while True:
            hwm_kib = max(hwm_kib, _vm_hwm_kib(proc.pid))
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - started > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                verdict = "hang"
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - started
        err.seek(0)
        text = err.read().decode("utf-8", "replace")
    # warnings (a busy machine, a context past the training length) are not failures
    lines = [line for line in text.strip().splitlines() if not line.startswith("kvchat: warning:")]
    first = lines[0] if lines else ""
    rc = proc.returncode
    if not verdict:
        if rc < 0 or rc in (134, 136, 139):
            verdict = "abort"
        elif "Traceback" in text:
            verdict = "traceback"
        elif "internal error" in text:
            verdict = "internal-error"
        elif rc == 0:
            verdict = "ok"
        elif first.startswith("kvchat: error:") and len(lines) == 1:
            verdict = "clean-error"
        else:
            verdict = "noisy"
    return Outcome(label, rc, verdict, wall, hwm_kib, first[:200], usage.ru_maxrss)


def _vm_hwm_kib(pid: int) -> int:
    """The process's own peak resident set so far (VmHWM), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0
