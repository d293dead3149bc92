"""kvchat on a real llama-server (built from the llama.cpp llama-cpp-python vendors).

The server's own counters are the proof: `timings.cache_n` (prompt tokens found in
its slot's cache) and `prompt_n` (evaluated) for each reply, as `run --json`
reports them under cache.server. Errors are provoked for real: nothing listening,
a name that does not resolve, a server started with --api-key, a server killed
in the middle of a reply.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from kvchat.app import open_conversation
from kvchat.errors import ExitCode, SessionError, UsageError
from tests.conftest import REPO
from tests.llama_servers import LlamaServer, free_port, llama_tool

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    slots = tmp_path_factory.mktemp("slots")
    with LlamaServer(llama_tool("llama-server"), "-m", str(model_path), "-c", "2048", "-np", "1",
                     "--slot-save-path", str(slots), "-t", "1") as running:
        yield running


def _run_json(kvchat, *args: str, stdin: str = "") -> dict:  # noqa: ANN001
    result = kvchat("run", *args, "--json", stdin=stdin)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_ten_turns_evaluate_only_new_tokens_by_the_servers_counters(server: LlamaServer, kv_env) -> None:  # noqa: ANN001
    warnings: list[str] = []
    flags = {"server": server.url, "temperature": "0", "max_tokens": "24", "seed": "1"}
    conv = open_conversation(flags, warnings.append)
    try:
        session = conv.session
        for turn in range(10):
            before = len(session.tokens)
            stats = session.send(f"Turn {turn}: name a colour.")
            list(stats)
            stats = stats.stats
            timings = conv.backend.engine.last_timings
            assert timings is not None
            # Everything kvchat had in its history was in the server's cache (but the
            # last reply's last token, which is evaluated with this turn, as locally)...
            assert timings.cache_n == stats.reused_tokens == max(before - 1, 0)
            # ...and the server evaluated exactly this turn's new tokens.
            assert timings.prompt_n == stats.evaluated_tokens
            assert stats.reevaluated_tokens == 0
        assert conv.backend.engine.n_past == len(session.tokens) - 1  # the last token waits for the next turn
    finally:
        conv.close()
    assert warnings == []


def test_kvchat_renders_the_template_as_the_server_does(server: LlamaServer, kv_env) -> None:  # noqa: ANN001
    conv = open_conversation({"server": server.url, "temperature": "0", "max_tokens": "8"}, print)
    try:
        session = conv.session
        session.set_system("Be brief.")
        for text in ("Hello!", "And again?"):
            list(session.send(text))
        # Up to the last user message (the server takes a final assistant message as
        # a reply to continue): the prompt kvchat tokenized for that turn.
        asked = session.messages[:-1]
        theirs = conv.backend.engine.apply_template_remotely(asked)
        assert session.template.render(asked, add_generation_prompt=True) == theirs
        assert session.kv_text.startswith(theirs)
    finally:
        conv.close()


def test_named_session_restores_the_slot_across_processes(server: LlamaServer, kvchat) -> None:  # noqa: ANN001
    first = _run_json(kvchat, "--server", server.url, "--session", "work", "--temperature", "0",
                      "--max-tokens", "16", "My name is Ada. Say hi.")
    server_counts = first["cache"]["server"]
    n_prompt = first["usage"]["prompt_tokens"]
    assert server_counts["cached_tokens"] + server_counts["evaluated_tokens"] == n_prompt
    # Another client takes the slot: its cache no longer holds the conversation.
    httpx2.post(f"{server.url}/completion", json={"prompt": "Unrelated text " * 20, "n_predict": 4,
                                                  "id_slot": 0, "cache_prompt": True}, timeout=120)
    second = kvchat("run", "--server", server.url, "--session", "work", "--json", "What is my name?")
    assert second.returncode == 0, second.stderr
    record = json.loads(second.stdout)
    assert "re-evaluates" not in second.stderr
    # The slot file brought the whole history back: only the new message was evaluated.
    assert record["cache"]["server"]["cached_tokens"] == record["cache"]["reused_tokens"] > 0
    assert record["cache"]["server"]["evaluated_tokens"] == record["cache"]["evaluated_tokens"]
    assert record["settings"]["temperature"] == 0  # restored from the session


def test_without_slot_files_resuming_says_what_it_costs(model_path: Path, kvchat) -> None:  # noqa: ANN001
    # --cache-ram 0: no RAM prompt cache either, so the other prompt really evicts it.
    with LlamaServer(llama_tool("llama-server"), "-m", str(model_path), "-c", "1024", "-np", "1",
                     "-t", "1", "--cache-ram", "0") as plain:
        _run_json(kvchat, "--server", plain.url, "--session", "s", "--max-tokens", "8", "Hi there.")
        httpx2.post(f"{plain.url}/completion", json={"prompt": "Other " * 30, "n_predict": 2, "id_slot": 0},
                    timeout=120)
        again = kvchat("run", "--server", plain.url, "--session", "s", "--max-tokens", "8", "--json", "Bye.")
    assert again.returncode == 0, again.stderr
    assert "re-evaluates up to" in again.stderr and "--slot-save-path" in again.stderr
    record = json.loads(again.stdout)
    # Exact all the same: the server evaluated the history and the new message.
    assert record["cache"]["server"]["evaluated_tokens"] == record["usage"]["prompt_tokens"]


def test_nothing_listening_is_a_network_error(kvchat) -> None:  # noqa: ANN001
    port = free_port()
    result = kvchat("run", "--server", f"http://127.0.0.1:{port}", "hello")
    assert result.returncode == ExitCode.NETWORK
    assert "connection refused" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_host_is_a_network_error(kvchat) -> None:  # noqa: ANN001
    result = kvchat("run", "--server", "http://no-such-host.invalid:8080", "hello")
    assert result.returncode == ExitCode.NETWORK
    assert "cannot resolve the server name 'no-such-host.invalid'" in result.stderr


def test_bad_server_url_is_a_usage_error(kvchat) -> None:  # noqa: ANN001
    result = kvchat("run", "--server", "gpu-box:8080", "hello")
    assert result.returncode == ExitCode.USAGE
    assert "--server 'gpu-box:8080' is not an http:// or https:// URL" in result.stderr


def test_wrong_api_key_names_the_variable(model_path: Path, kvchat, kv_env) -> None:  # noqa: ANN001
    with LlamaServer(llama_tool("llama-server"), "-m", str(model_path), "-c", "512", "-t", "1",
                     "--api-key", "sesame") as locked:
        refused = kvchat("run", "--server", locked.url, "--api-key", "wrong", "hello")
        assert refused.returncode == ExitCode.NETWORK
        assert "API key was refused" in refused.stderr and "KVCHAT_API_KEY" in refused.stderr
        missing = kvchat("run", "--server", locked.url, "hello")
        assert missing.returncode == ExitCode.NETWORK and "wants an API key" in missing.stderr
        kv_env["KVCHAT_API_KEY"] = "sesame"
        ok = kvchat("run", "--server", locked.url, "--max-tokens", "4", "hello")
        assert ok.returncode == 0, ok.stderr


def test_server_killed_mid_reply_keeps_the_partial_reply(model_path: Path, kv_env) -> None:  # noqa: ANN001
    running = LlamaServer(llama_tool("llama-server"), "-m", str(model_path), "-c", "2048", "-t", "1")
    running.start()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvchat", "run", "--server", running.url, "--session", "cut",
             "--max-tokens", "1500", "--temperature", "1", "--seed", "3",
             "Write a very long story about a lighthouse keeper."],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=kv_env, cwd=REPO,
        )
        assert proc.stdout is not None
        first = proc.stdout.read(40)  # the reply has started streaming
        assert first
    finally:
        running.kill()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == ExitCode.NETWORK, err
    assert "broke in the middle of the reply" in err.decode() and "Traceback" not in err.decode()
    partial = (first + out).decode()
    saved = json.loads(subprocess.run(
        [sys.executable, "-m", "kvchat", "sessions", "show", "cut", "--json"], capture_output=True,
        env=kv_env, cwd=REPO, check=True, text=True).stdout)
    reply = [m for m in saved["messages"] if m["role"] == "assistant"][-1]["content"]
    assert reply and partial.startswith(reply[:20])


def test_the_server_s_context_is_kvchat_s(server: LlamaServer, kv_env) -> None:  # noqa: ANN001
    conv = open_conversation({"server": server.url, "ctx": "4096"}, (warned := []).append)
    try:
        assert conv.backend.n_ctx == 2048
    finally:
        conv.close()
    assert any("--ctx" in w and "decided by the server" in w for w in warned)



def test_bench_measures_the_server_beside_its_own_timings(server: LlamaServer, kvchat) -> None:  # noqa: ANN001
    result = kvchat("bench", "--server", server.url, "--repeats", "2", "--prompt-tokens", "64",
                    "--decode-tokens", "8", "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["model"].endswith(".gguf") and "/" not in record["model"]
    assert record["prompt_tokens"] == 64 and len(record["ttft_s"]["samples"]) == 2
    assert record["decode_tok_s"]["median"] > 0 and record["server_decode_tok_s"]["median"] > 0
    assert record["server_prefill_tok_s"]["median"] > 0
    refused = kvchat("bench", "--server", server.url, "--cache-types", "q8_0")
    assert refused.returncode == ExitCode.USAGE and "server's speed only" in refused.stderr


def test_chat_repl_on_a_server_shows_what_it_reports(server: LlamaServer, kv_env) -> None:  # noqa: ANN001
    pexpect = pytest.importorskip("pexpect")
    from tests.test_repl import PROMPT, SUMMARY, command, plain

    env = dict(kv_env, PROMPT_TOOLKIT_NO_CPR="1")
    args = ["-m", "kvchat", "chat", "--server", server.url, "--temperature", "0", "--max-tokens", "12"]
    child = pexpect.spawn(sys.executable, args,
                          env=env, cwd=str(REPO), dimensions=(40, 120), encoding="utf-8", timeout=180)
    try:
        child.expect(PROMPT)
        assert f"SmolLM2-135M-Instruct.Q4_1.gguf on {server.url} · ctx 2048" in plain(child.before)
        out = command(child, "Name a colour.", SUMMARY)
        # KV fill from kvchat's exact history; its size is the server's and not reported.
        assert "size unknown" in out and f"server {server.url}" in out
        out = command(child, "/info", "session")
        assert "llama-server, 1 slots" in out and "slot 0" in out
        assert "prompt tokens from its cache" in out and "not reported by the server" in out
        second = command(child, "And another?", SUMMARY)
        assert re.search(r"\(\d+ cached\)", second)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        if child.isalive():
            child.terminate(force=True)


def test_overflow_is_handled_client_side_with_the_servers_context(model_path: Path, kv_env) -> None:  # noqa: ANN001
    long = " ".join(f"word{i}" for i in range(60))
    with LlamaServer(llama_tool("llama-server"), "-m", str(model_path), "-c", "512", "-np", "1",
                     "-t", "1") as small:
        conv = open_conversation({"server": small.url, "temperature": "0", "max_tokens": "16"}, print)
        try:
            session = conv.session
            assert conv.backend.n_ctx == 512
            dropped = 0
            for turn in range(6):
                sent = session.send(f"{turn}: repeat these: {long}")
                list(sent)
                stats, timings = sent.stats, conv.backend.engine.last_timings
                assert stats is not None and timings is not None
                dropped += stats.dropped_turns
                # Whatever was dropped, the server's cache and kvchat's history agree.
                assert timings.cache_n + timings.prompt_n == len(session.tokens) - stats.completion_tokens
                assert len(session.tokens) <= 512
            assert dropped > 0
        finally:
            conv.close()
        stop = open_conversation({"server": small.url, "max_tokens": "16", "overflow": "stop"}, print)
        try:
            with pytest.raises(SessionError, match="the context is full"):
                for turn in range(6):
                    list(stop.session.send(f"{turn}: {long}"))
            stop.session.clear()  # nothing to drop: a message longer than the context is refused
            with pytest.raises(UsageError, match="the context holds 512"):
                list(stop.session.send(long * 6))
        finally:
            stop.close()
