"""Options shared by several commands, defined once so they are spelled alike.

A setting's flags, help text and metavar come from kvchat.settings.SETTINGS.
A command takes groups of them with `@shared_options(CTX, SAMPLING, ...)`: the
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

from kvchat.setting_table import SETTINGS, keys_in

F = TypeVar("F", bound=Callable[..., Any])


def _option(name: str, annotation: Any, default: Any = None) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def option(name: str) -> Any:
    """The typer.Option of setting `name`: its flags, help and metavar from the table.
    An on/off setting (a bool default) is a --x/--no-x switch; any other takes the
    text as typed (None when not given), which kvchat.settings parses."""
    setting = SETTINGS[name]
    long, *short = setting.flags
    if isinstance(setting.default, bool):
        long = f"{long}/--no-{long.removeprefix('--')}"
    return typer.Option(long, *short, help=setting.help, metavar=setting.metavar, show_default=False)


def settings_options(*names: str) -> tuple[inspect.Parameter, ...]:
    """Command-line options for these settings, in this order (None when not given)."""
    return tuple(
        _option(name, Annotated[Optional[bool] if isinstance(SETTINGS[name].default, bool) else Optional[str],
                                option(name)])
        for name in names
    )


MODEL = settings_options("model")
CTX = settings_options("ctx")
CACHE_TYPES = settings_options("cache_type_k", "cache_type_v")
FLASH_ATTN = settings_options("flash_attn")
DEVICES = settings_options("ngl")
THREADS = settings_options("threads")
BATCH = settings_options("batch")
SAMPLING = settings_options("max_tokens", *keys_in("sampling"))
CONVERSATION = settings_options("system", "overflow")
PREFIX_CACHE = settings_options("prefix_cache", "prefix_cache_size")
TEMPLATE = settings_options("chat_template", "raw", "think")
CHECKPOINTS = settings_options("checkpoints", "checkpoint_mib")
DRAFT = settings_options("draft")
SPECULATIVE = (*settings_options("speculative"), *DRAFT)
SERVER = settings_options("server", "api_key")
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
            flags = {p.name: kwargs.pop(p.name) for p in added if p.name in SETTINGS}
            switches = {p.name: kwargs.pop(p.name) for p in added if p.name not in SETTINGS}
            if takes_flags:
                kwargs["flags"] = flags
            return func(**kwargs, **{k: v for k, v in switches.items() if k in signature.parameters})

        command.__signature__ = signature.replace(parameters=[*own, *added])  # type: ignore[attr-defined]
        # Typer reads annotations through typing.get_type_hints: give it the added ones too.
        command.__annotations__ = {**{p.name: p.annotation for p in own},
                                   **{p.name: p.annotation for p in added}, "return": hints.get("return")}
        return command  # type: ignore[return-value]

    return decorate
