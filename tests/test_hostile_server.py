"""A server that misbehaves (issue 23, items 18-21): `kvchat run --server URL` against
the fake of tests/hostile_server.py, which chats properly until it is told to send
something else. Each case: exit 6 with one line on stderr naming what the server
did, no traceback, bounded time (and memory, and bytes read, where the server sends
without end), and the named session saved before is either untouched (the turn
never started) or holds the turn with its reply marked as cut, and still loads.

No model is needed: the fake server provides the tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvchat import session_store
from kvchat.errors import ExitCode, SessionError
from tests.conftest import REPO
from tests.hostile_server import N_CTX, N_VOCAB, REPLY, TEMPLATE, Fault, HostileServer

MiB = 2**20
RSS_BOUND = 300 * MiB  # a 1 GiB reply drove kvchat to 20 GiB; bounded reads stay near its baseline
SENT_BOUND = 64 * MiB  # the 16 MiB caps, plus what socket buffers hold when kvchat stops reading
FIRST = "Hi"  # the turn saved before each case
SECOND = "Again"  # the turn the server spoils


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    max_rss: int  # bytes


# Runs kvchat in-process and, at exit, writes its peak resident memory (VmHWM of its own
# address space, which exec started afresh) to the file in argv[1]. wait4's ru_maxrss
# would not do: a forked child's peak counts the parent's pages from before its exec,
# and a pytest process that loaded models is over a GiB.
_PEAK = ("import atexit, runpy, sys\n"
         "out = sys.argv.pop(1)\n"
         "def peak():\n"
         "    kib = [ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM:')]\n"
         "    open(out, 'w').write(kib[0] if kib else '0')\n"
         "atexit.register(peak)\n"
         "sys.argv[0] = 'kvchat'\n"
         "runpy.run_module('kvchat', run_name='__main__', alter_sys=True)\n")


def run_kvchat(args: list[str], env: dict[str, str], timeout: float = 60) -> Run:
    """`python -m kvchat ARGS`, with the process's own peak memory (VmHWM at exit)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r") as peak:
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", _PEAK, peak.name, *args], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, env=env, cwd=REPO)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        seconds = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        kib = peak.read().strip()
        return Run(proc.returncode, out.read().decode(), err.read().decode(), seconds,
                   int(kib) * 1024 if kib.isdigit() else 0)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[HostileServer, bytes]]]:
    """Both fakes, each with a session 's' saved by one good turn (its file's bytes)."""
    with HostileServer("llama") as llama, HostileServer("openai") as openai:
        saved = {}
        for server in (llama, openai):
            home = tmp_path_factory.mktemp(f"home-{server.mode}")
            env = _env(home)
            good = run_kvchat(["run", "--server", server.url, "--session", "s", FIRST], env)
            assert good.returncode == 0, good.stderr
            # run --session says it started the session, and nothing else.
            assert good.stdout == REPLY + "\n" and good.stderr == "kvchat: new session 's'\n"
            saved[server.mode] = (server, _exported(home, env))
        yield saved


def _env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVCHAT_", "HF_"))}
    env.update(KVCHAT_HOME=str(home), HF_HOME=str(home / "hf"), HF_HUB_OFFLINE="1", NO_COLOR="1",
               COLUMNS="100", PYTHONUNBUFFERED="1", **(extra or {}))
    return env


@dataclass
class Case:
    mode: str  # "llama" (llama-server's API) or "openai"
    faults: list[Fault]
    says: str  # in the one stderr line
    saved: str = "cut"  # "cut": the turn is saved with its reply marked cut; "same": the file is untouched
    reply: str = ""  # what was streamed before the fault (stdout, and the saved partial reply)
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    max_s: float = 20.0  # wall time of the run, startup included (a loaded machine: generous)
    bounded: bool = False  # the server sends without end: check peak memory and bytes sent


def _tokens(n: int, text: str = REPLY) -> list[dict[str, object]]:
    """llama-server's first n token events of `text`, after a progress event."""
    return [{"prompt_progress": {"total": 10, "cache": 0, "processed": 10}}] + [
        {"content": c, "tokens": [3 + ord(c)], "stop": False, "id_slot": 0, "tokens_predicted": i + 1}
        for i, c in enumerate(text[:n])]


def _chunks(*contents: object) -> list[dict[str, object]]:
    return [{"choices": [{"index": 0, "delta": {"content": c}, "finish_reason": None}]} for c in contents]


PROPS = {"default_generation_settings": {"n_ctx": N_CTX}, "total_slots": 1, "model_path": "/m/fake.gguf",
         "chat_template": TEMPLATE, "bos_token": "", "eos_token": "<|im_end|>"}
SLOW = {"KVCHAT_SERVER_TIMEOUT": "2"}

CASES: dict[str, Case] = {
    # 18: bounded replies
    "llama /props body without end": Case(
        "llama", [Fault("/props", "huge-body")], "/props sent a reply over kvchat's 16 MiB bound",
        saved="same", bounded=True),
    "llama /props body of 1 GiB declared": Case(
        "llama", [Fault("/props", "huge-body", 2**30)],
        "/props sent a reply of 1024 MiB over kvchat's 16 MiB bound", saved="same", bounded=True),
    "llama event line without end": Case(
        "llama", [Fault("/completion", "huge-line")],
        "/completion sent an event-stream line over kvchat's 16 MiB bound", bounded=True),
    "openai event line without end": Case(
        "openai", [Fault("/v1/chat/completions", "huge-line")],
        "/v1/chat/completions sent an event-stream line over kvchat's 16 MiB bound", bounded=True),
    "openai /v1/models body without end": Case(
        "openai", [Fault("/v1/models", "huge-body")], "/v1/models sent a reply over kvchat's 16 MiB bound",
        saved="same", bounded=True),
    # 19: deadlines and the token limit
    "llama ignores n_predict": Case(
        "llama", [Fault("/completion", "tokens-forever")],
        "/completion sent more than the 16 tokens asked for (it ignores n_predict)",
        reply="a" * 16, args=("--max-tokens", "16"), bounded=True),
    "openai ignores max_tokens": Case(
        "openai", [Fault("/v1/chat/completions", "tokens-forever")],
        "/v1/chat/completions sent more than the 16 tokens asked for (it ignores max_tokens)",
        reply="a" * 16, args=("--max-tokens", "16"), bounded=True),
    "llama drips the next event": Case(
        "llama", [Fault("/completion", "drip", (_tokens(3), 0.25))],
        "/completion did not send the next event within the 2 s timeout", reply="Hel", env=SLOW, max_s=12),
    "llama drips its first event": Case(
        "llama", [Fault("/completion", "drip", ([], 0.25))],
        "/completion did not send its first event within the 2 s timeout", env=SLOW, max_s=12),
    "llama drips its headers": Case(
        "llama", [Fault("/completion", "drip-headers", 0.25)],
        "/completion did not send its reply within the 2 s timeout", env=SLOW, max_s=12),
    "openai drips the next event": Case(
        "openai", [Fault("/v1/chat/completions", "drip", (_chunks("Hel", "lo"), 0.25))],
        "/v1/chat/completions did not send the next event within the 2 s timeout", reply="Hello", env=SLOW,
        max_s=12),
    "openai drips /v1/models": Case(
        "openai", [Fault("/v1/models", "drip-headers", 0.25)],
        "/v1/models did not send its reply within the 2 s timeout", saved="same", env=SLOW, max_s=12),
    # 20: token ids
    "llama negative id in /completion": Case(
        "llama", [Fault("/completion", "events", _tokens(2) + [{"content": "x", "tokens": [-5]}])],
        "/completion sent token id -5, outside the model's vocabulary (0 to 258)", reply="He"),
    "llama out-of-range id in /completion": Case(
        "llama", [Fault("/completion", "events", [{"content": "x", "tokens": [N_VOCAB]}])],
        f"/completion sent token id {N_VOCAB}, outside the model's vocabulary (0 to 258)"),
    "llama negative id in /tokenize": Case(
        "llama", [Fault("/tokenize", "json", {"tokens": [{"id": -1, "piece": "A"}]}, when=SECOND)],
        "/tokenize sent token id -1, outside the model's vocabulary", saved="same"),
    "llama out-of-range bare id in /tokenize": Case(
        "llama", [Fault("/tokenize", "json", {"tokens": [70000]}, when=SECOND)],
        "/tokenize sent token id 70000, outside the model's vocabulary (0 to 258)", saved="same"),
    "llama id past int32, vocabulary unknown": Case(
        "llama", [Fault("/v1/models", "json", {"detail": "no"}, status=404),
                  Fault("/completion", "events", [{"content": "x", "tokens": [2**31]}])],
        "/completion sent token id 2147483648, outside the model's vocabulary (0 to 2147483647)"),
    # 21: malformed replies
    "llama first event not JSON": Case(
        "llama", [Fault("/completion", "events", [b"{not json"])],
        "/completion sent an event that is not JSON ({not json)"),
    "llama event is a list": Case(
        "llama", [Fault("/completion", "events", [b"[1, 2]"])],
        "/completion sent an event that is not a JSON object ([1, 2])"),
    "llama event is a number": Case(
        "llama", [Fault("/completion", "events", _tokens(1) + [b"42"])],
        "/completion sent an event that is not a JSON object (42)", reply="H"),
    "llama tokens is text": Case(
        "llama", [Fault("/completion", "events", [{"content": "H", "tokens": "abc"}])],
        "/completion sent 'tokens' = \"abc\", not a list"),
    "llama content is a number": Case(
        "llama", [Fault("/completion", "events", [{"content": 5, "tokens": [75]}])],
        "/completion sent 'content' = 5, not text"),
    "llama stop is text": Case(
        "llama", [Fault("/completion", "events", [{"stop": "yes"}])],
        "/completion sent 'stop' = \"yes\", not true or false"),
    "llama token id null": Case(
        "llama", [Fault("/completion", "events", [{"content": "H", "tokens": [None]}])],
        "/completion sent token id null"),
    "llama timings is a list": Case(
        "llama", [Fault("/completion", "events", _tokens(2) + [{"stop": True, "timings": [1]}])],
        "/completion sent 'timings' = [1], not an object", reply="He"),
    "llama n_ctx 'lots'": Case(
        "llama", [Fault("/props", "json", {**PROPS, "default_generation_settings": {"n_ctx": "lots"}})],
        "/props sent 'n_ctx' = \"lots\", not a whole number", saved="same"),
    "llama /tokenize tokens is text": Case(
        "llama", [Fault("/tokenize", "json", {"tokens": "nope"}, when=SECOND)],
        "/tokenize sent 'tokens' = \"nope\", not a list", saved="same"),
    "llama /tokenize reply is a list": Case(
        "llama", [Fault("/tokenize", "json", [1, 2, 3], when=SECOND)],
        "/tokenize sent a reply that is not a JSON object ([1, 2, 3])", saved="same"),
    "llama /tokenize reply is not JSON": Case(
        "llama", [Fault("/tokenize", "json", b"<html>oops</html>", when=SECOND)],
        "/tokenize sent a reply that is not JSON (<html>oops</html>)", saved="same"),
    "llama prompt_progress past its total": Case(
        "llama", [Fault("/completion", "events",
                        [{"prompt_progress": {"total": 5, "cache": 0, "processed": 50}}])],
        "/completion sent prompt progress that does not add up"),
    "llama prompt_progress is a number": Case(
        "llama", [Fault("/completion", "events", [{"prompt_progress": 7}])],
        "/completion sent 'prompt_progress' = 7, not an object"),
    "llama redirect": Case(
        "llama", [Fault("/completion", "redirect", "http://elsewhere.invalid/completion")],
        "/completion redirects to http://elsewhere.invalid/completion (HTTP 302)"),
    "llama empty stream": Case(
        "llama", [Fault("/completion", "empty-stream")],
        "/completion ended the stream before the reply's final event (stop)"),
    "llama closed after the headers": Case(
        "llama", [Fault("/completion", "headers-then-close")], "broke before the start of the reply"),
    "llama no final event": Case(
        "llama", [Fault("/completion", "reply-then-close", 6)],
        "/completion ended the stream before the reply's final event (stop)", reply="Hello"),
    "openai first event not JSON": Case(
        "openai", [Fault("/v1/chat/completions", "events", [b"{not json"])],
        "/v1/chat/completions sent an event that is not JSON ({not json)"),
    "openai event is a list": Case(
        "openai", [Fault("/v1/chat/completions", "events", [b"[]"])],
        "/v1/chat/completions sent an event that is not a JSON object ([])"),
    "openai choices is an object": Case(
        "openai", [Fault("/v1/chat/completions", "events", [{"choices": {"a": 1}}])],
        "/v1/chat/completions sent 'choices' = {\"a\": 1}, not a list"),
    "openai delta is text": Case(
        "openai", [Fault("/v1/chat/completions", "events", _chunks("Hel") + [{"choices": [{"delta": "x"}]}])],
        "/v1/chat/completions sent 'delta' = \"x\", not an object", reply="Hel"),
    "openai content is a number": Case(
        "openai", [Fault("/v1/chat/completions", "events", _chunks(5))],
        "/v1/chat/completions sent 'content' = 5, not text"),
    "openai finish_reason is a number": Case(
        "openai", [Fault("/v1/chat/completions", "events",
                         [{"choices": [{"delta": {}, "finish_reason": 1}]}])],
        "/v1/chat/completions sent 'finish_reason' = 1, not text"),
    "openai prompt_tokens is text": Case(
        "openai", [Fault("/v1/chat/completions", "events-done",
                         _chunks("Hi") + [{"choices": [], "usage": {"prompt_tokens": "x"}}])],
        "/v1/chat/completions sent 'prompt_tokens' = \"x\", not a whole number", reply="Hi"),
    "openai max_model_len 'lots'": Case(
        "openai", [Fault("/v1/models", "json", {"data": [{"id": "fake-chat", "max_model_len": "lots"}]})],
        "/v1/models sent 'max_model_len' = \"lots\", not a whole number", saved="same"),
    "openai model list is a number": Case(
        "openai", [Fault("/v1/models", "json", {"data": 3})], "/v1/models sent 'data' = 3, not a list",
        saved="same"),
    "openai text after its finish_reason": Case(
        "openai", [Fault("/v1/chat/completions", "events-done",
                         [*_chunks("Hi"), {"choices": [{"delta": {}, "finish_reason": "stop"}]},
                          *_chunks("more")])],
        "/v1/chat/completions sent more text after the reply's end (finish_reason 'stop')", reply="Hi"),
    "openai events without end after its finish_reason": Case(
        "openai", [Fault("/v1/chat/completions", "events",
                         [{"choices": [{"delta": {}, "finish_reason": "stop"}]}] + [{"choices": []}] * 50)],
        "/v1/chat/completions sent 10 events after the reply's end (finish_reason)"),
    "llama /props redirect": Case(
        "llama", [Fault("/props", "redirect", "http://elsewhere.invalid/props", status=301)],
        "/props redirects to http://elsewhere.invalid/props (HTTP 301)", saved="same"),
    "openai redirect": Case(
        "openai", [Fault("/v1/chat/completions", "redirect", "https://elsewhere.invalid/v1/chat/completions")],
        "/v1/chat/completions redirects to https://elsewhere.invalid/v1/chat/completions (HTTP 302)"),
    "openai empty stream": Case(
        "openai", [Fault("/v1/chat/completions", "empty-stream")],
        "/v1/chat/completions ended the stream before the reply's end (no finish_reason)"),
    "openai [DONE] alone": Case(
        "openai", [Fault("/v1/chat/completions", "events-done", [])],
        "/v1/chat/completions ended the stream before the reply's end (no finish_reason)"),
    "openai closed after the headers": Case(
        "openai", [Fault("/v1/chat/completions", "headers-then-close")],
        "broke before the start of the reply"),
    "openai no [DONE] nor finish_reason": Case(
        "openai", [Fault("/v1/chat/completions", "reply-then-close", 3)],
        "/v1/chat/completions ended the stream before the reply's end (no finish_reason)",
        reply="Hello there, "),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_misbehaving_server_is_a_network_error(name: str, servers, tmp_path: Path) -> None:  # noqa: ANN001
    case = CASES[name]
    server, saved_bytes = servers[case.mode]
    home = tmp_path / "home"
    (home / "sessions").mkdir(parents=True)
    session_file = home / "sessions" / "s.kvs"
    session_file.write_bytes(saved_bytes)
    server.faults = case.faults
    server.log.sent = 0
    try:
        result = run_kvchat(["run", "--server", server.url, "--session", "s", *case.args, SECOND],
                            _env(home, case.env))
    finally:
        server.faults = []
    assert result.returncode == ExitCode.NETWORK, result.stderr
    # run --session says which session it resumed when it got that far; then one error line.
    lines = [ln for ln in result.stderr.splitlines() if not ln.startswith("kvchat: resumed session 's': ")]
    assert len(lines) == 1 and lines[0].startswith("kvchat: error: "), result.stderr
    assert case.says in lines[0]
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert result.seconds < case.max_s
    assert result.stdout.rstrip("\n") == case.reply
    if case.bounded:
        assert 0 < result.max_rss < RSS_BOUND, f"peak RSS {result.max_rss / MiB:.0f} MiB (0: not recorded)"
        assert server.log.sent < SENT_BOUND, f"the server got {server.log.sent / MiB:.0f} MiB out"

    if case.saved == "same":
        assert session_file.read_bytes() == saved_bytes
        return
    before = session_store.load(_copy(saved_bytes, tmp_path))
    # The loader's own checks: the saved session is not poisoned.
    after = session_store.load(_copy(_exported(home, _env(home)), tmp_path, "after"))
    assert after.record["messages"][: len(before.record["messages"])] == before.record["messages"]
    user, reply = after.record["messages"][len(before.record["messages"]):]
    assert user == {"role": "user", "content": SECOND}
    assert reply["role"] == "assistant" and reply["content"] == case.reply
    assert reply["cut"] and case.says in reply["cut"]  # never a whole (or whole empty) reply
    assert all(0 <= t < N_VOCAB for t in after.tokens)
    assert after.tokens[: len(before.tokens)] == before.tokens


def _exported(home: Path, env: dict[str, str]) -> bytes:
    """Session 's' of `home` as one .kvs file (`sessions export --format kvs`)."""
    out = home / "exported.kvs"
    result = run_kvchat(["sessions", "export", "s", "--format", "kvs", "-o", str(out)], env)
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    out.unlink()
    return data


def _copy(data: bytes, tmp_path: Path, folder: str = "before") -> Path:
    path = tmp_path / folder / "s.kvs"
    path.parent.mkdir()
    path.write_bytes(data)
    return path


def test_sessions_show_marks_a_cut_reply(servers, tmp_path: Path) -> None:  # noqa: ANN001
    server, saved_bytes = servers["llama"]
    home = tmp_path / "home"
    (home / "sessions").mkdir(parents=True)
    (home / "sessions" / "s.kvs").write_bytes(saved_bytes)
    server.faults = [Fault("/completion", "reply-then-close", 4)]
    try:
        cut = run_kvchat(["run", "--server", server.url, "--session", "s", SECOND], _env(home))
    finally:
        server.faults = []
    assert cut.returncode == ExitCode.NETWORK and cut.stdout == "Hel\n"
    shown = run_kvchat(["sessions", "show", "s"], _env(home))
    assert shown.returncode == 0, shown.stderr
    assert "[assistant, cut short] Hel" in shown.stdout.replace("\n", " ")
    exported = json.loads(run_kvchat(["sessions", "show", "s", "--json"], _env(home)).stdout)
    assert "cut" not in exported["messages"][1] and exported["messages"][3]["cut"]
    # The next turn goes on from the cut reply, as from one stopped with Ctrl-C.
    again = run_kvchat(["run", "--server", server.url, "--session", "s", "Go on."], _env(home))
    assert again.returncode == 0, again.stderr
    assert again.stdout == REPLY + "\n"


def test_a_record_the_loader_would_refuse_is_never_saved(tmp_path: Path) -> None:
    """session_store.save runs the loader's checks first: a bad record raises and the
    good file stays as it was."""
    path = tmp_path / "s.kvs"
    record = {"model": {"path": "m", "size": 1, "sha256": "x"},
              "settings": {"n_ctx": 64, "type_k": "f16", "type_v": "f16", "flash_attn": "auto"},
              "messages": [{"role": "user", "content": "hi"}], "n_kv": 2}
    session_store.save(path, record, [1, 2], b"state")
    good = path.read_bytes()
    bad = (([1, -2], record, "a token id is negative"),
           ([1, 2**31], record, "a token id is not a 32-bit integer"),
           ([1, 2], {**record, "n_kv": 3}, "n_kv 3 does not match its 2 tokens"),
           ([1, 2], {**record, "messages": [{"role": "user"}]}, "messages[0] is not a message"))
    for tokens, rec, says in bad:
        with pytest.raises(SessionError, match="did not save session 's'") as caught:
            session_store.save(path, rec, tokens, b"state")
        assert says in str(caught.value) and "the previously saved copy is intact" in str(caught.value)
        assert path.read_bytes() == good
    assert session_store.load(path).tokens == [1, 2]
    assert not list(tmp_path.glob(".*.tmp"))



def test_metrics_a_server_could_not_mean_are_left_out() -> None:
    """vLLM's /metrics figures are shown as unknown where they cannot be true."""
    from kvchat.remote.metrics import vllm_metrics

    text = ('vllm:kv_cache_usage_perc{model_name="m"} 7\n'
            'vllm:prefix_cache_queries_total{model_name="m"} 100\n'
            'vllm:prefix_cache_hits_total{model_name="m"} 500\n'
            'vllm:num_requests_running{model_name="m"} -3\n'
            + 'vllm:num_requests_waiting{model_name="m"} 1e308\n' * 2)  # a sum past float
    m = vllm_metrics(text, "m")
    assert m.kv_cache_usage is None and m.requests_running is None and m.requests_waiting is None
    assert m.prefix_cache_hits == 500 and m.prefix_hit_rate is None  # more hits than lookups


def test_the_time_kvchat_holds_an_event_is_not_the_servers(servers) -> None:  # noqa: ANN001
    """The deadline is the server's: a reader that stops between events (a terminal
    paused with Ctrl-S) longer than the timeout still gets the rest of the reply."""
    from kvchat.remote.client import ServerClient, ServerOptions

    server, _ = servers["llama"]
    client = ServerClient(ServerOptions(server.url, api_key=None, timeout_s=1.0, verify_tls=True))
    try:
        events = client.stream("/completion", {"prompt": [1, 2, 3], "n_predict": 4})
        first = next(events)
        time.sleep(1.5)
        rest = list(events)
    finally:
        client.close()
    assert "prompt_progress" in first
    assert [e["content"] for e in rest[:-1]] == list(REPLY[:4]) and rest[-1]["stop"] is True
