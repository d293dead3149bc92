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

from kvchat import session_store

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
    assert "SmolLM2-135M-Instruct" in screen and "ctx 2048" in screen and "KV f16/f16" in screen
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
    assert "2048 tokens" in out

    out = command(child, "/set temperature 0.5", "seed")
    assert "temperature 0.5" in out
    command(child, "/set temperature 0", "seed")
    out = command(child, "/set temperature hot", "must be a number")
    out = command(child, "/frobnicate", "unknown command /frobnicate.*")
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

    first = session_store.load(session_store.session_path("first"), with_state=False).record
    assert [m["role"] for m in first["messages"]] == ["system"]  # /clear kept the system prompt
    second = session_store.load(session_store.session_path("second"), with_state=False).record
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
    child.expect(r"(\d+) tok · prefill .* · stop: interrupted")
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

    saved = session_store.load(session_store.session_path("talk"), with_state=False)
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
