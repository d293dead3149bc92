"""Every setting kvchat runs with: one table (kvchat.setting_table), one resolver,
one typed result (`Settings`).

Order, highest first: command-line flag > the saved named session > environment
variable `KVCHAT_<NAME>` > `config.toml` table `[defaults]` > built-in default.
A bad value from any source is a usage error (exit 2) that names where it came
from: `KVCHAT_TEMPERATURE='hot' is not a number`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvchat import config
from kvchat.cache_types import CacheType, resolve_flash_attn
from kvchat.errors import KvchatError, UsageError
from kvchat.setting_table import (
    LOAD_KEYS,
    MAX_CTX,
    MIN_CTX,
    OVERFLOW_POLICIES,
    SETTINGS,
    SPECULATIVE_MODES,
    BadValue,
    Group,
    Setting,
    Source,
    T,
    default,
    default_field,
    describe_source,
    keys_in,
    parse_ctx,
    parse_ngl,
    parse_size,
    parse_tokens,
    parse_value,
)

__all__ = ["BadValue", "Group", "LOAD_KEYS", "MAX_CTX", "MIN_CTX", "OVERFLOW_POLICIES", "SETTINGS",
           "SPECULATIVE_MODES", "Setting", "Source", "T", "default", "default_field", "keys_in",
           "parse_ctx", "parse_ngl", "parse_size", "parse_tokens", "parse_value", "Settings", "resolve"]


@dataclass(frozen=True)
class Settings:
    """Resolved values, typed and checked, with where each came from: one field per
    setting, in table order, defaulting to the table's default."""

    model: str | None = default_field("model")
    ctx: int | None = default_field("ctx")  # None: auto
    ctx_max: int = default_field("ctx_max")
    cache_type_k: CacheType = default_field("cache_type_k")
    cache_type_v: CacheType = default_field("cache_type_v")
    flash_attn: str = default_field("flash_attn")  # the mode asked for; the effective one is decided at load
    ngl: int | None = default_field("ngl")  # None: auto
    threads: int | None = default_field("threads")
    batch: int = default_field("batch")
    temperature: float = default_field("temperature")
    top_k: int = default_field("top_k")
    top_p: float = default_field("top_p")
    min_p: float = default_field("min_p")
    repeat_penalty: float = default_field("repeat_penalty")
    presence_penalty: float = default_field("presence_penalty")
    frequency_penalty: float = default_field("frequency_penalty")
    seed: int | None = default_field("seed")
    max_tokens: int | None = default_field("max_tokens")
    system: str | None = default_field("system")
    overflow: str = default_field("overflow")
    recent_chats: int = default_field("recent_chats")
    prefix_cache: bool = default_field("prefix_cache")
    prefix_cache_size: int | None = default_field("prefix_cache_size")  # deprecated: store_budget
    kv_store_size: int | None = default_field("kv_store_size")
    chat_template: str | None = default_field("chat_template")
    raw: bool = default_field("raw")
    think: str | None = default_field("think")
    checkpoints: int = default_field("checkpoints")
    checkpoint_mib: float = default_field("checkpoint_mib")
    speculative: str = default_field("speculative")
    draft: str | None = default_field("draft")
    server: str | None = default_field("server")
    api_key: str | None = default_field("api_key")
    server_timeout: float = default_field("server_timeout")
    tls_verify: bool = default_field("tls_verify")
    sources: Mapping[str, Source] = field(default_factory=dict)
    # Values from the environment or config file that a saved session overrode.
    overridden: tuple[str, ...] = ()

    @property
    def store_budget(self) -> int | None:
        """The KV store's one budget (None: auto); prefix_cache_size, the prefix cache's
        own limit before it joined the store, stands in for it when it alone is set."""
        return self.kv_store_size if self.kv_store_size is not None else (self.prefix_cache_size or None)


def resolve(flags: Mapping[str, Any] | None = None, saved: Mapping[str, Any] | None = None) -> Settings:
    """Resolve every setting once: flag > saved session > KVCHAT_* > config.toml > default.

    `flags` holds what the command line gave (None: not given); `saved` what a named
    session recorded. Raises UsageError naming the source of any bad value.
    """
    flags = flags or {}
    saved = saved or {}
    unknown = set(flags) - set(SETTINGS)
    if unknown:
        raise KvchatError(f"internal: unknown setting flag(s) {', '.join(sorted(unknown))}")
    file_values = config.file_defaults()
    unknown_keys = sorted(set(file_values) - set(SETTINGS))
    if unknown_keys:
        raise UsageError(
            f"{config.paths().config_file}: unknown setting(s) {', '.join(unknown_keys)}",
            hint=f"known: {', '.join(SETTINGS)}",
        )
    values: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    overridden: list[str] = []
    for name, setting in SETTINGS.items():
        env_raw = os.environ.get(setting.env_var)
        env_given = env_raw is not None and env_raw.strip() != ""
        candidates: list[tuple[Source, Any]] = [
            ("flag", flags.get(name)),
            ("session", saved.get(name)),
            ("env", env_raw if env_given else None),
            ("config", file_values.get(name)),
        ]
        source: Source = "default"
        raw: Any = setting.default
        for where, value in candidates:
            if value is not None:
                source, raw = where, value
                break
        values[name] = parse_value(name, raw, source)
        sources[name] = source
        if source == "session":
            # A lower source that disagrees is not silently dropped: say so once.
            for where, value in candidates[2:]:
                if value is not None and parse_value(name, value, where) != values[name]:
                    overridden.append(f"{describe_source(setting, where, value)} is ignored: the session was "
                                      f"saved with {setting.name} {raw}")
                    break
    if values["cache_type_v"].quantized or values["flash_attn"] == "off":
        # A quantized V cache needs flash attention: refuse 'off' before anything loads.
        resolve_flash_attn(values["flash_attn"], values["cache_type_v"])
    return Settings(**values, sources=sources, overridden=tuple(overridden))
