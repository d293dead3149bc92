"""Re-capture the README's `kvchat chat` transcript: drive a real chat through a
pseudo-terminal (100 columns) and print the screen as a user sees it.

    python benchmarks/readme_chat.py > /tmp/transcript.txt

Run it on a quiet machine: the figures in the summary lines are live measurements.
It uses a throw-away KVCHAT_HOME, the bundled model and greedy sampling.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from pathlib import Path

import pexpect

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from vt import Screen  # noqa: E402

PROMPT = ">>>"


def main() -> None:
    home = tempfile.mkdtemp(prefix="kvchat-readme-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCHAT_") and k != "COLUMNS"}
    env.update(KVCHAT_HOME=home, NO_COLOR="1", PROMPT_TOOLKIT_NO_CPR="1", HF_HUB_OFFLINE="1")
    log = io.StringIO()
    child = pexpect.spawn(sys.executable, ["-m", "kvchat", "chat", "--session", "demo", "--temperature", "0"],
                          env=env, cwd=str(REPO), dimensions=(200, 100), encoding="utf-8", timeout=600)
    child.logfile_read = log
    child.expect(PROMPT)

    def command(line: str, *patterns: str) -> None:
        child.sendline(line)
        for pattern in patterns:
            child.expect(pattern)
        child.expect(PROMPT)

    child.sendline("Repeat the word hello 500 times.")
    child.expect(r"decode [\d.]+ tok/s \((1[3-9]\d|[2-9]\d\d) tok\)")  # stop it after ~130 tokens
    child.sendintr()
    child.expect("stop: interrupted")
    child.expect(PROMPT)
    command("What is the KV cache in a transformer? One sentence.", "stop: ")
    command("/set max_tokens 64", "seed")
    command("/frobnicate", "unknown command")
    command("/etc/hosts", "not a command")
    command("/info", "session")
    command("/save demo-copy", "saved")
    command("/sessions", "demo")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    screen = Screen(100, 200)
    screen.feed(log.getvalue())
    print("$ kvchat chat --session demo --temperature 0")
    print("\n".join(screen.lines()).rstrip())


if __name__ == "__main__":
    main()
