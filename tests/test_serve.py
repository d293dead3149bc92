"""`kvchat serve` with real clients: the official openai SDK, `kvchat run --server`,
and plain HTTP for the error cases; SmolLM2 in a real server process (port 0)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvchat.errors import ExitCode

openai = pytest.importorskip("openai", reason="the openai SDK is part of the test extra")

REPO = Path(__file__).resolve().parent.parent
# About 700 tokens that stay the same on every call, as an agent's instructions do.
SYSTEM = " ".join(f"Rule {i}: answer briefly and plainly about topic number {i}." for i in range(55))


def serve_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVCHAT_", "HF_"))}
    env.update(KVCHAT_HOME=str(home), HF_HOME=str(home / "hf"), HF_HUB_OFFLINE="1", NO_COLOR="1",
               PYTHONUNBUFFERED="1")
    return env


class Server:
    """`python -m kvchat serve` as a process; its stderr is read by a thread."""

    def __init__(self, model: Path, home: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvchat", "serve", str(model), "--port", "0", "--ctx", "2048",
             "--temperature", "0", "--threads", "2", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env=serve_env(home), cwd=REPO)
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                if "Ctrl-C stops" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(180) or self.proc.poll() is not None:
            self.proc.kill()
            raise AssertionError("kvchat serve did not start:\n" + "".join(self.lines)[-3000:])
        started = next(line for line in self.lines if "Ctrl-C stops" in line)
        self.port = int(started.split("127.0.0.1:")[1].split("/")[0])
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key: str = "none") -> Any:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as reply:
            text = reply.read().decode()
        return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                if line and not line.startswith("#")}


def http(url: str, body: bytes | None = None, *, method: str = "POST",
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(model_path, tmp_path_factory.mktemp("serve"))
    try:
        yield s
    finally:
        s.stop()


def ask(client: Any, messages: list[dict[str, str]], **options: Any) -> Any:
    return client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=messages,
                                          max_tokens=options.pop("max_tokens", 16), **options)


def evaluated(reply: Any) -> int:
    return int(reply.usage.prompt_tokens - reply.usage.prompt_tokens_details.cached_tokens)


# -- the SDK -----------------------------------------------------------------------------------


def test_openai_sdk_streaming_and_not_give_the_same_greedy_reply(server: Server) -> None:
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct.Q4_1"]
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = ask(client, messages, seed=3)
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0
    chunks = list(ask(client, messages, seed=3, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens and usage.prompt_tokens_details is not None
    text_reply = client.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt="One, two,",
                                           max_tokens=4)
    assert text_reply.choices[0].text and text_reply.usage.completion_tokens <= 4


def test_stop_strings_and_max_tokens(server: Server) -> None:
    client = server.client()
    messages = [{"role": "user", "content": "Count from one to ten."}]
    full = ask(client, messages, max_tokens=40).choices[0].message.content
    stop = full.split()[2]  # a word from the middle of the reply
    cut = ask(client, messages, max_tokens=40, stop=["never there", stop])
    assert cut.choices[0].message.content == full.split(stop)[0]
    assert cut.choices[0].finish_reason == "stop"
    short = ask(client, messages, max_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_a_growing_conversation_evaluates_only_what_is_new(server: Server) -> None:
    client = server.client()
    messages = [{"role": "system", "content": SYSTEM}]
    costs = []
    for question in ("What is topic 3 about?", "And topic 7?", "Say it in five words."):
        messages.append({"role": "user", "content": question})
        reply = ask(client, messages, max_tokens=12)
        costs.append(evaluated(reply))
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
    assert costs[0] > 600
    assert all(cost < 40 for cost in costs[1:]), costs  # the new question and the template around it


def test_tools_on_a_template_without_them_are_a_clear_400(server: Server) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as info:
        ask(server.client(), [{"role": "user", "content": "Weather?"}], tools=[tool])
    assert info.value.status_code == 400 and "takes no tools" in str(info.value)
    assert info.value.body["code"] == "tools_not_supported"


# -- plain HTTP: bad input ----------------------------------------------------------------------


def test_bad_input_is_an_openai_error_never_a_500(server: Server) -> None:
    chat = server.url + "/v1/chat/completions"
    user = [{"role": "user", "content": "hi"}]
    cases = [
        (b"{nope", 400, "invalid_json"),
        (json.dumps({"messages": user, "model": "gpt-4o"}).encode(), 404, "model_not_found"),
        (json.dumps({"messages": user, "max_tokens": "ten"}).encode(), 400, "invalid_value"),
        (json.dumps({"messages": [{"role": "user", "content": "word " * 3000}]}).encode(), 400,
         "context_length_exceeded"),
    ]
    for body, status, code in cases:
        got, reply = http(chat, body)
        assert (got, reply["error"]["code"]) == (status, code), reply
        assert set(reply["error"]) == {"message", "type", "param", "code"}
    # A body over the limit is refused from its Content-Length, before it is read.
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000000\r\n\r\n{\"messages\": [")
        head = b""
        while b"}}" not in head:
            data = sock.recv(65536)
            if not data:
                break
            head += data
    assert head.startswith(b"HTTP/1.1 413") and b"body_too_large" in head, head
    assert http(server.url + "/v1/nothing", None, method="GET")[0] == 404
    assert http(server.url + "/v1/chat/completions", None, method="GET")[0] == 405
    assert http(server.url + "/health", None, method="GET") == (200, {"status": "ok"})
    # Still serving, and the failures are counted, none as a 500.
    reply = ask(server.client(), user, max_tokens=2)
    assert reply.choices[0].message.content is not None
    metrics = server.metrics()
    assert metrics['kvchat_requests_total{path="/v1/chat/completions",status="400"}'] >= 3
    assert not any('status="500"' in name for name in metrics)


def test_kvchat_run_and_chat_on_kvchat_serve(server: Server, kvchat) -> None:  # noqa: ANN001
    result = kvchat("run", "--server", server.url, "--temperature", "0", "--max-tokens", "6", "--json",
                    "Say hello.")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["text"] and record["model"] == "SmolLM2-135M-Instruct.Q4_1"
    assert record["usage"]["prompt_tokens"] > 0  # kvchat serve reports usage
    piped = kvchat("chat", "--server", server.url, "--max-tokens", "4", stdin="Name a fruit.")
    assert piped.returncode == 0 and piped.stdout.strip(), piped.stderr


# -- the queue, a client that goes away -------------------------------------------------------------


@pytest.mark.slow
def test_requests_queue_and_a_dropped_stream_stops_with_the_cache_exact(
        model_path: Path, tmp_path: Path) -> None:
    server = Server(model_path, tmp_path / "home", "--no-prefix-cache")
    fresh = None
    try:
        client = server.client()
        long = [{"role": "user", "content": "Write a long story about a cat and a boat."}]
        stream = ask(client, long, max_tokens=400, stream=True)
        got = [next(iter(stream)) for _ in range(3)]
        assert got
        second: list[Any] = []
        hello = [{"role": "user", "content": "Hi"}]
        waiter = threading.Thread(target=lambda: second.append(ask(client, hello, max_tokens=2)))
        waiter.start()
        deadline = time.monotonic() + 30
        while server.metrics()["kvchat_queue_depth"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.metrics()["kvchat_queue_depth"] == 1  # waiting behind the story
        stream.close()  # the client goes away mid-reply
        waiter.join(120)
        assert second and second[0].choices[0].message.content is not None
        metrics = server.metrics()
        assert metrics["kvchat_generated_tokens_total"] < 200  # the story stopped early
        assert metrics["kvchat_queue_depth"] == 0 and metrics["kvchat_requests_running"] == 0
        # The cache is exact: a conversation answered after all that is answered as a
        # server that never saw the dropped reply answers it.
        follow = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is topic 9?"}]
        after = ask(client, follow, max_tokens=12).choices[0].message.content
        fresh = Server(model_path, tmp_path / "fresh", "--no-prefix-cache")
        assert ask(fresh.client(), follow, max_tokens=12).choices[0].message.content == after
    finally:
        server.stop()
        if fresh is not None:
            fresh.stop()


def _raw_request(server: Server, body: dict[str, Any]) -> socket.socket:
    """A chat request sent on a socket of its own, its reply not read (to drop it)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def _until(server: Server, done: Callable[[dict[str, float]], bool], what: str) -> dict[str, float]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        metrics = server.metrics()
        if done(metrics):
            return metrics
        time.sleep(0.02)
    raise AssertionError(f"{what}: {server.metrics()}")


def test_a_client_that_gives_up_on_a_whole_reply_or_in_the_queue_frees_the_model(
        model_path: Path, tmp_path: Path) -> None:
    """Not only streams: a non-streamed call whose client goes away (a timeout, a
    cancelled call) stops generating, and one that leaves while queued never runs."""
    server = Server(model_path, tmp_path / "home", "--no-prefix-cache")
    try:
        story = {"model": "SmolLM2-135M-Instruct.Q4_1", "max_tokens": 400, "messages": [
            {"role": "user", "content": "Write a long story about a cat and a boat."}]}
        first = _raw_request(server, story)
        _until(server, lambda m: m["kvchat_generated_tokens_total"] > 0 or m["kvchat_requests_running"] == 1,
               "the first call did not start")
        queued = _raw_request(server, {**story, "max_tokens": 300})
        _until(server, lambda m: m["kvchat_queue_depth"] == 1, "the second call was not queued")
        queued.close()  # gives up while waiting
        _until(server, lambda m: m["kvchat_queue_depth"] == 0 and m["kvchat_requests_running"] == 1,
               "the queued call stayed in the queue")
        first.close()  # gives up on a reply that is being generated
        metrics = _until(server, lambda m: m["kvchat_requests_running"] == 0, "the reply went on")
        assert metrics["kvchat_generated_tokens_total"] < 300  # not the 400 asked, nor the second's
        assert metrics["kvchat_replies_total"] <= 1
        reply = ask(server.client(), [{"role": "user", "content": "Hi"}], max_tokens=4)
        assert reply.choices[0].message.content
        assert any("went away" in line for line in server.lines)
        assert server.metrics()['kvchat_requests_total{path="/v1/chat/completions",status="499"}'] == 2
    finally:
        server.stop()


# -- the KV outlives the server ------------------------------------------------------------------


@pytest.mark.slow
def test_a_conversation_evaluates_only_what_is_new_after_a_restart_and_a_sigkill(
        model_path: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]

    def turn(server: Server, question: str, **options: Any) -> Any:
        messages.append({"role": "user", "content": question})
        reply = ask(server.client(), messages, max_tokens=12, **options)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
        return reply

    first = Server(model_path, home)
    try:
        assert evaluated(turn(first, "What is topic 3 about?")) > 600
        assert evaluated(turn(first, "And topic 4?")) < 40
    finally:
        first.stop()
    second = Server(model_path, home)
    try:
        again = turn(second, "And topic 5?")
        assert evaluated(again) < 40, again.usage
        assert second.metrics()["kvchat_kv_store_restores_total"] == 1
        # Killed in the middle of a reply: what is on disk stays whole.
        stream = ask(second.client(), [*messages, {"role": "user", "content": "Tell me a long story."}],
                     max_tokens=400, stream=True)
        next(iter(stream))
        second.kill()
    finally:
        second.stop()
    third = Server(model_path, home)
    try:
        assert evaluated(turn(third, "And topic 6?")) < 40
        assert not any("damaged" in line or "KV store:" in line for line in third.lines), third.lines
    finally:
        third.stop()


@pytest.mark.slow
def test_two_clients_taking_turns_each_evaluate_only_their_new_tokens(model_path: Path,
                                                                     tmp_path: Path) -> None:
    server = Server(model_path, tmp_path / "home")
    try:
        client = server.client()
        editor = [{"role": "system", "content": SYSTEM}]
        other = SYSTEM.replace("briefly", "in detail").replace("topic", "item")
        agent = [{"role": "system", "content": other}]
        costs: dict[str, list[int]] = {"editor": [], "agent": []}
        for i in range(3):
            for name, messages in (("editor", editor), ("agent", agent)):
                messages.append({"role": "user", "content": f"Question {i} from the {name}?"})
                reply = ask(client, messages, max_tokens=8)
                messages.append({"role": "assistant", "content": reply.choices[0].message.content})
                costs[name].append(evaluated(reply))
        assert all(c[0] > 600 for c in costs.values()), costs
        assert all(cost < 40 for c in costs.values() for cost in c[1:]), costs
        # Every switch after the first round read the incoming client's cells back from disk.
        assert server.metrics()["kvchat_kv_store_restores_total"] == 4
    finally:
        server.stop()


def test_refused_before_loading(kvchat) -> None:  # noqa: ANN001
    refused = kvchat("serve", "--host", "0.0.0.0", "--port", "0", timeout=60)
    assert refused.returncode == ExitCode.USAGE and "--api-key" in refused.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = kvchat("serve", "--port", str(taken.getsockname()[1]), timeout=60)
    assert busy.returncode == ExitCode.USAGE and "cannot listen on 127.0.0.1" in busy.stderr
    assert "loading" not in busy.stderr and "Traceback" not in refused.stderr + busy.stderr


def test_a_key_is_checked(model_path: Path, tmp_path: Path) -> None:
    server = Server(model_path, tmp_path / "home", "--api-key", "s3cret")
    try:
        status, reply = http(server.url + "/v1/models", None, method="GET")
        assert (status, reply["error"]["code"]) == (401, "invalid_api_key")
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").models.list()
        assert server.client("s3cret").models.list().data
        assert http(server.url + "/health", None, method="GET")[0] == 200  # health needs no key
    finally:
        server.stop()


# A ChatML template that takes tools (Hermes style), for a model whose own does not.
TOOLS_TEMPLATE = """\
{%- if tools %}<|im_start|>system
You can call these functions:
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}<|im_start|>{{ message['role'] }}
{% if message.tool_calls %}{% for call in message.tool_calls %}<tool_call>\
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}</tool_call>\
{% endfor %}{% else %}{{ message['content'] }}{% endif %}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_tools_are_rendered_through_a_template_that_takes_them(model_path: Path, tmp_path: Path) -> None:
    template = tmp_path / "tools.jinja"
    template.write_text(TOOLS_TEMPLATE)
    server = Server(model_path, tmp_path / "home", "--chat-template", str(template))
    try:
        client = server.client()
        tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}}}}}
        question = [{"role": "user", "content": "Weather in Oslo?"}]
        plain = ask(client, question, max_tokens=4)
        with_tools = ask(client, question, max_tokens=4, tools=[tool])
        assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 20  # the tool list is in it
        # A whole round trip: the model's call and the tool's result go back through the template.
        answered = ask(client, [*question, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "12 C and rain"}],
            tools=[tool], max_tokens=8)
        assert answered.choices[0].finish_reason in ("stop", "length", "tool_calls")
        assert answered.usage.prompt_tokens_details.cached_tokens > 20  # the tool list was kept
    finally:
        server.stop()


# A thinking template in ChatML: the reply opens inside a reasoning block, and earlier
# replies are rendered without their reasoning (as Qwen3's template does).
THINKING_TEMPLATE = """\
{%- for message in messages %}<|im_start|>{{ message['role'] }}
{% if message['role'] == 'assistant' and '</think>' in message['content'] %}\
{{ message['content'].split('</think>')[-1].lstrip() }}{% else %}{{ message['content'] }}{% endif %}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
<think>
{% endif %}"""


def test_reasoning_comes_apart_and_the_rendered_history_is_what_is_cached(model_path: Path,
                                                                           tmp_path: Path) -> None:
    template = tmp_path / "thinking.jinja"
    template.write_text(THINKING_TEMPLATE)
    server = Server(model_path, tmp_path / "home", "--chat-template", str(template))
    try:
        client = server.client()
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is topic 2?"}]
        whole = ask(client, messages, max_tokens=10)
        message = whole.choices[0].message
        reasoning = (message.model_extra or {}).get("reasoning_content")
        # SmolLM2 never closes the block: all it wrote is reasoning, none of it the answer.
        assert reasoning and message.content == ""
        chunks = list(ask(client, messages, max_tokens=10, stream=True))
        streamed = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                           for c in chunks if c.choices)
        assert streamed == reasoning and not any(c.choices[0].delta.content for c in chunks if c.choices)
        # The client sends the reply back as the template renders it (no reasoning): what
        # the cache held up to the reply is kept, the reply is evaluated as rendered.
        messages += [{"role": "assistant", "content": "Topic 2 is about rules."},
                     {"role": "user", "content": "And topic 3?"}]
        again = ask(client, messages, max_tokens=4)
        assert again.usage.prompt_tokens_details.cached_tokens > 600 and evaluated(again) < 40
    finally:
        server.stop()
