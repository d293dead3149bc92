"""SpeculativeEngine's verify loop without a model: on a deterministic engine whose
"model" writes a fixed script, drafted generation must yield exactly the tokens and
text plain generation does, sample once per token, and leave in the cache every
token yielded but the last, nothing more, however the reply stops."""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator, Sequence

import pytest

from kvchat.engine_api import SamplingSettings, TokenEvent
from kvchat.errors import UsageError
from kvchat.speculative import DraftPolicy, NgramDrafter, Speculator
from kvchat.speculative_engine import SpeculativeEngine

EOG = 0
# Tokens 5 and 6 are the two bytes of one character: its text comes with token 6.
PIECES = {5: b"\xc3", 6: b"\xa9"}
LINE = [11, 12, 13, 14, 15, 16, 17, 5, 6, 18]  # a line the script repeats ...
VARIANT = [11, 12, 13, 21, 22, 16, 17, 5, 6, 18]  # ... and every third time varies


def _script(n_lines: int) -> list[int]:
    lines = [VARIANT if i % 3 == 2 else LINE for i in range(n_lines)]
    return [1, *(t for line in lines for t in line), EOG, *LINE * 4]


class ScriptEngine:
    """A VerifyingEngine whose next token at position p is script[p] (greedy, no noise),
    with a cache of cells that truncate and kv_remove really drop."""

    memory_kind = "kv"
    needs_checkpoints = False
    n_ctx_train = 1 << 16
    bos_token, eos_token, add_bos = 1, EOG, True
    flash_attn = "off"
    load_s = 0.0

    def __init__(self, script: list[int], n_ctx: int = 4096) -> None:
        self.script = script
        self.n_ctx = n_ctx
        self.n_vocab = 64
        self.cells: list[int] = []
        self._base = 0  # position of the last decode's first token
        self._n_out = 0  # outputs of the last decode
        self.samples = 0
        self.closed = False

    @property
    def n_past(self) -> int:
        return len(self.cells)

    def _decode(self, tokens: Sequence[int]) -> None:
        assert len(self.cells) + len(tokens) <= self.n_ctx, "decoded past the context"
        self._base = len(self.cells)
        self.cells.extend(tokens)
        self._n_out = len(tokens)

    def eval(self, tokens: Sequence[int], progress: Callable[[int, int], None] | None = None) -> None:
        self._decode(tokens)

    def eval_batch(self, tokens: Sequence[int]) -> None:
        self._decode(tokens)

    def start_reply(self, context: Sequence[int]) -> None:
        self.reply_context = list(context)  # what a reply's penalties would look back over

    def sample(self, index: int = -1) -> int:
        self.samples += 1
        i = self._n_out - 1 if index < 0 else index
        assert 0 <= i < self._n_out
        return self.script[self._base + i + 1]

    def truncate(self, n_tokens: int) -> None:
        del self.cells[n_tokens:]

    def is_eog(self, token: int) -> bool:
        return token == EOG

    def token_piece(self, token: int, *, special: bool = False) -> bytes:
        return PIECES.get(token, f"<{token}>".encode())

    def set_sampling(self, sampling: SamplingSettings) -> None:
        pass

    def kv_clear(self) -> None:
        self.cells.clear()

    def close(self) -> None:
        self.closed = True

    def generate(self, max_tokens: int | None, *, stop_at_eog: bool = True,
                 context: Sequence[int] = ()) -> Iterator[TokenEvent]:
        """Plain decoding, written out on its own as the reference."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        produced = 0
        while True:
            token = self.sample(-1)
            produced += 1
            eog = self.is_eog(token)
            text = "" if eog else decoder.decode(self.token_piece(token))
            last = ((eog and stop_at_eog) or (max_tokens is not None and produced >= max_tokens)
                    or self.n_past + 1 >= self.n_ctx)
            if last:
                text += decoder.decode(b"", final=True)
            yield TokenEvent(token, text, eog)
            if last:
                return
            self._decode([token])


def _speculator() -> Speculator:
    # Draft at once: the timing-driven pause is DraftPolicy's own test.
    return Speculator(NgramDrafter(), DraftPolicy(n_draft=4, t_plain_s=0.01, min_gain=0.0))


PROMPT_TOKENS = 25


def _run(engine: ScriptEngine, generate: Callable[..., Iterator[TokenEvent]], max_tokens: int | None,
         stop_at_eog: bool = True) -> list[TokenEvent]:
    engine.kv_clear()
    prompt = engine.script[:PROMPT_TOKENS]
    engine.eval(prompt)
    engine.samples = 0
    events = list(generate(max_tokens, stop_at_eog=stop_at_eog, context=prompt))
    assert engine.cells == engine.script[: PROMPT_TOKENS + len(events) - 1]
    assert engine.samples == len(events)  # the sampler sees each kept token once, no other
    return events


def _plain(events: list[TokenEvent]) -> list[tuple[int, str, bool]]:
    return [(e.token, e.text, e.is_eog) for e in events]


# The script's end of turn is at position 121; the prompt is its first 25 tokens.
@pytest.mark.parametrize(("max_tokens", "stop_at_eog", "n_ctx", "n_events"),
                         [(None, True, 4096, 97), (37, True, 4096, 37), (120, False, 4096, 120),
                          (None, True, 110, 110 - PROMPT_TOKENS)],
                         ids=["to-eog", "max-tokens", "past-eog", "context-end"])
def test_drafted_decoding_yields_what_plain_decoding_does(max_tokens: int | None, stop_at_eog: bool,
                                                          n_ctx: int, n_events: int) -> None:
    engine = ScriptEngine(_script(12), n_ctx)
    plain = _run(engine, engine.generate, max_tokens, stop_at_eog)
    spec = SpeculativeEngine(engine, _speculator())
    drafted = _run(engine, spec.generate, max_tokens, stop_at_eog)
    assert _plain(drafted) == _plain(plain)
    assert len(drafted) == n_events
    assert "é" in "".join(e.text for e in drafted)  # the split character came out whole
    assert 0 < spec.counters.accepted < spec.counters.drafted  # kept drafts, and refused some
    assert sum(e.drafted for e in drafted) == spec.counters.drafted
    assert sum(e.accepted for e in drafted) == spec.counters.accepted


def test_stopping_inside_a_verified_draft_drops_what_was_not_yielded() -> None:
    engine = ScriptEngine(_script(12))
    spec = SpeculativeEngine(engine, _speculator())
    prompt = engine.script[:PROMPT_TOKENS]
    engine.eval(prompt)
    stream = spec.generate(None, context=prompt)
    taken = []
    for event in stream:
        taken.append(event)
        if event.accepted >= 2:  # the first token of a step with more kept tokens to come
            break
    assert engine.n_past > PROMPT_TOKENS + len(taken) - 1  # those tokens are in the cache now
    stream.close()
    assert engine.cells == engine.script[: PROMPT_TOKENS + len(taken) - 1]


def test_the_wrapper_owns_the_engine_and_passes_the_rest_through() -> None:
    engine = ScriptEngine(_script(3))
    spec = SpeculativeEngine(engine, _speculator())
    assert (spec.mode, spec.n_ctx, spec.n_past, spec.memory_kind) == ("ngram", 4096, 0, "kv")
    spec.eval([1, 11, 12])
    assert spec.n_past == 3 and spec.is_eog(EOG)
    spec.close()
    assert engine.closed


def test_a_recurrent_model_cannot_be_wrapped() -> None:
    engine = ScriptEngine(_script(3))
    engine.memory_kind = "hybrid"
    with pytest.raises(UsageError, match="recurrent state"):
        SpeculativeEngine(engine, _speculator())
