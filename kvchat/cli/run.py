"""`kvchat run`: one prompt in (arguments and/or stdin), the answer out on stdout."""

from __future__ import annotations

import json
from typing import Annotated, Optional

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
from kvchat.errors import UsageError
from kvchat.registry import looks_like_model_ref
from kvchat.ui.environment import Environment
from kvchat.ui.render import stats_line


def split_model_and_prompt(
    words: list[str], model: str | None
) -> tuple[str | None, list[str]]:
    """`run [MODEL] [PROMPT...]`: the first word is a model only if it looks like one."""
    if model is None and words and looks_like_model_ref(words[0]):
        return words[0], words[1:]
    return model, words


def build_prompt(piped: str, words: list[str]) -> str:
    parts = [p for p in (piped.strip("\n"), " ".join(words).strip()) if p.strip()]
    if not parts:
        raise UsageError(
            "no prompt given",
            hint='pass it as arguments (kvchat run "Why is the sky blue?") or pipe it on stdin',
        )
    return "\n\n".join(parts)


def resolve_sampling(temperature: float | None, top_k: int | None, top_p: float | None,
                     seed: int | None):  # noqa: ANN201  (SamplingSettings: engine is imported lazily)
    """Sampling settings from flags, KVCHAT_* variables, the config file and defaults."""
    from kvchat.engine import SamplingSettings

    return SamplingSettings(
        temperature=float(config.setting("temperature", temperature)),
        top_k=int(config.setting("top_k", top_k)),
        top_p=float(config.setting("top_p", top_p)),
        min_p=float(config.setting("min_p")),
        seed=None if (s := config.setting("seed", seed)) is None else int(s),
    )


@app.command()
def run(
    words: Annotated[
        Optional[list[str]],
        typer.Argument(
            metavar="[MODEL] [PROMPT]...",
            help="A model (optional: path, alias or user/repo[:quant]), then the prompt.",
        ),
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
    stats: Annotated[bool, typer.Option("--stats", help="One timings line on stderr.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead.")] = False,
    verbose: VerboseOpt = False,
    session_name: SessionOpt = None,
    rebuild: RebuildOpt = False,
    overflow: OverflowOpt = None,
) -> None:
    """Answer one prompt. stdin comes first, then the arguments, a blank line between.

    \b
    Examples:
      echo "Why is the sky blue?" | kvchat run
      kvchat run ./model.gguf "Name three colours" --temperature 0 --seed 1
      git diff | kvchat run "Write a commit message for this diff" --json
      kvchat run --session work "Remember: my name is Ada."   (then later)
      kvchat run --session work "What is my name?"
    """
    env = Environment()
    model_ref, prompt_words = split_model_and_prompt(list(words or []), model)
    prompt = build_prompt(env.read_stdin(), prompt_words)
    sampling = resolve_sampling(temperature, top_k, top_p, seed)
    limit = config.setting("max_tokens", max_tokens)
    setup = open_chat(
        env, session_name=session_name, rebuild=rebuild, overflow=overflow, sampling=sampling,
        max_tokens=None if limit is None else int(limit), system=config.setting("system", system),
        verbose=verbose, model=model_ref, ctx=ctx, cache_type_k=cache_type_k,
        cache_type_v=cache_type_v, flash_attn=flash_attn, ngl=ngl, threads=threads,
    )
    engine, session, request = setup.engine, setup.session, setup.request
    try:
        pieces: list[str] = []
        interrupted = False
        stream = session.send(prompt)
        try:
            for event in stream:
                pieces.append(event.text)
                if not as_json:
                    env.stdout.write(event.text)
                    env.stdout.flush()
        except KeyboardInterrupt:
            stream.close()
            interrupted = True
        turn = session.last_turn
        assert turn is not None
        text = "".join(pieces)
        if as_json:
            record = {
                "text": text,
                "model": str(request.model_path),
                "settings": {
                    "n_ctx": engine.n_ctx,
                    "cache_type_k": request.type_k.name,
                    "cache_type_v": request.type_v.name,
                    "flash_attn": engine.flash_attn,
                    "n_gpu_layers": request.n_gpu_layers,
                    "n_threads": request.n_threads,
                    "temperature": sampling.temperature,
                    "top_k": sampling.top_k,
                    "top_p": sampling.top_p,
                    "seed": sampling.seed,
                    "max_tokens": session.max_tokens,
                },
                "usage": {
                    "prompt_tokens": turn.prompt_tokens,
                    "completion_tokens": turn.completion_tokens,
                },
                "cache": {
                    "reused_tokens": turn.reused_tokens,
                    "evaluated_tokens": turn.evaluated_tokens,
                },
                "timings": {
                    "load_s": round(engine.load_s, 4),
                    "ttft_s": round(turn.ttft_s, 4),
                    "prefill_tok_s": round(turn.prefill_tok_s, 2),
                    "decode_tok_s": round(turn.decode_tok_s, 2),
                },
                "stop_reason": turn.stop_reason,
            }
            env.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        elif text and not text.endswith("\n"):
            env.stdout.write("\n")
        env.stdout.flush()
        if stats:
            env.stderr.write(stats_line(turn, engine.load_s) + "\n")
        if turn.dropped_turns:
            env.warn(
                f"context full: dropped the {turn.dropped_turns} oldest turn(s) "
                f"({turn.dropped_tokens} tokens) to make room"
            )
        setup.save()
        if interrupted:
            raise KeyboardInterrupt
    finally:
        setup.close()
