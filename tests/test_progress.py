"""`kvchat run` in a terminal: a transient spinner while loading and prefilling, gone
when the answer starts; Ctrl-C during a long prefill stops it (chunked evaluation)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest

from kvchat.ui.environment import Environment
from kvchat.ui.progress import LoadProgress

REPO = Path(__file__).resolve().parent.parent


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class _Tty:
    """A stream that says it is a terminal and keeps what was written."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.text = ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def test_spinner_draws_only_on_a_terminal_and_erases_itself() -> None:
    for tty in (True, False):
        err = _Tty(tty)
        env = Environment(stderr=err)  # type: ignore[arg-type]
        with LoadProgress(env) as progress:
            time.sleep(0.35)
            progress.prefill(300, 3000)
            time.sleep(0.25)
            progress.done()
            drawn = err.text
            progress.done()  # idempotent: nothing more is written
            assert err.text == drawn
        if not tty:
            assert err.text == ""  # pipes and files never see it
            continue
        assert "loading the model" in err.text and "prefill 300/3,000 tokens" in err.text
        last = err.text.rsplit("\r", 2)
        # The final write blanks the line and returns the cursor to its start.
        assert last[-1] == "" and last[-2].strip() == ""


def test_run_in_a_terminal_shows_progress_then_only_the_answer(kv_env: dict[str, str]) -> None:
    child = pexpect.spawn(sys.executable, ["-m", "kvchat", "run", "--threads", "1", "--temperature", "0",
                                           "-n", "8", "--ctx", "1024", "Say hello"],
                          env=kv_env, cwd=str(REPO), dimensions=(24, 100), encoding="utf-8", timeout=240,
                          preexec_fn=_default_sigint)
    child.expect(pexpect.EOF)
    child.close()
    screen = child.before
    assert child.exitstatus == 0
    assert "loading the model" in screen or "reading the prompt" in screen
    # Everything after the last carriage return is the answer, not a progress line.
    answer = screen.rsplit("\r", 1)[-1] if "\r" in screen.strip("\r\n") else screen
    assert "loading" not in answer and "prefill" not in answer


@pytest.mark.slow
def test_ctrl_c_during_a_long_prefill_stops_it(kv_env: dict[str, str]) -> None:
    document = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(600))
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvchat", "run", "--threads", "1", "--ctx", "16384", "-n", "4",
         "Summarise this."],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=kv_env,
        cwd=str(REPO), preexec_fn=_default_sigint,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write(document)
    proc.stdin.close()
    time.sleep(4.0)  # loaded, and some way into a prefill of about 9,000 tokens
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    out, err = proc.stdout.read(), proc.stderr.read()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert out == ""


def test_prefill_is_evaluated_in_chunks_that_report_progress(model_path: Path) -> None:
    from kvchat.cache_types import parse_cache_type
    from kvchat.engine import Engine, EngineSettings

    f16 = parse_cache_type("f16")
    with Engine(model_path, EngineSettings(n_ctx=2048, type_k=f16, type_v=f16, n_threads=1)) as engine:
        tokens = engine.tokenize("the quick brown fox " * 300, add_special=True)[:1200]
        seen: list[tuple[int, int]] = []
        engine.eval(tokens, lambda done, total: seen.append((done, total)))
        assert len(seen) >= 3 and seen[-1] == (1200, 1200)
        assert [d for d, _ in seen] == sorted({d for d, _ in seen})
        # An interrupt between chunks leaves whole chunks in the cache, no more.
        engine.kv_clear()

        def stop(done: int, total: int) -> None:
            if done < total:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            engine.eval(tokens, stop)
        assert 0 < engine.n_past < 1200 and engine.cells_in_use() == engine.n_past
