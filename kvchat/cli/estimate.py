"""`kvchat estimate`: what a model costs at a context and cache types, before loading it.

Reads only the GGUF header (kvchat.gguf), plans with kvchat.memory, and never
imports llama_cpp unless `--exact` asks llama.cpp for its own figures. This module
only declares the command: the planner and the report (kvchat.cli.estimate_report)
are imported when it runs, not on every command's start-up.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from kvchat.cli import app
from kvchat.cli.options import BATCH, CTX, DEVICES, DRAFT, FLASH_ATTN, JSON, MODEL, shared_options
from kvchat.cli.options import CACHE_TYPES as CACHE_TYPE_OPTIONS


@app.command()
@shared_options(MODEL, CTX, CACHE_TYPE_OPTIONS, FLASH_ATTN, DEVICES, BATCH, DRAFT, JSON)
def estimate(
    model_arg: Annotated[
        Optional[str], typer.Argument(metavar="[MODEL]", help="A .gguf path or model reference "
                                      "(default: bundled SmolLM2-135M).")
    ] = None,
    *,
    flags: dict[str, Any],
    compare: Annotated[
        bool, typer.Option("--compare", help="Cache types x contexts up to the training length.")
    ] = False,
    vram: Annotated[
        Optional[str], typer.Option("--vram", help="VRAM per GPU, e.g. 8GB (default: free now).")
    ] = None,
    ram: Annotated[
        Optional[str], typer.Option("--ram", help="RAM, e.g. 16GiB (default: available now).")
    ] = None,
    margin: Annotated[
        Optional[str], typer.Option("--margin", help="Memory to leave free per device (default 1GiB).")
    ] = None,
    ubatch: Annotated[int, typer.Option("--ubatch", "-ub", help="Micro-batch size.", min=1)] = 512,
    parallel: Annotated[int, typer.Option("--parallel", "-np", help="Sequences in parallel.", min=1)] = 1,
    swa_full: Annotated[bool, typer.Option("--swa-full", help="Full-size cache for SWA layers.")] = False,
    exact: Annotated[
        bool, typer.Option("--exact", help="Also load the model and print llama.cpp's own figures.")
    ] = False,
    device: Annotated[
        Optional[list[str]], typer.Option(
            "--device", metavar="NAME=SIZE", help="A device to plan over, with its memory: a GPU as "
            "llama.cpp names it (CUDA0=24GiB) or an rpc-server worker (rpc://10.0.0.2:50052=24GiB). "
            "Repeat it; the devices replace the GPUs found here.")
    ] = None,
    tensor_split: Annotated[
        Optional[str], typer.Option(
            "--tensor-split", "-ts", metavar="N0,N1,...", help="Share of the layers per device, in the order "
            "the estimate lists them (default: by memory, as llama.cpp splits by free memory).")
    ] = None,
    as_json: bool = False,
) -> None:
    """Memory a model needs — weights, KV cache, compute — per device, from its header alone.

    With --draft, the draft model's share too, at the same context and cache types.

    \b
    Examples:
      kvchat estimate ./model.gguf --ctx 8k,32k -ctk q8_0 -ctv q8_0
      kvchat estimate ./model.gguf --compare --vram 8GB
      kvchat estimate ./model.gguf --ngl auto --vram 6GiB --json
      kvchat estimate qwen2.5-7b --draft qwen2.5-0.5b   (the draft model's share too)
      kvchat estimate qwen2.5-72b:Q4_K_M --device CUDA0=24GiB --device rpc://10.0.0.2:50052=24GiB
    """
    from kvchat.cli.estimate_report import run

    run(model_arg, flags, compare=compare, vram=vram, ram=ram, margin=margin, ubatch=ubatch,
        parallel=parallel, swa_full=swa_full, exact=exact, device=device, tensor_split=tensor_split,
        as_json=as_json)
