"""A conversation: messages, the exact token history in the KV cache, and an engine.

The token history here is the single truth of what the KV cache holds. Each turn
renders the conversation with the chat template, keeps the part already in the
cache, tokenizes only the new text and evaluates only those tokens. Generated
tokens are appended as generated, never re-tokenized from text.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from kvchat.chat_template import ChatTemplate, Message
from kvchat.engine import Engine, SamplingSettings, TokenEvent
from kvchat.errors import UsageError


@dataclass
class TurnStats:
    """What one turn cost. Token counts come from the session's own history."""

    reused_tokens: int = 0
    evaluated_tokens: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stop_reason: str = "eog"

    @property
    def prefill_tok_s(self) -> float:
        return self.evaluated_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first token comes out of the prefill; decode speed covers the rest.
        n = self.completion_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


@dataclass
class Session:
    engine: Engine
    template: ChatTemplate
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    max_tokens: int | None = None
    messages: list[Message] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    # The exact text the tokens in `tokens` stand for (special tokens rendered).
    kv_text: str = ""
    last_turn: TurnStats | None = None

    def __post_init__(self) -> None:
        self.engine.set_sampling(self.sampling)

    def set_system(self, text: str) -> None:
        if self.messages:
            raise UsageError("the system prompt must come before the first message")
        self.messages.append({"role": "system", "content": text})

    def _new_tokens(self, rendered: str) -> list[int]:
        """Tokens to append so that the cache holds `rendered`."""
        if self.kv_text and rendered.startswith(self.kv_text):
            return self.engine.tokenize(rendered[len(self.kv_text) :], add_special=False)
        # Nothing cached yet, or the template rewrote earlier turns: tokenize the
        # whole text and keep the longest common token prefix that is cached.
        bos_text = self.engine.token_text(self.engine.bos_token)
        add_bos = self.engine.add_bos and not (bos_text and rendered.startswith(bos_text))
        full = self.engine.tokenize(rendered, add_special=add_bos)
        keep = 0
        for have, want in zip(self.tokens, full, strict=False):
            if have != want:
                break
            keep += 1
        if keep < len(self.tokens):
            self.engine.kv_remove(keep, -1)
            del self.tokens[keep:]
        return full[keep:]

    def send(self, text: str) -> Iterator[TokenEvent]:
        """Add a user message and stream the reply's tokens.

        The turn's figures are in `last_turn` once the iterator ends, whether it
        ran to the end of the turn or was closed early (Ctrl-C): a partial reply
        is kept in both the transcript and the token history.
        """
        stats = TurnStats()
        self.last_turn = stats
        messages = [*self.messages, {"role": "user", "content": text}]
        rendered = self.template.render(messages, add_generation_prompt=True)
        new_tokens = self._new_tokens(rendered)
        pending = self.tokens[self.engine.n_past :]
        to_eval = pending + new_tokens
        stats.prompt_tokens = len(self.tokens) + len(new_tokens)
        if stats.prompt_tokens >= self.engine.n_ctx:
            raise UsageError(
                f"the conversation needs {stats.prompt_tokens} tokens, the context holds "
                f"{self.engine.n_ctx}",
                hint="raise --ctx or start a new conversation",
            )
        stats.reused_tokens = self.engine.n_past
        started = time.perf_counter()
        self.engine.eval(to_eval)
        stats.evaluated_tokens = len(to_eval)
        self.tokens.extend(new_tokens)
        self.kv_text = rendered
        kv_decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.messages = messages
        reply_pieces: list[str] = []
        first_token_at: float | None = None
        try:
            for event in self.engine.generate(self.max_tokens):
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                    stats.ttft_s = first_token_at - started
                    stats.prefill_s = stats.ttft_s
                self.tokens.append(event.token)
                self.kv_text += kv_decoder.decode(self.engine.token_piece(event.token, special=True))
                stats.completion_tokens += 1
                reply_pieces.append(event.text)
                if event.is_eog:
                    stats.stop_reason = "eog"
                elif len(self.tokens) >= self.engine.n_ctx:
                    stats.stop_reason = "ctx"
                else:
                    stats.stop_reason = "length"
                yield event
        except GeneratorExit:
            stats.stop_reason = "interrupted"
            raise
        except KeyboardInterrupt:
            stats.stop_reason = "interrupted"
            raise
        finally:
            if first_token_at is not None:
                stats.decode_s = time.perf_counter() - first_token_at
            self.messages.append({"role": "assistant", "content": "".join(reply_pieces)})
