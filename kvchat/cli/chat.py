"""`kvchat chat`: the interactive chat (kvchat.ui.repl); piped stdin makes it `kvchat run`."""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from kvchat.cli import app
from kvchat.cli.options import CHAT_OPTIONS, shared_options
from kvchat.errors import SessionError, UsageError
from kvchat.ui.environment import Environment

if TYPE_CHECKING:
    from kvchat.app import Chat
    from kvchat.engine_api import SamplingSettings


class Render(str, Enum):
    plain = "plain"
    markdown = "markdown"


@app.command()
@shared_options(CHAT_OPTIONS)
def chat(
    model_arg: Annotated[
        Optional[str], typer.Argument(metavar="[MODEL]", help="A .gguf path or model reference.")
    ] = None,
    *,
    flags: dict[str, Any],
    verbose: bool = False,
    session_name: str | None = None,
    rebuild: bool = False,
    render: Annotated[
        Render, typer.Option("--render", help="Replies as plain text or rendered markdown.")
    ] = Render.plain,
    continue_last: Annotated[
        bool, typer.Option("--continue", "-C", help="Resume the newest recent (unnamed) chat.")
    ] = False,
) -> None:
    """Chat interactively: history, multi-line input, /commands, a live status line.

    \b
    Keys: Enter sends · Alt-Enter (or Esc Enter) new line · Tab completes
    /commands · Ctrl-C stops a reply · Ctrl-D or /exit leaves. Type /help inside.
    With stdin not a terminal it answers what was piped, like `kvchat run`.
    An unnamed chat is kept as a recent chat (`auto-…` in `kvchat sessions list`,
    the newest 20: setting recent_chats); --continue resumes the newest.

    \b
    Examples:
      kvchat chat --session work --render markdown
      kvchat chat --continue
      kvchat chat ./model.gguf --ctx 8192 -ctk q8_0 -ctv q8_0 -fa on
      cat prompt.txt | kvchat chat
    """
    from kvchat.app import open_conversation, switch_conversation

    if model_arg is not None and flags["model"] is not None:
        raise UsageError("give the model once: as the argument or with --model")
    flags = {**flags, "model": model_arg or flags["model"]}
    env = Environment()
    if continue_last:
        session_name = _last_recent_chat(session_name)
    if not env.stdin_isatty:
        from kvchat.cli.run import answer_piped

        answer_piped(env, flags, session_name=session_name, rebuild=rebuild, verbose=verbose)
        return

    from kvchat.hardware import open_nvml
    from kvchat.ui.repl import ChatRepl

    def opener(name: str | None, sampling: SamplingSettings, limit: int | None) -> Chat:
        return switch_conversation(flags, env.warn, name, sampling, limit, verbose=verbose)

    conv = open_conversation(flags, env.warn, session_name=session_name, rebuild=rebuild, verbose=verbose)
    nvml = open_nvml()
    repl = ChatRepl(env, conv, opener=opener, markdown=render is Render.markdown, nvml=nvml,
                    recent_keep=conv.settings.recent_chats)
    try:
        repl.run()
    finally:
        repl.close()
        if nvml is not None:
            nvml.close()


def _last_recent_chat(session_name: str | None) -> str:
    """--continue: the newest recent chat's session name."""
    from kvchat.saved_sessions import latest_recent

    if session_name is not None:
        raise UsageError("--continue resumes the newest recent chat; give it or --session NAME, not both")
    name = latest_recent()
    if name is None:
        raise SessionError("there is no recent chat to continue", hint="start one with `kvchat chat`")
    return name
