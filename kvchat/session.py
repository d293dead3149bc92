"""A token-exact conversation (`kvchat.conversation.Conversation`): messages, the
exact token history in the KV cache, and a `ChatEngine` (llama.cpp, llama-server).

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
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from typing import Any

from kvchat.chat_template import ChatTemplate, Message
from kvchat.checkpoints import (
    PERSISTED_CHECKPOINTS,
    SavedCheckpoint,
    decode_checkpoints,
    encode_checkpoints,
    history_digest,
    with_checkpoint,
)
from kvchat.conversation import SavedState, StateLoader, Turn, TurnStats, assistant_reply, set_system_prompt
from kvchat.engine_api import ChatEngine, CheckpointingEngine, SamplingSettings, ShiftingEngine, TokenEvent
from kvchat.engine_state import EngineState
from kvchat.errors import NetworkError, SessionError, UsageError
from kvchat.prefix_cache import PrefixCache
from kvchat.reasoning import ReasoningSplitter, opens_in_prompt, prefilled_reply, template_has_reasoning
from kvchat.settings import OVERFLOW_POLICIES, default_field
from kvchat.turn_split import TurnMark, TurnSplitter


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
        # Optional engine capabilities, asked for once (kvchat.engine_api).
        self._shifter = self.engine if isinstance(self.engine, ShiftingEngine) else None
        self._checkpointer = self.engine if isinstance(self.engine, CheckpointingEngine) else None
        self._revision = 0
        self._split = TurnSplitter(self.engine, self.template)
        # History tokens that have been in the cache (the rest were never evaluated),
        # and why the cache last lost some of them.
        self._evaluated_upto = 0
        self._reeval_reason = ""
        self._system_changed = False  # by the user: what follows it is evaluated anew, not lost

    # -- conversation edits ------------------------------------------------

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def template_origin(self) -> str:
        return self.template.origin

    @property
    def checkpoint_usage(self) -> tuple[int, int] | None:
        return len(self.checkpoints), self.checkpoint_bytes

    @property
    def revision(self) -> int:
        return self._revision

    def set_system(self, text: str) -> None:
        """Set the system prompt; once turns exist, the cache is rebuilt lazily."""
        self._revision += 1
        self._system_changed = bool(self.tokens)
        if set_system_prompt(self.messages, text):
            for mark in self.turns:
                mark.message += 1

    def clear(self) -> None:
        """Forget the conversation (the system prompt stays) and empty the KV cache."""
        self.engine.kv_clear()
        self._revision += 1
        self.messages = [m for m in self.messages[:1] if m["role"] == "system"]
        self.dropped = []
        self.tokens = []
        self.kv_text = ""
        self.turns = []
        self.checkpoints = []
        self._evaluated_upto, self._system_changed = 0, False

    def set_sampling(self, sampling: SamplingSettings) -> None:
        self.sampling = sampling
        self.engine.set_sampling(sampling)

    @property
    def n_kv(self) -> int:
        """Cells of the KV cache in use by this conversation."""
        return self.engine.n_past

    # -- tokens for a turn -----------------------------------------------

    def _resync(self, text: str, messages: list[Message]) -> None:
        """Make the history stand for `text` when the cached text is not its prefix
        (a template that rewrites earlier turns): keep the history's tokens, as they
        were generated, for the longest start of `text` they stand for, and tokenize
        only the rest at turn boundaries; it becomes pending and is evaluated with
        the next turn."""
        keep, full, self.turns = self._split.resync(self.tokens, self.kv_text, self.turns, text, messages)
        self.tokens = full
        self.kv_text = text
        asked, self._system_changed = self._system_changed, False
        reason = "the system prompt changed" if asked else "the chat template rewrote earlier turns"
        if keep < self.engine.n_past:
            self._rollback(keep, reason)
        # The rest of `full` stands for text already seen: evaluating it is re-evaluation
        # (unless the user changed the text before it: then it is the work they asked for).
        if self._evaluated_upto and len(full) > keep and not asked:
            self._note_reeval(reason)
        self._evaluated_upto = keep if asked else max(keep, len(full) if self._evaluated_upto else 0)

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
        user_char = self._split.turn_offset(messages, len(messages) - 1, rendered)
        cut = min(max((base if user_char is None else user_char) - base, 0), len(rendered) - base)
        tokens, landed = self._split.tokenize_at(rendered[base:], [cut], at_start=not self.tokens)
        return tokens, [TurnMark(len(messages) - 1, len(self.tokens) + landed[0], base + cut)]

    # -- checkpoints and rollback ---------------------------------------------

    def _checkpoint(self, history: list[int], n_tokens: int) -> None:
        """Snapshot the cache now (it holds history[:n_tokens]) where the memory cannot
        roll back, within the count and size bounds."""
        engine = self._checkpointer
        if engine is None or not self.engine.needs_checkpoints or self.checkpoint_max <= 0 or n_tokens <= 0:
            return
        digest = history_digest(history[:n_tokens])
        if not any(c.n_tokens == n_tokens and c.digest == digest for c in self.checkpoints):
            taken = SavedCheckpoint(engine.checkpoint(n_tokens), digest)
            self.checkpoints = with_checkpoint(self.checkpoints, taken, self.checkpoint_max,
                                               self.checkpoint_mib)

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
            checkpointer = self._checkpointer
            for saved in reversed(self.checkpoints if checkpointer is not None else []):
                if saved.n_tokens > n_tokens or saved.digest != history_digest(self.tokens[: saved.n_tokens]):
                    continue
                if checkpointer is not None and checkpointer.restore_checkpoint(saved.checkpoint):
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
        return self._shifter is not None and self._shifter.can_shift() and \
            self.engine.memory_kind in ("kv", "swa")

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
        if not shifted and self._shifter is not None and self._shifts_cheaply() and \
                self.engine.kv_remove(first.token, kv_end):
            if kv_end < n_kv:
                self._shifter.kv_shift(kv_end, -1, -(kv_end - first.token))
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

    def send(self, text: str, *, shared_chars: int | None = None) -> Turn:
        """Add a user message; the turn streams the reply's tokens.

        The turn's figures are complete once its iteration ends, whether it ran to
        the end of the turn or was closed early (Ctrl-C): a partial reply is kept in
        both the transcript and the token history.
        """
        return Turn(lambda stats: self._send(stats, {"role": "user", "content": text}, shared_chars))

    def answer(self, messages: list[Message]) -> Turn:
        """Reply to a conversation sent whole (a server's clients resend it every call):
        the last message (a user's, or a tool's result) is answered, the others become the
        transcript, and the cache is matched by content (a resync keeps the tokens for the
        longest start of the new rendering), so only what is new is evaluated."""
        if not messages:
            raise UsageError("there is no message to answer", hint="send at least one message")
        *history, last = messages

        def run(stats: TurnStats) -> Generator[TokenEvent, None, None]:
            if history != self.messages:
                self._revision += 1
                self.messages, self.dropped = list(history), []
            yield from self._send(stats, last, None)

        return Turn(run)

    def _send(self, stats: TurnStats, user: Message,
              shared_chars: int | None) -> Generator[TokenEvent, None, None]:
        self._revision += 1
        text = user["content"]
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
                last_mark = marks[-1] if marks else None
                cuts = self._split.prefix_cuts(to_eval, last_mark, rendered, text, shared_chars)
                got = self.prefix_cache.prefill(self.engine, to_eval, cuts, self.on_prefill)
                stats.prefix_cache_tokens = got.restored_tokens
                stats.prefix_cache_restore_s = got.restore_s
                stats.prefix_cache_skipped, stats.prefix_cache_routine = got.skipped, got.routine
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

    def _generate(self, stats: TurnStats, started: float) -> Generator[TokenEvent, None, None]:
        kv_decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        reply_pieces: list[str] = []
        first_token_at: float | None = None
        if self.turns and self.turns[-1].reply_token == len(self.tokens):
            self.turns[-1].reply_char = len(self.kv_text)
        splitter = None
        prefilled = ""
        cut = ""
        if self.template.render_fn is None and template_has_reasoning(self.template.source):
            splitter = ReasoningSplitter(inside=opens_in_prompt(self.kv_text))
            prefilled = prefilled_reply(self.template, self.messages, self.kv_text)
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
                    last = (event.is_eog or stats.stop_reason == "ctx"
                            or (self.max_tokens is not None and stats.completion_tokens >= self.max_tokens))
                    reasoning, answer, thinking = splitter.split(event.text, last=last)
                    stats.reasoning_tokens += thinking
                    event = replace(event, text=answer, reasoning_text=reasoning)
                yield event
        except (GeneratorExit, KeyboardInterrupt):
            stats.stop_reason = "interrupted"
            raise
        except NetworkError as exc:  # a server's stream broke: the reply so far is kept
            stats.stop_reason, cut = "dropped", exc.message
            raise
        finally:
            # A reply cut inside a character ends in bytes that decode to U+FFFD, in the
            # cached text as in the reply the engine streamed (its decoder flushes too).
            self.kv_text += kv_decoder.decode(b"", final=True)
            if first_token_at is not None:
                stats.decode_s = time.perf_counter() - first_token_at
            self.messages.append(assistant_reply(prefilled + "".join(reply_pieces), cut))
            # Every generated token but the last is in the cache.
            self._evaluated_upto = max(self.engine.n_past, len(self.tokens) - 1)

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
        mark = self._last_exchange()
        self._revision += 1
        user = self.messages[mark.message]
        del self.messages[mark.message :]
        del self.tokens[mark.token :]
        self.kv_text = self.kv_text[: mark.char]
        self.turns.pop()
        self._evaluated_upto = min(self._evaluated_upto, mark.token)
        self._rollback(mark.token, "undo")
        return user

    def retry(self) -> Turn:
        """Regenerate the last reply (a new sample of it): the reply's tokens leave
        the history and the cache, the last prompt token is evaluated again for its
        logits, and generation starts over."""
        mark = self._last_exchange()
        if mark.reply_token < 0 or mark.reply_char < 0:
            return self.send(self.undo()["content"])
        return Turn(lambda stats: self._retry(stats, mark))

    def _retry(self, stats: TurnStats, mark: TurnMark) -> Generator[TokenEvent, None, None]:
        self._revision += 1
        del self.messages[mark.message + 1 :]
        del self.tokens[mark.reply_token :]
        self.kv_text = self.kv_text[: mark.reply_char]
        self._evaluated_upto = min(self._evaluated_upto, mark.reply_token)
        self._rollback(mark.reply_token - 1, "retry")
        pending = self.tokens[self.engine.n_past :]
        stats.prompt_tokens = len(self.tokens)
        stats.reused_tokens = self.engine.n_past
        # The last prompt token is evaluated again by design (its logits start the new
        # reply): only what the cache lost before it is re-evaluation worth a word.
        stats.reevaluated_tokens = max(len(pending) - 1, 0)
        stats.reevaluated_reason = (self._reeval_reason or "retry") if stats.reevaluated_tokens else ""
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
            "turns": [dict(vars(m)) for m in self.turns],  # flat ints: asdict's deep copy cost a save 1 ms
            "n_kv": self.engine.n_past,
        }

    def saved_state(self) -> SavedState:
        """The token history, the engine to read its cells from, and the checkpoints
        an undo of the last exchange needs."""
        return SavedState(list(self.tokens), self.engine.n_past, EngineState(self.engine),
                          encode_checkpoints(self.checkpoints[-PERSISTED_CHECKPOINTS:]))

    def _take(self, record: dict[str, Any], tokens: list[int], n_kv: int) -> None:
        """The transcript, history and turn marks of `record` (`to_record`'s), the
        engine holding (or about to hold) its first `n_kv` tokens."""
        self.messages = list(record["messages"])
        self.dropped = list(record.get("dropped", []))
        self._revision += 1
        self.turns = [TurnMark(**m) for m in record.get("turns", [])]
        self.tokens = list(tokens)
        self.kv_text = record["kv_text"]
        self.checkpoints = []
        self._evaluated_upto = n_kv

    def restore(self, record: dict[str, Any], tokens: list[int], state: bytes | StateLoader | None,
                checkpoints: bytes = b"") -> int:
        """Load a saved conversation. With `state` (the whole KV state, or a loader
        that restores what it can), the KV cache is restored as saved, tokens it could
        not restore evaluated, and the saved checkpoints kept; without it (rebuild),
        the history is re-evaluated. Returns tokens evaluated."""
        n_kv = int(record["n_kv"])
        self._take(record, tokens, n_kv)
        if state is None:
            # Rebuild: evaluate the transcript's tokens (exactly as they were in the
            # cache, generated tokens included) from scratch.
            self.engine.kv_clear()
            self.engine.eval(self.tokens[:n_kv])
            return n_kv
        if callable(state):
            done = state(EngineState(self.engine))
            if done < n_kv:  # what a damaged block lost
                self.engine.eval(self.tokens[done:n_kv])
        else:
            done = n_kv
            self.engine.load_state_bytes(state, n_kv)
        if self.engine.needs_checkpoints and self._checkpointer is not None:
            self.checkpoints = decode_checkpoints(checkpoints)
        return n_kv - done

    def adopt(self, record: dict[str, Any], tokens: list[int]) -> None:
        """Take a conversation (`to_record`'s record) whose first `engine.n_past` tokens the
        engine holds already (restored from the KV store); the rest comes with the next turn."""
        self._take(record, tokens, self.engine.n_past)

    def restore_from_messages(self, record: dict[str, Any]) -> int:
        """Rebuild from the transcript alone (another model: tokens do not carry over).
        Returns tokens evaluated."""
        self.messages = list(record["messages"])
        self.dropped = list(record.get("dropped", []))
        self._revision += 1
        self.engine.kv_clear()
        self.tokens, self.kv_text, self.turns, self.checkpoints = [], "", [], []
        self._evaluated_upto = 0
        if self.messages:
            self._resync(self.template.render(self.messages, add_generation_prompt=False), self.messages)
        self.engine.eval(self.tokens)
        self._evaluated_upto = len(self.tokens)
        return len(self.tokens)
