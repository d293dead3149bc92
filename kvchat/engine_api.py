"""The engine interface: what a conversation needs from whatever runs the model.

`Session` (and bench, the monitor and the REPL) depend on this small protocol, not
on llama.cpp. `kvchat.engine.Engine` implements it in-process; a remote engine
(llama-server) or a test double can implement it too. The value types that cross
the seam live here, so importing them never loads llama.cpp, and so does
`TokenEmitter`, the one way any engine turns sampled tokens into TokenEvents.
`VerifyingEngine` is the optional capability speculative decoding needs: an engine
that has it can be wrapped by kvchat.speculative_engine.SpeculativeEngine.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from kvchat.settings import default_field


@dataclass(frozen=True)
class SamplingSettings:
    """The settings in kvchat.settings' "sampling" group, defaulting to its table."""

    temperature: float = default_field("temperature")
    top_k: int = default_field("top_k")
    top_p: float = default_field("top_p")
    min_p: float = default_field("min_p")
    repeat_penalty: float = default_field("repeat_penalty")
    presence_penalty: float = default_field("presence_penalty")
    frequency_penalty: float = default_field("frequency_penalty")

    @property
    def penalised(self) -> bool:
        """Whether any penalty applies (they need the tokens chosen so far)."""
        return self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
    seed: int | None = default_field("seed")


@dataclass(frozen=True)
class TokenEvent:
    """One generated token: its id and the text it completes (may be '').

    For a thinking model the session moves the reasoning part of the text to
    `reasoning_text`; `text` is then the answer part only.
    With speculative decoding, the first token out of a verify step carries how many
    draft tokens that step verified (`drafted`) and kept (`accepted`); the others 0.
    """

    token: int
    text: str
    is_eog: bool
    reasoning_text: str = ""
    drafted: int = 0
    accepted: int = 0


# What a context's memory is (Engine.memory_kind): a plain KV cache removes cells to
# roll back; a sliding-window cache (swa), recurrent and hybrid memory need checkpoints.
MEMORY_KINDS = ("kv", "swa", "recurrent", "hybrid")


@dataclass(frozen=True)
class Checkpoint:
    """A snapshot of the sequence after `n_tokens` tokens (llama_state_seq_get_data_ext).

    `partial`: only the part of the memory that cannot roll back (SWA window or
    recurrent state); restoring it also needs the older attention cells in place.
    """

    n_tokens: int
    data: bytes
    partial: bool

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class PerfCounters:
    """The engine's own timings (llama.cpp: llama_perf_context)."""

    prompt_eval_ms: float
    prompt_tokens: int
    eval_ms: float
    eval_tokens: int


class ChatEngine(Protocol):
    """One loaded model with one context and one sequence: what a token-exact
    conversation (`kvchat.session.Session`) needs, and nothing else. What only some
    engines can do is an optional capability below, asked for with `isinstance`."""

    # -- facts about the context ------------------------------------------------
    @property
    def n_ctx(self) -> int: ...
    @property
    def n_past(self) -> int:
        """Cells of the sequence in the cache (the next position to evaluate)."""
        ...
    @property
    def bos_token(self) -> int: ...
    @property
    def add_bos(self) -> bool: ...
    @property
    def memory_kind(self) -> str:
        """One of MEMORY_KINDS."""
        ...
    @property
    def needs_checkpoints(self) -> bool:
        """Removing the tail of the sequence can lose what the history needs."""
        ...

    # -- tokens ------------------------------------------------------------------
    def is_eog(self, token: int) -> bool:
        """The token ends a reply (end of generation)."""
        ...
    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]: ...
    def token_text(self, token: int) -> str: ...
    def token_piece(self, token: int, *, special: bool = False) -> bytes: ...

    # -- evaluation and sampling -------------------------------------------------
    def eval(self, tokens: Sequence[int], progress: Callable[[int, int], None] | None = None) -> None:
        """Append tokens to the sequence in the cache; `progress(done, total)` after each
        chunk, between which a KeyboardInterrupt may stop it."""
        ...
    def set_sampling(self, sampling: SamplingSettings) -> None: ...
    def generate(
        self, max_tokens: int | None, *, stop_at_eog: bool = True, context: Sequence[int] = ()
    ) -> Iterator[TokenEvent]:
        """Sample after the last eval until end of turn; the last token yielded is not
        evaluated into the cache (the caller evaluates it with the next turn).
        `context` is the token history in the cache, from which a speculative engine
        drafts; the tokens yielded do not depend on it."""
        ...

    # -- the cache -----------------------------------------------------------------
    def kv_remove(self, start: int, end: int) -> bool:
        """Remove positions [start, end) (end -1: to the end); False if refused."""
        ...
    def kv_clear(self) -> None: ...
    def covers(self, n_tokens: int) -> bool:
        """The cache holds exactly what the token after `n_tokens` history tokens needs."""
        ...
    def state_bytes(self) -> bytes:
        """The sequence's state, for a saved session (what load_state_bytes takes)."""
        ...
    def load_state_bytes(self, data: bytes, n_tokens: int) -> None: ...


@runtime_checkable
class ShiftingEngine(Protocol):
    """Capability: move cells to other positions (llama.cpp's seq_add). `can_shift()`
    says whether this context's memory allows it (Gemma 3's does not)."""

    def can_shift(self) -> bool: ...
    def kv_shift(self, start: int, end: int, delta: int) -> None: ...


@runtime_checkable
class CheckpointingEngine(Protocol):
    """Capability: snapshot the sequence and go back to a snapshot
    (llama_state_seq_get_data_ext), for memory that cannot roll back by removal."""

    def checkpoint(self, n_tokens: int) -> Checkpoint: ...
    def restore_checkpoint(self, checkpoint: Checkpoint) -> bool: ...


class VerifyingEngine(ChatEngine, Protocol):
    """A ChatEngine that can check many candidate tokens in one forward pass: what
    speculative decoding (kvchat.speculative_engine) needs from the engine it wraps,
    and what a draft model (kvchat.speculative.ModelDrafter) runs on."""

    @property
    def n_vocab(self) -> int: ...
    @property
    def eos_token(self) -> int: ...

    def close(self) -> None: ...
    def eval_batch(self, tokens: Sequence[int]) -> None:
        """Append `tokens` (at most one batch) in one decode, keeping the logits of every
        position: `sample(i)` then samples what follows tokens[: i + 1]."""
        ...
    def sample(self, index: int = -1) -> int:
        """Sample at batch index `index` of the last decode (-1: its last output) and
        accept the token into the sampler's state: call it once per token kept."""
        ...
    def start_reply(self, context: Sequence[int]) -> None:
        """Before a reply's first `sample`: the sampler's state (a grammar, the
        penalties' look-back) set for a reply that follows `context`."""
        ...
    def truncate(self, n_tokens: int) -> None:
        """Keep the first `n_tokens` positions of the sequence, drop the rest; raises
        KvchatError where the cache cannot then go on from `n_tokens`."""
        ...


class TokenEmitter:
    """Turns the tokens of one reply, as they are sampled, into TokenEvents: their text
    through one incremental UTF-8 decoder (a character split over several tokens comes
    out whole, with the token that completes it), and whether the reply ends there.

    A reply ends at an end-of-generation token (with `stop_at_eog`), at `max_tokens`,
    or where the context is full: the last token is never evaluated, so `room` tokens
    (n_ctx - n_past when the reply starts) can be yielded.
    """

    def __init__(self, engine: ChatEngine, max_tokens: int | None, room: int, *, stop_at_eog: bool) -> None:
        self.produced = 0
        self.done = False  # the last event ended the reply
        self._is_eog = engine.is_eog
        self._piece = engine.token_piece
        self._decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        self._limit = room if max_tokens is None else min(max_tokens, room)
        self._stop_at_eog = stop_at_eog

    def event(self, token: int, drafted: int = 0, accepted: int = 0) -> TokenEvent:
        self.produced += 1
        eog = self._is_eog(token)
        text = "" if eog else self._decode(self._piece(token))
        self.done = (eog and self._stop_at_eog) or self.produced >= self._limit
        if self.done:
            text += self._decode(b"", final=True)
        return TokenEvent(token, text, eog, drafted=drafted, accepted=accepted)


@dataclass(frozen=True)
class ChatUsage:
    """What a server says one chat completion cost (OpenAI `usage`)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None  # prompt tokens from its prefix cache; None: not reported


class MessageEngine(Protocol):
    """A server that renders and tokenizes messages itself (OpenAI chat completions:
    vLLM, ollama, LM Studio, llama-cpp-python's server). A message conversation
    (`kvchat.message_session.MessageSession`) keeps the messages and the server's own
    token counts; there is no token history here."""

    @property
    def n_ctx(self) -> int:
        """The server's context (max_model_len), 0 where it does not say."""
        ...
    @property
    def load_s(self) -> float: ...
    @property
    def last_usage(self) -> ChatUsage | None: ...
    @property
    def last_finish_reason(self) -> str | None: ...

    def set_sampling(self, sampling: SamplingSettings) -> None: ...
    def chat(self, messages: Sequence[dict[str, str]], max_tokens: int | None) -> Iterator[TokenEvent]:
        """Stream the reply to `messages` (TokenEvent.token is -1: ids are not sent)."""
        ...
    def close(self) -> None: ...
