"""Options shared by several commands, defined once so they are spelled alike.

Every option defaults to None: `kvchat.config.setting` then applies the order
flag > KVCHAT_* environment variable > config file > built-in default.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model", "-m",
        help="Model: alias[:quant], user/repo[:quant], user/repo/file.gguf or a .gguf path "
        "(default: the bundled SmolLM2-135M).",
    ),
]
CtxOpt = Annotated[
    Optional[str],
    typer.Option(
        "--ctx", "-c",
        help="Context length in tokens (4096, 8k) or 'auto': the largest that fits free memory, "
        "up to the training length and ctx_max (32768).",
    ),
]
CacheTypeKOpt = Annotated[
    Optional[str],
    typer.Option(
        "--cache-type-k", "-ctk", help="K cache type: f32 f16 bf16 q8_0 q4_0 q4_1 iq4_nl q5_0 q5_1."
    ),
]
CacheTypeVOpt = Annotated[
    Optional[str],
    typer.Option("--cache-type-v", "-ctv", help="V cache type (quantized types need flash attention)."),
]
FlashAttnOpt = Annotated[
    Optional[str], typer.Option("--flash-attn", "-fa", help="Flash attention: auto, on or off.")
]
NglOpt = Annotated[
    Optional[int],
    typer.Option("--ngl", help="Layers to offload to the GPU (-1: all).", min=-1),
]
ThreadsOpt = Annotated[
    Optional[int], typer.Option("--threads", "-t", help="CPU threads (default: physical cores).", min=1)
]
SessionOpt = Annotated[
    Optional[str],
    typer.Option("--session", "-S", help="Named session: resume it (KV state restored) and save each turn."),
]
RebuildOpt = Annotated[
    bool,
    typer.Option("--rebuild", help="Re-evaluate a saved session whose model or settings changed."),
]
OverflowOpt = Annotated[
    Optional[str],
    typer.Option("--overflow", help="When the context is full: shift (drop oldest turns) or stop."),
]
MaxTokensOpt = Annotated[
    Optional[int],
    typer.Option("--max-tokens", "-n", help="Stop each reply after this many tokens.", min=1),
]
TemperatureOpt = Annotated[
    Optional[float], typer.Option("--temperature", "--temp", help="0 = greedy.", min=0.0)
]
TopKOpt = Annotated[Optional[int], typer.Option("--top-k", min=0)]
TopPOpt = Annotated[Optional[float], typer.Option("--top-p", min=0.0, max=1.0)]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Sampling seed.")]
SystemOpt = Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show llama.cpp's log.")]
