"""`/copy`: the last reply or its last code block onto the clipboard, through a real
clipboard tool (a stand-in script here) or OSC 52 on a terminal."""

from __future__ import annotations

import base64
import io
import stat
from pathlib import Path

import pytest

from kvchat.errors import KvchatError, UsageError
from kvchat.ui.clipboard import copy_last_reply, copy_to_clipboard, last_code_block, osc52

REPLY = "Use this:\n\n```python\nprint('one')\n```\n\nor this:\n\n~~~\n  print('two')\n\n  done()\n~~~\nBye."


def test_the_last_code_block_is_its_content_without_fences() -> None:
    assert last_code_block(REPLY) == "  print('two')\n\n  done()\n"
    assert last_code_block("```sh\nls\n```") == "ls\n"
    assert last_code_block("````\n```\ninner\n```\n````\n") == "```\ninner\n```\n"  # a longer fence holds ```
    assert last_code_block("cut short:\n```\nhalf(") == "half(\n"  # an interrupted reply
    assert last_code_block("no code here, only `inline`") is None


def _tool(folder: Path, name: str) -> Path:
    """A stand-in clipboard tool that stores what it reads, as xclip would hold it."""
    script = folder / name
    script.write_text(f"#!/bin/sh\ncat > '{folder}/{name}.got'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_a_clipboard_tool_gets_the_text(tmp_path: Path) -> None:
    tools = {"xclip": _tool(tmp_path, "xclip"), "wl-copy": _tool(tmp_path, "wl-copy"),
             "clip.exe": _tool(tmp_path, "clip.exe")}

    def which(name: str) -> str | None:
        return str(tools[name]) if name in tools else None

    text = "héllo\nwörld\n"
    # X11 only: wl-copy has no Wayland display to write to
    assert copy_to_clipboard(text, None, environ={"DISPLAY": ":0"}, which=which) == "xclip"
    assert (tmp_path / "xclip.got").read_text("utf-8") == text
    assert copy_to_clipboard(text, None, environ={"WAYLAND_DISPLAY": "wayland-0", "DISPLAY": ":0"},
                             which=which) == "wl-copy"
    assert copy_to_clipboard(text, None, environ={}, which=which) == "clip.exe"  # WSL: no display needed
    assert (tmp_path / "clip.exe.got").read_bytes().decode("utf-16") == text


def test_a_failing_tool_falls_back_to_osc52_on_a_terminal(tmp_path: Path) -> None:
    broken = tmp_path / "xclip"
    broken.write_text("#!/bin/sh\necho 'Error: Can't open display' >&2\nexit 1\n")
    broken.chmod(0o755)
    terminal = io.StringIO()
    how = copy_to_clipboard("x = 1\n", terminal, environ={"DISPLAY": ":9"},
                            which=lambda name: str(broken) if name == "xclip" else None)
    assert how == "OSC 52" and terminal.getvalue() == osc52("x = 1\n")
    assert terminal.getvalue() == "\x1b]52;c;" + base64.b64encode(b"x = 1\n").decode() + "\x07"


def test_no_tool_and_no_terminal_is_one_clear_error() -> None:
    with pytest.raises(KvchatError, match="no clipboard to copy to") as caught:
        copy_to_clipboard("x", None, environ={}, which=lambda name: None)
    assert caught.value.hint is not None and "xclip" in caught.value.hint
    with pytest.raises(KvchatError, match="too long for the terminal's clipboard"):
        copy_to_clipboard("x" * 200_000, io.StringIO(), environ={}, which=lambda name: None)


def test_copy_says_what_it_copied(monkeypatch: pytest.MonkeyPatch) -> None:
    messages = [{"role": "user", "content": "code?"}, {"role": "assistant", "content": REPLY}]
    terminal = io.StringIO()
    monkeypatch.setattr("shutil.which", lambda name: None)
    said = copy_last_reply(messages, code=True, terminal=terminal)
    assert said.startswith("sent the last reply's last code block (3 lines) to the terminal's clipboard")
    assert terminal.getvalue() == osc52("  print('two')\n\n  done()\n")
    said = copy_last_reply(messages, code=False, terminal=io.StringIO())
    assert said.startswith(f"sent the last reply ({len(REPLY.splitlines())} lines)")
    with pytest.raises(UsageError, match="has no code block"):
        copy_last_reply([{"role": "assistant", "content": "plain"}], code=True, terminal=terminal)
    with pytest.raises(UsageError, match="no reply to copy yet"):
        copy_last_reply([{"role": "user", "content": "hi"}], code=False, terminal=terminal)
