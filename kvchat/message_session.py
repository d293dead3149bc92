"""A message conversation: on a server that renders and tokenizes messages itself
(an OpenAI-compatible chat API: vLLM, ollama, LM Studio, llama-cpp-python's server).

It keeps the messages and the server's own token counts (`usage`); there is no
token history and no KV state here: the server's prefix cache is what keeps
earlier turns from being evaluated again, and `cached_tokens` is the proof where
the server reports it. The overflow policy is applied from the server's count of
the last exchange. It implements `kvchat.conversation.Conversation`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from kvchat.chat_template import Message
from kvchat.conversation import SavedState, StateLoader, Turn, TurnStats, assistant_reply, set_system_prompt
from kvchat.engine_api import MessageEngine, SamplingSettings, TokenEvent
from kvchat.errors import NetworkError, SessionError, UsageError
from kvchat.settings import OVERFLOW_POLICIES, default_field


@dataclass
class MessageSession:
    engine: MessageEngine
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    max_tokens: int | None = default_field("max_tokens")
    overflow: str = default_field("overflow")
    messages: list[Message] = field(default_factory=list)
    dropped: list[Message] = field(default_factory=list)
    on_prefill: Callable[[int, int], None] | None = None

    def __post_init__(self) -> None:
        if self.overflow not in OVERFLOW_POLICIES:
            raise UsageError(f"unknown --overflow '{self.overflow}'", hint="use shift or stop")
        self.engine.set_sampling(self.sampling)
        self._context_used = 0  # the server's prompt + completion tokens of the last exchange
        self._revision = 0

    @property
    def n_kv(self) -> int:
        return self._context_used

    @property
    def n_tokens(self) -> int:
        return 0

    @property
    def template_origin(self) -> str:
        return "the server's own (it renders the messages)"

    @property
    def checkpoint_usage(self) -> tuple[int, int] | None:
        return None

    @property
    def revision(self) -> int:
        return self._revision

    def set_system(self, text: str) -> None:
        self._revision += 1
        set_system_prompt(self.messages, text)

    def set_sampling(self, sampling: SamplingSettings) -> None:
        self.sampling = sampling
        self.engine.set_sampling(sampling)

    def clear(self) -> None:
        self._revision += 1
        self._context_used = 0
        self.messages = [m for m in self.messages[:1] if m["role"] == "system"]
        self.dropped = []

    # -- a turn ---------------------------------------------------------------------

    def send(self, text: str, *, shared_chars: int | None = None) -> Turn:
        """Send the messages; the server's `usage` gives the turn's counts.
        (`shared_chars` is for the local prefix cache; the server has its own.)"""
        return Turn(lambda stats: self._send(stats, text))

    def _drop_oldest_exchange(self) -> bool:
        """Drop the oldest user message after the system prompt and its replies."""
        start = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        users = [i for i in range(start, len(self.messages)) if self.messages[i]["role"] == "user"]
        if not users:
            return False
        end = users[1] if len(users) > 1 else len(self.messages)
        self.dropped.extend(self.messages[users[0] : end])
        del self.messages[users[0] : end]
        return True

    def _make_room(self, stats: TurnStats, text: str) -> None:
        """The overflow policy, from the server's count of the last exchange (the new
        message estimated at one token per 3 bytes: the server's tokenizer is not at
        hand)."""
        n_ctx = self.engine.n_ctx
        if not n_ctx:
            return
        reserve = min(self.max_tokens or 512, n_ctx // 4)
        while self._context_used + len(text.encode()) // 3 + reserve > n_ctx and self.messages[-1:]:
            if self.overflow == "stop":
                raise SessionError(f"the context is full ({self._context_used} of {n_ctx} tokens used)",
                                   hint="clear the conversation, or use --overflow shift")
            before = self._context_used
            if not self._drop_oldest_exchange():
                break
            stats.dropped_turns += 1
            # The server counts again next turn; until then, assume the drop freed half.
            self._context_used = before // 2

    def _send(self, stats: TurnStats, text: str) -> Generator[TokenEvent, None, None]:
        self._revision += 1
        self._make_room(stats, text)
        messages = [*self.messages, {"role": "user", "content": text}]
        pieces: list[str] = []
        started = time.perf_counter()
        first_token_at: float | None = None
        cut = ""
        try:
            for event in self.engine.chat(messages, self.max_tokens):
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                    stats.ttft_s = stats.prefill_s = first_token_at - started
                stats.completion_tokens += 1
                pieces.append(event.text)
                if event.reasoning_text:
                    stats.reasoning_tokens += 1
                yield event
        except (GeneratorExit, KeyboardInterrupt):
            stats.stop_reason = "interrupted"
            raise
        except NetworkError as exc:
            stats.stop_reason, cut = "dropped", exc.message
            raise
        finally:
            if first_token_at is not None:
                stats.decode_s = time.perf_counter() - first_token_at
            if pieces or stats.stop_reason != "interrupted":
                self.messages = [*messages, assistant_reply("".join(pieces), cut)]
            self._count_usage(stats)

    def _count_usage(self, stats: TurnStats) -> None:
        usage = self.engine.last_usage
        if stats.stop_reason not in ("interrupted", "dropped"):
            stats.stop_reason = {"stop": "eog", "length": "length"}.get(self.engine.last_finish_reason or "",
                                                                         "eog")
        if usage is None:
            stats.usage_reported = False
            return
        cached = usage.cached_tokens or 0
        stats.prompt_tokens = usage.prompt_tokens
        stats.completion_tokens = usage.completion_tokens
        stats.reused_tokens = cached
        stats.evaluated_tokens = usage.prompt_tokens - cached
        self._context_used = usage.prompt_tokens + usage.completion_tokens

    # -- undo and retry ---------------------------------------------------------------

    def undo(self) -> Message:
        """Drop the last user message and its reply; returns the user message."""
        users = [i for i, m in enumerate(self.messages) if m["role"] == "user"]
        if not users:
            raise SessionError("there is no exchange to undo", hint="send a message first")
        self._revision += 1
        user = self.messages[users[-1]]
        del self.messages[users[-1] :]
        return user

    def retry(self) -> Turn:
        """The server renders: sending the last message again is a retry."""
        return self.send(self.undo()["content"])

    # -- persistence: the transcript only (the server's prefix cache holds the rest) ------

    def to_record(self) -> dict[str, Any]:
        return {"messages": self.messages, "dropped": self.dropped, "kv_text": "", "turns": [], "n_kv": 0}

    def saved_state(self) -> SavedState:
        return SavedState([], 0, None, b"")

    def restore(self, record: dict[str, Any], tokens: list[int], state: bytes | StateLoader | None,
                checkpoints: bytes = b"") -> int:
        return self.restore_from_messages(record)

    def restore_from_messages(self, record: dict[str, Any]) -> int:
        self._revision += 1
        self.messages = list(record["messages"])
        self.dropped = list(record.get("dropped", []))
        return 0
