"""What the chat's live status line costs in decode speed.

The same greedy reply is produced with and without what `kvchat chat` runs
around it: the ReplyView (rich Live, refreshed on its own thread) with the
status line, and the HardwareSampler thread reading RSS (and VRAM where NVML
is present). Runs alternate to spread out machine noise; the medians of decode
tok/s are compared. The console is a terminal console writing to /dev/null, so
every frame is really rendered.

Prints `status line decode ratio (with/without): R` — 1.0 means free.

Usage: python benchmarks/bench_status_line.py [--model PATH] [--threads N] [--tokens 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics

from rich.console import Console

from kvchat.app import chat_template_for
from kvchat.cache_types import parse_cache_type
from kvchat.conversation import TurnStats
from kvchat.engine import Engine, EngineSettings, supports_gpu_offload
from kvchat.engine_api import SamplingSettings
from kvchat.hardware import open_nvml
from kvchat.monitor import HardwareSampler, KvFill, TokenMeter, kv_bytes_per_cell
from kvchat.registry import default_model_path
from kvchat.session import Session
from kvchat.ui.status import DeviceInfo, ReplyView, status_text

PROMPT = "Repeat the word hello 500 times."


def one_reply(session: Session, *, with_status: bool, console: Console, sampler: HardwareSampler,
              device: DeviceInfo, bytes_per_cell: float) -> TurnStats:
    """One reply's figures (its decode tok/s is the session's own), from an empty cache."""
    session.clear()
    meter = TokenMeter()
    stream = session.send(PROMPT)
    if not with_status:
        sink = []
        for event in stream:
            sink.append(event.text)
    else:
        def status() -> str:
            kv = KvFill(session.n_kv, session.engine.n_ctx, bytes_per_cell)
            return status_text(meter, 0, kv, sampler.latest, device)

        with sampler, ReplyView(console, markdown=False, status=status) as view:
            meter.start()
            for event in stream:
                meter.token()
                if event.text:
                    view.feed(event.text)
    return stream.stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = args.model or default_model_path()
    f16 = parse_cache_type("f16")
    settings = EngineSettings(n_ctx=1024, type_k=f16, type_v=f16, n_threads=args.threads)
    nvml = open_nvml()
    with Engine(model, settings) as engine, open(os.devnull, "w") as devnull:
        session = Session(engine, chat_template_for(engine), SamplingSettings(temperature=0.0),
                          args.tokens)
        console = Console(file=devnull, force_terminal=True, width=120, height=40)
        sampler = HardwareSampler(nvml=nvml)
        device = DeviceInfo(engine.gpu_layers, supports_gpu_offload())
        per_cell = kv_bytes_per_cell(engine.buffers, engine.n_ctx)
        one_reply(session, with_status=True, console=console, sampler=sampler, device=device,
                  bytes_per_cell=per_cell)  # warm-up
        without: list[float] = []
        with_: list[float] = []
        for _ in range(args.repeats):
            for flag, into in ((False, without), (True, with_)):
                last = one_reply(session, with_status=flag, console=console, sampler=sampler,
                                 device=device, bytes_per_cell=per_cell)
                into.append(last.decode_tok_s)
        produced = last.completion_tokens
    if nvml is not None:
        nvml.close()
    a, b = statistics.median(without), statistics.median(with_)
    print(f"model {model.name} · threads {args.threads} · {produced} tokens per reply · "
          f"{args.repeats} runs each · hardware: {sampler.latest.memory_kind}")
    print(f"decode without status line: {a:.1f} tok/s (runs: {', '.join(f'{x:.1f}' for x in without)})")
    print(f"decode with status line:    {b:.1f} tok/s (runs: {', '.join(f'{x:.1f}' for x in with_)})")
    print(f"status line decode ratio (with/without): {b / a:.3f}")


if __name__ == "__main__":
    main()
