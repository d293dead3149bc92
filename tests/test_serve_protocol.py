"""kvchat serve without a model: request checks, OpenAI-shaped errors, tool-call
parsing (whole and streamed), stop strings, and how failures map to statuses."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kvchat.app.serving import StopFilter
from kvchat.engine_api import SamplingSettings
from kvchat.errors import ModelFormatError, NetworkError, SessionError, UsageError
from kvchat.sequences import common_prefix
from kvchat.serve import protocol
from kvchat.serve.protocol import ApiError
from kvchat.serve.server import api_error
from kvchat.serve.tool_calls import ToolCallStream, parse_tool_calls

NAMES = {"m", "m.gguf"}
DEFAULT = SamplingSettings(temperature=0.5, top_p=0.9, seed=None)
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def chat(**body: Any) -> protocol.Call:
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return protocol.chat_call(body, NAMES, DEFAULT, None)


def refused(body: dict[str, Any] | bytes, *, completion: bool = False) -> ApiError:
    with pytest.raises(ApiError) as info:
        parsed = protocol.parse_body(body) if isinstance(body, bytes) else body
        if completion:
            protocol.completion_call(parsed, NAMES, DEFAULT)
        else:
            protocol.chat_call(parsed, NAMES, DEFAULT, None)
    error = info.value
    shape = error.body()["error"]
    assert set(shape) == {"message", "type", "param", "code"} and shape["message"]
    return error


# -- requests ----------------------------------------------------------------------------


def test_a_chat_request_becomes_the_application_request() -> None:
    call = chat(model="m", messages=[{"role": "developer", "content": "Be brief."},
                                     {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                  {"type": "text", "text": "b"}]}],
                temperature=0, top_p=0.5, seed=2**40 + 7, max_tokens=12, stop="END", stream=True,
                stream_options={"include_usage": True}, user="ignored", presence_penalty=0)
    r = call.request
    assert r.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"}]
    assert (r.sampling.temperature, r.sampling.top_p, r.sampling.seed) == (0.0, 0.5, 7)
    assert r.sampling.top_k == DEFAULT.top_k  # not given: the server's own setting
    assert (r.max_tokens, r.stop, call.stream, call.include_usage, r.raw) == (12, ("END",), True, True, False)
    assert chat(max_completion_tokens=5).request.max_tokens == 5
    assert chat().request.sampling == DEFAULT and chat().request.max_tokens is None
    penalised = chat(presence_penalty=0.5, frequency_penalty=-1).request.sampling
    assert (penalised.presence_penalty, penalised.frequency_penalty) == (0.5, -1.0)


def test_tool_messages_are_given_to_the_template_as_transformers_does() -> None:
    call = chat(tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "12 C"}])
    assistant = call.request.messages[1]
    assert assistant["content"] == ""  # templates concatenate strings: never None
    assert assistant["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}  # type: ignore[index]
    assert call.request.messages[2]["tool_call_id"] == "c1"
    assert call.request.tools == [WEATHER]
    assert chat(tools=[WEATHER], tool_choice="none").request.tools is None


def test_completions_take_one_prompt_and_default_to_16_tokens() -> None:
    call = protocol.completion_call({"prompt": ["Once upon"]}, NAMES, DEFAULT)
    assert call.request.raw and call.request.messages == [{"role": "user", "content": "Once upon"}]
    assert call.request.max_tokens == 16


@pytest.mark.parametrize(("body", "status", "param"), [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b"[" * 100_000, 400, None),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, 400,
     "messages"),
    ({"model": "other", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ({"model": 3, "messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 9}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": True}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": 1.5}, 400, "seed"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [1]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 17}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, 400, "logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": {"name": "f"}}, 400, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400, "tools[0]"),
])
def test_bad_requests_are_openai_errors_naming_the_field(body: dict[str, Any] | bytes, status: int,
                                                         param: str | None) -> None:
    error = refused(body)
    assert (error.status, error.param) == (status, param)


def test_bad_completion_requests() -> None:
    assert refused({"prompt": [1, 2, 3]}, completion=True).param == "prompt"
    assert refused({"prompt": ""}, completion=True).param == "prompt"
    assert refused({"prompt": "x", "echo": True}, completion=True).param == "echo"


def test_failures_before_a_reply_map_to_client_or_server_errors() -> None:
    context = api_error(SessionError("the context is full"))
    assert (context.status, context.code) == (400, "context_length_exceeded")
    assert api_error(UsageError("the message needs 9000 tokens")).status == 400
    assert api_error(ModelFormatError("roles must alternate")).status == 400
    broken = api_error(RuntimeError("llama_decode returned -1"))
    assert (broken.status, broken.type) == (500, "server_error") and "RuntimeError" in broken.message
    assert api_error(NetworkError("x")).status == 500
    assert json.dumps(broken.body())  # always serialisable


# -- tool calls ----------------------------------------------------------------------------


def test_hermes_tool_calls_after_text() -> None:
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
            '</tool_call>\n<tool_call>{"name": "get_weather", '
            '"arguments": "{\\"city\\": \\"Rome\\"}"}</tool_call>')
    content, calls = parse_tool_calls(text, {"get_weather"})
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo"}), ("get_weather", {"city": "Rome"})]
    assert calls[0].id != calls[1].id and calls[0].to_openai(0)["index"] == 0


def test_an_unclosed_last_tool_call_is_still_a_call() -> None:
    _, calls = parse_tool_calls('<tool_call>{"name": "get_weather", "arguments": {}}', {"get_weather"})
    assert [c.name for c in calls] == ["get_weather"]


def test_llama3_json_tool_calls() -> None:
    text = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "get_time", ' \
           '"parameters": {}}'
    content, calls = parse_tool_calls(text, {"get_weather", "get_time"})
    assert content == "" and [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Oslo"}


@pytest.mark.parametrize("text", [
    '{"name": "launch_rockets", "parameters": {}}',  # not a declared function
    '{"name": "get_weather", "parameters": {}} and then some prose',
    '{"answer": 42}',
    "<tool_call>not json</tool_call>",
    "Plain words.",
])
def test_what_is_not_a_declared_call_stays_text(text: str) -> None:
    assert parse_tool_calls(text, {"get_weather"}) == (text, [])


def _stream(pieces: list[str], names: set[str]) -> tuple[str, list[str]]:
    stream = ToolCallStream(names)
    shown = "".join(stream.feed(p) for p in pieces)
    rest, calls = stream.finish()
    return shown + rest, [c.name for c in calls]


def test_streamed_text_never_shows_a_call() -> None:
    pieces = ["Let", " me", " check", ".\n<tool", "_call>\n{\"name\": \"get_weather\",",
              " \"arguments\": {}}", "\n</tool_call>"]
    shown, calls = _stream(pieces, {"get_weather"})
    assert "tool_call" not in shown and shown.strip() == "Let me check." and calls == ["get_weather"]
    shown, calls = _stream(["{\"name\"", ": \"get_weather\", \"parameters\": {}}"], {"get_weather"})
    assert (shown, calls) == ("", ["get_weather"])


def test_streamed_text_that_only_looks_like_a_call_is_shown_whole() -> None:
    assert _stream(["<", "b>bold</b> and <tool"], {"f"}) == ("<b>bold</b> and <tool", [])
    assert _stream(["{\"answer\"", ": 42}"], {"f"}) == ("{\"answer\": 42}", [])
    assert _stream(["Hello", " world"], {"f"}) == ("Hello world", [])


# -- stop strings and matching -------------------------------------------------------------------


def test_stop_strings_cut_the_reply_even_across_pieces() -> None:
    stops = StopFilter(["END", "\n\n"])
    out = [stops.feed(p) for p in ["one E", "N", "D two"]]
    assert "".join(out) == "one " and stops.hit and stops.flush() == ""
    held = StopFilter(["END"])
    assert held.feed("abc EN") == "abc " and not held.hit and held.flush() == "EN"
    assert StopFilter([]).feed("x") == "x"


@pytest.mark.parametrize(("a", "b"), [("", ""), ("abc", "abd"), ("abc", "abc"), ("abc", "abcdef"),
                                      ("x" * 1000 + "y", "x" * 1000 + "z"), ("q", "r"),
                                      ([1, 2, 3], [1, 2, 4]), ([], [5]),
                                      (list(range(9000)), list(range(9000)) + [1]),
                                      (list(range(5000)) + [7] * 3000, list(range(5000)) + [8])])
def test_common_prefix(a: str | list[int], b: str | list[int]) -> None:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    assert common_prefix(a, b) == n == common_prefix(b, a)
