"""Devices a plan spreads a model over: local GPUs and llama.cpp RPC workers.

`--device NAME=SIZE` names one: a local GPU as llama.cpp names it (CUDA0, Vulkan1,
...) or an `rpc-server` worker (rpc://host:port). This module parses and checks
them, orders them as llama.cpp orders a model's devices, and builds the Budget and
default tensor split the planner (kvchat.memory) takes. Pure: no probing, no llama_cpp.

The order matters: llama.cpp hands the last layers to the devices in this order,
split at the cumulative shares (kvchat.memory._layer_devices).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvchat.errors import UsageError
from kvchat.memory import DEFAULT_MARGIN, Budget, parse_size

RPC_SCHEME = "rpc://"
# Local GPU backends in the order ggml registers them (ggml/src/ggml-backend-reg.cpp:
# CUDA -- ROCm and MUSA builds compile the same backend under another name --, Metal,
# SYCL, Vulkan); llama.cpp lists a model's GPUs in registry order, then by index.
GPU_BACKENDS = ("CUDA", "ROCm", "MUSA", "MTL", "SYCL", "Vulkan")
_GPU_RE = re.compile(r"^(?P<backend>[A-Za-z]+)(?P<index>\d+)$")
_HOST_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_SPLIT_SEP_RE = re.compile(r"[,/]+")  # what llama.cpp's --tensor-split accepts (common/arg.cpp)


@dataclass(frozen=True)
class Device:
    """One device of a plan and the memory it offers (bytes, before the margin)."""

    name: str  # as the plan and the user name it: CUDA0, rpc://10.0.0.2:50052
    size: int
    host: str | None = None  # RPC workers only
    port: int | None = None

    @property
    def is_rpc(self) -> bool:
        return self.host is not None

    @property
    def endpoint(self) -> str:
        """host:port, as llama-server's --rpc takes it (RPC workers only)."""
        return f"{self.host}:{self.port}"

    @property
    def buffer_name(self) -> str:
        """The name llama.cpp's log gives this device's buffers: RPC0[host:port] for
        the first device an rpc-server offers (ggml_backend_rpc_buffer_type numbers
        devices per server, ggml/src/ggml-rpc/ggml-rpc.cpp), the device name for a GPU."""
        return f"RPC0[{self.endpoint}]" if self.is_rpc else self.name


def parse_device(text: str) -> Device:
    """'CUDA0=24GiB' or 'rpc://10.0.0.2:50052=24GiB' -> Device (sizes as parse_size reads them)."""
    name, sep, size_text = str(text).rpartition("=")
    name = name.strip()
    if not sep or not name:
        raise UsageError(f"--device '{text}' is not NAME=SIZE",
                         hint="e.g. --device CUDA0=24GiB or --device rpc://10.0.0.2:50052=24GiB")
    size = parse_size(size_text)
    if size <= 0:
        raise UsageError(f"--device {name} has no memory ({size_text.strip()})",
                         hint="give its size, e.g. 24GiB")
    if name.lower().startswith(RPC_SCHEME):
        host, port = _parse_endpoint(name[len(RPC_SCHEME):], name)
        return Device(f"{RPC_SCHEME}{host}:{port}", size, host, port)
    return Device(_gpu_name(name), size)


def _parse_endpoint(endpoint: str, name: str) -> tuple[str, int]:
    """host and port of an rpc-server, as llama.cpp's RPC client reads them: split at
    the first ':' (ggml-rpc.cpp parse_endpoint), so an IPv6 address cannot be given."""
    host, sep, port_text = endpoint.partition(":")
    if not sep or not port_text:
        raise UsageError(f"--device {name} has no port", hint="write rpc://HOST:PORT, e.g. rpc://10.0.0.2:50052")
    if ":" in port_text or host.startswith("["):
        raise UsageError(f"--device {name}: llama.cpp's RPC client reads HOST:PORT up to the first ':', "
                         "so it cannot reach an IPv6 address",
                         hint="give the worker's IPv4 address or host name")
    if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"--device {name}: '{port_text}' is not a port", hint="ports are 1 to 65535")
    labels = host.split(".")
    numeric = all(label.isdigit() for label in labels)
    if (not host or len(host) > 253 or not all(_HOST_LABEL_RE.match(label) for label in labels)
            or (numeric and not _is_ipv4(host))):
        raise UsageError(f"--device {name}: '{host}' is not a host name or IPv4 address",
                         hint="write rpc://HOST:PORT, e.g. rpc://10.0.0.2:50052")
    return host.lower(), int(port_text)


def _is_ipv4(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _gpu_name(name: str) -> str:
    match = _GPU_RE.match(name)
    backend = next((b for b in GPU_BACKENDS if match and b.lower() == match["backend"].lower()), None)
    if match is None or backend is None:
        raise UsageError(f"--device '{name}' is neither a GPU nor an RPC worker",
                         hint="name GPUs as llama.cpp does (CUDA0, Vulkan0, MTL0, ...) and workers rpc://HOST:PORT")
    return f"{backend}{int(match['index'])}"


def order_devices(devices: list[Device]) -> list[Device]:
    """llama.cpp's order (src/llama.cpp, llama_prepare_model_devices): RPC workers first,
    in the order given (as llama-server's --rpc list registers them), then local GPUs
    by backend and index. The same device twice is refused."""
    seen: set[str] = set()
    for dev in devices:
        if dev.name in seen:
            raise UsageError(f"--device {dev.name} is given twice", hint="name each device once")
        seen.add(dev.name)

    def gpu_key(dev: Device) -> tuple[int, int]:
        match = _GPU_RE.match(dev.name)
        assert match is not None
        return GPU_BACKENDS.index(match["backend"]), int(match["index"])

    return [d for d in devices if d.is_rpc] + sorted((d for d in devices if not d.is_rpc), key=gpu_key)


def parse_devices(texts: list[str]) -> list[Device]:
    """Every --device value, parsed and in llama.cpp's order."""
    return order_devices([parse_device(text) for text in texts])


def parse_tensor_split(text: str, n_devices: int) -> tuple[float, ...]:
    """'3,1' (or '3/1', as llama.cpp accepts) -> one non-negative share per device."""
    parts = [p.strip() for p in _SPLIT_SEP_RE.split(str(text).strip())]
    try:
        shares = tuple(float(p) for p in parts)
    except ValueError:
        raise UsageError(f"--tensor-split '{text}' is not a list of numbers",
                         hint="e.g. --tensor-split 3,1") from None
    if any(not share >= 0 or share == float("inf") for share in shares) or not any(shares):
        raise UsageError(f"--tensor-split '{text}' needs shares of 0 or more, one of them above 0",
                         hint="e.g. --tensor-split 3,1")
    if len(shares) != n_devices:
        raise UsageError(f"--tensor-split '{text}' gives {len(shares)} share(s) for {n_devices} device(s)",
                         hint="one share per device, in the order the estimate lists them")
    return shares


def device_budget(devices: list[Device], ram: int, margin: int = DEFAULT_MARGIN) -> Budget:
    """A budget over these devices (in llama.cpp's order) and this much RAM."""
    return Budget(ram=ram, vram=tuple(d.size for d in devices), gpu_names=tuple(d.name for d in devices),
                  margin=margin)


def served_by_llama_server(names: tuple[str, ...]) -> bool:
    """Whether a plan over these devices runs on llama-server: RPC workers need it
    (llama-cpp-python has no RPC client). llama-server asks llama.cpp for one row of
    logits per slot (its log: n_outputs_max = n_parallel), not one per batch token."""
    return any(name.startswith(RPC_SCHEME) for name in names)
