"""`kvchat sessions list|show|rm|export|import`: named conversations saved on disk."""

from __future__ import annotations

import errno
import json
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from kvchat.cli import app
from kvchat.errors import KvchatError, UsageError
from kvchat.ui.environment import Environment
from kvchat.ui.render import safe_text
from kvchat.ui.tables import TableData, print_table
from kvchat.units import format_bytes

sessions_app = typer.Typer(help="Named sessions saved on disk (see `run/chat --session NAME`).",
                           no_args_is_help=True, suggest_commands=False)
app.add_typer(sessions_app, name="sessions")

NameArg = Annotated[str, typer.Argument(help="Session name.")]


class ExportFormat(str, Enum):
    markdown = "markdown"
    json = "json"
    kvs = "kvs"  # one portable file: transcript, tokens and KV state (`sessions import` reads it)


def _when(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")
    except (OverflowError, ValueError, OSError, TypeError):
        return "?"


@sessions_app.command("list")
def list_cmd(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List saved sessions: turns, KV cells in use, context, the bytes only it holds and
    those it shares with other conversations, model; then the KV store's use and budget."""
    from kvchat import saved_sessions
    env = Environment()
    infos = saved_sessions.list_sessions()
    if as_json:
        rows = [{"name": i.name, "turns": i.turns, "n_kv": i.n_kv, "n_ctx": i.n_ctx, "bytes": i.size,
                 "shared_bytes": i.shared, "model": i.model, "updated": i.updated, "path": str(i.path)}
                for i in infos]
        env.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    if not infos:
        env.stderr.write("no saved sessions yet — start one with `kvchat chat --session NAME`\n")
        return
    table = TableData(("name", "turns", "KV cells", "size", "shared", "model", "updated"),
                      right=frozenset({"turns", "KV cells", "size", "shared"}))
    for i in infos:  # names come from files: escaped
        table.add_row(safe_text(i.name), str(i.turns), f"{i.n_kv}/{i.n_ctx}", format_bytes(i.size),
                      format_bytes(i.shared) if i.shared else "", safe_text(i.model), _when(i.updated))
    print_table(table, env.stdout, env.out_console())
    env.stderr.write(store_line() + "\n")


def store_line() -> str:
    """The KV store's use against its budget, and what named sessions alone take."""
    from kvchat import saved_sessions
    from kvchat.settings import resolve

    f = saved_sessions.store_figures(resolve().store_budget)
    served = f["served_bytes"]
    line = (f"KV store: {format_bytes(f['bytes'])} of {format_bytes(f['budget_bytes'])} "
            f"(named sessions {format_bytes(f['named_bytes'])}, "
            f"recent chats {format_bytes(f['recent_bytes'])}, "
            + (f"kvchat serve's conversations {format_bytes(served)}, " if served else "")
            + f"cache {format_bytes(f['unreferenced_bytes'] + f['prefix_cache_bytes'])})")
    return line + (" — named sessions alone exceed the budget (kv_store_size)"
                   if f["named_over_budget"] else "")


def _load(name: str) -> dict[str, Any]:
    from kvchat import saved_sessions
    return saved_sessions.load_existing(name, with_state=False).record


@sessions_app.command("show")
def show_cmd(name: NameArg, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show a session's settings and transcript."""
    from kvchat import session_store
    env = Environment()
    record = _load(name)
    if as_json:
        env.stdout.write(json.dumps(_export_record(name, record), indent=2, ensure_ascii=False) + "\n")
        return
    s = record["settings"]
    con = env.out_console()
    # everything from the file is escaped before it reaches the terminal
    con.print(f"session {name}: model {safe_text(session_store.model_display_name(record['model']))}, "
              f"n_ctx {session_store.context_cells(record)}, "
              f"K {safe_text(s['type_k'])}, V {safe_text(s['type_v'])}, "
              f"flash attention {safe_text(s['flash_attn'])}, {record['n_kv']} KV cells in use",
              markup=False, highlight=False)
    if record.get("dropped"):
        con.print(f"({len(record['dropped'])} earlier messages dropped from the context)", markup=False)
    for message in record["messages"]:
        con.print(f"[{_role(message)}] {safe_text(message['content'], None, multiline=True)}",
                  markup=False, highlight=False)


def _role(message: dict[str, Any]) -> str:
    """The role, and whether the reply was cut short (a server's stream that broke)."""
    return safe_text(message["role"]) + (", cut short" if message.get("cut") else "")


def _export_record(name: str, record: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "model": record["model"],
        "settings": record["settings"],
        "created": record.get("created"),
        "updated": record.get("updated"),
        "messages": record.get("dropped", []) + record["messages"],
        "dropped_from_context": len(record.get("dropped", [])),
    }


def to_markdown(name: str, record: dict[str, Any]) -> str:
    from kvchat import session_store
    lines = [f"# Session {name}", "",
             f"Model: `{session_store.model_display_name(record['model'])}` · "
             f"n_ctx {session_store.context_cells(record)}", ""]
    for message in record.get("dropped", []) + record["messages"]:
        cut = f" (cut short: {message['cut']})" if message.get("cut") else ""
        lines += [f"## {message['role']}{cut}", "", message["content"].rstrip(), ""]
    return "\n".join(lines)


@sessions_app.command("export")
def export_cmd(
    name: NameArg,
    fmt: Annotated[ExportFormat, typer.Option("--format", "-f")] = ExportFormat.markdown,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="File (default stdout).")] = None,
) -> None:
    """Export a transcript as Markdown or JSON (every message, dropped ones included), or
    the whole session as one portable .kvs file (`--format kvs -o FILE`; `sessions
    import` reads it)."""
    if fmt is ExportFormat.kvs:
        _export_kvs(name, output)
        return
    record = _load(name)
    if fmt is ExportFormat.json:
        text = json.dumps(_export_record(name, record), indent=2, ensure_ascii=False) + "\n"
    else:
        text = to_markdown(name, record)
    if output is None:
        Environment().stdout.write(text)
    else:
        write_output(output, text.encode("utf-8"))


def write_output(path: Path, data: bytes) -> None:
    """Write to what `path` names, as `cmd > path` would: through a symlink to its
    target, into a device or FIFO as a stream, a regular file truncated in place
    (its mode kept). Only session files use temp-and-rename; a folder is refused."""
    if path.is_dir():
        raise UsageError(f"{path} is a directory", hint="give a file name, e.g. -o transcript.md")
    try:
        with open(path, "wb") as fh:
            fh.write(data)
    except OSError as exc:
        reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise KvchatError(f"cannot write {path}: {reason}", hint="pick another --output path") from None


@sessions_app.command("rm")
def rm_cmd(
    names: Annotated[list[str], typer.Argument(metavar="NAME...", help="Session names.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Delete saved sessions: every one named, or none when one of them does not exist."""
    from kvchat import saved_sessions
    env = Environment()
    names = list(dict.fromkeys(names))
    for name in names:
        if not saved_sessions.exists(name):
            _load(name)  # raises the not-found error
    listed = ", ".join(f"'{name}'" for name in names)
    if not yes:
        if not env.stdin_isatty:
            raise UsageError(f"not deleting session{'s' if len(names) > 1 else ''} {listed} without "
                             "confirmation", hint="add --yes")
        if not typer.confirm(f"Delete session{'s' if len(names) > 1 else ''} {listed}?", default=False,
                             err=True):
            typer.echo("kvchat: nothing deleted", err=True)
            return  # declining is an answer, not an error: `kvchat rm` does the same
    for name in names:
        saved_sessions.remove(name)
        env.stderr.write(f"deleted session '{name}'\n")


def _export_kvs(name: str, output: Path | None) -> None:
    """The session in the .kvs container (kvchat.session_store): its blocks joined."""
    from kvchat import saved_sessions, session_store
    if output is None:
        raise UsageError("--format kvs writes a binary file", hint=f"add -o {name}.kvs")
    saved = saved_sessions.load_existing(name)
    record = {k: v for k, v in saved.record.items() if k != "format_version"}
    with session_store.locked(name):
        state = saved_sessions.whole_state(saved)
    if output.is_dir():
        raise UsageError(f"{output} is a directory", hint=f"give a file name, e.g. -o {name}.kvs")
    session_store.save(output, record, saved.tokens, state, saved.checkpoints)


@sessions_app.command("import")
def import_cmd(
    file: Annotated[Path, typer.Argument(help="A .kvs file (`sessions export NAME -f kvs -o FILE`).")],
    name: Annotated[Optional[str], typer.Argument(help="Session name (default: the file's).")] = None,
) -> None:
    """Import a session exported as a .kvs file (or one from an older kvchat)."""
    from kvchat import session_store
    from kvchat.named_session import import_file

    target = session_store.check_name(name or file.stem)
    import_file(file, target)
    Environment().stderr.write(f"imported session '{target}' — resume with "
                               f"`kvchat chat --session {target}`\n")
