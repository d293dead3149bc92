"""The conversation seam without a model: Turn, the message conversation over a
scripted server, template choice for a model without llama.cpp's built-ins, and the
--json record's schema from a backend's facts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from kvchat.app.backends import MemoryFigures
from kvchat.app.report import TurnReport, turn_report
from kvchat.chat_template import BuiltinTemplates, select_template
from kvchat.conversation import Turn, TurnStats
from kvchat.engine_api import ChatUsage, MessageEngine, SamplingSettings, TokenEvent
from kvchat.errors import NetworkError, SessionError, UsageError
from kvchat.message_session import MessageSession


class ScriptedServer:
    """A MessageEngine whose replies are scripted: each reply is its words, one
    event each; `usage` counts one token per word of the messages."""

    def __init__(self, n_ctx: int = 0, *, report_usage: bool = True, fail_after: int | None = None) -> None:
        self.n_ctx = n_ctx
        self.load_s = 0.0
        self.sampling = SamplingSettings()
        self.sent: list[list[dict[str, str]]] = []
        self._usage: ChatUsage | None = None
        self._finish: str | None = None
        self._report = report_usage
        self._fail_after = fail_after

    @property
    def last_usage(self) -> ChatUsage | None:
        return self._usage

    @property
    def last_finish_reason(self) -> str | None:
        return self._finish

    def set_sampling(self, sampling: SamplingSettings) -> None:
        self.sampling = sampling

    def chat(self, messages: Sequence[dict[str, str]], max_tokens: int | None) -> Iterator[TokenEvent]:
        self.sent.append(list(messages))
        self._usage = self._finish = None
        words = f"reply {len(self.sent)} to {messages[-1]['content']}".split()[: max_tokens or None]
        for i, word in enumerate(words):
            if self._fail_after is not None and i == self._fail_after:
                raise NetworkError("the server closed the stream")
            yield TokenEvent(-1, word + " ", False)
        self._finish = "stop"
        if self._report:
            prompt = sum(len(m["content"].split()) for m in messages)
            self._usage = ChatUsage(prompt, len(words), prompt // 2)

    def close(self) -> None:
        pass


def _server_conversation(server: ScriptedServer, **kwargs: Any) -> MessageSession:
    engine: MessageEngine = server  # the scripted server is a MessageEngine (mypy-checked shape)
    return MessageSession(engine, **kwargs)


def test_a_turn_runs_only_when_iterated_and_its_figures_are_complete_after() -> None:
    server = ScriptedServer()
    session = _server_conversation(server)
    turn = session.send("hello there")
    assert not turn.begun and server.sent == []
    assert turn.text() == "reply 1 to hello there "
    assert turn.begun and turn.stats.completion_tokens == 5 and turn.stats.stop_reason == "eog"
    assert turn.stats.prompt_tokens == 2 and turn.stats.reused_tokens == 1
    assert session.messages[-1] == {"role": "assistant", "content": "reply 1 to hello there "}


def test_a_turn_closed_early_keeps_the_partial_reply() -> None:
    session = _server_conversation(ScriptedServer())
    turn = session.send("one two three")
    first = next(turn)
    turn.close()
    assert turn.stats.stop_reason == "interrupted"
    assert session.messages[-1] == {"role": "assistant", "content": first.text}


def test_a_dropped_stream_is_kept_and_marked() -> None:
    session = _server_conversation(ScriptedServer(fail_after=2))
    turn = session.send("a b c")
    with pytest.raises(NetworkError):
        list(turn)
    assert turn.stats.stop_reason == "dropped"
    assert session.messages[-1]["content"] == "reply 1 "


def test_without_usage_the_prompt_counts_are_unknown() -> None:
    session = _server_conversation(ScriptedServer(report_usage=False))
    turn = session.send("hi")
    list(turn)
    assert not turn.stats.usage_reported and turn.stats.completion_tokens == 4


def test_message_conversation_overflow_drops_oldest_exchanges_or_refuses() -> None:
    server = ScriptedServer(n_ctx=64)
    session = _server_conversation(server, max_tokens=8)
    session.set_system("be brief")
    for i in range(12):
        session.send(f"message {i} " + "word " * 10).text()
    assert session.dropped and session.messages[0]["role"] == "system"
    assert session.n_kv <= 64
    stopping = _server_conversation(ScriptedServer(n_ctx=64), max_tokens=8, overflow="stop")
    with pytest.raises(SessionError, match="context is full"):
        for i in range(12):
            stopping.send(f"message {i} " + "word " * 10).text()


def test_message_conversation_undo_and_retry_resend_the_last_message() -> None:
    server = ScriptedServer()
    session = _server_conversation(server)
    session.send("first").text()
    session.send("second").text()
    assert session.retry().text() == "reply 3 to second "
    assert [m["content"] for m in server.sent[-1]] == ["first", "reply 1 to first ", "second"]
    assert session.undo()["content"] == "second" and len(session.messages) == 2
    revision = session.revision
    session.clear()
    assert session.messages == [] and session.revision != revision
    with pytest.raises(SessionError, match="no exchange"):
        session.undo()
    with pytest.raises(UsageError, match="overflow"):
        _server_conversation(server, overflow="later")


def test_message_conversation_saves_its_transcript_only() -> None:
    session = _server_conversation(ScriptedServer())
    session.send("keep me").text()
    saved = session.saved_state()
    assert saved.tokens == [] and saved.source is None and session.n_tokens == 0
    other = _server_conversation(ScriptedServer())
    assert other.restore(session.to_record(), [], None) == 0
    assert other.messages == session.messages and other.checkpoint_usage is None


class ServerTemplates:
    """A model whose only template is its own (llama-server's view): no built-ins."""

    def __init__(self, own: str | None) -> None:
        self.own = own

    def chat_template(self) -> str | None:
        return self.own

    def has_special_token(self, text: str) -> bool:
        return text == "<|im_start|>"

    def token_text(self, token: int) -> str:
        return {1: "<s>", 2: "</s>"}.get(token, "")

    @property
    def bos_token(self) -> int:
        return 1

    @property
    def eos_token(self) -> int:
        return 2


def test_a_model_without_built_in_templates_is_asked_nothing_it_cannot_do() -> None:
    model = ServerTemplates(None)
    assert not isinstance(model, BuiltinTemplates)
    template, notice = select_template(model)
    assert notice is not None and "ChatML" in notice
    with pytest.raises(UsageError, match="built-in templates are only at hand for a model loaded here"):
        select_template(model, "chatml")
    own, notice = select_template(ServerTemplates("{{ messages[0]['content'] }}"))
    assert notice is None
    assert own.render([{"role": "user", "content": "x"}], add_generation_prompt=True) == "x"


class FakeBackend:
    """The facts a backend gives a turn report."""

    label = "m.gguf"
    model_ref = "/models/m.gguf"
    n_ctx = 256
    load_s = 1.23456
    speculative_mode = "ngram"

    def __init__(self, server: dict[str, Any] | None) -> None:
        self._server = server

    def where(self) -> dict[str, Any]:
        return {"server": "http://x", "n_ctx": 256} if self._server is not None else {"n_ctx": 256}

    def memory(self, conversation: Any) -> MemoryFigures:
        return MemoryFigures(256, conversation.n_kv, None if self._server else 1024, None, None)

    def server_counts(self) -> dict[str, Any] | None:
        return self._server


class FakeChat:
    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend
        self.session = _server_conversation(ScriptedServer())
        self.rebuilt_tokens = 5
        self.rebuild_s = 0.25


def test_the_turn_report_is_the_json_schema() -> None:
    stats = TurnStats(reused_tokens=10, evaluated_tokens=3, prompt_tokens=13, completion_tokens=4,
                      ttft_s=0.5, prefill_s=0.5, decode_s=1.0, drafted_tokens=4, accepted_tokens=2)
    local = turn_report(FakeChat(FakeBackend(None)), stats, "hi").to_json()  # type: ignore[arg-type]
    assert list(local) == ["text", "reasoning", "model", "settings", "usage", "cache", "memory", "timings",
                           "speculative", "stop_reason"]
    assert local["model"] == "m" and local["settings"]["n_ctx"] == 256  # as `kvchat list` would name it
    # Tokens --rebuild re-evaluated count as evaluated, not reused.
    assert (local["cache"]["reused_tokens"], local["cache"]["evaluated_tokens"],
            local["cache"]["rebuilt_tokens"]) == (5, 8, 5)
    assert "server" not in local["cache"] and "prefix_cache_skipped" not in local["cache"]
    assert local["speculative"] == {"mode": "ngram", "drafted_tokens": 4, "accepted_tokens": 2,
                                    "acceptance": 0.5}
    assert local["timings"]["load_s"] == 1.2346 and local["memory"]["kv_bytes"] == 1024
    assert local["timings"]["rebuild_s"] == 0.25  # the rebuild's time, apart from the turn's
    remote_chat = FakeChat(FakeBackend({"cached_tokens": 7}))
    remote_chat.rebuilt_tokens = 0
    remote = turn_report(remote_chat,  # type: ignore[arg-type]
                         TurnStats(usage_reported=False, prefix_cache_skipped="too short"), "").to_json()
    assert remote["cache"]["server"] == {"cached_tokens": 7}
    assert remote["cache"]["reused_tokens"] is None and remote["usage"]["prompt_tokens"] is None
    assert remote["cache"]["prefix_cache_skipped"] == "too short"
    assert "rebuild_s" not in remote["timings"]  # nothing rebuilt: not in the record
    assert isinstance(turn_report(FakeChat(FakeBackend(None)), stats, ""), TurnReport)  # type: ignore[arg-type]


def test_turn_wraps_any_generator_and_closes_it() -> None:
    closed: list[bool] = []

    def run(stats: TurnStats) -> Iterator[TokenEvent]:
        try:
            stats.completion_tokens = 1
            yield TokenEvent(5, "x", False)
            yield TokenEvent(6, "y", True)
        finally:
            closed.append(True)

    turn = Turn(run)  # type: ignore[arg-type]
    assert next(turn).token == 5 and turn.stats.completion_tokens == 1
    turn.close()
    assert closed == [True]
