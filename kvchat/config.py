"""Where kvchat keeps things and how settings are resolved.

Settings are resolved in kvchat.settings (flag > saved session > `KVCHAT_<NAME>` >
this config file's `[defaults]` > default); this module only finds and reads the
file. `KVCHAT_HOME` moves every kvchat file (config, sessions, history, user
models.toml) under one folder; model files live in the Hugging Face cache
(`HF_HOME`), shared with other tools.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import platformdirs

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

from kvchat.errors import UsageError

ENV_PREFIX = "KVCHAT_"


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
    def prefix_cache_dir(self) -> Path:
        # Inside the KV store (kvchat.kv_store): one folder, one disk budget.
        return self.data_dir / "kv-store" / "prefix"

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
def _read_table(config_file: Path) -> dict[str, Any]:
    if not config_file.is_file():
        return {}
    try:
        data = tomllib.loads(config_file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"{config_file} is not UTF-8 text", hint="save it as UTF-8, or remove it") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read {config_file}: {exc}", hint="fix or remove that file") from None
    table = data.get("defaults", {})
    if not isinstance(table, dict):
        raise UsageError(
            f"{config_file}: 'defaults' must be a table ([defaults]), not {type(table).__name__}",
            hint="write the settings under a [defaults] line",
        )
    others = sorted(set(data) - {"defaults"})
    if others:
        raise UsageError(f"{config_file}: unknown key(s) {', '.join(others)}",
                         hint="settings go under [defaults]")
    return dict(table)


def file_defaults() -> dict[str, Any]:
    """The raw `[defaults]` table of the user's config.toml (values unparsed: the
    settings module parses and checks them, naming the file in its errors)."""
    return _read_table(paths().config_file)


def debug_enabled() -> bool:
    return os.environ.get("KVCHAT_DEBUG", "") not in ("", "0", "false", "no")
