"""Where kvchat keeps things and how settings are resolved.

Precedence, in one place: command-line flag > environment variable
(`KVCHAT_<NAME>`) > user config file (`config.toml`, table `[defaults]`) > built-in
default. `KVCHAT_HOME` moves every kvchat file (config, sessions, history, user
models.toml) under one folder; model files live in the Hugging Face cache
(`HF_HOME`), shared with other tools.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import platformdirs

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from kvchat.errors import UsageError

ENV_PREFIX = "KVCHAT_"

DEFAULTS: dict[str, Any] = {
    "model": None,
    "ctx": "auto",  # the largest context that fits free memory, up to ctx_max
    "ctx_max": 32768,
    "cache_type_k": "f16",
    "cache_type_v": "f16",
    "flash_attn": "auto",
    "ngl": -1,
    "threads": None,  # physical cores, resolved at use
    "max_tokens": None,  # until end of turn or context full
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.95,
    "min_p": 0.05,
    "seed": None,
    "system": None,
    "batch": 512,
}


@dataclass(frozen=True)
class Paths:
    config_dir: Path
    data_dir: Path

    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.toml"

    @property
    def user_models_file(self) -> Path:
        return self.config_dir / "models.toml"

    @property
    def sessions_dir(self) -> Path:
        return self.data_dir / "sessions"

    @property
    def history_file(self) -> Path:
        return self.data_dir / "history"


def paths() -> Paths:
    home = os.environ.get("KVCHAT_HOME")
    if home:
        root = Path(home).expanduser()
        return Paths(config_dir=root, data_dir=root)
    return Paths(
        config_dir=Path(platformdirs.user_config_dir("kvchat")),
        data_dir=Path(platformdirs.user_data_dir("kvchat")),
    )


@cache
def _file_defaults(config_file: Path) -> dict[str, Any]:
    if not config_file.is_file():
        return {}
    try:
        data = tomllib.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(
            f"cannot read {config_file}: {exc}", hint="fix or remove that file"
        ) from exc
    table = data.get("defaults", {})
    unknown = sorted(set(table) - set(DEFAULTS))
    if unknown:
        raise UsageError(
            f"{config_file}: unknown setting(s) {', '.join(unknown)}",
            hint=f"known: {', '.join(DEFAULTS)}",
        )
    return dict(table)


def setting(name: str, flag_value: Any = None) -> Any:
    """Resolve one setting: flag > KVCHAT_<NAME> > config file > default.

    Values from the environment come back as strings; callers parse them the same
    way as flag values.
    """
    if flag_value is not None:
        return flag_value
    env = os.environ.get(ENV_PREFIX + name.upper())
    if env not in (None, ""):
        return env
    from_file = _file_defaults(paths().config_file)
    if name in from_file:
        return from_file[name]
    return DEFAULTS[name]


def debug_enabled() -> bool:
    return os.environ.get("KVCHAT_DEBUG", "") not in ("", "0", "false", "no")
