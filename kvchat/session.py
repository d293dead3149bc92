"""A conversation: messages, the exact token history in the KV cache, and an engine.

The token history here is the single truth of what the KV cache holds. Each turn
renders the conversation with the chat template, keeps the part already in the
cache, tokenizes only the new text and evaluates only those tokens. Generated
tokens are appended as generated, never re-tokenized from text.

When the context fills up, the `shift` policy drops the oldest whole turns after
the system prompt: their cells are removed from the KV cache and the later cells
are shifted back (llama.cpp's seq_rm + seq_add), or re-evaluated where the model
cannot shift. The `stop` policy refuses the turn instead.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass, field
from typing import Any

from kvchat.chat_template import ChatTemplate, Message, preamble_length
from kvchat.engine_api import ChatEngine, SamplingSettings, TokenEvent
from kvchat.errors import SessionError, UsageError
from kvchat.prefix_cache import PrefixCache

OVERFLOW_POLICIES = ("shift", "stop")


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
    dropped_turns: int = 0
    dropped_tokens: int = 0
    # The persistent prefix cache (kvchat.prefix_cache): tokens restored from disk,
    # the time that took, and why the cache was not used (None: used, or not asked).
    prefix_cache_tokens: int = 0
    prefix_cache_restore_s: float = 0.0
    prefix_cache_skipped: str | None = None
    # Speculative decoding: draft tokens verified, and those kept (see kvchat.speculative).
    drafted_tokens: int = 0
    accepted_tokens: int = 0

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


@dataclass
class TurnMark:
    """Where a user turn starts: message index, token index, character index."""

    message: int
    token: int
    char: int


@dataclass
class Session:
    engine: ChatEngine
    template: ChatTemplate
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    max_tokens: int | None = None
    overflow: str = "shift"
    # Messages in the context, and the ones dropped from it (kept for the transcript).
    messages: list[Message] = field(default_factory=list)
    dropped: list[Message] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    # The exact text the tokens in `tokens` stand for (special tokens rendered).
    kv_text: str = ""
    turns: list[TurnMark] = field(default_factory=list)
    last_turn: TurnStats | None = None
    # Called with (tokens done, tokens to do) while a turn's prompt is evaluated.
    on_prefill: Callable[[int, int], None] | None = None
    # Used when a turn starts on an empty KV cache (a one-shot run, a new chat).
    prefix_cache: PrefixCache | None = None

    def __post_init__(self) -> None:
        if self.overflow not in OVERFLOW_POLICIES:
            raise UsageError(f"unknown --overflow '{self.overflow}'", hint="use shift or stop")
        self.engine.set_sampling(self.sampling)
        self._preamble = preamble_length(self.template)

    # -- conversation edits ------------------------------------------------

    def set_system(self, text: str) -> None:
        """Set the system prompt; once turns exist, the cache is rebuilt lazily."""
        if self.messages and self.messages[0]["role"] == "system":
            self.messages[0] = {"role": "system", "content": text}
        else:
            self.messages.insert(0, {"role": "system", "content": text})
            for mark in self.turns:
                mark.message += 1

    def clear(self) -> None:
        """Forget the conversation (the system prompt stays) and empty the KV cache."""
        self.engine.kv_clear()
        self.messages = [m for m in self.messages[:1] if m["role"] == "system"]
        self.dropped = []
        self.tokens = []
        self.kv_text = ""
        self.turns = []

    def set_sampling(self, sampling: SamplingSettings) -> None:
        self.sampling = sampling
        self.engine.set_sampling(sampling)

    @property
    def n_kv(self) -> int:
        """Cells of the KV cache in use by this conversation."""
        return self.engine.n_past

    # -- tokens for a turn -----------------------------------------------

    def _turn_offset(self, messages: list[Message], i: int, text: str) -> int | None:
        """Character offset in `text` where user message `i` starts, if known."""
        if i == 0:
            return min(self._preamble, len(text))
        prefix = self.template.render(messages[:i], add_generation_prompt=False)
        return len(prefix) if text.startswith(prefix) else None

    def _turn_marks(self, messages: list[Message], text: str) -> list[tuple[int, int]]:
        """(message index, character offset) of every user turn found in `text`."""
        marks = []
        for i, message in enumerate(messages):
            if message["role"] == "user":
                offset = self._turn_offset(messages, i, text)
                if offset is not None:
                    marks.append((i, offset))
        return marks

    def _tokenize_at(self, text: str, cuts: list[int], *, at_start: bool) -> tuple[list[int], list[int]]:
        """Tokenize `text` in pieces split at `cuts`; return tokens and where each cut landed.

        Text `at_start` of the history gets the model's BOS token unless the
        template already wrote it.
        """
        tokens: list[int] = []
        landed: list[int] = []
        start = 0
        for cut in [*cuts, len(text)]:
            piece = text[start:cut]
            if piece:
                add_bos = False
                if at_start and not tokens:
                    bos_text = self.engine.token_text(self.engine.bos_token)
                    add_bos = self.engine.add_bos and not (bos_text and piece.startswith(bos_text))
                tokens.extend(self.engine.tokenize(piece, add_special=add_bos))
            landed.append(len(tokens))
            start = max(start, cut)
        return tokens, landed[:-1]

    def _resync(self, text: str, messages: list[Message]) -> None:
        """Make the history stand for `text` when the cached text is not its prefix
        (a template that rewrites earlier turns): tokenize it at turn boundaries and
        keep the longest common token prefix that is cached; the rest becomes
        pending and is evaluated with the next turn."""
        marks = self._turn_marks(messages, text)
        full, landed = self._tokenize_at(text, [c for _, c in marks], at_start=True)
        keep = 0
        for have, want in zip(self.tokens, full, strict=False):
            if have != want:
                break
            keep += 1
        if keep < self.engine.n_past:
            self.engine.kv_remove(keep, -1)
        self.tokens = full
        self.kv_text = text
        self.turns = [TurnMark(i, at, c) for (i, c), at in zip(marks, landed, strict=True)]

    def _plan_tokens(self, messages: list[Message], rendered: str) -> tuple[list[int], list[TurnMark]]:
        """Tokens to append so that the cache holds `rendered`, and the new turn's mark.

        Only the text after what is cached is tokenized; generated tokens stay as
        they were generated.
        """
        if not rendered.startswith(self.kv_text):
            history = self.template.render(messages[:-1], add_generation_prompt=False)
            if rendered.startswith(history):
                self._resync(history, messages[:-1])
            else:  # not even prefix-stable: the new turn is part of the resync
                self._resync(rendered, messages)
                return [], []
        base = len(self.kv_text)
        user_char = self._turn_offset(messages, len(messages) - 1, rendered)
        cut = min(max((base if user_char is None else user_char) - base, 0), len(rendered) - base)
        tokens, landed = self._tokenize_at(rendered[base:], [cut], at_start=not self.tokens)
        return tokens, [TurnMark(len(messages) - 1, len(self.tokens) + landed[0], base + cut)]

    # -- overflow -----------------------------------------------------------

    def _reserve(self) -> int:
        n_ctx = self.engine.n_ctx
        return min(self.max_tokens or 512, n_ctx // 4)

    def _drop_oldest_turn(self, pending_messages: int) -> int:
        """Drop the oldest user turn (and its replies); return the tokens freed."""
        first = self.turns[0]
        nxt = self.turns[1] if len(self.turns) > 1 else None
        tok_end = nxt.token if nxt else len(self.tokens)
        char_end = nxt.char if nxt else len(self.kv_text)
        msg_end = nxt.message if nxt else pending_messages
        n_tok = tok_end - first.token
        n_char = char_end - first.char
        n_msg = msg_end - first.message
        n_kv = self.engine.n_past
        kv_end = min(tok_end, n_kv)
        if first.token < kv_end:
            self.engine.kv_remove(first.token, kv_end)
            if kv_end < n_kv and self.engine.can_shift():
                self.engine.kv_shift(kv_end, -1, -(kv_end - first.token))
            elif kv_end < n_kv:
                # No position shift for this model: drop the rest too; those
                # tokens are re-evaluated with the next turn.
                self.engine.kv_remove(first.token, -1)
        del self.tokens[first.token : tok_end]
        self.kv_text = self.kv_text[: first.char] + self.kv_text[char_end:]
        self.dropped.extend(self.messages[first.message : msg_end])
        del self.messages[first.message : msg_end]
        self.turns.pop(0)
        for mark in self.turns:
            mark.token -= n_tok
            mark.char -= n_char
            mark.message -= n_msg
        return n_tok

    # -- a turn -------------------------------------------------------------

    def send(self, text: str, *, shared_chars: int | None = None) -> Generator[TokenEvent, None, None]:
        """Add a user message and stream the reply's tokens.

        The turn's figures are in `last_turn` once the iterator ends, whether it
        ran to the end of the turn or was closed early (Ctrl-C): a partial reply
        is kept in both the transcript and the token history.
        """
        stats = TurnStats()
        self.last_turn = stats
        user: Message = {"role": "user", "content": text}
        n_ctx = self.engine.n_ctx
        while True:
            messages = [*self.messages, user]
            rendered = self.template.render(messages, add_generation_prompt=True)
            new_tokens, marks = self._plan_tokens(messages, rendered)
            needed = len(self.tokens) + len(new_tokens)
            droppable = bool(self.turns) and self.turns[0].message < len(self.messages)
            if needed + self._reserve() <= n_ctx or (not droppable and needed < n_ctx):
                break
            if not droppable:
                raise UsageError(
                    f"the message needs {needed} tokens with the conversation's start; "
                    f"the context holds {n_ctx}",
                    hint="raise --ctx or send a shorter message",
                )
            if self.overflow == "stop":
                raise SessionError(
                    f"the context is full ({len(self.tokens)} of {n_ctx} tokens used, "
                    f"this turn needs {needed - len(self.tokens)} more)",
                    hint="clear the conversation, raise --ctx, or use --overflow shift",
                )
            stats.dropped_tokens += self._drop_oldest_turn(len(self.messages))
            stats.dropped_turns += 1

        pending = self.tokens[self.engine.n_past :]
        to_eval = pending + new_tokens
        stats.prompt_tokens = needed
        stats.reused_tokens = self.engine.n_past
        started = time.perf_counter()
        n_past_before = self.engine.n_past
        try:
            if self.prefix_cache is not None and n_past_before == 0:
                cuts = self._prefix_cuts(to_eval, marks, rendered, text, shared_chars)
                got = self.prefix_cache.prefill(self.engine, to_eval, cuts, self.on_prefill)
                stats.prefix_cache_tokens = got.restored_tokens
                stats.prefix_cache_restore_s = got.restore_s
                stats.prefix_cache_skipped = got.skipped
            else:
                self.engine.eval(to_eval, self.on_prefill)
        except BaseException:
            # Interrupted or failed mid-prefill: take the half-evaluated cells out
            # again, so that the history stays the truth of the cache.
            self.engine.kv_remove(n_past_before, -1)
            stats.stop_reason = "interrupted"
            raise
        stats.evaluated_tokens = len(to_eval) - stats.prefix_cache_tokens
        self.tokens.extend(new_tokens)
        self.turns.extend(marks)
        self.kv_text = rendered
        self.messages = messages
        yield from self._generate(stats, started)
        if self.prefix_cache is not None:
            try:
                self.prefix_cache.commit()
            except OSError as exc:  # a full disk costs the cache entry, never the answer
                stats.prefix_cache_skipped = f"could not store the prefix: {exc.strerror or exc}"

    def _prefix_cuts(self, tokens: list[int], marks: list[TurnMark], rendered: str, text: str,
                     shared_chars: int | None) -> list[int]:
        """Token positions where the prefix cache cuts this prompt: the end of what comes
        before the user turn (the system prompt), and the end of the shared start of the
        message (`shared_chars`), one token early in case the tokenizer merges across it."""
        if not marks:
            return []
        mark = marks[-1]
        cuts = [mark.token]
        content_at = rendered.find(text, mark.char)
        if shared_chars and content_at >= 0:
            want = len(rendered[mark.char : content_at + shared_chars].encode("utf-8"))
            have = 0
            for i in range(mark.token, len(tokens)):
                have += len(self.engine.token_piece(tokens[i], special=True))
                if have > want:
                    cuts.append(i - 1)
                    break
        return cuts

    def _generate(self, stats: TurnStats, started: float) -> Generator[TokenEvent, None, None]:
        kv_decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        reply_pieces: list[str] = []
        first_token_at: float | None = None
        try:
            for event in self.engine.generate(self.max_tokens, context=self.tokens):
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                    stats.ttft_s = stats.prefill_s = first_token_at - started
                self.tokens.append(event.token)
                self.kv_text += kv_decoder.decode(self.engine.token_piece(event.token, special=True))
                stats.completion_tokens += 1
                stats.drafted_tokens += event.drafted
                stats.accepted_tokens += event.accepted
                reply_pieces.append(event.text)
                if event.is_eog:
                    stats.stop_reason = "eog"
                elif len(self.tokens) >= self.engine.n_ctx:
                    stats.stop_reason = "ctx"
                else:
                    stats.stop_reason = "length"
                yield event
        except (GeneratorExit, KeyboardInterrupt):
            stats.stop_reason = "interrupted"
            raise
        finally:
            if first_token_at is not None:
                stats.decode_s = time.perf_counter() - first_token_at
            self.messages.append({"role": "assistant", "content": "".join(reply_pieces)})

    # -- persistence -----------------------------------------------------------

    def to_record(self) -> dict[str, Any]:
        """Everything but the KV bytes, as plain data (see session_store)."""
        return {
            "messages": self.messages,
            "dropped": self.dropped,
            "kv_text": self.kv_text,
            "turns": [asdict(m) for m in self.turns],
            "n_kv": self.engine.n_past,
        }

    def restore(self, record: dict[str, Any], tokens: list[int], state: bytes | None) -> int:
        """Load a saved conversation. With `state`, the KV cache is restored as saved;
        without it (rebuild), the history is re-evaluated. Returns tokens evaluated."""
        self.messages = list(record["messages"])
        self.dropped = list(record.get("dropped", []))
        self.turns = [TurnMark(**m) for m in record.get("turns", [])]
        n_kv = int(record["n_kv"])
        if state is not None:
            self.tokens = list(tokens)
            self.kv_text = record["kv_text"]
            self.engine.load_state_bytes(state, n_kv)
            return 0
        # Rebuild: evaluate the transcript's tokens (exactly as they were in the
        # cache, generated tokens included) from scratch.
        self.engine.kv_clear()
        self.tokens = list(tokens)
        self.kv_text = record["kv_text"]
        self.engine.eval(self.tokens[:n_kv])
        return n_kv

    def restore_from_messages(self, record: dict[str, Any]) -> int:
        """Rebuild from the transcript alone (another model: tokens do not carry over).
        Returns tokens evaluated."""
        self.engine.kv_clear()
        self.messages = list(record["messages"])
        self.dropped = list(record.get("dropped", []))
        self.tokens, self.kv_text, self.turns = [], "", []
        if self.messages:
            self._resync(self.template.render(self.messages, add_generation_prompt=False), self.messages)
        self.engine.eval(self.tokens)
        return len(self.tokens)
