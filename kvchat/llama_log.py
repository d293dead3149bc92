"""What llama.cpp says about what it allocated, read from its log: parsed here only.

The engine captures llama.cpp's log while loading and hands the lines to
`parse_load_log`, which returns one `LoadReport`: buffer sizes per device and kind
(model, KV, recurrent state, output, compute), the KV summary (cells, K and V
bytes), the layers offloaded to GPUs and the flash-attention mode llama.cpp
settled on. Every regex is anchored on a fixed phrase and applied only to short
lines, so a hostile model name in the log cannot make parsing slow.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

_MIB = 1024 * 1024
# llama.cpp's allocation lines are short; anything longer is not one of them (e.g. a
# 1 MiB general.name echoed by the loader) and is never handed to a regex.
_MAX_LINE = 400
_BUFFER_RE = re.compile(r"(?P<dev>[\w.:\-\[\]]+) +(?P<kind>model|KV|RS|output|compute) buffer size = *"
                        r"(?P<mib>\d+(?:\.\d+)?) MiB")
_KV_SUMMARY_RE = re.compile(
    r"size = *[\d.]+ MiB \( *(?P<cells>\d+) cells,[^)]*\), K \(\w+\): *(?P<k>[\d.]+) MiB, "
    r"V \(\w+\): *(?P<v>[\d.]+) MiB"
)
_OFFLOADED_RE = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_FLASH_ATTN_RE = re.compile(r"flash_attn += *(?:auto *-> *)?(?P<mode>enabled|disabled|auto|1|0|true|false)")


@dataclass
class BufferSizes:
    """What llama.cpp reported allocating, in bytes, keyed by device name."""

    model: dict[str, int] = field(default_factory=dict)
    kv: dict[str, int] = field(default_factory=dict)
    k: int = 0
    v: int = 0
    recurrent: dict[str, int] = field(default_factory=dict)
    output: dict[str, int] = field(default_factory=dict)
    compute: dict[str, int] = field(default_factory=dict)
    kv_cells: int = 0

    def total(self) -> int:
        return sum(
            sum(d.values())
            for d in (self.model, self.kv, self.recurrent, self.output, self.compute)
        )


@dataclass
class LoadReport:
    buffers: BufferSizes
    gpu_layers: tuple[int, int] | None  # (offloaded, total), when llama.cpp said
    flash_attn: str | None  # "on"/"off" as llama.cpp resolved it, when it said


def parse_buffer_sizes(lines: Sequence[str]) -> BufferSizes:
    """Collect the buffer sizes llama.cpp printed while loading (see REFERENCE.md)."""
    sizes = BufferSizes()
    targets = {
        "model": sizes.model,
        "KV": sizes.kv,
        "RS": sizes.recurrent,
        "output": sizes.output,
        "compute": sizes.compute,
    }
    for line in lines:
        if len(line) > _MAX_LINE:
            continue
        if "buffer size =" in line:
            match = _BUFFER_RE.search(line)
            if match:
                target = targets[match["kind"]]
                dev = match["dev"]
                target[dev] = target.get(dev, 0) + round(float(match["mib"]) * _MIB)
        elif " cells," in line:
            match = _KV_SUMMARY_RE.search(line)
            if match:
                sizes.kv_cells += int(match["cells"])
                sizes.k += round(float(match["k"]) * _MIB)
                sizes.v += round(float(match["v"]) * _MIB)
    return sizes


def gpu_layers(lines: Sequence[str]) -> tuple[int, int] | None:
    """(offloaded, total) from llama.cpp's `offloaded N/M layers to GPU` line."""
    for line in reversed(lines):
        if len(line) <= _MAX_LINE and "layers to GPU" in line:
            match = _OFFLOADED_RE.search(line)
            if match:
                return int(match[1]), int(match[2])
    return None


def effective_flash_attn(lines: Sequence[str]) -> str | None:
    """'on' or 'off' as llama.cpp settled it (it resolves `auto` per device)."""
    for line in reversed(lines):
        if len(line) <= _MAX_LINE and "flash_attn" in line:
            match = _FLASH_ATTN_RE.search(line)
            if match and match["mode"] != "auto":
                return "on" if match["mode"] in ("enabled", "1", "true") else "off"
    return None


def parse_load_log(lines: Sequence[str]) -> LoadReport:
    return LoadReport(parse_buffer_sizes(lines), gpu_layers(lines), effective_flash_attn(lines))
