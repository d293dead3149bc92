"""Hostile and careless input (issue 11, items 11-16, 18, 19): every case is one clean
line on stderr and a meaningful exit code, never a traceback, an abort or a hang."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvchat import saved_sessions, session_store
from kvchat.errors import ExitCode
from tests.conftest import REPO

SIGPIPE_EXIT = 128 + 13


@dataclass
class Case:
    """One bad input: what to prepare, the command, and the one line expected."""

    args: tuple[str, ...]
    code: int
    first_words: str  # the stderr line starts with "kvchat: error: " + these
    prepare: Callable[[Path, Path], None] | None = None  # (kvchat home, model path)
    env: dict[str, str] = field(default_factory=dict)
    stdin: bytes = b""


def _write(relative: str, data: bytes) -> Callable[[Path, Path], None]:
    def prepare(home: Path, model: Path) -> None:
        target = home / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    return prepare


def _mkdir(relative: str) -> Callable[[Path, Path], None]:
    def prepare(home: Path, model: Path) -> None:
        (home / relative).mkdir(parents=True)

    return prepare


def _aligned_1(home: Path, model: Path) -> None:
    """The real model with general.alignment=1: llama.cpp aborted on it."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gguf_fuzz import U32, Value, tiny_model_parts, write_gguf_bytes

    md, tensors = tiny_model_parts(model)
    md["general.alignment"] = Value(U32, 1)
    home.mkdir(parents=True, exist_ok=True)
    (home / "aligned1.gguf").write_bytes(write_gguf_bytes(md, tensors, alignment=1))


def _bad_block_count(home: Path, model: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gguf_fuzz import U32, Value, tiny_model_parts, write_gguf_bytes

    md, tensors = tiny_model_parts(model)
    md["llama.block_count"] = Value(U32, 2**32 - 1)
    home.mkdir(parents=True, exist_ok=True)
    (home / "blocks.gguf").write_bytes(write_gguf_bytes(md, tensors))


CASES: dict[str, Case] = {
    # 11: llama.cpp aborts
    "ctx 1": Case(("run", "--ctx", "1", "Hi"), ExitCode.USAGE, "--ctx '1' is below the smallest context"),
    "ctx 31": Case(("run", "--ctx", "31", "Hi"), ExitCode.USAGE, "--ctx '31' is below the smallest context"),
    "block_count 2^32-1 with explicit ctx": Case(
        ("run", "-m", "{home}/blocks.gguf", "--ctx", "256", "Hi"),
        ExitCode.BAD_MODEL,
        "llama.block_count is",
        prepare=_bad_block_count,
    ),
    "alignment 1": Case(
        ("run", "-m", "{home}/aligned1.gguf", "--ctx", "256", "Hi"),
        ExitCode.BAD_MODEL,
        "aligned1.gguf: GGUF header is corrupt: general.alignment 1",
        prepare=_aligned_1,
    ),
    # 12: memory blow-ups
    "ctx 1e30": Case(("run", "--ctx", "1e30", "Hi"), ExitCode.USAGE, "--ctx '1e30' is not a token count"),
    "ctx 99999999": Case(
        ("run", "--ctx", "99999999", "Hi"), ExitCode.USAGE, "--ctx '99999999' is above 16777216 tokens"
    ),
    "ctx 4294967808": Case(
        ("run", "--ctx", "4294967808", "Hi"), ExitCode.USAGE, "--ctx '4294967808' is above 16777216 tokens"
    ),
    "ctx 1M, past 4x training": Case(
        ("run", "--ctx", "1000000", "Hi"),
        ExitCode.USAGE,
        "--ctx 1000000 is more than 4x the model's training context",
    ),
    # 15: internal errors
    "config.toml not UTF-8": Case(
        ("run", "Hi"),
        ExitCode.USAGE,
        "",
        prepare=_write("config.toml", b'[defaults]\nsystem = "caf\xe9"\n'),
    ),
    "config defaults=5": Case(
        ("run", "Hi"), ExitCode.USAGE, "", prepare=_write("config.toml", b"defaults = 5\n")
    ),
    "config system=5": Case(
        ("run", "Hi"), ExitCode.USAGE, "", prepare=_write("config.toml", b"[defaults]\nsystem = 5\n")
    ),
    "models.toml repo=5": Case(
        ("run", "-m", "mine", "Hi"),
        ExitCode.USAGE,
        "",
        prepare=_write("models.toml", b"[models.mine]\nrepo = 5\n"),
    ),
    "models.toml bad file pattern": Case(
        ("run", "-m", "mine", "Hi"),
        ExitCode.USAGE,
        "",
        prepare=_write("models.toml", b'[models.mine]\nrepo = "a/b"\nfile = "M-{quant}-{nope}.gguf"\n'),
    ),
    "KVCHAT_HOME is a file": Case(
        ("run", "--session", "s", "Hi"),
        ExitCode.SESSION,
        "cannot create the sessions folder",
        env={"KVCHAT_HOME": "{home}/file"},
        prepare=_write("file", b"x"),
    ),
    "a folder named NAME.kvs": Case(
        ("sessions", "show", "dir"), ExitCode.SESSION, "", prepare=_mkdir("sessions/dir.kvs")
    ),
    "export -o a folder": Case(("sessions", "export", "s", "-o", "{home}"), ExitCode.USAGE, "", prepare=None),
    "export -o /dev/full": Case(
        ("sessions", "export", "s", "-o", "/dev/full"),
        ExitCode.ERROR,
        "cannot write /dev/full: the disk is full",
    ),
}


def _expand(text: str, home: Path) -> str:
    return text.replace("{home}", str(home))


def _run(
    args: list[str], env: dict[str, str], stdin: bytes = b"", **kwargs: object
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvchat", *args],
        input=stdin,
        capture_output=True,
        env=env,
        cwd=REPO,
        timeout=240,
        **kwargs,
    )


def _saved_session(home: Path, name: str = "s") -> Path:
    """A small valid session file written through session_store (no model run)."""
    record = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        "dropped": [],
        "kv_text": "",
        "turns": [],
        "n_kv": 3,
        "model": {"path": "/m/model.gguf", "size": 1, "sha256": "00"},
        "settings": {"n_ctx": 256, "type_k": "f16", "type_v": "f16", "flash_attn": "off"},
    }
    path = home / "sessions" / f"{name}.kvs"
    path.parent.mkdir(parents=True, exist_ok=True)
    session_store.save(path, record, [1, 2, 3, 4], b"state")
    return path


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_table(name: str, kv_env: dict[str, str], model_path: Path) -> None:
    case = CASES[name]
    home = Path(kv_env["KVCHAT_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    if case.prepare is not None:
        case.prepare(home, model_path)
    if case.args[:2] in (("sessions", "export"),):
        _saved_session(home)
    env = {**kv_env, **{k: _expand(v, home) for k, v in case.env.items()}}
    result = _run([_expand(a, home) for a in case.args], env, case.stdin)
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == case.code, (result.returncode, stderr)
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("kvchat: error: " + case.first_words), lines[0]


# -- 12: threads, 15: streams and encodings (these succeed) ----------------------------


def test_threads_are_bounded_by_logical_cores(kvchat) -> None:
    result = kvchat("run", "--threads", "64", "--max-tokens", "2", "--temperature", "0", "--json", "Hi")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["settings"]["n_threads"] <= (os.cpu_count() or 1)
    assert "--threads 64 is more than" in result.stderr
    absurd = kvchat("run", "--threads", "10000", "Hi")
    assert absurd.returncode == ExitCode.USAGE and "--threads '10000' must be at most" in absurd.stderr


def test_non_utf8_stdin_and_argv_are_answered(kv_env: dict[str, str]) -> None:
    args = [b"run", b"--max-tokens", b"2", b"--temperature", b"0", b"--json", b"na\xefve"]
    proc = subprocess.run(
        [sys.executable.encode(), b"-m", b"kvchat", *args],
        input=b"caf\xe9 au lait\n",
        capture_output=True,
        env=kv_env,
        cwd=REPO,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["usage"]["prompt_tokens"] > 0


def test_stdout_full_or_closed_is_one_line(kv_env: dict[str, str]) -> None:
    args = [sys.executable, "-m", "kvchat", "run", "--max-tokens", "2", "--temperature", "0", "Hi"]
    with open("/dev/full", "w") as full:
        proc = subprocess.run(args, stdout=full, stderr=subprocess.PIPE, env=kv_env, cwd=REPO, timeout=240)
    assert proc.returncode == ExitCode.ERROR
    errors = _error_lines(proc.stderr)
    assert errors == [errors[0]] and errors[0].startswith(
        "kvchat: error: the disk is full (writing the output)"
    )
    closed = subprocess.run(
        [*args[:3], "--version"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=kv_env,
        cwd=REPO,
        timeout=60,
        close_fds=True,
        preexec_fn=lambda: os.close(1),
    )
    assert closed.returncode == ExitCode.ERROR
    assert closed.stderr.decode().startswith("kvchat: error: standard output is closed")


def test_output_cut_by_head_exits_quietly(kv_env: dict[str, str]) -> None:
    """`kvchat run ... | head -c 5`: no message, the status of a tool stopped by SIGPIPE."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvchat",
            "run",
            "--max-tokens",
            "200",
            "--temperature",
            "0",
            "Write a long story about a river.",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=kv_env,
        cwd=REPO,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(5)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=240) == SIGPIPE_EXIT
    assert _error_lines(err) == []  # warnings (a busy machine) may come; no error, no traceback


def _error_lines(stderr: bytes) -> list[str]:
    """stderr without kvchat's warnings (a busy test machine draws a contention warning)."""
    lines = stderr.decode("utf-8", "replace").strip().splitlines()
    return [line for line in lines if not line.startswith("kvchat: warning:")]


def test_config_text_setting_with_wrong_type_names_it(kvchat, kv_env: dict[str, str]) -> None:
    home = Path(kv_env["KVCHAT_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text("[defaults]\nsystem = 5\n")
    result = kvchat("run", "Hi")
    assert result.returncode == ExitCode.USAGE and "system = 5" in result.stderr


def test_model_hashes_cache_of_the_wrong_shape_is_rebuilt(kvchat, kv_env: dict[str, str]) -> None:
    home = Path(kv_env["KVCHAT_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    for content in ("[]", "null", '{"x": 5}'):
        (home / "model_hashes.json").write_text(content)
        result = kvchat("run", "--session", "h", "--max-tokens", "1", "--temperature", "0", "Hi")
        assert result.returncode == 0, result.stderr
        assert isinstance(json.loads((home / "model_hashes.json").read_text()), dict)


def test_permission_denied_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Root ignores file modes, so the OSError is raised where a read would fail."""
    from kvchat import cli

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", "/models/m.gguf")

    monkeypatch.setattr(cli, "app", denied)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "hi"])
    assert exit_info.value.code == ExitCode.ERROR
    assert capsys.readouterr().err == (
        "kvchat: error: permission denied: /models/m.gguf — check its permissions (or KVCHAT_HOME)\n"
    )


def test_disk_full_while_saving_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kv_env: dict[str, str]
) -> None:
    path = _saved_session(Path(kv_env["KVCHAT_HOME"]))
    before = path.read_bytes()

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(session_store.SessionError) as err:
        session_store.save(path, session_store.load(path).record, [1, 2, 3, 4], b"new state")
    assert "the disk is full (the previously saved copy is intact)" in str(err.value)
    assert path.read_bytes() == before
    assert not list(path.parent.glob(".*.tmp"))


# -- 14: export writes to what the path names -------------------------------------------


def test_export_writes_through_a_symlink_and_into_a_fifo(
    kvchat, kv_env: dict[str, str], tmp_path: Path
) -> None:
    _saved_session(Path(kv_env["KVCHAT_HOME"]))
    target = tmp_path / "real.md"
    target.write_text("old")
    target.chmod(0o644)
    link = tmp_path / "link.md"
    link.symlink_to(target)
    result = kvchat("sessions", "export", "s", "-o", str(link))
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and target.read_text().startswith("# Session s")
    assert target.stat().st_mode & 0o777 == 0o644
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    result = kvchat("sessions", "export", "s", "-o", str(fifo))
    assert result.returncode == 0, result.stderr
    assert reader.communicate(timeout=60)[0].startswith(b"# Session s")
    assert fifo.exists() and not fifo.is_file()


# -- 16: session files ----------------------------------------------------------------------


def _resave(path: Path, **changes: object) -> None:
    """Rewrite a session with a changed record and a valid checksum (bypassing validation)."""
    saved = session_store.load(path)
    record = {**saved.record, **changes}
    record.pop("format_version")
    session_store.write_container(path, record, saved.tokens, saved.state)


def test_show_and_export_verify_the_checksum(kvchat, kv_env: dict[str, str]) -> None:
    path = _saved_session(Path(kv_env["KVCHAT_HOME"]))
    data = bytearray(path.read_bytes())
    data[len(data) * 3 // 4] ^= 0x01  # inside the KV state, the bulk of the file: show/export do not print it
    path.write_bytes(bytes(data))
    for args in (("sessions", "show", "s"), ("sessions", "export", "s")):
        result = kvchat(*args)
        assert result.returncode == ExitCode.SESSION, result.stderr
        assert "checksum mismatch" in result.stderr and result.stdout == ""


@pytest.mark.parametrize(
    "changes",
    [
        {"n_kv": -5},
        {"n_kv": 99},
        {"messages": "x"},
        {"settings": {"n_ctx": "big"}},
        {"model": None},
        {"turns": [{"message": -1}]},
    ],
)
def test_records_with_a_valid_checksum_are_still_validated(
    kvchat, kv_env: dict[str, str], changes: dict
) -> None:
    path = _saved_session(Path(kv_env["KVCHAT_HOME"]))
    saved = session_store.load(path)
    record = {**saved.record, **changes}
    with pytest.raises(session_store.SessionError):  # written unchecked; load() validates
        session_store.write_container(path, record, saved.tokens, saved.state)
        session_store.load(path)
    result = kvchat("sessions", "show", "s")
    assert result.returncode == ExitCode.SESSION and "invalid record" in result.stderr


def test_one_bad_session_does_not_hide_the_others(kvchat, kv_env: dict[str, str]) -> None:
    home = Path(kv_env["KVCHAT_HOME"])
    _saved_session(home, "good")
    bad = _saved_session(home, "bad")
    saved = session_store.load(bad)
    record = dict(saved.record)
    record["Settings"] = record.pop("settings")
    session_store.write_container(bad, record, saved.tokens, saved.state)
    (home / "sessions" / "dir.kvs").mkdir()
    result = kvchat("sessions", "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["good"]["model"] == "model"
    assert rows["bad"]["model"] == "(damaged)" and rows["dir"]["model"] == "(damaged)"


@pytest.mark.slow
def test_a_refused_kv_state_exits_7(kvchat, kv_env: dict[str, str]) -> None:
    result = kvchat("run", "--session", "k", "--max-tokens", "2", "--temperature", "0", "Hi")
    assert result.returncode == 0, result.stderr
    path = Path(kv_env["KVCHAT_HOME"]) / "sessions" / "k.kvs"
    saved = saved_sessions.load_existing("k")
    saved_sessions.remove("k")  # the store's copy: the same conversation as a .kvs file instead
    record = dict(saved.record)
    record.pop("format_version")
    session_store.save(path, record, saved.tokens, b"\x01" * 64)  # checksum valid, state garbage
    result = kvchat("run", "--session", "k", "--max-tokens", "2", "Again")
    assert result.returncode == ExitCode.SESSION, result.stderr
    errors = _error_lines(result.stderr.encode())
    assert len(errors) == 1 and "KV state" in errors[0]


# -- 18: text from files ------------------------------------------------------------------


def test_escape_sequences_from_files_never_reach_the_terminal(
    kvchat, kv_env: dict[str, str], model_path: Path, tmp_path: Path
) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gguf_fuzz import STR, U8, Value, tiny_model_parts, write_gguf_bytes

    md, tensors = tiny_model_parts(model_path)
    md["general.name"] = Value(STR, "\x1b]0;pwned\x07\x1b[31mred" + "n" * 5000)
    md["general.architecture"] = Value(STR, "llama")
    md["tokenizer.chat_template"] = Value(
        STR, "{{ '\x1b]0;pwned\x07' }}{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    named = tmp_path / "named.gguf"
    named.write_bytes(write_gguf_bytes(md, tensors))
    for args in (("show", str(named)), ("estimate", str(named), "--ctx", "256")):
        result = kvchat(*args)
        assert result.returncode == 0, result.stderr
        assert "\x1b" not in result.stdout
        assert max(len(line) for line in result.stdout.splitlines()) < 1000
    assert "\\x1b]0;pwned\\x07" in kvchat("show", str(named)).stdout  # the template, shown escaped
    md, tensors = tiny_model_parts(model_path)
    noise = "\x1b[2J" * 100_000
    md[noise + "a"] = Value(U8, 1)
    md[noise + "b"] = Value(U8, 1)
    data = write_gguf_bytes(md, tensors)
    data = data.replace((noise + "b").encode(), (noise + "a").encode(), 1)  # one key twice: an error names it
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    result = kvchat("estimate", str(bad))
    assert result.returncode == ExitCode.BAD_MODEL
    assert "\x1b" not in result.stderr and len(result.stderr) < 2000


def test_safe_text() -> None:
    from kvchat.ui.render import safe_text

    assert safe_text("a\x1b[31mb\x9b\u202e") == "a\\x1b[31mb\\x9b\\u202e"
    assert safe_text("x" * 300, limit=10) == "x" * 10 + "… (290 more characters)"
    assert safe_text("line\n\tnext", multiline=True) == "line\n\tnext"
    assert safe_text("line\nnext") == "line\\x0anext"


# -- 19: leftovers ------------------------------------------------------------------------


def test_stale_temp_files_and_locks_are_cleaned(kvchat, kv_env: dict[str, str]) -> None:
    folder = Path(kv_env["KVCHAT_HOME"]) / "sessions"
    folder.mkdir(parents=True)
    stale = folder / ".t.kvs.abc123.tmp"
    stale.write_bytes(b"half a save")
    result = kvchat("run", "--session", "t", "--max-tokens", "1", "--temperature", "0", "Hi")
    assert result.returncode == 0, result.stderr
    assert not stale.exists()
    stale.write_bytes(b"half a save")
    assert kvchat("sessions", "rm", "t", "--yes").returncode == 0
    assert not stale.exists()
    kvchat("sessions", "show", "never-saved")
    assert sorted(p.name for p in folder.iterdir()) == []  # no .lock for every name tried


def test_lock_is_exclusive_and_leaves_nothing(kv_env: dict[str, str]) -> None:
    with (
        session_store.locked("x"),
        pytest.raises(session_store.SessionError, match="in use"),
        session_store.locked("x"),
    ):
        pass
    assert not list(session_store.sessions_dir().glob("*.lock"))
    with session_store.locked("x"):  # and it can be taken again
        pass


def test_ctrl_c_during_start_up_prints_no_traceback(kv_env: dict[str, str]) -> None:
    """SIGINT while kvchat's modules are still importing (the first ~0.3 s): one line.
    The child says when the interpreter itself is up, so the signal lands in kvchat's
    imports, not in Python's own start-up (which kvchat cannot guard)."""
    code = (
        "import sys; from kvchat.__main__ import main; sys.argv = ['kvchat', 'estimate', '--help']; "
        "sys.stdout.write('up\\n'); sys.stdout.flush(); main()"
    )
    for delay in (0.0, 0.02, 0.05, 0.1, 0.2, 0.3):
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=kv_env, cwd=REPO
        )
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert b"Traceback" not in err, (delay, err)
        if proc.returncode == -signal.SIGINT:
            # The signal landed while the interpreter was shutting down (Python restores
            # the default handlers then): only acceptable once the work was all done.
            assert b"Usage: kvchat estimate" in out and err == b"", (delay, out, err)
            continue
        assert proc.returncode in (0, ExitCode.INTERRUPTED), (delay, proc.returncode, err)


def test_rebuilt_tokens_count_as_evaluated() -> None:
    from kvchat.app.report import rebuilt_cache_counts

    # (reused, evaluated, rebuilt)
    assert rebuilt_cache_counts(100, 20, 0) == (100, 20, 0)
    assert rebuilt_cache_counts(100, 20, 90) == (10, 110, 90)


# -- 13: hangs ------------------------------------------------------------------------------


def _finishes(fn: Callable[[], object], within_s: float = 60.0) -> object:
    """Run fn in a thread; fail (instead of hanging the suite) if it has not returned.
    A hang bound, far above the expected milliseconds: not a speed assertion."""
    import threading

    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(_capture(fn)), daemon=True)
    thread.start()
    thread.join(within_s)
    assert not thread.is_alive(), "hung"
    value = result[0]
    if isinstance(value, BaseException):
        raise value
    return value


def _capture(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except BaseException as exc:  # handed to the test thread
        return exc


@pytest.mark.parametrize(
    "source",
    [
        "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
        "{{ 'x' * 100000000 }}",
        "{% set ns = namespace(x='ab') %}{% for i in range(40) %}{% set ns.x = ns.x + ns.x %}{% endfor %}",
        "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
        "{% for m in messages * 100000000 %}{% endfor %}",
    ],
)
def test_hostile_templates_fail_cleanly_and_fast(source: str) -> None:
    from kvchat.chat_template import ChatTemplate, preamble_length
    from kvchat.errors import ModelFormatError

    template = ChatTemplate(source)
    try:  # a template that merely fails has no preamble (0); one over a limit is refused
        assert _finishes(lambda: preamble_length(template)) == 0
    except ModelFormatError as exc:
        assert "chat template" in str(exc)
    with pytest.raises(ModelFormatError, match="chat template"):
        _finishes(lambda: template.render([{"role": "user", "content": "hi"}], add_generation_prompt=True))


def test_template_output_is_bounded_but_long_messages_pass() -> None:
    from kvchat.chat_template import MAX_TEMPLATE_CHARS, ChatTemplate

    long = "y" * (3 * MAX_TEMPLATE_CHARS)
    out = ChatTemplate(None).render([{"role": "user", "content": long}], add_generation_prompt=True)
    assert long in out


def test_log_parsing_is_linear_on_a_huge_line() -> None:
    from kvchat.engine.runtime import _LOG
    from kvchat.llama_log import parse_buffer_sizes

    huge = "print_info: general.name = " + "n" * (1 << 20) + " model buffer size = 1.00 MiB"
    sizes = _finishes(
        lambda: parse_buffer_sizes([huge, "load_tensors: CPU_Mapped model buffer size = 80.16 MiB"])
    )
    assert sizes.model == {"CPU_Mapped": round(80.16 * 1024 * 1024)}
    mark = _LOG.mark()
    _finishes(lambda: [_LOG.write("x" * 1000) for _ in range(2000)] and _LOG.write("\n"))
    assert [len(line) for line in _LOG.since(mark)] == [4096]


# -- 11/12: GGUF checks that keep llama.cpp from aborting or reading everything --------------


def test_trailing_junk_and_small_alignments_are_refused(model_path: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gguf_fuzz import U32, Value, tiny_model_parts, write_case, write_gguf_bytes

    from kvchat.errors import ModelFormatError
    from kvchat.gguf import read_header_file

    md, tensors = tiny_model_parts(model_path)
    base = write_gguf_bytes(md, tensors)
    tailed = tmp_path / "tail.gguf"
    write_case(tailed, base, 64 << 30)  # sparse: no disk used
    with pytest.raises(ModelFormatError, match="after its last tensor"):
        read_header_file(tailed)
    small = tmp_path / "small.gguf"
    write_case(small, base, 4096)  # a little padding is tolerated
    read_header_file(small)
    for alignment in (1, 2, 4):
        md["general.alignment"] = Value(U32, alignment)
        path = tmp_path / f"a{alignment}.gguf"
        path.write_bytes(write_gguf_bytes(md, tensors, alignment))
        with pytest.raises(ModelFormatError, match="alignment"):
            read_header_file(path)


def test_engine_checks_the_header_and_the_batch(model_path: Path, tmp_path: Path) -> None:
    """The engine itself refuses a damaged file and a tiny context, whatever the caller."""
    from kvchat.cache_types import CACHE_TYPES
    from kvchat.engine import Engine, EngineSettings
    from kvchat.errors import ModelFormatError, UsageError

    f16 = CACHE_TYPES["f16"]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(model_path.read_bytes()[:1_000_000])
    with pytest.raises(ModelFormatError):
        Engine(cut, EngineSettings(n_ctx=256, type_k=f16, type_v=f16))
    with pytest.raises(UsageError, match="too small"):
        Engine(model_path, EngineSettings(n_ctx=8, type_k=f16, type_v=f16))
    with Engine(model_path, EngineSettings(n_ctx=64, type_k=f16, type_v=f16, n_threads=2)) as engine:
        assert engine.n_batch <= engine.n_ctx
        tokens = engine.tokenize("word " * 60, add_special=True)[: engine.n_ctx - 1]
        engine.eval(tokens)  # one prompt longer than n_batch would be: no GGML_ASSERT
        assert engine.n_past == len(tokens)


def test_ctx_100_with_a_120_token_prompt_is_answered_or_refused_cleanly(kvchat) -> None:
    result = kvchat("run", "--ctx", "100", "--max-tokens", "2", "--temperature", "0", "word " * 120)
    assert result.returncode in (0, ExitCode.USAGE), result.stderr
    assert "Traceback" not in result.stderr and "GGML_ASSERT" not in result.stderr + result.stdout


def test_estimate_without_training_length_is_consistent(kvchat, tmp_path: Path) -> None:
    from tests.synthetic import write_gguf

    path = write_gguf(
        tmp_path / "c0.gguf",
        "llama",
        {"context_length": 0, "embedding_length": 64, "attention.head_count": 4},
        n_layer=2,
    )
    result = kvchat("estimate", str(path), "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["largest_ctx"] == record["plans"][0]["n_ctx"] == 32768  # ctx_max, as run --ctx auto


def test_explicit_ctx_is_bounded_by_training_length_and_memory(
    model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvchat import limits
    from kvchat.errors import OutOfMemoryError, UsageError
    from kvchat.memory import Budget, PlanSettings
    from kvchat.model_spec import read_spec

    spec = read_spec(str(model_path))
    base = PlanSettings(flash_attn=False, n_gpu_layers=0)
    plenty = Budget(ram=64 << 30)
    assert limits.check_explicit_ctx(spec, base, plenty, 16384, force=False) == []
    assert limits.check_explicit_ctx(spec, base, plenty, 100, force=False) == [
        "--ctx 100 becomes 256: llama.cpp rounds the context up to a multiple of 256"]
    with pytest.raises(UsageError, match="4x"):
        limits.check_explicit_ctx(spec, base, plenty, 8192 * 4 + 1, force=False)
    little = Budget(ram=300 << 20)
    with pytest.raises(OutOfMemoryError, match="more than the memory free now"):
        limits.check_explicit_ctx(spec, base, little, 8192, force=False)
    forced = limits.check_explicit_ctx(spec, base, little, 8192 * 8, force=True)
    assert forced and "KVCHAT_FORCE" in forced[0]
    monkeypatch.setenv("KVCHAT_FORCE", "1")
    assert limits.forced()


def test_explicit_ctx_past_the_memory_is_refused_before_loading(kvchat) -> None:
    result = kvchat("run", "--ctx", "32k", "--max-tokens", "1", "Hi", timeout=120)
    if result.returncode == 0:  # the machine really has the memory: nothing to refuse
        return
    assert result.returncode == ExitCode.OUT_OF_MEMORY, result.stderr
    assert "more than the memory free now" in result.stderr
