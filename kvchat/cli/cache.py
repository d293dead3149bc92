"""`kvchat cache list|stats|clear`: the persistent prefix cache on disk."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Any

import typer

from kvchat.cli import app
from kvchat.errors import UsageError
from kvchat.ui.environment import Environment
from kvchat.ui.render import safe_text
from kvchat.units import format_bytes

cache_app = typer.Typer(help="The prefix cache: prompt starts kept on disk for `run` and `chat`.",
                        no_args_is_help=True, suggest_commands=False)
app.add_typer(cache_app, name="cache")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead.")]


def _model_names(files: Iterable[str]) -> dict[str, str]:
    """Each recorded model file's name as `kvchat list` gives it (registry.model_name_for)."""
    from kvchat.registry import model_name_for

    return {file: model_name_for(file) for file in set(files)}


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


@cache_app.command("list")
def list_cmd(as_json: JsonOpt = False) -> None:
    """One row per stored prefix: model, tokens, size, last use, hits (most recent first)."""
    from kvchat.prefix_store import Store

    env = Environment()
    entries = sorted(Store().read_index().values(), key=lambda e: e.last_used, reverse=True)
    names = _model_names(e.model for e in entries)
    if as_json:
        rows = [{"key": e.key, "model": names[e.model], "file": e.model, "start": e.start, "end": e.end,
                 "bytes": e.bytes, "last_used": e.last_used, "hits": e.hits} for e in entries]
        env.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    if not entries:
        env.stderr.write("the prefix cache is empty — `kvchat run` fills it with prompts of 256+ tokens\n")
        return
    from kvchat.ui.tables import TableData, print_table

    # A hit is counted on every segment a restore used, shared starts (a document that
    # several prompts begin with) included.
    table = TableData(("key", "model", "tokens", "size", "last use", "hits"), right=frozenset({"hits"}))
    for e in entries:
        table.add_row(e.key[:12], safe_text(names[e.model]), f"{e.start}-{e.end}", format_bytes(e.bytes),
                      _when(e.last_used), str(e.hits))
    print_table(table, env.stdout, env.out_console())


@cache_app.command("stats")
def stats_cmd(as_json: JsonOpt = False) -> None:
    """Entries, bytes used, hits, where the cache lives, and the KV store whose one
    budget it shares (kv_store_size)."""
    from kvchat import saved_sessions
    from kvchat.cli.sessions import store_line
    from kvchat.prefix_store import Store
    from kvchat.settings import resolve

    env = Environment()
    store = Store()
    entries = list(store.read_index().values())
    s = resolve()
    kv_store = saved_sessions.store_figures(s.store_budget)
    figures: dict[str, Any] = {
        "path": str(store.folder),
        "enabled": s.prefix_cache,
        "entries": len(entries),
        "tokens": sum(e.end - e.start for e in entries),
        "bytes": store.used_bytes(),  # each block once (a session may share some: `sessions list`)
        # The one budget of the KV store the cache lives in (no limit of its own).
        "limit_bytes": kv_store["configured_bytes"],
        "effective_limit_bytes": kv_store["budget_bytes"],
        "hits": sum(e.hits for e in entries),
        "models": sorted(set(_model_names(e.model for e in entries).values())),
        "kv_store": kv_store,
    }
    if as_json:
        env.stdout.write(json.dumps(figures, indent=2) + "\n")
        return
    env.stdout.write(
        f"path     {figures['path']}\n"
        f"enabled  {'yes' if figures['enabled'] else 'no (prefix_cache setting)'}\n"
        f"entries  {figures['entries']} ({figures['tokens']} tokens, {figures['hits']} hits)\n"
        f"size     {format_bytes(figures['bytes'])}, in the KV store's budget of "
        f"{format_bytes(figures['effective_limit_bytes'])} (kv_store_size)\n"
        f"models   {', '.join(figures['models']) or '-'}\n"
    )
    env.stdout.write(store_line() + "\n")


@cache_app.command("clear")
def clear_cmd(yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False) -> None:
    """Delete every stored prefix, and the KV store's blocks no session names (the cache
    both make up in the store's one budget). A block a session names stays its own."""
    from kvchat.kv_store import KvStore

    env = Environment()
    if not yes:
        if not env.stdin_isatty:
            raise UsageError("not clearing the prefix cache without confirmation", hint="add --yes")
        if not typer.confirm("Delete every entry of the prefix cache?", default=False, err=True):
            raise typer.Exit(1)
    store = KvStore()
    before = store.usage().total if store.root.is_dir() else 0
    store.prefix.clear()
    if store.root.is_dir():
        store.evict(0, cache_only=True)
    freed = before - (store.usage().total if store.root.is_dir() else 0)
    env.stderr.write(f"prefix cache cleared ({format_bytes(freed)} freed)\n")
