"""The memory planner: pure functions from a ModelSpec and settings to bytes per device.

`plan_memory` sizes what llama.cpp allocates when it loads a model and creates a
context: weights, K and V cells, recurrent state, the output (logits) buffer and
the compute buffer, on the CPU and each GPU. The KV and recurrent figures follow
llama.cpp's code exactly (cited per function); the compute buffer is measured by
llama.cpp's graph allocator, so here it is an estimate from the largest tensors
alive at once. `largest_ctx`, `fit_gpu_layers` and `fit` search for what fits a
memory budget, as llama.cpp's `--fit` does, without loading anything.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field, replace

from kvchat.cache_types import CACHE_TYPES, CacheType, fused_kernel_warning
from kvchat.errors import UsageError
from kvchat.model_spec import ModelSpec

MiB = 1024 * 1024
GiB = 1024 * MiB
CTX_PAD = 256  # llama-context.cpp: cparams.n_ctx = GGML_PAD(cparams.n_ctx, 256)
DEFAULT_MARGIN = 1 * GiB  # what llama.cpp's --fit leaves free per device by default
GGML_SCHED_MAX_COPIES = 4  # input copies the scheduler keeps with pipeline parallelism (ggml-backend.cpp)
CPU = "CPU"


@dataclass(frozen=True)
class PlanSettings:
    """Context settings that shape memory; defaults match kvchat's engine."""

    n_ctx: int = 4096  # 0: the model's training context, as llama.cpp does
    type_k: CacheType = CACHE_TYPES["f16"]
    type_v: CacheType = CACHE_TYPES["f16"]
    flash_attn: bool = True
    swa_full: bool = False
    n_batch: int = 512
    n_ubatch: int = 512
    n_gpu_layers: int = -1  # -1: all layers and the output layer (ignored without GPUs)
    gpus: tuple[str, ...] = ()  # GPUs and RPC workers, in llama.cpp's order; empty: a CPU-only plan
    tensor_split: tuple[float, ...] = ()  # share of layers per GPU, in gpus' order (default: even)
    n_seq: int = 1
    kv_unified: bool = False
    offload_kqv: bool = True
    n_outputs_max: int = 0  # logits rows a batch may ask for; 0: n_batch (llama.cpp's default)
    # Sequences kvchat adds beside the conversation's own: a plain KV cache gets a scratch
    # sequence (kvchat.engine, state_range_bytes) in one unified stream, which costs one
    # more logits row in the output buffer and nothing else.
    scratch_seqs: int = 0


@dataclass
class DevicePlan:
    """Bytes one device holds."""

    name: str
    layers: int = 0  # repeating layers (blocks) placed here
    weights: int = 0
    k: int = 0
    v: int = 0
    recurrent: int = 0
    output: int = 0
    compute: int = 0

    @property
    def kv(self) -> int:
        return self.k + self.v

    @property
    def total(self) -> int:
        return self.weights + self.k + self.v + self.recurrent + self.output + self.compute


@dataclass
class MemoryPlan:
    """What llama.cpp would allocate for one model and context, device by device."""

    settings: PlanSettings
    n_ctx: int  # after llama.cpp's rounding
    n_ctx_seq: int
    kv_cells: int  # cells of the full-attention cache, per stream
    swa_cells: int  # cells of the sliding-window cache, per stream (0: none)
    n_stream: int
    n_batch: int
    n_ubatch: int
    n_gpu_layers: int  # layers (and output) actually on GPUs
    output_on_gpu: bool
    devices: list[DevicePlan]
    warnings: list[str] = field(default_factory=list)
    output_device: str = CPU  # where the output layer (and the logits' matmul) lives

    def device(self, name: str) -> DevicePlan:
        for dev in self.devices:
            if dev.name == name:
                return dev
        raise KeyError(name)

    @property
    def cpu(self) -> DevicePlan:
        return self.devices[0]

    @property
    def gpus(self) -> list[DevicePlan]:
        return self.devices[1:]

    def _sum(self, attr: str) -> int:
        return sum(getattr(d, attr) for d in self.devices)

    @property
    def weights(self) -> int:
        return self._sum("weights")

    @property
    def k(self) -> int:
        return self._sum("k")

    @property
    def v(self) -> int:
        return self._sum("v")

    @property
    def kv(self) -> int:
        return self.k + self.v

    @property
    def recurrent(self) -> int:
        return self._sum("recurrent")

    @property
    def output(self) -> int:
        return self._sum("output")

    @property
    def compute(self) -> int:
        return self._sum("compute")

    @property
    def total(self) -> int:
        return self._sum("total")


def scratch_seqs(spec: ModelSpec) -> int:
    """The scratch sequences kvchat's own load of `spec` has (kvchat.engine): one on a
    plain KV cache, none where the memory cannot be cut by position (sliding window,
    recurrent, hybrid) or there is no memory."""
    return 1 if spec.has_memory and spec.memory_type == "standard" else 0


def round_ctx(n_ctx: int, n_ctx_train: int, n_seq: int = 1, kv_unified: bool = False) -> tuple[int, int]:
    """(n_ctx, n_ctx_seq) as llama_context's constructor rounds them (src/llama-context.cpp)."""
    if n_ctx < 0:
        raise UsageError(f"context length must be positive, got {n_ctx}")
    if n_seq < 1:
        raise UsageError(f"number of sequences must be at least 1, got {n_seq}")
    n = n_ctx or n_ctx_train
    n = -(-n // CTX_PAD) * CTX_PAD
    if kv_unified:
        return n, n
    n_ctx_seq = -(-(n // n_seq) // CTX_PAD) * CTX_PAD
    if n_ctx_seq == 0:
        raise UsageError(f"a {n_ctx}-token context cannot be split over {n_seq} sequences")
    return n_ctx_seq * n_seq, n_ctx_seq


def _layer_devices(spec: ModelSpec, s: PlanSettings) -> tuple[list[str], str, int]:
    """Device of each layer and of the output layer (llama_model::load_tensors).

    The last `n_gpu_layers` of the n_layer + 1 "layers" (blocks, then the output
    layer) go to the GPUs, split by `tensor_split`; the input embeddings stay on
    the CPU.
    """
    n_layer = spec.n_layer
    if not s.gpus:
        return [CPU] * n_layer, CPU, 0
    ngl = n_layer + 1 if s.n_gpu_layers < 0 else s.n_gpu_layers
    i_gpu_start = max(n_layer + 1 - ngl, 0)
    act = min(ngl, n_layer + 1)
    shares = list(s.tensor_split) if s.tensor_split else [1.0] * len(s.gpus)
    if len(shares) != len(s.gpus) or sum(shares) <= 0 or min(shares) < 0:
        raise UsageError("tensor split needs one non-negative share per GPU")
    # llama.cpp sums and normalises the shares in single precision: a layer that
    # falls on a split point goes where float32 rounding sends it
    bounds, acc = [], 0.0
    for share in shares:
        acc = _f32(acc + _f32(share))
        bounds.append(acc)
    bounds = [_f32(bound / acc) for bound in bounds]

    def device(il: int) -> str:
        if il < i_gpu_start or il - i_gpu_start >= act:
            return CPU
        frac = _f32((il - i_gpu_start) / act)
        # std::upper_bound over the cumulative split points
        for gpu, bound in zip(s.gpus, bounds, strict=True):
            if frac < bound:
                return gpu
        return s.gpus[-1]

    return [device(il) for il in range(n_layer)], device(n_layer), act


def _f32(x: float) -> float:
    """x rounded to single precision, as a C float holds it."""
    return float(struct.unpack("f", struct.pack("f", x))[0])


def kv_cells(spec: ModelSpec, s: PlanSettings) -> tuple[int, int, int, int, int]:
    """(n_ctx, n_ctx_seq, cells, swa_cells, n_ubatch) for these settings.

    Full-attention caches hold n_ctx_seq cells per stream; sliding-window caches
    PAD(min(cells, n_swa * (unified ? n_seq : 1) + n_ubatch), 256), or the full
    size with swa_full (src/llama-kv-cache-iswa.cpp).
    """
    n_ctx, n_ctx_seq = round_ctx(s.n_ctx, spec.n_ctx_train, s.n_seq, s.kv_unified)
    requested = s.n_ctx or spec.n_ctx_train
    n_batch = min(requested, s.n_batch)  # causal attention: the batch is capped by the context
    n_ubatch = min(n_batch, s.n_ubatch or s.n_batch)
    cells = n_ctx if s.kv_unified else n_ctx_seq
    swa_cells = 0
    if any(spec.is_swa):
        window = spec.n_swa * (s.n_seq if s.kv_unified else 1) + n_ubatch
        swa_cells = cells if s.swa_full else -(-min(cells, window) // CTX_PAD) * CTX_PAD
    return n_ctx, n_ctx_seq, cells, swa_cells, n_ubatch


def plan_memory(spec: ModelSpec, settings: PlanSettings) -> MemoryPlan:
    """Bytes per device for this model and context: the heart of `kvchat estimate`."""
    s = settings
    warnings: list[str] = []
    if s.type_v.quantized and not s.flash_attn:
        raise UsageError(
            f"a {s.type_v.name} V cache needs flash attention",
            hint="use --flash-attn on, or --cache-type-v f16",
        )
    n_ctx, n_ctx_seq, cells, swa_cells, n_ubatch = kv_cells(spec, s)
    n_batch = min(s.n_ctx or spec.n_ctx_train, s.n_batch)
    n_stream = 1 if s.kv_unified else s.n_seq
    if n_ctx_seq > spec.n_ctx_train > 0:
        warnings.append(
            f"context {n_ctx_seq} is above the model's training context ({spec.n_ctx_train})"
        )

    layer_dev, output_dev, n_gpu_layers = _layer_devices(spec, s)
    devices = {CPU: DevicePlan(CPU)}
    for gpu in s.gpus:
        devices[gpu] = DevicePlan(gpu)

    # weights: input embeddings on the CPU, blocks where placed, output head with the
    # output layer; a tied head is a copy of token_embd when it leaves the CPU
    devices[CPU].weights += spec.input_bytes
    for il, dev in enumerate(layer_dev):
        devices[dev].layers += 1
        devices[dev].weights += spec.layer_bytes[il]
    devices[output_dev].weights += spec.output_bytes
    if spec.output_is_tied and output_dev != CPU:
        devices[output_dev].weights += spec.tied_output_bytes

    if spec.has_memory:
        _plan_kv(spec, s, layer_dev, devices, cells, swa_cells, n_stream)
        _plan_recurrent(spec, s, layer_dev, devices)

    # output buffer: logits for n_seq outputs, reserved at context creation
    # (llama_context::output_reserve), in host memory
    devices[CPU].output = 4 * spec.n_vocab * (max(1, s.n_seq) + s.scratch_seqs)

    _plan_compute(spec, s, devices, layer_dev, output_dev, cells, swa_cells, n_ubatch, n_batch)

    if s.gpus and s.flash_attn and (warning := fused_kernel_warning(s.type_k, s.type_v)):
        warnings.append(warning)
    return MemoryPlan(
        settings=s,
        n_ctx=n_ctx,
        n_ctx_seq=n_ctx_seq,
        kv_cells=cells,
        swa_cells=swa_cells,
        n_stream=n_stream,
        n_batch=n_batch,
        n_ubatch=n_ubatch,
        n_gpu_layers=n_gpu_layers,
        output_on_gpu=output_dev != CPU,
        devices=list(devices.values()),
        warnings=warnings,
        output_device=output_dev,
    )


def _plan_kv(
    spec: ModelSpec,
    s: PlanSettings,
    layer_dev: list[str],
    devices: dict[str, DevicePlan],
    cells: int,
    swa_cells: int,
    n_stream: int,
) -> None:
    """K and V tensors per layer (llama_kv_cache's constructor, src/llama-kv-cache.cpp).

    K is `type_k` rows of head_dim_k * n_head_kv per cell and stream; V likewise,
    except that without flash attention V is stored transposed and every layer is
    padded to the widest V row, and that MLA caches have no V at all.
    """
    v_trans = not s.flash_attn
    v_width_max = spec.n_embd_v_gqa_max()
    for il in range(spec.n_layer):
        if not spec.has_kv[il]:
            continue
        dev = devices[layer_dev[il] if s.offload_kqv else CPU]
        n_cells = (swa_cells if spec.is_swa[il] else cells) * n_stream
        dev.k += _row_bytes(s.type_k, spec.n_embd_k_gqa(il), "K") * n_cells
        if not spec.is_mla:
            width = v_width_max if v_trans else spec.n_embd_v_gqa(il)
            dev.v += _row_bytes(s.type_v, width, "V") * n_cells


@dataclass(frozen=True)
class KvGrowth:
    """How the KV cache grows with the context: `fixed + per_1k * n_ctx / 1024` bytes
    for any n_ctx from `from_ctx` on (a multiple of 256), as plan_memory sizes it."""

    per_1k: int  # bytes each further 1024 tokens of context add (the full-attention layers)
    fixed: int  # bytes that stop growing: the sliding-window layers' cells
    swa_cells: int  # cells each sliding-window layer keeps (0: none)
    from_ctx: int


def kv_growth(spec: ModelSpec, settings: PlanSettings) -> KvGrowth:
    """KV bytes per 1k tokens of context, and the part that does not grow, from two
    plans past the sliding window (its cells stop at PAD(n_swa + n_ubatch, 256))."""
    window = spec.n_swa + settings.n_ubatch if any(spec.is_swa) and not settings.swa_full else 0
    start = max(1024, -(-window // CTX_PAD) * CTX_PAD)
    low = plan_memory(spec, replace(settings, n_ctx=start))
    high = plan_memory(spec, replace(settings, n_ctx=start + 1024))
    per_1k = high.kv - low.kv
    return KvGrowth(per_1k, low.kv - per_1k * start // 1024, low.swa_cells if window else 0, start)


def checkpoint_bytes(spec: ModelSpec, s: PlanSettings) -> int:
    """Bytes of one KV checkpoint kvchat keeps at a turn boundary (kvchat.session),
    0 where none is needed (memory that rolls back by removing cells).

    It is llama_state_seq_get_data_ext with LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY:
    the SWA layers' cells inside the window (n_swa of them, the rest are masked;
    src/llama-kv-cache.cpp state_write) or the recurrent state; a few bytes of
    cell metadata are left out. Checkpoints live in host RAM, outside `total`.
    """
    kind = spec.memory_type
    if kind == "standard" or (kind == "sliding-window" and s.swa_full):
        return 0
    if kind in ("recurrent", "hybrid"):
        return 4 * (spec.n_embd_r + spec.n_embd_s) * sum(
            1 for il in range(spec.n_layer_main) if spec.is_recurrent[il])
    n_cells = min(spec.n_swa, kv_cells(spec, s)[3])
    total = 0
    for il in range(spec.n_layer):
        if spec.has_kv[il] and spec.is_swa[il]:
            total += _row_bytes(s.type_k, spec.n_embd_k_gqa(il), "K") * n_cells
            if not spec.is_mla:
                total += _row_bytes(s.type_v, spec.n_embd_v_gqa(il), "V") * n_cells
    return total


def _row_bytes(cache_type: CacheType, n: int, which: str) -> int:
    if n % cache_type.block_size:
        raise UsageError(
            f"a {cache_type.name} {which} cache needs rows that are a multiple of "
            f"{cache_type.block_size} values; this model's are {n}",
            hint="pick f16, bf16 or f32 for this model",
        )
    return cache_type.row_bytes(n)


def _plan_recurrent(
    spec: ModelSpec, s: PlanSettings, layer_dev: list[str], devices: dict[str, DevicePlan]
) -> None:
    """Recurrent state per layer (llama_memory_recurrent, src/llama-memory-recurrent.cpp).

    f32 rows of n_embd_r (conv/shift) and n_embd_s (ssm/wkv) per sequence, whatever
    the context length or cache types.
    """
    mem_size = max(1, s.n_seq)
    per_layer = 4 * (spec.n_embd_r + spec.n_embd_s) * mem_size
    for il in range(spec.n_layer_main):
        if spec.is_recurrent[il]:
            devices[layer_dev[il] if s.offload_kqv else CPU].recurrent += per_layer


def _plan_compute(
    spec: ModelSpec,
    s: PlanSettings,
    devices: dict[str, DevicePlan],
    layer_dev: list[str],
    output_dev: str,
    cells: int,
    swa_cells: int,
    n_ubatch: int,
    n_batch: int,
) -> None:
    """Estimate the compute buffers that llama.cpp's graph allocator reserves.

    The reserve graph processes one micro-batch of n_tokens = min(n_ctx, n_ubatch)
    with min(n_tokens, n_outputs_max) outputs (llama_context::sched_reserve). Its
    peak is the logits (n_vocab floats per output, next to two n_embd activations),
    the attention (without flash attention the scores: n_kv floats per token and
    head, plus the f32 mask; flash attention never materialises them and its mask is
    f16) or the FFN (gate, up and their product beside three n_embd activations),
    the mask staying alive throughout. Measured against llama.cpp on SmolLM2 this is
    within ~2% on the CPU alone; over two RPC workers within 5% per device (12% on
    the host without flash attention). For other models treat it as an estimate.

    Graph inputs (the masks, the embeddings a device receives) live in the compute
    buffers of the CPU and of each device. With pipeline parallelism -- more than one
    device and every layer offloaded (llama_context's constructor) -- the scheduler
    keeps GGML_SCHED_MAX_COPIES (4) copies of every input (ggml-backend.cpp,
    ggml_backend_sched_split_graph, pass 6).
    """
    n_tokens = n_ubatch
    n_outputs = min(n_tokens, n_batch, s.n_outputs_max or n_batch)
    logits_phase = 4 * n_tokens * 2 * spec.n_embd + 4 * n_outputs * spec.n_vocab
    n_head = max(spec.n_head, default=0)
    n_kv = cells if any(spec.has_kv) else 0
    mask_bytes = 2 if s.flash_attn else 4
    mask = mask_bytes * n_tokens * n_kv
    masks = mask + (mask_bytes * n_tokens * swa_cells if any(spec.is_swa) else 0)
    attn_phase = mask + 4 * n_tokens * 6 * spec.n_embd
    if not s.flash_attn:
        attn_phase += 4 * n_tokens * n_kv * n_head
    ffn_phase = mask + 4 * n_tokens * 3 * (spec.n_embd + spec.n_ff_max)
    layer_phase = max(attn_phase, ffn_phase)
    if any(spec.is_recurrent):
        # the scan keeps a copy of the state of every sequence in the batch
        layer_phase = max(layer_phase, 4 * (spec.n_embd_r + spec.n_embd_s) * max(1, s.n_seq) * 2)
    gpu_devs = {d for d in [*layer_dev, output_dev] if d != CPU}
    if not gpu_devs:
        devices[CPU].compute = max(logits_phase, layer_phase)
        return
    pipeline = len(s.gpus) > 1 and CPU not in layer_dev and output_dev != CPU and s.offload_kqv
    n_copies = GGML_SCHED_MAX_COPIES if pipeline else 1
    inputs = masks + 4 * n_tokens * spec.n_embd  # the masks and the hidden state arriving
    # split graph: each GPU holds the activations of its layers; the CPU keeps the
    # input embeddings and, when the output layer stays there, the logits
    for gpu in gpu_devs:
        holds_layers = gpu in layer_dev
        devices[gpu].compute = max(
            layer_phase + (n_copies - 1) * inputs if holds_layers else 0,
            logits_phase if output_dev == gpu else 0,
        )
    host = 4 * n_tokens * spec.n_embd + n_copies * inputs
    if output_dev == CPU:
        host = max(host, logits_phase)
    if any(d == CPU for d in layer_dev):
        host = max(host, layer_phase)
    devices[CPU].compute = host


# -- budgets and fitting ------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str) -> int:
    """Bytes from '8GB', '6.5GiB', '512MiB', '512M', '1024B', '0'.

    'GB' and 'GiB' both mean 1024**3 here, as memory is sold and reported in binary
    units; say '8000MB' for decimal precision. A bare number other than 0 is refused:
    `--vram 8` meant 8 GiB far more often than 8 bytes.
    """
    match = _SIZE_RE.match(str(text))
    if not match:
        raise UsageError(
            f"cannot read the size '{text}'", hint="use a number with a unit, e.g. 8GB, 6.5GiB, 512MiB"
        )
    number, prefix, binary, byte = match.groups()
    value = float(number) * 1024 ** _POWERS[prefix.lower()]
    if not (prefix or binary or byte) and value != 0:
        raise UsageError(
            f"the size '{text.strip()}' has no unit",
            hint=f"say {number}GiB, {number}MiB or {number}B",
        )
    return int(value)


@dataclass(frozen=True)
class Budget:
    """Memory a plan may use: RAM, and free VRAM per GPU, each minus `margin`."""

    ram: int
    vram: tuple[int, ...] = ()
    gpu_names: tuple[str, ...] = ()
    margin: int = DEFAULT_MARGIN

    def limit(self, device: str) -> int:
        if device == CPU:
            return self.ram - self.margin
        return self.vram[self.gpu_names.index(device)] - self.margin

    def split(self) -> tuple[float, ...]:
        """llama.cpp's default tensor split: each GPU's share of the free memory
        (src/llama-model.cpp, load_tensors); even where none reports any."""
        if not self.gpu_names or sum(self.vram) <= 0:
            return ()
        return tuple(float(size) for size in self.vram)


def fits(plan: MemoryPlan, budget: Budget) -> bool:
    """Every device's total within its budget."""
    return all(dev.total <= budget.limit(dev.name) for dev in plan.devices)


def _with_gpus(settings: PlanSettings, budget: Budget) -> PlanSettings:
    """The budget's GPUs, split as llama.cpp splits by default: by free memory."""
    if budget.gpu_names and not settings.gpus:
        split = settings.tensor_split or budget.split()
        return replace(settings, gpus=budget.gpu_names, tensor_split=split)
    return settings


def largest_ctx(
    spec: ModelSpec, settings: PlanSettings, budget: Budget, *, max_ctx: int | None = None
) -> int | None:
    """The largest context (a multiple of 256, at most the training context or
    `max_ctx`) whose plan fits the budget with the settings' GPU layers; None if
    not even 256 tokens fit. This is what `run --ctx auto` needs.
    """
    settings = _with_gpus(settings, budget)
    top = max_ctx if max_ctx else spec.n_ctx_train
    hi = max(top // CTX_PAD, 1)
    lo = 0  # in units of 256 tokens; lo fits (0 meaning nothing does yet)

    def ok(units: int) -> bool:
        return fits(plan_memory(spec, replace(settings, n_ctx=units * CTX_PAD)), budget)

    if ok(hi):
        return hi * CTX_PAD
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo * CTX_PAD if lo else None


def fit_gpu_layers(spec: ModelSpec, settings: PlanSettings, budget: Budget) -> int | None:
    """The most layers (0..n_layer+1, the +1 being the output layer) that fit the GPUs
    at the settings' context; None if the model does not fit even on the CPU."""
    settings = _with_gpus(settings, budget)
    if not settings.gpus:
        return 0 if fits(plan_memory(spec, replace(settings, n_gpu_layers=0)), budget) else None
    for ngl in range(spec.n_layer + 1, -1, -1):
        if fits(plan_memory(spec, replace(settings, n_gpu_layers=ngl)), budget):
            return ngl
    return None


@dataclass(frozen=True)
class FitResult:
    n_ctx: int
    n_gpu_layers: int
    plan: MemoryPlan


def fit(
    spec: ModelSpec, settings: PlanSettings, budget: Budget, *, n_ctx_min: int = 4096,
    max_ctx: int | None = None,
) -> FitResult | None:
    """Context and GPU layers that fit, in llama.cpp's `--fit` order: keep every
    layer on the GPU and shrink the context (from `max_ctx`, default the training
    length), down to `n_ctx_min`; below that keep `n_ctx_min` and move layers back
    to the CPU. None when nothing fits.
    """
    settings = _with_gpus(settings, budget)
    n_ctx_min = min(n_ctx_min, spec.n_ctx_train) or CTX_PAD
    full = replace(settings, n_gpu_layers=-1)
    n_ctx = largest_ctx(spec, full, budget, max_ctx=max_ctx)
    if n_ctx is not None and n_ctx >= n_ctx_min:
        plan = plan_memory(spec, replace(full, n_ctx=n_ctx))
        return FitResult(n_ctx, plan.n_gpu_layers if settings.gpus else 0, plan)
    at_min = replace(settings, n_ctx=n_ctx_min)
    ngl = fit_gpu_layers(spec, at_min, budget)
    if ngl is None:
        n_ctx = largest_ctx(spec, replace(settings, n_gpu_layers=0), budget, max_ctx=max_ctx)
        if n_ctx is None:
            return None
        return FitResult(n_ctx, 0, plan_memory(spec, replace(settings, n_gpu_layers=0, n_ctx=n_ctx)))
    plan = plan_memory(spec, replace(at_min, n_gpu_layers=ngl))
    return FitResult(plan.n_ctx, ngl, plan)
