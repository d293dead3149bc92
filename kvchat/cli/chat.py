"""`kvchat chat`: the interactive chat (kvchat.ui.repl); piped stdin makes it `kvchat run`."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Optional

import typer

from kvchat import config
from kvchat.cli import app
from kvchat.cli.common import open_chat
from kvchat.cli.options import (
    CacheTypeKOpt,
    CacheTypeVOpt,
    CtxOpt,
    FlashAttnOpt,
    MaxTokensOpt,
    ModelOpt,
    NglOpt,
    OverflowOpt,
    RebuildOpt,
    SeedOpt,
    SessionOpt,
    SystemOpt,
    TemperatureOpt,
    ThreadsOpt,
    TopKOpt,
    TopPOpt,
    VerboseOpt,
)
from kvchat.cli.run import resolve_sampling
from kvchat.cli.run import run as run_command
from kvchat.errors import UsageError
from kvchat.ui.environment import Environment


class Render(str, Enum):
    plain = "plain"
    markdown = "markdown"


@app.command()
def chat(
    model_arg: Annotated[
        Optional[str], typer.Argument(metavar="[MODEL]", help="A .gguf path or model reference.")
    ] = None,
    model: ModelOpt = None,
    ctx: CtxOpt = None,
    cache_type_k: CacheTypeKOpt = None,
    cache_type_v: CacheTypeVOpt = None,
    flash_attn: FlashAttnOpt = None,
    ngl: NglOpt = None,
    threads: ThreadsOpt = None,
    max_tokens: MaxTokensOpt = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    seed: SeedOpt = None,
    system: SystemOpt = None,
    verbose: VerboseOpt = False,
    session_name: SessionOpt = None,
    rebuild: RebuildOpt = False,
    overflow: OverflowOpt = None,
    render: Annotated[
        Render, typer.Option("--render", help="Replies as plain text or rendered markdown.")
    ] = Render.plain,
) -> None:
    """Chat interactively: history, multi-line input, /commands, a live status line.

    \b
    Keys: Enter sends · Alt-Enter (or Esc Enter) new line · Tab completes
    /commands · Ctrl-C stops a reply · Ctrl-D or /exit leaves. Type /help inside.
    With stdin not a terminal it answers what was piped, like `kvchat run`.

    \b
    Examples:
      kvchat chat --session work --render markdown
      kvchat chat ./model.gguf --ctx 8192 -ctk q8_0 -ctv q8_0 -fa on
      cat prompt.txt | kvchat chat
    """
    if model_arg is not None and model is not None:
        raise UsageError("give the model once: as the argument or with --model")
    model_ref = model_arg or model
    env = Environment()
    load_flags: dict[str, Any] = dict(model=model_ref, ctx=ctx, cache_type_k=cache_type_k,
                                      cache_type_v=cache_type_v, flash_attn=flash_attn, ngl=ngl,
                                      threads=threads)
    if not env.stdin_isatty:
        run_command(words=None, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    seed=seed, system=system, stats=False, as_json=False, verbose=verbose,
                    session_name=session_name, rebuild=rebuild, overflow=overflow, **load_flags)
        return

    from kvchat.monitor import open_nvml
    from kvchat.ui.repl import ChatRepl

    limit = config.setting("max_tokens", max_tokens)

    def opener(name: str | None, sampling: Any, limit: int | None) -> Any:
        """Open another chat from inside the REPL (/load): the saved settings win."""
        flags = dict(load_flags, model=None, ctx=None, cache_type_k=None, cache_type_v=None,
                     flash_attn=None) if name else load_flags
        return open_chat(env, session_name=name, rebuild=False, overflow=overflow, sampling=sampling,
                         max_tokens=limit, system=None, verbose=verbose, **flags)

    setup = open_chat(
        env, session_name=session_name, rebuild=rebuild, overflow=overflow,
        sampling=resolve_sampling(temperature, top_k, top_p, seed),
        max_tokens=None if limit is None else int(limit), system=config.setting("system", system),
        verbose=verbose, **load_flags,
    )
    nvml = open_nvml()
    repl = ChatRepl(env, setup, opener=opener, markdown=render is Render.markdown, nvml=nvml)
    try:
        repl.run()
    finally:
        repl.close()
        if nvml is not None:
            nvml.close()
