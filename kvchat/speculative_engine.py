"""Speculative decoding as an engine around an engine.

`SpeculativeEngine` is a ChatEngine: everything but `generate` goes to the engine it
wraps, which knows nothing of drafting. Its `generate` asks a `Speculator`
(kvchat.speculative) for draft tokens and verifies them with the wrapped engine's
verify capability (engine_api.VerifyingEngine): the pending token and the draft in
one batch, the target's own sampler at each position in turn, the rejected tail
dropped from the cache. The tokens yielded are those plain decoding samples.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from kvchat.engine_api import (
    ChatEngine,
    Checkpoint,
    CheckpointingEngine,
    SamplingSettings,
    ShiftingEngine,
    TokenEmitter,
    TokenEvent,
    VerifyingEngine,
)
from kvchat.errors import KvchatError, UsageError
from kvchat.speculative import SpecCounters, Speculator


class SpeculationTarget(VerifyingEngine, ShiftingEngine, CheckpointingEngine, Protocol):
    """The engine speculative decoding wraps (kvchat.engine.Engine): it verifies drafts,
    and the wrapper passes on what else it can do (shifting, checkpoints, reading and
    loading ranges of the sequence's state)."""

    @property
    def can_save_ranges(self) -> bool: ...
    def state_range_bytes(self, start: int, end: int) -> bytearray: ...
    def load_state_range(self, data: bytes, start: int, end: int) -> None: ...


def speculation_blocker(engine: ChatEngine) -> str | None:
    """Why speculative decoding cannot run on `engine`'s model, or None.

    Rejected draft tokens must be removed from the cache; recurrent and hybrid
    memories hold one state per sequence and cannot drop a tail
    (llama_memory_seq_rm returns false there).
    """
    if engine.memory_kind in ("recurrent", "hybrid"):
        return "this model's recurrent state cannot drop rejected draft tokens"
    return None


class SpeculativeEngine:
    """`target` with drafted, verified generation. Owns both: `close()` closes the
    speculator (and a draft model it holds), then `target`."""

    def __init__(self, target: SpeculationTarget, speculator: Speculator) -> None:
        blocker = speculation_blocker(target)
        if blocker is not None:
            raise UsageError(f"speculative decoding is not possible: {blocker}",
                             hint="use --speculative off")
        self.target = target
        self.speculator = speculator

    @property
    def mode(self) -> str:
        """The drafter at work: ngram or draft."""
        return self.speculator.mode

    @property
    def counters(self) -> SpecCounters:
        """What drafting did in this engine's lifetime."""
        return self.speculator.counters

    def generate(
        self, max_tokens: int | None, *, stop_at_eog: bool = True, context: Sequence[int] = ()
    ) -> Iterator[TokenEvent]:
        """ChatEngine.generate with drafts from `context` (the token history in the cache)
        plus the reply so far: each step evaluates the pending token and the draft in
        one batch, samples the target's choice at each position in turn and keeps draft
        tokens only while they equal it. The sampler sees exactly the tokens it would
        in plain decoding, one `sample` per token kept."""
        engine, spec = self.target, self.speculator
        policy = spec.policy
        is_eog = engine.is_eog
        start = engine.n_past
        emit = TokenEmitter(engine, max_tokens, engine.n_ctx - start, stop_at_eog=stop_at_eog)
        history = list(context)
        engine.start_reply(history)
        sampled = [engine.sample(-1)]
        drafted = accepted = 0
        spec.sync(history)  # e.g. a draft model's prefill: not a cost of any one step
        try:
            while True:
                for j, token in enumerate(sampled):
                    yield emit.event(token, drafted if j == 0 else 0, accepted if j == 0 else 0)
                    if emit.done:
                        return
                history.extend(sampled)
                pending = sampled[-1]
                base = engine.n_past  # == start + produced - 1: the pending token goes here
                room = min(engine.n_ctx - base - 2, policy.n_max)
                if max_tokens is not None:
                    room = min(room, max_tokens - emit.produced - 1)
                began = time.perf_counter()
                drafts = spec.propose(history, room)
                if not drafts:
                    engine.eval_batch((pending,))
                    sampled = [engine.sample(-1)]
                    drafted = accepted = 0
                    spec.observe_plain(time.perf_counter() - began)
                    continue
                engine.eval_batch([pending, *drafts])
                sampled = []
                for i in range(len(drafts) + 1):
                    token = engine.sample(i)
                    sampled.append(token)
                    if i == len(drafts) or token != drafts[i]:
                        break
                    if stop_at_eog and is_eog(token):
                        break
                    if max_tokens is not None and emit.produced + len(sampled) >= max_tokens:
                        break
                drafted = len(drafts)
                accepted = sum(1 for a, b in zip(sampled, drafts, strict=False) if a == b)
                # Keep the pending token and the accepted drafts but the last one sampled,
                # which stays pending like any last token yielded.
                self._truncate(base + len(sampled))
                spec.observe_draft(drafted, accepted, len(sampled), time.perf_counter() - began)
        finally:
            # Stopped early (closed, interrupted, max_tokens inside a step): the cache
            # holds every token yielded but the last, nothing more.
            self._truncate(start + max(emit.produced - 1, 0))

    def _truncate(self, n_tokens: int) -> None:
        try:
            self.target.truncate(n_tokens)
        except KvchatError as e:
            raise KvchatError(f"speculative decoding: {e.message}", hint="use --speculative off") from e

    def close(self) -> None:
        try:
            self.speculator.close()
        finally:
            self.target.close()

    # -- everything else is the target's ------------------------------------------------

    # -- everything else is the target's -----------------------------------------------

    @property
    def n_ctx(self) -> int:
        return self.target.n_ctx

    @property
    def n_past(self) -> int:
        return self.target.n_past

    @property
    def bos_token(self) -> int:
        return self.target.bos_token

    @property
    def add_bos(self) -> bool:
        return self.target.add_bos

    @property
    def memory_kind(self) -> str:
        return self.target.memory_kind

    @property
    def needs_checkpoints(self) -> bool:
        return self.target.needs_checkpoints

    @property
    def can_save_ranges(self) -> bool:
        return self.target.can_save_ranges

    def is_eog(self, token: int) -> bool:
        return self.target.is_eog(token)

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        return self.target.tokenize(text, add_special=add_special, parse_special=parse_special)

    def token_text(self, token: int) -> str:
        return self.target.token_text(token)

    def token_piece(self, token: int, *, special: bool = False) -> bytes:
        return self.target.token_piece(token, special=special)

    def eval(self, tokens: Sequence[int], progress: Callable[[int, int], None] | None = None) -> None:
        self.target.eval(tokens, progress)

    def set_sampling(self, sampling: SamplingSettings) -> None:
        self.target.set_sampling(sampling)

    def kv_remove(self, start: int, end: int) -> bool:
        return self.target.kv_remove(start, end)

    def kv_shift(self, start: int, end: int, delta: int) -> None:
        self.target.kv_shift(start, end, delta)

    def can_shift(self) -> bool:
        return self.target.can_shift()

    def kv_clear(self) -> None:
        self.target.kv_clear()

    def covers(self, n_tokens: int) -> bool:
        return self.target.covers(n_tokens)

    def checkpoint(self, n_tokens: int) -> Checkpoint:
        return self.target.checkpoint(n_tokens)

    def restore_checkpoint(self, checkpoint: Checkpoint) -> bool:
        return self.target.restore_checkpoint(checkpoint)

    def state_bytes(self) -> bytes:
        return self.target.state_bytes()

    def load_state_bytes(self, data: bytes, n_tokens: int) -> None:
        self.target.load_state_bytes(data, n_tokens)

    def state_range_bytes(self, start: int, end: int) -> bytearray:
        return self.target.state_range_bytes(start, end)

    def load_state_range(self, data: bytes, start: int, end: int) -> None:
        self.target.load_state_range(data, start, end)
