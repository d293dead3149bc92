"""A conversation: messages, the exact token history in the KV cache, and an engine.

The token history here is the single truth of what the KV cache holds. Each turn
renders the conversation with the chat template, keeps the part already in the
cache, tokenizes only the new text and evaluates only those tokens. Generated
tokens are appended as generated, never re-tokenized from text.

When the context fills up, the `shift` policy drops the oldest whole turns after
the system prompt: their cells are removed from the KV cache and the later cells
are shifted back (llama.cpp's seq_rm + seq_add). Where the memory cannot shift,
it drops old turns down to half the context at once, so that the re-evaluation
this forces happens rarely. The `stop` policy refuses the turn instead.

After every removal the cache is checked against the history (`Engine.covers`):
recurrent and hybrid memory refuse partial removals, and a sliding-window cache
has already dropped cells older than its window. Then the latest checkpoint (a
snapshot taken at turn boundaries) is restored, or the history re-evaluated, and
the turn reports it (`TurnStats.reevaluated_tokens`).
"""

from __future__ import annotations

import codecs
import hashlib
import struct
import time
from array import array
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, cast

from kvchat.chat_template import TURN_SENTINELS, ChatTemplate, Message, preamble_length
from kvchat.engine_api import ChatEngine, Checkpoint, MessageEngine, SamplingSettings, TokenEvent
from kvchat.errors import ModelFormatError, NetworkError, SessionError, UsageError
from kvchat.prefix_cache import PrefixCache
from kvchat.reasoning import ReasoningSplitter, opens_in_prompt, template_has_reasoning
from kvchat.settings import OVERFLOW_POLICIES, default_field


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


@dataclass
class TurnMark:
    """Where a user turn starts: message index, token index, character index; and
    where its reply starts (token and character index; -1 until the prompt is in)."""

    message: int
    token: int
    char: int
    reply_token: int = -1
    reply_char: int = -1


def _digest(tokens: list[int]) -> bytes:
    return hashlib.blake2b(array("i", tokens).tobytes(), digest_size=16).digest()


@dataclass
class SavedCheckpoint:
    """A checkpoint and the digest of the token prefix it stands for."""

    checkpoint: Checkpoint
    digest: bytes

    @property
    def n_tokens(self) -> int:
        return self.checkpoint.n_tokens


_CHECKPOINT_HEAD = struct.Struct("<IB16sQ")  # n_tokens, partial, digest, data length
PERSISTED_CHECKPOINTS = 2  # a named session keeps what rewinding its last exchange needs


def encode_checkpoints(checkpoints: list[SavedCheckpoint]) -> bytes:
    """Checkpoints as bytes for a session file (kvchat.session_store)."""
    parts = [struct.pack("<I", len(checkpoints))]
    for saved in checkpoints:
        cp = saved.checkpoint
        parts.append(_CHECKPOINT_HEAD.pack(cp.n_tokens, cp.partial, saved.digest, cp.size))
        parts.append(cp.data)
    return b"".join(parts)


def decode_checkpoints(blob: bytes) -> list[SavedCheckpoint]:
    """The inverse of encode_checkpoints; [] for an empty or malformed blob (they
    are an optimisation: without them an undo re-evaluates, and says so)."""
    if len(blob) < 4:
        return []
    (count,) = struct.unpack_from("<I", blob)
    at, out = 4, []
    for _ in range(count):
        if at + _CHECKPOINT_HEAD.size > len(blob):
            return []
        n_tokens, partial, digest, size = _CHECKPOINT_HEAD.unpack_from(blob, at)
        at += _CHECKPOINT_HEAD.size
        if at + size > len(blob):
            return []
        out.append(SavedCheckpoint(Checkpoint(n_tokens, blob[at : at + size], bool(partial)), digest))
        at += size
    return out


@dataclass
class Session:
    engine: ChatEngine
    template: ChatTemplate
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    max_tokens: int | None = default_field("max_tokens")
    overflow: str = default_field("overflow")
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
    # Checkpoints at turn boundaries (only on memory that cannot roll back), bounded.
    checkpoint_max: int = default_field("checkpoints")
    checkpoint_mib: float = default_field("checkpoint_mib")
    checkpoints: list[SavedCheckpoint] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.overflow not in OVERFLOW_POLICIES:
            raise UsageError(f"unknown --overflow '{self.overflow}'", hint="use shift or stop")
        self.engine.set_sampling(self.sampling)
        # A server that renders and tokenizes messages itself (MessageEngine): the
        # session keeps messages and the server's counts, no token history.
        self.chat_api: MessageEngine | None = (cast(MessageEngine, self.engine)
                                               if getattr(self.engine, "renders_messages", False) else None)
        self._context_used = 0  # the server's prompt + completion tokens of the last turn
        self._preamble = preamble_length(self.template)
        # History tokens that have been in the cache (the rest were never evaluated),
        # and why the cache last lost some of them.
        self._evaluated_upto = 0
        self._reeval_reason = ""

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
        if self.chat_api is None:
            self.engine.kv_clear()
        self._context_used = 0
        self.messages = [m for m in self.messages[:1] if m["role"] == "system"]
        self.dropped = []
        self.tokens = []
        self.kv_text = ""
        self.turns = []
        self.checkpoints = []
        self._evaluated_upto = 0

    def set_sampling(self, sampling: SamplingSettings) -> None:
        self.sampling = sampling
        self.engine.set_sampling(sampling)

    @property
    def n_kv(self) -> int:
        """Cells of the KV cache in use by this conversation (on a server that renders
        messages itself: its token count of the last exchange)."""
        return self._context_used if self.chat_api is not None else self.engine.n_past

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
                if add_bos and tokens[:1] == [self.engine.bos_token]:
                    # The BOS token the model adds is the preamble's, not the first
                    # turn's: a cut at the very start lands after it, so dropping that
                    # turn keeps it.
                    landed = [max(at, 1) for at in landed]
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
        replies = {m.message: m for m in self.turns}
        self.tokens = full
        self.kv_text = text
        self.turns = []
        for (i, c), at in zip(marks, landed, strict=True):
            old = replies.get(i)
            # A reply start stays valid only where the text before it is unchanged.
            reply = (old.reply_token, old.reply_char) if old and 0 <= old.reply_token <= keep else (-1, -1)
            self.turns.append(TurnMark(i, at, c, *reply))
        reason = "the chat template rewrote earlier turns"
        if keep < self.engine.n_past:
            self._rollback(keep, reason)
        # The rest of `full` stands for text already seen: evaluating it is re-evaluation.
        if self._evaluated_upto and len(full) > keep:
            self._note_reeval(reason)
        self._evaluated_upto = max(keep, len(full) if self._evaluated_upto else 0)

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
                self._evaluated_upto = min(self._evaluated_upto, self.engine.n_past)
                return [], []
        base = len(self.kv_text)
        user_char = self._turn_offset(messages, len(messages) - 1, rendered)
        cut = min(max((base if user_char is None else user_char) - base, 0), len(rendered) - base)
        tokens, landed = self._tokenize_at(rendered[base:], [cut], at_start=not self.tokens)
        return tokens, [TurnMark(len(messages) - 1, len(self.tokens) + landed[0], base + cut)]

    # -- checkpoints and rollback ---------------------------------------------

    def _checkpoint(self, history: list[int], n_tokens: int) -> None:
        """Snapshot the cache now (it holds history[:n_tokens]) where the memory
        cannot roll back; oldest checkpoints go first past the count or size bound."""
        if not self.engine.needs_checkpoints or self.checkpoint_max <= 0 or n_tokens <= 0:
            return
        digest = _digest(history[:n_tokens])
        if any(c.n_tokens == n_tokens and c.digest == digest for c in self.checkpoints):
            return
        saved = SavedCheckpoint(self.engine.checkpoint(n_tokens), digest)
        self.checkpoints = [c for c in self.checkpoints if c.n_tokens != n_tokens]
        self.checkpoints.append(saved)
        self.checkpoints.sort(key=lambda c: c.n_tokens)
        budget = self.checkpoint_mib * 1024 * 1024
        while self.checkpoints and (len(self.checkpoints) > self.checkpoint_max
                                    or self.checkpoint_bytes > budget):
            self.checkpoints.pop(0)

    @property
    def checkpoint_bytes(self) -> int:
        return sum(c.checkpoint.size for c in self.checkpoints)

    def _note_reeval(self, reason: str) -> None:
        """Say why the next turn re-evaluates tokens; reasons gather until it has."""
        if reason not in self._reeval_reason.split("; "):
            self._reeval_reason = f"{self._reeval_reason}; {reason}" if self._reeval_reason else reason

    def _rollback(self, n_tokens: int, reason: str) -> None:
        """Make the cache hold tokens[:k] for the largest k <= n_tokens it can, never
        more: remove the tail, check what is left, else restore the latest checkpoint
        at or before n_tokens, else empty the cache. tokens[k:] become pending and are
        evaluated with the next turn (counted as re-evaluated)."""
        engine = self.engine
        n_tokens = min(n_tokens, engine.n_past)
        kept = n_tokens
        if not (engine.kv_remove(n_tokens, -1) and engine.covers(n_tokens)):
            kept = 0
            for saved in reversed(self.checkpoints):
                if saved.n_tokens > n_tokens or saved.digest != _digest(self.tokens[: saved.n_tokens]):
                    continue
                if engine.restore_checkpoint(saved.checkpoint):
                    kept = saved.n_tokens
                    break
            if kept == 0:
                engine.kv_clear()
        if kept < n_tokens:
            self._note_reeval(reason)
        # Checkpoints past what the cache holds lost the attention cells they rely on.
        self.checkpoints = [c for c in self.checkpoints if c.n_tokens <= kept or not c.checkpoint.partial]

    def _prefill(self, to_eval: list[int], history: list[int], at: list[int]) -> None:
        """Evaluate `to_eval` (it continues the cache: history[engine.n_past:]),
        taking a checkpoint whenever the cache holds history[:p] for p in `at`."""
        engine = self.engine
        start = engine.n_past
        done = 0
        wanted = sorted({p for p in at if start <= p <= start + len(to_eval)})
        if not engine.needs_checkpoints:
            wanted = []
        report = self.on_prefill

        def progress(offset: int) -> Callable[[int, int], None] | None:
            if report is None:
                return None
            return lambda n_done, _total: report(offset + n_done, len(to_eval))

        for p in wanted:
            engine.eval(to_eval[done : p - start], progress(done))
            done = p - start
            self._checkpoint(history, p)
        engine.eval(to_eval[done:], progress(done))

    # -- overflow -----------------------------------------------------------

    def _reserve(self) -> int:
        n_ctx = self.engine.n_ctx
        return min(self.max_tokens or 512, n_ctx // 4)

    def _shifts_cheaply(self) -> bool:
        return self.engine.can_shift() and self.engine.memory_kind in ("kv", "swa")

    def _drop_oldest_turn(self, pending_messages: int) -> int:
        """Drop the oldest user turn (and its replies); return the tokens freed.

        Where the memory can shift positions, its cells are removed and the later
        ones shifted back; otherwise (or when the cache then misses cells) the
        cache is rolled back to the start of the dropped turn and the rest of the
        history is re-evaluated with the next turn.
        """
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
        shifted = first.token >= n_kv
        # Where the memory cannot shift, dropping evaluated tokens means evaluating
        # what follows again, even if an earlier rollback this turn took the cells out.
        costs_reeval = tok_end < self._evaluated_upto and not self._shifts_cheaply()
        if not shifted and self._shifts_cheaply() and self.engine.kv_remove(first.token, kv_end):
            if kv_end < n_kv:
                self.engine.kv_shift(kv_end, -1, -(kv_end - first.token))
            shifted = self.engine.covers(n_kv - (kv_end - first.token))
        del self.tokens[first.token : tok_end]
        self.kv_text = self.kv_text[: first.char] + self.kv_text[char_end:]
        self.dropped.extend(self.messages[first.message : msg_end])
        del self.messages[first.message : msg_end]
        self.turns.pop(0)
        for mark in self.turns:
            mark.token -= n_tok
            mark.char -= n_char
            mark.message -= n_msg
            if mark.reply_token >= 0:
                mark.reply_token -= n_tok
                mark.reply_char -= n_char
        if self._evaluated_upto >= tok_end:
            self._evaluated_upto -= n_tok
        else:
            self._evaluated_upto = min(self._evaluated_upto, first.token)
        # Checkpoints after the dropped turn stand for a history that no longer exists.
        self.checkpoints = [c for c in self.checkpoints if c.n_tokens <= first.token]
        if not shifted:
            self._rollback(first.token, "dropped old turns and the memory cannot shift positions")
        if not shifted or costs_reeval:
            self._note_reeval("dropped old turns and the memory cannot shift positions")
        return n_tok

    # -- a turn -------------------------------------------------------------

    def send(self, text: str, *, shared_chars: int | None = None) -> Generator[TokenEvent, None, None]:
        """Add a user message and stream the reply's tokens.

        The turn's figures are in `last_turn` once the iterator ends, whether it
        ran to the end of the turn or was closed early (Ctrl-C): a partial reply
        is kept in both the transcript and the token history.
        """
        if self.chat_api is not None:
            yield from self._send_messages(self.chat_api, text)
            return
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
            # Without cheap shifts, drop down to half the context at once: the
            # re-evaluation that follows then comes back rarely.
            limit = n_ctx if not stats.dropped_turns or self._shifts_cheaply() else n_ctx // 2
            if needed + self._reserve() <= limit or (not droppable and needed < n_ctx):
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

        started = self._evaluate(stats, new_tokens, marks, rendered, text, shared_chars)
        self.messages = messages
        self.kv_text = rendered
        yield from self._generate(stats, started)
        if self.prefix_cache is not None:
            try:
                self.prefix_cache.commit()
            except OSError as exc:  # a full disk costs the cache entry, never the answer
                stats.prefix_cache_skipped = f"could not store the prefix: {exc.strerror or exc}"

    def _evaluate(self, stats: TurnStats, new_tokens: list[int], marks: list[TurnMark], rendered: str,
                  text: str, shared_chars: int | None) -> float:
        """Prefill what the cache lacks plus `new_tokens`; the reply starts after them.

        Checkpoints are taken where the history ends before this turn (undo, an
        interrupted prefill) and one token before the reply (retry needs the last
        prompt token evaluated again for its logits).
        """
        history_len = len(self.tokens)
        history = self.tokens + new_tokens
        pending = self.tokens[self.engine.n_past :]
        to_eval = pending + new_tokens
        stats.prompt_tokens = len(history)
        stats.reused_tokens = self.engine.n_past
        stats.reevaluated_tokens = max(0, min(self._evaluated_upto, history_len) - self.engine.n_past)
        stats.reevaluated_reason = self._reeval_reason if stats.reevaluated_tokens else ""
        started = time.perf_counter()
        try:
            if self.prefix_cache is not None and self.engine.n_past == 0:
                cuts = self._prefix_cuts(to_eval, marks, rendered, text, shared_chars)
                got = self.prefix_cache.prefill(self.engine, to_eval, cuts, self.on_prefill)
                stats.prefix_cache_tokens = got.restored_tokens
                stats.prefix_cache_restore_s = got.restore_s
                stats.prefix_cache_skipped = got.skipped
            else:
                self._prefill(to_eval, history, [history_len, len(history) - 1])
        except BaseException:
            # Interrupted or failed mid-prefill: take the half-evaluated cells out
            # again, so that the history stays the truth of the cache.
            self._rollback(history_len, "an interrupted prefill")
            stats.stop_reason = "interrupted"
            raise
        self._reeval_reason = ""
        stats.evaluated_tokens = len(to_eval) - stats.prefix_cache_tokens
        self.tokens = history
        self._evaluated_upto = len(history)
        for mark in marks:
            mark.reply_token = len(history)
        self.turns.extend(marks)
        return started

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
        if self.turns and self.turns[-1].reply_token == len(self.tokens):
            self.turns[-1].reply_char = len(self.kv_text)
        splitter = None
        prefilled = ""
        if self.template.render_fn is None and template_has_reasoning(self.template.source):
            splitter = ReasoningSplitter(inside=opens_in_prompt(self.kv_text))
            prefilled = self._prefilled_reply()
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
                if splitter is not None:
                    event = self._split_reasoning(splitter, event, stats)
                yield event
        except (GeneratorExit, KeyboardInterrupt):
            stats.stop_reason = "interrupted"
            raise
        except NetworkError:  # a server's stream broke: the reply so far is kept
            stats.stop_reason = "dropped"
            raise
        finally:
            # A reply cut inside a character ends in bytes that decode to U+FFFD, in the
            # cached text as in the reply the engine streamed (its decoder flushes too).
            self.kv_text += kv_decoder.decode(b"", final=True)
            if first_token_at is not None:
                stats.decode_s = time.perf_counter() - first_token_at
            self.messages.append({"role": "assistant", "content": prefilled + "".join(reply_pieces)})
            # Every generated token but the last is in the cache.
            self._evaluated_upto = max(self.engine.n_past, len(self.tokens) - 1)

    def _prefilled_reply(self) -> str:
        """Text the generation prompt already wrote into the reply (a reasoning block
        opened, or closed empty by enable_thinking=false): it is part of the reply as
        the template renders it back, so the history keeps it with the model's text."""
        messages = self.messages
        try:
            before = self.template.render(messages, add_generation_prompt=False)
            reply: Message = {"role": "assistant", "content": TURN_SENTINELS[1]}
            with_reply = self.template.render([*messages, reply], add_generation_prompt=False)
        except ModelFormatError:
            return ""
        if not with_reply.startswith(before) or TURN_SENTINELS[1] not in with_reply:
            return ""
        header = with_reply[len(before) : with_reply.index(TURN_SENTINELS[1])]
        start = len(before) + len(header)
        if not self.kv_text.startswith(before + header):
            return ""
        tail = self.kv_text[start:]
        return tail if "<think>" in tail else ""

    def _split_reasoning(self, splitter: ReasoningSplitter, event: TokenEvent,
                         stats: TurnStats) -> TokenEvent:
        was_inside = splitter.inside
        reasoning, answer = splitter.feed(event.text)
        last = (event.is_eog or stats.stop_reason == "ctx"
                or (self.max_tokens is not None and stats.completion_tokens >= self.max_tokens))
        if last:
            more_reasoning, more_answer = splitter.flush()
            reasoning, answer = reasoning + more_reasoning, answer + more_answer
        if reasoning or (was_inside and splitter.inside):
            stats.reasoning_tokens += 1
        return replace(event, text=answer, reasoning_text=reasoning)

    # -- a turn on a server that renders messages itself ------------------------

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

    def _send_messages(self, api: MessageEngine, text: str) -> Generator[TokenEvent, None, None]:
        """Send the messages; the server's `usage` gives the turn's counts. Overflow is
        handled here with the same policy, from the server's count of the last exchange
        (the new message estimated at one token per 3 bytes: the server's tokenizer is
        not at hand)."""
        stats = TurnStats()
        self.last_turn = stats
        n_ctx = api.n_ctx
        if n_ctx:
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
        messages = [*self.messages, {"role": "user", "content": text}]
        pieces: list[str] = []
        started = time.perf_counter()
        first_token_at: float | None = None
        try:
            for event in api.chat(messages, self.max_tokens):
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
        except NetworkError:
            stats.stop_reason = "dropped"
            raise
        finally:
            if first_token_at is not None:
                stats.decode_s = time.perf_counter() - first_token_at
            if pieces or stats.stop_reason != "interrupted":
                self.messages = [*messages, {"role": "assistant", "content": "".join(pieces)}]
            self._count_usage(api, stats)

    def _count_usage(self, api: MessageEngine, stats: TurnStats) -> None:
        usage = api.last_usage
        if stats.stop_reason not in ("interrupted", "dropped"):
            stats.stop_reason = {"stop": "eog", "length": "length"}.get(api.last_finish_reason or "", "eog")
        if usage is None:
            stats.usage_reported = False
            return
        cached = usage.cached_tokens or 0
        stats.prompt_tokens = usage.prompt_tokens
        stats.completion_tokens = usage.completion_tokens
        stats.reused_tokens = cached
        stats.evaluated_tokens = usage.prompt_tokens - cached
        self._context_used = usage.prompt_tokens + usage.completion_tokens

    # -- undo and retry -------------------------------------------------------

    def _last_exchange(self) -> TurnMark:
        if not self.turns or self.turns[-1].message >= len(self.messages):
            raise SessionError("there is no exchange to undo", hint="send a message first")
        return self.turns[-1]

    def undo(self) -> Message:
        """Drop the last user message and its reply; returns the user message.

        The cache is rolled back to where that message started (the checkpoint
        taken there where the memory cannot simply remove its tail), so the next
        message costs about its own tokens, not the conversation.
        """
        if self.chat_api is not None:
            users = [i for i, m in enumerate(self.messages) if m["role"] == "user"]
            if not users:
                raise SessionError("there is no exchange to undo", hint="send a message first")
            user = self.messages[users[-1]]
            del self.messages[users[-1] :]
            return user
        mark = self._last_exchange()
        user = self.messages[mark.message]
        del self.messages[mark.message :]
        del self.tokens[mark.token :]
        self.kv_text = self.kv_text[: mark.char]
        self.turns.pop()
        self._evaluated_upto = min(self._evaluated_upto, mark.token)
        self._rollback(mark.token, "undo")
        return user

    def retry(self) -> Generator[TokenEvent, None, None]:
        """Regenerate the last reply (a new sample of it): the reply's tokens leave
        the history and the cache, the last prompt token is evaluated again for its
        logits, and generation starts over."""
        if self.chat_api is not None:  # the server renders: sending the message again is a retry
            yield from self.send(self.undo()["content"])
            return
        mark = self._last_exchange()
        if mark.reply_token < 0 or mark.reply_char < 0:
            user = self.undo()
            yield from self.send(user["content"])
            return
        stats = TurnStats()
        self.last_turn = stats
        del self.messages[mark.message + 1 :]
        del self.tokens[mark.reply_token :]
        self.kv_text = self.kv_text[: mark.reply_char]
        self._evaluated_upto = min(self._evaluated_upto, mark.reply_token)
        self._rollback(mark.reply_token - 1, "retry")
        pending = self.tokens[self.engine.n_past :]
        stats.prompt_tokens = len(self.tokens)
        stats.reused_tokens = self.engine.n_past
        stats.reevaluated_tokens = len(pending)
        stats.reevaluated_reason = self._reeval_reason or "retry: the last prompt token gives the logits"
        started = time.perf_counter()
        try:
            self.engine.eval(pending)
        except BaseException:
            self._rollback(len(self.tokens) - len(pending), "an interrupted prefill")
            stats.stop_reason = "interrupted"
            raise
        self._reeval_reason = ""
        stats.evaluated_tokens = len(pending)
        yield from self._generate(stats, started)

    # -- persistence -----------------------------------------------------------

    def to_record(self) -> dict[str, Any]:
        """Everything but the KV bytes, as plain data (see session_store)."""
        return {
            "messages": self.messages,
            "dropped": self.dropped,
            "kv_text": self.kv_text,
            "turns": [asdict(m) for m in self.turns],
            "n_kv": 0 if self.chat_api is not None else self.engine.n_past,
        }

    def restore(self, record: dict[str, Any], tokens: list[int], state: bytes | None,
                checkpoints: bytes = b"") -> int:
        """Load a saved conversation. With `state`, the KV cache is restored as saved
        (and the saved checkpoints with it); without it (rebuild), the history is
        re-evaluated. Returns tokens evaluated."""
        self.messages = list(record["messages"])
        self.dropped = list(record.get("dropped", []))
        if self.chat_api is not None:  # the server's prefix cache, not a state here
            return 0
        self.turns = [TurnMark(**m) for m in record.get("turns", [])]
        n_kv = int(record["n_kv"])
        self.checkpoints = []
        self._evaluated_upto = n_kv
        if state is not None:
            self.tokens = list(tokens)
            self.kv_text = record["kv_text"]
            self.engine.load_state_bytes(state, n_kv)
            if self.engine.needs_checkpoints:
                self.checkpoints = decode_checkpoints(checkpoints)
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
        self.messages = list(record["messages"])
        self.dropped = list(record.get("dropped", []))
        if self.chat_api is not None:
            return 0
        self.engine.kv_clear()
        self.tokens, self.kv_text, self.turns, self.checkpoints = [], "", [], []
        self._evaluated_upto = 0
        if self.messages:
            self._resync(self.template.render(self.messages, add_generation_prompt=False), self.messages)
        self.engine.eval(self.tokens)
        self._evaluated_upto = len(self.tokens)
        return len(self.tokens)
