"""The monitor (RSS, VRAM through NVML, tok/s) and the status line built from it.

There is no NVIDIA GPU on the test machine: the no-GPU path is tested for real,
and the GPU path with a small fake `pynvml` module put in `sys.modules` (and the
driver check patched), which is all NVML is to kvchat.
"""

from __future__ import annotations

import io
import re
import sys
import time
from types import ModuleType, SimpleNamespace

import pytest
from rich.console import Console

from kvchat import hardware
from kvchat.conversation import TurnStats
from kvchat.hardware import GpuMemory, HardwareSample, memory_kind, open_nvml, rss_bytes
from kvchat.llama_log import gpu_layers
from kvchat.monitor import HardwareSampler, KvFill, TokenMeter, kv_bytes_per_cell
from kvchat.ui.status import (
    DeviceInfo,
    ReplyView,
    hardware_text,
    open_fence,
    split_finished,
    status_text,
    summary_text,
    wrap_segments,
)

GIB = 1024**3
CPU_ONLY = DeviceInfo(gpu_layers=None, gpu_build=False)


def fake_pynvml(*, used: int = 3 * GIB, total: int = 8 * GIB, count: int = 1,
                init_error: bool = False) -> ModuleType:
    """Just the NVML calls kvchat makes, with a record of them."""
    module = ModuleType("pynvml")
    module.calls = []  # type: ignore[attr-defined]

    def init() -> None:
        module.calls.append("init")
        if init_error:
            raise RuntimeError("NVML Shared Library Not Found")

    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlShutdown = lambda: module.calls.append("shutdown")  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: count  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = lambda i: f"handle{i}"  # type: ignore[attr-defined]
    module.nvmlDeviceGetName = lambda h: b"NVIDIA Fake 8GB"  # type: ignore[attr-defined]

    def memory_info(handle: str) -> SimpleNamespace:
        module.calls.append("memory")
        return SimpleNamespace(used=used, total=total, free=total - used)

    module.nvmlDeviceGetMemoryInfo = memory_info  # type: ignore[attr-defined]
    return module


@pytest.fixture()
def with_fake_gpu(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    def install(**kwargs: object) -> ModuleType:
        module = fake_pynvml(**kwargs)  # type: ignore[arg-type]
        monkeypatch.setitem(sys.modules, "pynvml", module)
        monkeypatch.setattr(hardware, "_no_nvidia_driver", lambda: False)
        return module

    return install


# -- no GPU, for real -------------------------------------------------------------


def test_no_gpu_here_means_cpu() -> None:
    nvml = open_nvml()
    assert nvml is None  # this machine has no NVIDIA driver
    sample = HardwareSampler(nvml=nvml).sample()
    assert sample.vram is None
    assert sample.memory_kind == "cpu"
    assert sample.rss_bytes > 50 * 1024 * 1024
    assert hardware_text(sample, CPU_ONLY) == f"RSS {sample.rss_bytes / 2**20:.2f} MiB · CPU"


def test_rss_matches_psutil() -> None:
    import psutil

    assert abs(rss_bytes() - psutil.Process().memory_info().rss) < 16 * 1024 * 1024


def test_apple_silicon_is_unified_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(hardware.platform, "machine", lambda: "arm64")
    assert memory_kind(None) == "unified"
    sample = HardwareSample(100 * 2**20, None, "unified", 0.0)
    assert "unified memory" in hardware_text(sample, DeviceInfo((31, 31), True))


# -- GPU, through a fake pynvml -----------------------------------------------------


def test_fake_gpu_reports_vram(with_fake_gpu) -> None:
    module = with_fake_gpu(used=3 * GIB, total=8 * GIB)
    nvml = open_nvml()
    assert nvml is not None and nvml.names == ("NVIDIA Fake 8GB",)
    assert memory_kind(nvml) == "nvidia"
    assert nvml.read() == GpuMemory(3 * GIB, 8 * GIB, ("NVIDIA Fake 8GB",))
    sample = HardwareSampler(nvml=nvml).sample()
    text = hardware_text(sample, DeviceInfo(gpu_layers=(31, 31), gpu_build=True))
    assert "VRAM 3.00/8.00 GiB" in text and "GPU layers 31/31" in text and "CPU" not in text
    nvml.close()
    assert module.calls[0] == "init" and module.calls[-1] == "shutdown"


def test_two_gpus_are_summed(with_fake_gpu) -> None:
    with_fake_gpu(used=1 * GIB, total=4 * GIB, count=2)
    nvml = open_nvml()
    assert nvml is not None
    assert nvml.read() == GpuMemory(2 * GIB, 8 * GIB, ("NVIDIA Fake 8GB", "NVIDIA Fake 8GB"))


def test_nvml_that_fails_to_start_means_cpu(with_fake_gpu) -> None:
    with_fake_gpu(init_error=True)
    assert open_nvml() is None


def test_nvml_without_devices_is_shut_down(with_fake_gpu) -> None:
    module = with_fake_gpu(count=0)
    assert open_nvml() is None
    assert module.calls == ["init", "shutdown"]


def test_a_gpu_that_goes_away_reads_as_none(with_fake_gpu) -> None:
    module = with_fake_gpu()
    nvml = open_nvml()
    assert nvml is not None

    def lost(handle: str) -> None:
        raise RuntimeError("GPU is lost")

    module.nvmlDeviceGetMemoryInfo = lost  # type: ignore[attr-defined]
    assert nvml.read() is None


def test_sampler_reads_on_its_own_thread_at_its_interval(with_fake_gpu) -> None:
    module = with_fake_gpu()
    nvml = open_nvml()
    sampler = HardwareSampler(interval_s=0.05, nvml=nvml)
    module.calls.clear()
    with sampler:
        time.sleep(0.5)
        first = sampler.latest
    reads = module.calls.count("memory")
    # One read at start and about one per interval; never more (nothing per token).
    assert 3 <= reads <= 13, reads
    assert first.vram is not None and first.vram.used == 3 * GIB
    assert sampler._thread is None  # stopped and joined
    module.calls.clear()
    time.sleep(0.12)
    assert module.calls == []


# -- tok/s, KV fill, layers -----------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_meter() -> None:
    clock = FakeClock()
    meter = TokenMeter(clock)
    meter.start()
    assert meter.ttft_s is None and meter.decode_tok_s() is None
    clock.now += 0.5
    meter.token()
    assert meter.ttft_s == pytest.approx(0.5)
    assert meter.prefill_tok_s(100) == pytest.approx(200.0)
    assert meter.decode_tok_s() is None  # one token: no decode span yet
    for _ in range(10):
        clock.now += 0.02
        meter.token()
    assert meter.tokens == 11
    assert meter.decode_tok_s() == pytest.approx(50.0)
    assert meter.prefill_tok_s(0) is None


def test_kv_fill_from_llama_cpp_buffers() -> None:
    # SmolLM2-135M at n_ctx 4096, f16/f16: llama.cpp reports K 45 MiB + V 45 MiB.
    buffers = SimpleNamespace(kv_cells=4096, k=45 * 2**20, v=45 * 2**20, kv={"CPU": 90 * 2**20})
    per_cell = kv_bytes_per_cell(buffers, 4096)
    assert per_cell == 30 * 2 * 2 * 192  # layers x (K+V) x f16 bytes x (3 heads x 64 dims)
    fill = KvFill(1024, 4096, per_cell)
    assert fill.fraction == 0.25
    assert fill.used_bytes == 22.5 * 2**20
    no_summary = SimpleNamespace(kv_cells=0, k=0, v=0, kv={"CUDA0": 60 * 2**20, "CPU": 30 * 2**20})
    assert kv_bytes_per_cell(no_summary, 4096) == per_cell


def test_kv_total_is_the_buffer_total_on_a_sliding_window_model() -> None:
    # Gemma 3 270M at n_ctx 4096: a full cache (4096 cells) and a SWA cache (1024 cells),
    # two summary lines. The status line's total must be the figure /info prints.
    mib = 2**20
    buffers = SimpleNamespace(kv_cells=4096 + 1024, k=55.5 * mib, v=55.5 * mib, kv={"CPU": 111 * mib})
    fill = KvFill(4096, 4096, kv_bytes_per_cell(buffers, 4096))
    assert fill.total_bytes == 111 * mib


def test_gpu_layers_from_the_load_log() -> None:
    log = ["load_tensors: offloading 30 repeating layers to GPU",
           "load_tensors: offloaded 31/31 layers to GPU", "llama_kv_cache: ..."]
    assert gpu_layers(log) == (31, 31)
    assert gpu_layers(["load_tensors:   CPU_Mapped model buffer size =    92.10 MiB"]) is None


# -- the lines the user sees --------------------------------------------------------------


def test_status_line_during_prefill_and_decode() -> None:
    clock = FakeClock()
    meter = TokenMeter(clock)
    meter.start()
    clock.now += 0.3
    kv = KvFill(812, 4096, 23040.0)
    hw = HardwareSample(412 * 2**20, None, "cpu", 0.0)
    assert status_text(meter, 40, kv, hw, CPU_ONLY).startswith("prefill 40 tok… 0.3s · KV 812/4096")
    meter.token()
    clock.now += 1.0
    for _ in range(50):
        meter.token()
    line = status_text(meter, 40, kv, hw, CPU_ONLY)
    assert line == ("prefill 133.3 tok/s · ttft 0.30s · decode 50.0 tok/s (51 tok) · "
                    "KV 812/4096 (20%, 17.8/90.0 MiB) · RSS 412.00 MiB · CPU")


def test_summary_line() -> None:
    turn = TurnStats(reused_tokens=30, evaluated_tokens=25, prompt_tokens=55, completion_tokens=11,
                     ttft_s=0.05, prefill_s=0.05, decode_s=0.1, stop_reason="eog")
    hw = HardwareSample(300 * 2**20, GpuMemory(2 * GIB, 8 * GIB, ("x",)), "nvidia", 0.0)
    line = summary_text(turn, KvFill(66, 4096, 23040.0), hw, DeviceInfo((31, 31), True))
    assert line == ("11 tok · prefill 25 tok at 500.0 tok/s (30 cached) · ttft 0.05s · "
                    "decode 100.0 tok/s · KV 66/4096 (2%, 1.5/90.0 MiB) · RSS 300.00 MiB · "
                    "VRAM 2.00/8.00 GiB · GPU layers 31/31 · stop: eog")


def test_status_and_summary_lines_show_draft_acceptance() -> None:
    clock = FakeClock()
    meter = TokenMeter(clock)
    meter.start()
    clock.now += 0.3
    meter.token()
    clock.now += 1.0
    meter.token(drafted=8, accepted=6)
    for _ in range(6):
        meter.token()
    meter.token(drafted=4, accepted=0)
    kv = KvFill(812, 4096, 23040.0)
    hw = HardwareSample(412 * 2**20, None, "cpu", 0.0)
    line = status_text(meter, 40, kv, hw, CPU_ONLY)
    assert "(9 tok) · drafts 6/12 accepted (50%) · KV 812/4096" in line
    turn = TurnStats(reused_tokens=30, evaluated_tokens=25, prompt_tokens=55, completion_tokens=11,
                     ttft_s=0.05, prefill_s=0.05, decode_s=0.1, stop_reason="eog",
                     drafted_tokens=12, accepted_tokens=9)
    summary = summary_text(turn, kv, hw, CPU_ONLY)
    assert "decode 100.0 tok/s · drafts 9/12 accepted (75%) · KV 812/4096" in summary
    without = summary_text(TurnStats(completion_tokens=3), kv, hw, CPU_ONLY)
    assert "drafts" not in without


def test_long_lines_wrap_between_segments() -> None:
    line = "prefill 1.0 tok/s · ttft 0.10s · KV 1/4096 (0%, 0.0/90.0 MiB) · RSS 1.00 MiB · CPU"
    assert wrap_segments(line, 200) == line
    assert wrap_segments(line, 45) == ("prefill 1.0 tok/s · ttft 0.10s\n"
                                       "KV 1/4096 (0%, 0.0/90.0 MiB) · RSS 1.00 MiB\nCPU")


# -- streaming the reply ---------------------------------------------------------------------


def test_plain_text_is_finished_line_by_line() -> None:
    assert split_finished("one\ntwo\nthr", markdown=False) == ("one\ntwo\n", "thr")
    assert split_finished("no newline", markdown=False) == ("", "no newline")


def test_markdown_is_finished_block_by_block() -> None:
    assert split_finished("# Title\n\nA para", markdown=True) == ("# Title\n\n", "A para")
    text = "Intro\n\n```python\nx = 1\n\ny = 2\n"
    assert split_finished(text, markdown=True) == ("Intro\n\n", "```python\nx = 1\n\ny = 2\n")
    closed = text + "```\nafter"
    assert split_finished(closed, markdown=True) == (text + "```\n", "after")
    assert open_fence("```python\nx = 1\n") == "```python"
    assert open_fence("```python\nx = 1\n```\n") is None


def _console(*, terminal: bool) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=terminal, width=60, height=20, no_color=True), buffer


@pytest.mark.parametrize("terminal", [True, False])
def test_reply_view_keeps_the_whole_reply_on_screen(terminal: bool) -> None:
    console, buffer = _console(terminal=terminal)
    words = [f"w{i}" for i in range(400)]  # far more than the 20-line screen holds
    with ReplyView(console, markdown=False, status=lambda: "STATUS", refresh_per_second=50) as view:
        for word in ["first line\n", *(w + " " for w in words)]:
            view.feed(word)
            time.sleep(0.0005)
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buffer.getvalue())
    assert ("STATUS" in plain) is terminal
    # The live area is transient: after its last frame, the rest of the reply is printed for good.
    assert "w399" in plain.split("STATUS")[-1]
    if not terminal:  # no live frames: every word printed once, in order
        assert plain.split() == ["first", "line", *words]


def test_reply_view_markdown_renders_blocks() -> None:
    console, buffer = _console(terminal=False)
    with ReplyView(console, markdown=True, status=None) as view:
        for piece in ["# Head", "ing\n\nSome **bold** text.\n\n", "```\ncode()\n```\n"]:
            view.feed(piece)
    out = buffer.getvalue()
    assert "Heading" in out and "**" not in out and "code()" in out and "```" not in out


def test_reply_view_markdown_code_blocks_copy_as_code() -> None:
    # rich pads a code block by a column and wraps it; copied from the screen, that is not the code
    console, buffer = _console(terminal=False)
    long = "    return x + 1  # " + "a comment longer than the whole screen " * 4
    with ReplyView(console, markdown=True, status=None) as view:
        view.feed(f"Here:\n\n```python\ndef f(x):\n{long}\n```\n\nDone.\n")
    lines = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buffer.getvalue()).splitlines()
    at = lines.index("def f(x):")  # flush left, no trailing padding
    assert lines[at + 1] == long.rstrip()  # one line, whole


def test_stats_on_a_server_do_not_show_this_process_s_rss_as_the_model_s() -> None:
    from kvchat.app.backends import MemoryFigures
    from kvchat.conversation import TurnStats
    from kvchat.ui.render import stats_line

    turn = TurnStats(prompt_tokens=13, completion_tokens=4, ttft_s=0.5, prefill_s=0.5, decode_s=1.0)
    here = stats_line(turn, 1.0, MemoryFigures(256, 17, 1 << 20, 300 << 20, None))
    assert "RSS 300.00 MiB" in here and "KV 1.00 MiB" in here
    server = stats_line(turn, 1.0, MemoryFigures(256, 17, None, None, None))  # what a server backend gives
    assert "RSS" not in server and "KV unknown" in server
