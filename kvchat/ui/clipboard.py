"""`/copy` in the chat: the last reply, or its last code block, onto the clipboard.

A clipboard tool is used where one is installed and can reach a display (wl-copy
on Wayland, xclip or xsel on X11, pbcopy on macOS, clip.exe on Windows and WSL);
otherwise, on a terminal, the text is sent as an OSC 52 sequence, which most
terminal emulators put on the clipboard (some ask first or need it allowed).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TextIO

from kvchat.errors import KvchatError

_FENCE_RE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def last_code_block(text: str) -> str | None:
    """The content of the last fenced code block of a Markdown reply (``` or ~~~, any
    info string), without its fences; an unclosed fence at the end counts as a block."""
    blocks: list[str] = []
    fence: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        found = _FENCE_RE.match(line)
        if fence is None:
            if found:
                fence, lines = found.group(1), []
        elif found and found.group(1)[0] == fence[0] and len(found.group(1)) >= len(fence) \
                and not line.strip().strip(fence[0]):
            blocks.append("\n".join(lines))
            fence = None
        else:
            lines.append(line)
    if fence is not None:
        blocks.append("\n".join(lines))
    return blocks[-1] + "\n" if blocks else None


@dataclass(frozen=True)
class _Tool:
    command: tuple[str, ...]
    needs: str | None  # the environment variable naming the display it writes to
    encoding: str = "utf-8"


# In order of preference; clip.exe reads UTF-16 with a BOM as Unicode (else the code page).
TOOLS = (
    _Tool(("wl-copy",), "WAYLAND_DISPLAY"),
    _Tool(("xclip", "-selection", "clipboard"), "DISPLAY"),
    _Tool(("xsel", "--clipboard", "--input"), "DISPLAY"),
    _Tool(("pbcopy",), None),
    _Tool(("clip.exe",), None, "utf-16"),
)
OSC52_MAX_BYTES = 100_000  # terminals cap what they accept (xterm: about 100 kB); larger is refused


def osc52(text: str) -> str:
    """The escape sequence that asks a terminal to put `text` on the clipboard."""
    return "\x1b]52;c;" + base64.b64encode(text.encode("utf-8")).decode("ascii") + "\x07"


def copy_to_clipboard(text: str, terminal: TextIO | None, *, environ: Mapping[str, str] | None = None,
                      which: Callable[[str], str | None] | None = None) -> str:
    """Put `text` on the clipboard; returns how ("wl-copy", "OSC 52"...). `terminal`:
    where to send OSC 52 when no tool can (None: not a terminal). KvchatError when
    there is no way. `environ` and `which` default to the process's own."""
    environ = os.environ if environ is None else environ
    which = shutil.which if which is None else which
    for tool in TOOLS:
        found = which(tool.command[0])
        if found is None or (tool.needs is not None and not environ.get(tool.needs)):
            continue
        try:
            # The tool's output is not read: xclip and wl-copy leave a child holding the
            # selection, which would keep a captured pipe open.
            subprocess.run([found, *tool.command[1:]], input=text.encode(tool.encoding),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=5, check=True)
        except (OSError, subprocess.SubprocessError):
            continue  # e.g. xclip without a reachable X server: try the next way
        return tool.command[0]
    if terminal is None:
        raise KvchatError("no clipboard to copy to: none of wl-copy, xclip, xsel, pbcopy or clip.exe works "
                          "here, and the output is not a terminal (for OSC 52)",
                          hint="install one (e.g. wl-clipboard or xclip), or run the chat in a terminal")
    payload = osc52(text)
    if len(payload) > OSC52_MAX_BYTES:
        raise KvchatError(f"too long for the terminal's clipboard ({len(text)} characters over OSC 52)",
                          hint="install a clipboard tool (wl-clipboard, xclip, xsel), or /copy code")
    terminal.write(payload)
    terminal.flush()
    return "OSC 52"


def copy_last_reply(messages: list[dict[str, str]], *, code: bool, terminal: TextIO | None) -> str:
    """`/copy [code]`: put the last reply (or its last code block) on the clipboard;
    returns the line that says what was done."""
    from kvchat.errors import UsageError
    from kvchat.ui.render import plural

    reply = next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), None)
    if not reply:
        raise UsageError("no reply to copy yet", hint="send a message first")
    what = "the last reply"
    if code:
        block = last_code_block(reply)
        if block is None:
            raise UsageError("the last reply has no code block", hint="/copy copies the whole reply")
        reply, what = block, "the last reply's last code block"
    how = copy_to_clipboard(reply, terminal)
    size = plural(len(reply.splitlines()), "line")
    if how == "OSC 52":
        return (f"sent {what} ({size}) to the terminal's clipboard (OSC 52: some terminals ask first "
                "or need it allowed)")
    return f"copied {what} ({size}) to the clipboard with {how}"
