"""The table of every setting kvchat runs with (SETTINGS) and its parsers; the
resolver and its typed result are kvchat.settings. Kept apart so that building the
command line (`kvchat --help`) costs the table, not the resolver's dataclass.

Order, highest first: command-line flag > the saved named session > environment
variable `KVCHAT_<NAME>` > `config.toml` table `[defaults]` > built-in default.

Each setting has one parser that takes what any source gives (a flag's string, an
environment string, a TOML value, a saved value) and returns a typed, range-checked
value. A bad value from any source is a usage error (exit 2) that names where it
came from: `KVCHAT_TEMPERATURE='hot' is not a number`,
`config.toml [defaults] ctx = 'abc' is not a token count`.

The table (SETTINGS) is the one place a setting's name, parser, default, flags,
environment variable, help text and groups are written. Derived from it: the
command-line options (kvchat.cli.options), the `Settings` fields' defaults, the
defaults of SamplingSettings, Session and PrefixCache (`default`, `default_field`),
the REPL's /set keys, what a named session saves, and what a server decides
(`keys_in`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Literal, TypeVar

from kvchat import config
from kvchat.cache_types import CACHE_TYPES, CacheType, parse_cache_type
from kvchat.errors import UsageError

T = TypeVar("T")
Source = Literal["flag", "session", "env", "config", "default"]
# What a setting belongs to, beside being resolved:
# - sampling: a field of kvchat.engine_api.SamplingSettings (the sampler's chain);
# - saved: recorded with a named session and given back on resume;
# - repl: changed in a chat with `/set KEY VALUE`;
# - local: sizes or places a model loaded here: with --server the server decides it;
# - load: a saved session's own value wins over the flags on /load (its KV state needs it);
# - rendering: how the transcript becomes tokens: saved with a named session (beside its
#   sampling) and given back on resume, so that its next turn is rendered the same way.
Group = Literal["sampling", "saved", "repl", "local", "load", "rendering"]
_SAMPLING: frozenset[Group] = frozenset({"sampling", "saved", "repl"})

# Bounds that stop absurd values before llama.cpp sees them (it would wrap or abort).
MAX_CTX = 1 << 24  # 16M tokens: more than any GGUF's training context today
MIN_CTX = 32  # llama.cpp asserts on smaller contexts (n_ctx must hold one ubatch of padding)
OVERFLOW_POLICIES = ("shift", "stop")


class BadValue(ValueError):
    """A parser's reason, completed by the resolver with where the value came from."""


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One setting. `default` is written as a user would write it and parsed like any
    source's value; `flags` are the command-line names, the long one first (an on/off
    setting's flag also has its --no- form); `help` is the --help text."""

    name: str
    parse: Callable[[Any], T]
    default: Any
    flags: tuple[str, ...]
    help: str
    groups: AbstractSet[Group] = frozenset()
    metavar: str | None = None

    @property
    def flag(self) -> str | None:
        return self.flags[0] if self.flags else None

    @property
    def env_var(self) -> str:
        return config.ENV_PREFIX + self.name.upper()


# --- parsers: any source's raw value -> a typed value, or BadValue(reason) -------------


def _text(raw: Any) -> str:
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise BadValue("is not a text value")
    return str(raw).strip()


def _string(raw: Any) -> str:
    """Text settings (model, system prompt): a number is a mistake, not a name."""
    if not isinstance(raw, str):
        raise BadValue("is not a text value (quote it)")
    return raw.strip()


def _int(raw: Any, low: int | None = None, high: int | None = None, noun: str = "a whole number") -> int:
    if isinstance(raw, bool):
        raise BadValue(f"is not {noun}")
    if isinstance(raw, int):
        value = raw
    else:
        try:
            value = int(_text(raw))
        except ValueError:
            raise BadValue(f"is not {noun}") from None
    if low is not None and value < low:
        raise BadValue(f"must be at least {low}")
    if high is not None and value > high:
        raise BadValue(f"must be at most {high}")
    return value


def _float(raw: Any, low: float | None = None, high: float | None = None, *, open_low: bool = False) -> float:
    if isinstance(raw, bool):
        raise BadValue("is not a number")
    try:
        value = float(raw) if isinstance(raw, (int, float)) else float(_text(raw))
    except ValueError:
        raise BadValue("is not a number") from None
    if not math.isfinite(value):
        raise BadValue("is not a finite number")
    if low is not None and (value <= low if open_low else value < low):
        raise BadValue(f"must be {'above' if open_low else 'at least'} {low:g}")
    if high is not None and value > high:
        raise BadValue(f"must be at most {high:g}")
    return value


def _optional(parse: Callable[[Any], T], *unset_words: str) -> Callable[[Any], T | None]:
    """None, '' and 'none' (and `unset_words`) mean "not set" (KVCHAT_SEED=random)."""
    unset = {"", "none", *unset_words}

    def parse_optional(raw: Any) -> T | None:
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in unset):
            return None
        return parse(raw)

    return parse_optional


def parse_tokens(raw: Any) -> int:
    """A token count: 4096, or 8k / 32K (x1024)."""
    text = _text(raw).lower() if not isinstance(raw, int) or isinstance(raw, bool) else str(raw)
    scale = 1024 if text.endswith("k") else 1
    try:
        number = int(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise BadValue("is not a token count (e.g. 4096 or 8k)") from None
    if number < MIN_CTX:
        raise BadValue(f"is below the smallest context llama.cpp runs ({MIN_CTX} tokens)")
    if number > MAX_CTX:
        raise BadValue(f"is above {MAX_CTX} tokens, more than any model is trained for")
    return number


def parse_ctx(raw: Any) -> int | None:
    """A context length, or None for 'auto' (the largest that fits free memory)."""
    if isinstance(raw, str) and raw.strip().lower() == "auto":
        return None
    return parse_tokens(raw)


def parse_ngl(raw: Any) -> int | None:
    """GPU layers: a count, -1 for all, or None for 'auto' (the most that fit)."""
    if isinstance(raw, str) and raw.strip().lower() == "auto":
        return None
    return _int(raw, -1, 100_000, "a layer count, -1 (all) or auto")


def _cache_type(raw: Any) -> CacheType:
    try:
        return parse_cache_type(_text(raw))
    except UsageError as exc:
        raise BadValue(f"is not a cache type ({exc.hint})") from None


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse_choice(raw: Any) -> str:
        value = _text(raw).lower()
        if value not in choices:
            raise BadValue(f"is not one of {', '.join(choices)}")
        return value

    return parse_choice


def _bool(raw: Any) -> bool:
    """yes/no: true/false, 1/0, yes/no, on/off (a flag gives a bool already)."""
    if isinstance(raw, bool):
        return raw
    value = _text(raw).lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise BadValue("is not yes or no (true/false, 1/0, on/off)")


_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(raw: Any) -> int:
    """A size in bytes: 4G, 500M, 2GiB, 1048576 (K/M/G/T are powers of 1024)."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        value: float = raw
    else:
        text = _text(raw).lower().removesuffix("ib").removesuffix("b")
        unit = text[-1:] if text[-1:] in _SIZE_UNITS else ""
        try:
            value = float(text[: len(text) - len(unit)]) * _SIZE_UNITS[unit]
        except ValueError:
            raise BadValue("is not a size (e.g. 4G, 500M or 2GiB)") from None
    if not math.isfinite(value) or value < 0:
        raise BadValue("is not a size (e.g. 4G, 500M or 2GiB)")
    return int(value)


def _server_url(raw: Any) -> str:
    from kvchat.remote.client import check_url

    try:
        return check_url(_string(raw))
    except UsageError:
        raise BadValue("is not an http:// or https:// URL (e.g. http://gpu-box:8080)") from None


def _threads(raw: Any) -> int:
    return _int(raw, 1, 4096, "a thread count")


# The speculative decoding modes (kvchat.speculative runs them); defined here so that
# this table does not import the drafting code.
SPECULATIVE_MODES = ("auto", "ngram", "draft", "off")

# `{name}` in a help text is that setting's default as a user writes it; `{default}`
# the setting's own, `{env}` its environment variable, `{cache_types}` the K/V types.
_TABLE: tuple[Setting[Any], ...] = (
    Setting("model", _optional(_string), None, ("--model", "-m"),
            "Model: alias[:quant], user/repo[:quant], user/repo/file.gguf or a .gguf path "
            "(default: the bundled SmolLM2-135M).", {"load"}),
    Setting("ctx", parse_ctx, "auto", ("--ctx", "-c"),
            "Context length in tokens (4096, 8k) or 'auto': the largest that fits free memory, "
            "up to the training length and ctx_max ({ctx_max}).", {"load", "local"}),
    Setting("ctx_max", lambda raw: _int(raw, MIN_CTX, MAX_CTX), 32768, (),
            "largest context --ctx auto picks"),
    Setting("cache_type_k", _cache_type, "f16", ("--cache-type-k", "-ctk"), "K cache type: {cache_types}.",
            {"load", "local"}),
    Setting("cache_type_v", _cache_type, "f16", ("--cache-type-v", "-ctv"),
            "V cache type (quantized types need flash attention).", {"load", "local"}),
    Setting("flash_attn", _choice("auto", "on", "off"), "auto", ("--flash-attn", "-fa"),
            "Flash attention: auto (off on a CPU), on or off.", {"load", "local"}),
    Setting("ngl", parse_ngl, -1, ("--ngl",),
            "Layers to offload to the GPU: a count, -1 (all) or auto (the most that fit).", {"local"}),
    Setting("threads", _optional(_threads), None, ("--threads", "-t"),
            "CPU threads (default: physical cores).", {"local"}),
    Setting("batch", lambda raw: _int(raw, 1, 1 << 20), 512, ("--batch", "-b"),
            "Prompt tokens evaluated per step (default {default}).", {"local"}),
    Setting("temperature", lambda raw: _float(raw, 0.0, 100.0), 0.8, ("--temperature", "--temp"),
            "Sampling temperature; 0 = greedy (default {default}).", _SAMPLING),
    Setting("top_k", lambda raw: _int(raw, 0), 40, ("--top-k",), "Top-k; 0 = off (default {default}).",
            _SAMPLING),
    Setting("top_p", lambda raw: _float(raw, 0.0, 1.0, open_low=True), 0.95, ("--top-p",),
            "Top-p; 1 = off (default {default}).", _SAMPLING),
    Setting("min_p", lambda raw: _float(raw, 0.0, 1.0), 0.05, ("--min-p",),
            "Min-p; 0 = off (default {default}).", _SAMPLING),
    Setting("repeat_penalty", lambda raw: _float(raw, 0.0, 10.0, open_low=True), 1.0, ("--repeat-penalty",),
            "Penalty for repeating recent tokens; 1 = off (default).", _SAMPLING),
    # OpenAI's two penalties, as llama.cpp applies them: over the last PENALTY_TOKENS tokens.
    Setting("presence_penalty", lambda raw: _float(raw, -2.0, 2.0), 0.0, ("--presence-penalty",),
            "Subtracted once from each token among the last 64 (-2 to 2; 0 = off, default).", _SAMPLING),
    Setting("frequency_penalty", lambda raw: _float(raw, -2.0, 2.0), 0.0, ("--frequency-penalty",),
            "Subtracted per time a token occurs in the last 64 (-2 to 2; 0 = off, default).", _SAMPLING),
    Setting("seed", _optional(lambda raw: _int(raw, 0, 2**32 - 1, "a seed (0 to 4294967295)"), "random"),
            None, ("--seed",), "Sampling seed.", _SAMPLING),
    # After the sampler's settings: a resumed session lists what it restored in this order.
    Setting("max_tokens", _optional(lambda raw: _int(raw, 1)), None, ("--max-tokens", "-n"),
            "Stop each reply after this many tokens.", {"saved", "repl"}),
    Setting("system", _optional(_string), None, ("--system", "-s"), "System prompt."),
    Setting("overflow", _choice(*OVERFLOW_POLICIES), "shift", ("--overflow",),
            "When the context is full: shift (drop oldest turns) or stop."),
    Setting("recent_chats", lambda raw: _int(raw, 0, 10_000), 20, (),
            "unnamed chats kept as auto-* sessions (0: none)"),
    Setting("prefix_cache", _bool, True, ("--prefix-cache",),
            "Reuse and store prompt starts on disk (default {default}; see `kvchat cache`).", {"local"}),
    Setting("prefix_cache_size", _optional(parse_size, "auto"), None, ("--prefix-cache-size",),
            "Deprecated: another name for kv_store_size, the one disk budget the prefix cache "
            "shares (0 still turns the cache off).", metavar="SIZE"),
    Setting("kv_store_size", _optional(parse_size, "auto"), None, (),
            "disk budget of all KV on disk: saved sessions, recent chats and the prefix cache "
            "(auto: half the free disk)"),
    Setting("chat_template", _optional(_string), None, ("--chat-template",),
            "A llama.cpp built-in template name (chatml, gemma, llama3, ...) or a Jinja file; "
            "overrides the model's own.", {"rendering"}),
    Setting("raw", _bool, False, ("--raw",), "No chat template: plain text completion (base models).",
            {"rendering"}),
    Setting("think", _optional(_choice("on", "off")), None, ("--think",),
            "Reasoning on or off, where the template has a switch (enable_thinking).", {"rendering"}),
    Setting("checkpoints", lambda raw: _int(raw, 0, 1024), 8, ("--checkpoints",),
            "KV checkpoints kept at turn boundaries on sliding-window, recurrent and hybrid models, "
            "so that undo, retry and an interrupted prefill re-evaluate a turn, not the conversation "
            "(default {default}).", {"local"}),
    Setting("checkpoint_mib", lambda raw: _float(raw, 0.0), 256.0, ("--checkpoint-mib",),
            "Memory cap for those checkpoints, MiB (default {default})."),
    Setting("speculative", _choice(*SPECULATIVE_MODES), "auto", ("--speculative",),
            "Speculative decoding: auto (n-gram lookup, or the --draft model), ngram, "
            "draft or off. The tokens are the model's own either way."),
    Setting("draft", _optional(_string), None, ("--draft",),
            "Draft model for speculative decoding: a small model with the same vocabulary "
            "(a .gguf path, an alias, user/repo:QUANT).", {"local"}),
    Setting("server", _optional(_server_url), None, ("--server",),
            "Chat on a running llama-server, vLLM or other OpenAI-compatible "
            "server (http://host:port) instead of loading the model here.", metavar="URL"),
    Setting("api_key", _optional(_string), None, ("--api-key",), "The server's API key (or {env})."),
    Setting("server_timeout", lambda raw: _float(raw, 0.0, 86_400.0, open_low=True), 300.0, (),
            "seconds to wait for the next byte from the server"),
    Setting("tls_verify", _bool, True, (), "check the server's TLS certificate"),
)


def _shown(value: Any) -> str:
    """A default as a user would write it: on/off, 256 (not 256.0), 4G."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _with_help(table: tuple[Setting[Any], ...]) -> dict[str, Setting[Any]]:
    defaults = {s.name: _shown(s.default) for s in table}
    words = {**defaults, "cache_types": " ".join(CACHE_TYPES)}
    return {s.name: replace(s, help=s.help.format_map({**words, "default": defaults[s.name],
                                                        "env": s.env_var}))
            for s in table}


SETTINGS: dict[str, Setting[Any]] = _with_help(_TABLE)


def keys_in(group: Group) -> tuple[str, ...]:
    """The settings in one group, in table order (see `Group`)."""
    return tuple(name for name, setting in SETTINGS.items() if group in setting.groups)


def default(name: str) -> Any:
    """A setting's built-in default, parsed as any source's value is."""
    setting = SETTINGS[name]
    return setting.parse(setting.default)


def default_field(name: str) -> Any:
    """A dataclass field whose default is the table's (read when an instance is made),
    for the classes that carry a setting: Settings, SamplingSettings, Session."""
    return field(default_factory=lambda: default(name))


LOAD_KEYS = keys_in("load")


def describe_source(setting: Setting[Any], source: Source, raw: Any) -> str:
    shown = repr(raw) if isinstance(raw, str) else str(raw)
    if source == "flag":
        return f"{setting.flag} {shown}"
    if source == "env":
        return f"{setting.env_var}={shown}"
    if source == "config":
        return f"{config.paths().config_file.name} [defaults] {setting.name} = {shown}"
    if source == "session":
        return f"the saved session's {setting.name} {shown}"
    return f"the default {setting.name} {shown}"


def parse_value(name: str, raw: Any, source: Source) -> Any:
    """Parse one value from a known source; a bad one is a UsageError naming it."""
    setting = SETTINGS[name]
    try:
        return setting.parse(raw)
    except BadValue as exc:
        hint = {
            "env": f"fix or unset {setting.env_var}",
            "config": f"fix it in {config.paths().config_file}",
            "flag": f"see `kvchat --help` for {setting.flag}",
        }.get(source, "")
        raise UsageError(f"{describe_source(setting, source, raw)} {exc}", hint=hint or None) from None
