"""`kvchat chat` driven through a real pseudo-terminal (pexpect), on the real model.

Each test starts one chat process and goes through several things with it, to
keep the suite fast. The screen is read as the byte stream the terminal gets,
with escape sequences taken out where a check needs plain text.
"""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

import pexpect
import pytest

from kvchat import saved_sessions

REPO = Path(__file__).resolve().parent.parent
PROMPT = ">>>"
SUMMARY = r"stop: (eog|length|ctx)"
ANSI = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|[()][0-9A-B]|[=>78])")
# One thread: the test machine's cores are shared, and llama.cpp's threads spin.
FAST = ("--threads", "1", "--temperature", "0", "--seed", "1", "--ctx", "2048")


def plain(text: str) -> str:
    return ANSI.sub("", text).replace("\r", "")


def _default_sigint() -> None:
    # A test runner started in the background may ignore SIGINT; the chat must see Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture()
def chat(kv_env: dict[str, str]):  # noqa: ANN201
    children: list[pexpect.spawn] = []

    def start(*args: str) -> pexpect.spawn:
        env = dict(kv_env, PROMPT_TOOLKIT_NO_CPR="1")  # pexpect does not answer cursor queries
        child = pexpect.spawn(sys.executable, ["-m", "kvchat", "chat", *FAST, *args], env=env,
                              cwd=str(REPO), dimensions=(40, 120), encoding="utf-8", timeout=180,
                              preexec_fn=_default_sigint)
        children.append(child)
        child.expect(PROMPT)
        return child

    yield start
    for child in children:
        if child.isalive():
            child.terminate(force=True)


def command(child: pexpect.spawn, line: str, *patterns: str) -> str:
    """Send a line, wait for each pattern in turn and the next prompt; the screen text."""
    child.sendline(line)
    seen = []
    for pattern in patterns:
        child.expect(pattern)
        seen.append(child.before + child.after)
    child.expect(PROMPT)
    seen.append(child.before)
    return plain("".join(seen))


def message(child: pexpect.spawn, text: str) -> str:
    return command(child, text, SUMMARY)


def test_a_conversation_with_slash_commands(chat, kv_env: dict[str, str]) -> None:
    child = chat("--max-tokens", "12", "--session", "first")
    screen = plain(child.before)
    # One name per model: the one `kvchat list` shows (the file is in /info).
    assert "kvchat · smollm2-135m · ctx 2048" in screen and "KV f16/f16" in screen
    assert "new session 'first'" in screen and "Alt-Enter" in screen

    out = message(child, "Name a colour.")
    # The summary that stays (wrapped between segments at the 100 columns of COLUMNS):
    # speeds, KV fill in cells and MiB, memory, and no GPU.
    summary = " · ".join(out.strip().splitlines()[-2:])
    assert re.search(r"12 tok · prefill \d+ tok at [\d.]+k? tok/s \(0 cached\) · ttft [\d.]+s · "
                     r"decode [\d.]+ tok/s · KV \d+/2048 \(\d+%, [\d.]+/45.0 MiB\) · "
                     r"RSS [\d.]+ MiB · CPU · stop: length", summary), summary

    out = command(child, "/help", "/exit")
    for name in ("/help", "/system", "/clear", "/save NAME", "/load NAME", "/sessions", "/stats",
                 "/set", "/info", "/exit"):
        assert name in out
    out = command(child, "/info", "session")
    assert "K f16, V f16" in out and "flash attention" in out and "on GPU: none" in out
    assert re.search(r"model +smollm2-135m *\n", out)
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in "".join(out.split())  # the file row, folded
    assert "2048 tokens" in out
    assert "memory" in out and "standard" in out and "tokenizer.chat_template" in out

    out = command(child, "/set temperature 0.5", "seed")
    assert "temperature 0.5" in out
    command(child, "/set temperature 0", "seed")
    out = command(child, "/set temperature hot", "is not a number")
    out = command(child, "/frobnicate", r"unknown command /frobnicate[^\r\n]*")
    assert "/help" in out and "/sessions" in out

    # Tab completes a command; Alt-Enter (Esc Enter) puts a newline into one message.
    child.send("/sta\t")
    child.expect("/stats")
    child.send("\r")
    child.expect("last reply: load")
    child.expect(PROMPT)
    child.send("Say one word.\x1b\rThen stop.\r")
    child.expect(SUMMARY)
    child.expect(PROMPT)

    out = command(child, "/stats", "turns dropped")
    assert "conversation: 2 turns in context" in out

    out = command(child, "/system You are terse.", "system prompt set")
    out = command(child, "/system", "system prompt: You are terse.")

    out = command(child, "/save second", "saved 'second'")
    out = command(child, "/sessions", "second")
    assert "first" in out
    out = command(child, "/clear", "cleared")
    assert "KV cache empty (0/2048 cells)" in out
    command(child, "/load second", r"loaded 'second': 2 turns, \d+ KV cells restored \(0 re-evaluated\)")
    out = command(child, "/sessions", r"\* +second")
    out = command(child, "/load nothere", "no session named 'nothere'")

    # Ctrl-C at an empty prompt once warns, twice leaves.
    child.sendintr()
    child.expect(r"Ctrl-C again")
    child.expect(PROMPT)
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    first = saved_sessions.load_existing("first", with_state=False).record
    assert [m["role"] for m in first["messages"]] == ["system"]  # /clear kept the system prompt
    second = saved_sessions.load_existing("second", with_state=False).record
    user = [m["content"] for m in second["messages"] if m["role"] == "user"]
    assert user == ["Name a colour.", "Say one word.\nThen stop."]
    history = Path(kv_env["KVCHAT_HOME"], "history").read_text()
    assert "+Name a colour." in history and "+/info" in history


def test_ctrl_c_stops_a_reply_and_keeps_it(chat) -> None:
    child = chat("--session", "talk")
    child.sendline("Repeat the word hello 500 times.")
    child.expect("hello, hello, hello")  # streamed while the status line is live
    child.expect(r"decode [\d.]+ tok/s \(\d+ tok\)")
    child.sendintr()
    child.expect(r"(\d+) tok · prefill (?s:.*?)stop: interrupted")  # the summary may wrap
    produced = int(child.match.group(1))
    child.expect(PROMPT)
    assert produced < 600

    # The session is intact: the next turn reuses the whole conversation from the KV cache.
    child.sendline("/set max_tokens 4")
    child.expect(PROMPT)
    child.sendline("Thanks.")
    child.expect(r"prefill (\d+) tok at .* \((\d+) cached\)")
    cached = int(child.match.group(2))
    assert cached > produced
    child.expect(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    saved = saved_sessions.load_existing("talk", with_state=False)
    reply = [m for m in saved.record["messages"] if m["role"] == "assistant"][0]["content"]
    assert reply.count("hello") >= 3
    assert saved.record["n_kv"] <= len(saved.tokens)


def test_markdown_render(chat) -> None:
    child = chat("--render", "markdown", "--max-tokens", "40")
    out = message(child, "Write a markdown list of three fruits.")
    assert "stop:" in out
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_piped_stdin_behaves_like_run(kvchat) -> None:
    piped = kvchat("chat", "--max-tokens", "8", *FAST, stdin="Why is the sky blue?\n")
    ran = kvchat("run", "--max-tokens", "8", *FAST, stdin="Why is the sky blue?\n")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == ran.stdout and piped.stdout.strip()
    assert piped.stderr == ""
    assert ">>>" not in piped.stdout


def _drain(child: pexpect.spawn) -> None:
    """Read everything the (stopped) child has written so far."""
    while True:
        try:
            child.read_nonblocking(65536, timeout=0.5)
        except pexpect.TIMEOUT:
            return


def test_resize_mid_reply_leaves_no_cut_status_line_and_no_duplicates(kv_env: dict[str, str]) -> None:
    """Narrow the terminal while a reply streams, replayed on a screen that re-wraps lines
    as most terminals do: the status line is erased whole and no line shows twice."""
    import io
    import os

    from vt import Screen

    # Without COLUMNS rich follows the terminal's real size, as in a user's shell.
    env = {k: v for k, v in kv_env.items() if k != "COLUMNS"}
    env["PROMPT_TOOLKIT_NO_CPR"] = "1"
    child = pexpect.spawn(sys.executable, ["-m", "kvchat", "chat", *FAST, "--max-tokens", "400",
                                           "--session", "resize"],
                          env=env, cwd=str(REPO), dimensions=(40, 120), encoding="utf-8", timeout=180,
                          preexec_fn=_default_sigint)
    try:
        child.expect(PROMPT)
        log = io.StringIO()
        child.logfile_read = log
        question = "Count from 1 to 300, one number per line."
        child.sendline(question)
        for _ in range(3):  # the live area is up and has been redrawn a few times
            child.expect(r"decode [\d.]+ tok/s \(\d+ tok\)")
        os.kill(child.pid, signal.SIGSTOP)
        _drain(child)
        before_resize = len(log.getvalue())
        child.setwinsize(40, 50)
        os.kill(child.pid, signal.SIGCONT)
        child.expect(SUMMARY)
        child.expect(PROMPT)
        stream = log.getvalue()
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        if child.isalive():
            child.terminate(force=True)

    # Replay from the line after the echoed question up to the summary's end.
    start = stream.index("\n", stream.index(question)) + 1
    end = stream.index("\n", re.search(SUMMARY, stream).end())
    screen = Screen(120, 40)
    screen.feed(stream[start:before_resize])
    screen.resize(50, 40)
    screen.feed(stream[before_resize:end])
    rows = [row for row in screen.lines() if row]

    saved = saved_sessions.load_existing("resize", with_state=False).record
    reply = [m for m in saved["messages"] if m["role"] == "assistant"][-1]["content"]
    summary_at = next(i for i, row in enumerate(rows) if re.match(r"\d+ tok · ", row))
    shown = rows[:summary_at]
    # The reply's text once, in order, and nothing else (however its lines were wrapped).
    assert "".join("".join(shown).split()) == "".join(reply.split()), "\n".join(shown[-20:])
    # Only the summary is left below the reply: no cut status line anywhere.
    assert sum("ttft" in row for row in rows) == 1, "\n".join(rows[summary_at - 3:])
    assert not any(re.search(r"tok/s \(\d+ tok\)", row) for row in rows)


def test_an_unnamed_chat_is_kept_in_history_and_continued(chat, kv_env: dict[str, str]) -> None:
    import os
    import stat

    child = chat("--max-tokens", "6")
    assert "this chat is kept in history" in plain(child.before)
    message(child, "Name a fruit.")
    out = command(child, "/stats", "dropped")
    assert "conversation: 1 turn in context" in out and "0 turns dropped" in out
    out = command(child, "/etc/hosts looks odd", r"not a command[^\r\n]*")
    assert "type //etc/hosts looks odd" in out
    child.sendline("/exit")
    child.expect(r"kept in history as '(auto-\d{8}-\d{6})'")
    name = child.match.group(1)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    history = Path(kv_env["KVCHAT_HOME"], "history")
    assert stat.S_IMODE(os.stat(history).st_mode) == 0o600

    again = chat("--continue")
    banner = plain(again.before)
    assert f"resumed recent chat '{name}': 1 turn" in banner and "user: Name a fruit." in banner
    again.sendline("/exit")
    again.expect(pexpect.EOF)


def test_leaving_or_loading_asks_first_when_history_is_off(chat, kv_env: dict[str, str]) -> None:
    kv_env["KVCHAT_RECENT_CHATS"] = "0"
    child = chat("--max-tokens", "6")
    message(child, "Name a fruit.")
    command(child, "/save kept", "saved 'kept'")
    message(child, "And a colour?")
    command(child, "/load kept", "not saved — /save NAME keeps it; /load kept again discards it")
    command(child, "/load kept", "loaded 'kept': 1 turn")
    command(child, "/clear", "cleared")
    message(child, "Name a tree.")
    # /load switched to the named session: it is saved after each reply, nothing to ask.
    child.sendline("/exit")
    child.expect(pexpect.EOF)

    child = chat("--max-tokens", "6")
    message(child, "Name a fruit.")
    command(child, "/exit", r"this chat is not saved — /save NAME keeps it; /exit again leaves without it")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert [i.name for i in saved_sessions.list_sessions()] == ["kept"]


def test_resuming_a_session_restores_its_sampling_and_shows_the_last_exchange(chat) -> None:
    child = chat("--session", "tuned", "--max-tokens", "6")
    command(child, "/set top_k 7", "seed")
    message(child, "Name a fruit.")
    child.sendline("/exit")
    child.expect(pexpect.EOF)

    again = chat("--session", "tuned")  # temperature and seed are given again (FAST); the rest is not
    banner = " ".join(plain(again.before).split())  # the terminal wraps the line
    assert ("settings restored: top_k 7, top_p 0.95, min_p 0.05, repeat_penalty 1, presence_penalty 0, "
            "frequency_penalty 0, max_tokens 6") in banner
    assert "user: Name a fruit." in banner and "assistant: " in banner
    out = command(again, "/set", "seed")
    assert "top_k 7" in out and "max_tokens 6" in out and "temperature 0" in out
    again.sendline("/exit")
    again.expect(pexpect.EOF)


def test_sessions_list_counts_cells_against_the_context_llama_cpp_made(kvchat, model_path: Path) -> None:
    import json

    r = kvchat("run", "--ctx", "160", "--session", "small", "--max-tokens", "4", "--threads", "1",
               "--temperature", "0", "Say hi.")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(kvchat("sessions", "list", "--json").stdout)
    assert row["n_ctx"] == 256 and 0 < row["n_kv"] <= 256  # llama.cpp rounds 160 up to 256 cells
    assert row["model"] == "smollm2-135m"
    lines = kvchat("sessions", "list").stdout.splitlines()  # piped: tab-separated
    assert lines[0].split("\t") == ["name", "turns", "KV cells", "size", "shared", "model", "updated"]
    assert lines[1].split("\t")[:3] == ["small", "1", f"{row['n_kv']}/256"]


def test_undo_and_retry(chat, kv_env: dict[str, str]) -> None:
    child = chat("--max-tokens", "8", "--session", "redo")
    message(child, "Name a colour.")
    message(child, "Name a fruit.")
    again = message(child, "/retry")
    assert "prefill 1 tok" in again  # the reply again from the cached prompt: one token re-evaluated
    assert "re-evaluated" not in again  # by design, so not worth a warning
    undone = command(child, "/undo", "undone")
    assert 'undone: "Name a fruit."' in plain(undone + child.before)
    saved = saved_sessions.load_existing("redo", with_state=False)
    assert [m["content"] for m in saved.record["messages"] if m["role"] == "user"] == ["Name a colour."]
    out = command(child, "/undo", "undone")
    assert "undone" in out
    err = command(child, "/undo", "no exchange")
    assert "no exchange to undo" in err
    child.sendline("/exit")
    child.expect(pexpect.EOF)


def test_the_prompt_comes_back_while_the_save_is_still_writing(chat, kv_env: dict[str, str]) -> None:
    """The next prompt does not wait for the save: with the KV store's lock held here
    (a save takes it shared and waits for it without limit), a turn's reply still
    ends in a prompt. /exit then waits for the write, says so, and exits once the
    lock is released, with the turn saved."""
    import fcntl
    import time

    child = chat("--max-tokens", "6")
    message(child, "Name a fruit.")
    # The first save's manifest is its last file: once it is there, the store and its
    # lock exist and that write no longer needs the lock (its eviction pass gives up on
    # a lock held elsewhere).
    home = Path(kv_env["KVCHAT_HOME"])
    deadline = time.monotonic() + 120
    while not list(home.rglob("*.kvm")) and time.monotonic() < deadline:
        time.sleep(0.05)
    (lock_path,) = home.rglob("store.lock")
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # A save that held the prompt would block here for as long as the lock is held.
        out = message(child, "Name a colour.")
        assert "Name a colour." in out
        child.sendline("/exit")
        child.expect("saving")  # /exit waits for the write in flight, and says so
        assert child.isalive()
        fcntl.flock(lock, fcntl.LOCK_UN)
    child.expect(r"kept in history as '(auto-\d{8}-\d{6})'")
    name = child.match.group(1)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    saved = saved_sessions.load_existing(name, with_state=False)
    assert [m["content"] for m in saved.record["messages"] if m["role"] == "user"] == [
        "Name a fruit.", "Name a colour."]
