"""kvchat on an OpenAI-compatible server: llama-cpp-python's own server stands in
for vLLM, ollama and LM Studio (vLLM cannot run here; its /metrics parsing is
tested on the exposition text its documentation shows)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from kvchat.app import open_conversation
from kvchat.errors import ExitCode
from kvchat.message_session import MessageSession
from kvchat.remote.metrics import parse_exposition, vllm_metrics
from tests.llama_servers import free_port

# From docs.vllm.ai "Production Metrics" (the v1 names) and an older server's names.
VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen3-32B"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen3-32B"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen3-32B"} 0.0421
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="Qwen/Qwen3-32B"} 2048.0
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="Qwen/Qwen3-32B"} 1536.0
vllm:iteration_tokens_total_bucket{le="1.0",model_name="Qwen/Qwen3-32B"} 3.0
vllm:kv_cache_usage_perc{engine="0",model_name="other/model"} 0.5
"""


def test_vllm_metrics_are_read_for_the_model_in_use() -> None:
    m = vllm_metrics(VLLM_METRICS, "Qwen/Qwen3-32B")
    assert m.kv_cache_usage == pytest.approx(0.0421)
    assert (m.prefix_cache_queries, m.prefix_cache_hits) == (2048.0, 1536.0)
    assert m.prefix_hit_rate == pytest.approx(0.75)
    assert (m.requests_running, m.requests_waiting) == (1.0, 0.0)
    # Without a model name, a name's series add up.
    assert vllm_metrics(VLLM_METRICS).kv_cache_usage == pytest.approx(0.5421)


def test_older_vllm_names_and_what_is_missing() -> None:
    m = vllm_metrics('vllm:gpu_cache_usage_perc{model_name="m"} 0.25\n', "m")
    assert m.kv_cache_usage == 0.25
    assert m.prefix_cache_queries is None and m.prefix_hit_rate is None  # not exposed: unknown


def test_exposition_lines_that_are_not_samples_are_skipped() -> None:
    text = 'a{x="1"} 2\n# comment\n\nbroken line here\nb NaN\nc{l="q\\"uote"} 3 1700000000\n'
    samples = parse_exposition(text)
    assert [(s.name, s.value) for s in samples][0] == ("a", 2.0)
    assert samples[-1].labels == {"l": 'q"uote'} and samples[-1].value == 3.0


# llama-cpp-python's server, loading weights as kvchat does: without llama.cpp's extra
# CPU buffer types where kvchat's AMX guard says so (it has no flag for that).
_LAUNCH = """
import runpy
import llama_cpp.llama_cpp as llama
from kvchat.engine import amx_guard
if amx_guard() is not None:
    default_params = llama.llama_model_default_params
    def model_params():
        params = default_params()
        params.use_extra_bufts = False
        return params
    llama.llama_model_default_params = model_params
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def openai_server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python[server] is part of the test extra")
    port = free_port()
    log = tmp_path_factory.mktemp("openai") / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, "--model", str(model_path), "--model_alias", "smollm2",
             "--n_ctx", "2048", "--n_threads", "1", "--host", "127.0.0.1", "--port", str(port)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                if httpx2.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx2.TransportError:
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_chat_on_an_openai_compatible_server(openai_server: str, kv_env) -> None:  # noqa: ANN001
    conv = open_conversation({"server": openai_server, "temperature": "0", "max_tokens": "12"}, print)
    try:
        session = conv.session
        assert isinstance(session, MessageSession)
        # llama-cpp-python's server states neither its context nor usage when streaming:
        # both stay unknown (vLLM reports max_model_len and usage).
        assert conv.backend.n_ctx == 0
        replies = []
        for text in ("Hello!", "Name a colour.", "And another one?"):
            sent = session.send(text)
            replies.append("".join(e.text for e in sent))
            turn = sent.stats
            assert turn.completion_tokens > 0 and not turn.usage_reported
        assert all(replies)
        assert [m["role"] for m in session.messages] == ["user", "assistant"] * 3
        assert "".join(replies[-1]) == session.messages[-1]["content"]
        counts = conv.backend.server_counts()
        assert counts == {"cached_tokens": None, "evaluated_tokens": None, "kv_cache_usage": None,
                          "prefix_cache_hit_rate": None}
        undone = session.undo()
        assert undone["content"] == "And another one?" and len(session.messages) == 4
    finally:
        conv.close()


@pytest.mark.slow
def test_run_json_and_a_named_session_on_an_openai_server(openai_server: str, kvchat) -> None:  # noqa: ANN001
    first = kvchat("run", "--server", openai_server, "--session", "o", "--max-tokens", "8", "--json", "Hi.")
    assert first.returncode == 0, first.stderr
    record = json.loads(first.stdout)
    assert record["model"] == "smollm2" and record["text"]
    assert record["usage"]["prompt_tokens"] is None  # not reported by this server, not invented
    second = kvchat("run", "--server", openai_server, "--session", "o", "--max-tokens", "8", "Again.")
    assert second.returncode == 0, second.stderr
    saved = json.loads(kvchat("sessions", "show", "o", "--json").stdout)
    assert [m["content"] for m in saved["messages"] if m["role"] == "user"] == ["Hi.", "Again."]


@pytest.mark.slow
def test_unknown_model_lists_the_servers_models(openai_server: str, kvchat) -> None:  # noqa: ANN001
    result = kvchat("run", "--server", openai_server, "-m", "nope", "hello")
    assert result.returncode == ExitCode.NOT_FOUND
    assert "does not serve model 'nope'" in result.stderr and "smollm2" in result.stderr
