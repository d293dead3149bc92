"""Options shared by several commands, defined once so they are spelled alike.

A command takes groups of them with `@shared_options(LOAD, SAMPLING, ...)`: the
options are added to its signature for Typer, and the function receives what the
user typed as one `flags` dict (None for every option not given), which
`kvchat.settings.resolve` turns into typed settings (flag > saved session >
KVCHAT_* > config.toml > default). Typer only checks the shape of a value here;
ranges and meanings are checked in one place, the settings module.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any, Optional, TypeVar

import typer

F = TypeVar("F", bound=Callable[..., Any])


def _option(name: str, annotation: Any, default: Any = None) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


MODEL = (
    _option("model", Annotated[Optional[str], typer.Option(
        "--model", "-m",
        help="Model: alias[:quant], user/repo[:quant], user/repo/file.gguf or a .gguf path "
        "(default: the bundled SmolLM2-135M).")]),
)
CTX = (
    _option("ctx", Annotated[Optional[str], typer.Option(
        "--ctx", "-c",
        help="Context length in tokens (4096, 8k) or 'auto': the largest that fits free memory, "
        "up to the training length and ctx_max (32768).")]),
)
CACHE_TYPES = (
    _option("cache_type_k", Annotated[Optional[str], typer.Option(
        "--cache-type-k", "-ctk", help="K cache type: f32 f16 bf16 q8_0 q4_0 q4_1 iq4_nl q5_0 q5_1.")]),
    _option("cache_type_v", Annotated[Optional[str], typer.Option(
        "--cache-type-v", "-ctv", help="V cache type (quantized types need flash attention).")]),
)
FLASH_ATTN = (
    _option("flash_attn", Annotated[Optional[str], typer.Option(
        "--flash-attn", "-fa", help="Flash attention: auto (off on a CPU), on or off.")]),
)
DEVICES = (
    _option("ngl", Annotated[Optional[str], typer.Option(
        "--ngl", help="Layers to offload to the GPU: a count, -1 (all) or auto (the most that fit).")]),
)
THREADS = (
    _option("threads", Annotated[Optional[str], typer.Option(
        "--threads", "-t", help="CPU threads (default: physical cores).")]),
)
BATCH = (
    _option("batch", Annotated[Optional[str], typer.Option(
        "--batch", "-b", help="Prompt tokens evaluated per step (default 512).")]),
)
SAMPLING = (
    _option("max_tokens", Annotated[Optional[str], typer.Option(
        "--max-tokens", "-n", help="Stop each reply after this many tokens.")]),
    _option("temperature", Annotated[Optional[str], typer.Option(
        "--temperature", "--temp", help="Sampling temperature; 0 = greedy (default 0.8).")]),
    _option("top_k", Annotated[Optional[str], typer.Option(
        "--top-k", help="Top-k; 0 = off (default 40).")]),
    _option("top_p", Annotated[Optional[str], typer.Option(
        "--top-p", help="Top-p; 1 = off (default 0.95).")]),
    _option("min_p", Annotated[Optional[str], typer.Option(
        "--min-p", help="Min-p; 0 = off (default 0.05).")]),
    _option("repeat_penalty", Annotated[Optional[str], typer.Option(
        "--repeat-penalty", help="Penalty for repeating recent tokens; 1 = off (default).")]),
    _option("seed", Annotated[Optional[str], typer.Option("--seed", help="Sampling seed.")]),
)
CONVERSATION = (
    _option("system", Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt.")]),
    _option("overflow", Annotated[Optional[str], typer.Option(
        "--overflow", help="When the context is full: shift (drop oldest turns) or stop.")]),
)
PREFIX_CACHE = (
    _option("prefix_cache", Annotated[Optional[bool], typer.Option(
        "--prefix-cache/--no-prefix-cache", show_default=False,
        help="Reuse and store prompt starts on disk (default on; see `kvchat cache`).")]),
    _option("prefix_cache_size", Annotated[Optional[str], typer.Option(
        "--prefix-cache-size", metavar="SIZE",
        help="Prefix cache size limit, like 4G or 500M (default 4G).")]),
)
TEMPLATE = (
    _option("chat_template", Annotated[Optional[str], typer.Option(
        "--chat-template",
        help="A llama.cpp built-in template name (chatml, gemma, llama3, ...) or a Jinja file; "
        "overrides the model's own.")]),
    _option("raw", Annotated[Optional[bool], typer.Option(
        "--raw/--no-raw", help="No chat template: plain text completion (base models).")]),
    _option("think", Annotated[Optional[str], typer.Option(
        "--think", help="Reasoning on or off, where the template has a switch (enable_thinking).")]),
)
CHECKPOINTS = (
    _option("checkpoints", Annotated[Optional[str], typer.Option(
        "--checkpoints",
        help="KV checkpoints kept at turn boundaries on sliding-window, recurrent and hybrid models, "
        "so that undo, retry and an interrupted prefill re-evaluate a turn, not the conversation "
        "(default 8).")]),
    _option("checkpoint_mib", Annotated[Optional[str], typer.Option(
        "--checkpoint-mib", help="Memory cap for those checkpoints, MiB (default 256).")]),
)
SESSION = (
    _option("session_name", Annotated[Optional[str], typer.Option(
        "--session", "-S", help="Named session: resume it (KV state restored) and save each turn.")]),
    _option("rebuild", Annotated[bool, typer.Option(
        "--rebuild", help="Re-evaluate a saved session whose model or settings changed.")], False),
)
SPECULATIVE = (
    _option("speculative", Annotated[Optional[str], typer.Option(
        "--speculative", help="Speculative decoding: auto (n-gram lookup, or the --draft model), ngram, "
        "draft or off. The tokens are the model's own either way.")]),
    _option("draft", Annotated[Optional[str], typer.Option(
        "--draft", help="Draft model for speculative decoding: a small model with the same vocabulary "
        "(a .gguf path, an alias, user/repo:QUANT).")]),
)
SERVER = (
    _option("server", Annotated[Optional[str], typer.Option(
        "--server", metavar="URL", help="Chat on a running llama-server, vLLM or other OpenAI-compatible "
        "server (http://host:port) instead of loading the model here.")]),
    _option("api_key", Annotated[Optional[str], typer.Option(
        "--api-key", help="The server's API key (or KVCHAT_API_KEY).")]),
)
VERBOSE = (
    _option("verbose", Annotated[bool, typer.Option("--verbose", "-v", help="Show llama.cpp's log.")], False),
)
JSON = (
    _option("as_json", Annotated[bool, typer.Option("--json", help="Print one JSON object instead.")], False),
)

# Every option a chat (run or chat) takes, in --help order.
CHAT_OPTIONS = (*MODEL, *CTX, *CACHE_TYPES, *FLASH_ATTN, *DEVICES, *THREADS, *BATCH, *SAMPLING, *CONVERSATION,
                *PREFIX_CACHE, *TEMPLATE, *CHECKPOINTS, *SPECULATIVE, *SERVER, *SESSION, *VERBOSE)
# Names that are settings (kvchat.settings) rather than command switches.
_NOT_SETTINGS = {"session_name", "rebuild", "verbose", "as_json"}


def shared_options(*groups: tuple[inspect.Parameter, ...]) -> Callable[[F], F]:
    """Add option groups to a command; it receives the settings among them as
    `flags` (a dict) and the other switches (verbose, session...) by name."""
    added = [param for group in groups for param in group]
    added_names = {param.name for param in added}

    def decorate(func: F) -> F:
        signature = inspect.signature(func)
        # Typer reads each parameter's typer.Option/Argument from its annotation object:
        # resolve the function's own (string) annotations first.
        hints = typing.get_type_hints(func, include_extras=True)
        # A switch the function names itself (e.g. `verbose: bool = False`) is passed on.
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()
               if p.name != "flags" and p.name not in added_names]
        takes_flags = "flags" in signature.parameters

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            flags = {p.name: kwargs.pop(p.name) for p in added if p.name not in _NOT_SETTINGS}
            switches = {p.name: kwargs.pop(p.name) for p in added if p.name in _NOT_SETTINGS}
            if takes_flags:
                kwargs["flags"] = flags
            return func(**kwargs, **{k: v for k, v in switches.items() if k in signature.parameters})

        command.__signature__ = signature.replace(parameters=[*own, *added])  # type: ignore[attr-defined]
        # Typer reads annotations through typing.get_type_hints: give it the added ones too.
        command.__annotations__ = {**{p.name: p.annotation for p in own},
                                   **{p.name: p.annotation for p in added}, "return": hints.get("return")}
        return command  # type: ignore[return-value]

    return decorate
