"""What a conversation is to the REPL, `run` and the server, whatever runs the model.

Two kinds implement `Conversation`: a token-exact conversation over a `ChatEngine`
(`kvchat.session.Session`: llama.cpp here, or llama-server), and a message
conversation over a server that renders messages itself
(`kvchat.message_session.MessageSession`: vLLM, ollama, any OpenAI-compatible
server). Neither knows of the other; the application layer picks one per backend.

A turn is a `Turn`: iterate it for the reply's token events, read its figures
(`TurnStats`) after, however it ended (the last event, an early close on Ctrl-C,
a dropped connection).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from kvchat.engine_api import SamplingSettings, TokenEvent

if TYPE_CHECKING:
    from kvchat.chat_template import Message
    from kvchat.kv_store import RangeSink, RangeSource

# Loads a saved KV state into an engine (kvchat.kv_store.KvStore.restore, bound to a
# manifest) and returns the positions it restored; the conversation evaluates the rest.
StateLoader = Callable[["RangeSink"], int]


@dataclass
class TurnStats:
    """What one turn cost. Token counts come from the conversation's own history
    (or, on a server that renders messages, from its `usage`)."""

    reused_tokens: int = 0
    evaluated_tokens: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stop_reason: str = "eog"
    dropped_turns: int = 0
    dropped_tokens: int = 0
    # The persistent prefix cache (kvchat.prefix_cache): tokens restored from disk,
    # the time that took, and why the cache was not used (None: used, or not asked).
    prefix_cache_tokens: int = 0
    prefix_cache_restore_s: float = 0.0
    prefix_cache_skipped: str | None = None
    prefix_cache_routine: bool = False  # skipped only for a short prompt: reported, not warned about
    reasoning_tokens: int = 0
    # History tokens evaluated again this turn because the cache had lost them, and why.
    reevaluated_tokens: int = 0
    reevaluated_reason: str = ""
    # Speculative decoding: draft tokens verified, and those kept (see kvchat.speculative).
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    # False on a server that renders messages and sent no `usage`: the prompt counts
    # are unknown (completion_tokens then counts the streamed pieces).
    usage_reported: bool = True

    @property
    def acceptance(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def prefill_tok_s(self) -> float:
        # Restoring from the prefix cache is not prefill: it is timed on its own.
        seconds = self.prefill_s - self.prefix_cache_restore_s
        return self.evaluated_tokens / seconds if seconds > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first token comes out of the prefill; decode speed covers the rest.
        n = self.completion_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


def set_system_prompt(messages: list[Message], text: str) -> bool:
    """Put `text` as the system prompt at the start of `messages`, in place; True when
    it was inserted (the messages after it moved one place on)."""
    if messages and messages[0]["role"] == "system":
        messages[0] = {"role": "system", "content": text}
        return False
    messages.insert(0, {"role": "system", "content": text})
    return True


def assistant_reply(text: str, cut: str = "") -> Message:
    """An assistant message; one the server cut short (`cut`: why) is marked as such, so
    that the transcript never shows it as a whole reply."""
    return {"role": "assistant", "content": text, **({"cut": cut} if cut else {})}


class Turn:
    """One exchange. Iterating it runs the turn and yields the reply's events;
    `stats` holds its figures, complete once iteration has ended or `close()` ran
    (a partial reply stays in the conversation). Nothing runs before iteration."""

    def __init__(self, run: Callable[[TurnStats], Generator[TokenEvent, None, None]]) -> None:
        self.stats = TurnStats()
        self.begun = False  # the turn started running (it may have been stopped in its prefill)
        self._events = self._run(run)

    def _run(self, run: Callable[[TurnStats], Generator[TokenEvent, None, None]]
             ) -> Generator[TokenEvent, None, None]:
        self.begun = True
        yield from run(self.stats)

    def __iter__(self) -> Iterator[TokenEvent]:
        return self

    def __next__(self) -> TokenEvent:
        return next(self._events)

    def close(self) -> None:
        """Stop the reply where it is (the conversation keeps what came); run this
        before the engine is freed, never leave it to the garbage collector."""
        self._events.close()

    def text(self) -> str:
        """Run the turn to its end and return the reply's text (tests, scripts)."""
        try:
            return "".join(event.text for event in self)
        finally:
            self.close()


@dataclass(frozen=True)
class SavedState:
    """What a saved conversation keeps beside its record: the token history, how
    many of its tokens the KV cache holds, where a save reads those cells from (None:
    no KV here, a conversation without a token history) and the checkpoints. Taking
    it reads nothing: the store reads only the cells its last save did not cover."""

    tokens: list[int]
    n_kv: int
    source: RangeSource | None
    checkpoints: bytes


class Conversation(Protocol):
    """A conversation as the REPL, `run` and the server use it."""

    messages: list[Message]
    dropped: list[Message]
    sampling: SamplingSettings
    max_tokens: int | None
    # Called with (tokens done, tokens to do) while a turn's prompt is evaluated.
    on_prefill: Callable[[int, int], None] | None

    @property
    def n_kv(self) -> int:
        """KV cells this conversation uses (on a server that renders messages: its
        token count of the last exchange)."""
        ...
    @property
    def n_tokens(self) -> int:
        """Tokens in the history (0 for a conversation without a token history)."""
        ...
    @property
    def template_origin(self) -> str:
        """Which chat template renders the messages, and where it came from."""
        ...
    @property
    def checkpoint_usage(self) -> tuple[int, int] | None:
        """(count, bytes) of checkpoints kept; None where the conversation keeps none."""
        ...
    @property
    def revision(self) -> int:
        """Changes whenever what a save would write changes (the REPL saves only then)."""
        ...

    def set_system(self, text: str) -> None: ...
    def set_sampling(self, sampling: SamplingSettings) -> None: ...
    def clear(self) -> None: ...
    def send(self, text: str, *, shared_chars: int | None = None) -> Turn: ...
    def undo(self) -> Message: ...
    def retry(self) -> Turn: ...

    # -- persistence (kvchat.named_session) ---------------------------------------
    def to_record(self) -> dict[str, Any]: ...
    def saved_state(self) -> SavedState: ...
    def restore(self, record: dict[str, Any], tokens: list[int], state: bytes | StateLoader | None,
                checkpoints: bytes = b"") -> int:
        """Load a saved conversation: `state` is the whole KV state, or a loader that
        restores as much as it can (the rest is evaluated); None re-evaluates it all.
        Returns tokens evaluated."""
        ...
    def restore_from_messages(self, record: dict[str, Any]) -> int:
        """Rebuild from the transcript alone. Returns tokens evaluated."""
        ...
