"""The Session's invariants, driven by hypothesis: on the fake engine for thousands
of steps (fast tier), and on the real model (integration tier, slow).

Random sequences of send (with and without an interrupt mid-reply or
mid-prefill), overflow shift (a small context fills up in a few turns), clear,
set-system, save and restore (and on the fake: undo, retry, every memory kind and
templates that rewrite earlier turns). After every step:

- the engine holds exactly the cells the session says (llama.cpp's own count;
  on the fake, the tokens in its cells and what its next token is computed from);
- the cached tokens are a prefix of the token history, which runs at most the
  not-yet-evaluated tokens past them;
- the token history, detokenized, is the cached text (BOS aside);
- every turn mark points at a user message, at the token and character where that
  turn starts in the history.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from fake_engine import FakeEngine, check_session, turn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvchat.engine_api import SamplingSettings
from kvchat.errors import KvchatError, SessionError, UsageError
from kvchat.session import Session

if TYPE_CHECKING:
    from kvchat.engine import Engine

WORDS = ["cats", "the sea", "Paris", "prime numbers", "tea", "a short poem", "bread", "日本", "ok"]


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[Engine]:
    from kvchat.cache_types import parse_cache_type
    from kvchat.engine import Engine, EngineSettings

    f16 = parse_cache_type("f16")
    with Engine(model_path, EngineSettings(n_ctx=512, type_k=f16, type_v=f16, n_threads=2)) as eng:
        yield eng


def _text_of(engine: Engine, tokens: list[int]) -> str:
    return b"".join(engine.token_piece(t, special=True) for t in tokens).decode("utf-8", errors="replace")


def check_invariants(session: Session, engine: Engine) -> None:
    n_past = engine.n_past
    assert engine.cells_in_use() == n_past, "the engine's cells disagree with its own count"
    assert n_past <= len(session.tokens)
    # A BOS token the model adds is not in the cached text; one the template writes is.
    bos_text = engine.token_text(engine.bos_token)
    added_bos = session.tokens[:1] == [engine.bos_token] and not session.kv_text.startswith(bos_text)
    bos = bos_text if added_bos else ""
    assert bos + session.kv_text == _text_of(engine, session.tokens)
    for mark in session.turns:
        assert session.messages[mark.message]["role"] == "user"
        assert _text_of(engine, session.tokens[: mark.token]) == bos + session.kv_text[: mark.char]
    marks = [m.token for m in session.turns]
    assert marks == sorted(marks)


class _StopPrefill(Exception):
    pass


step = st.one_of(
    st.tuples(st.just("send"), st.sampled_from(WORDS), st.integers(1, 6)),
    st.tuples(st.just("interrupt_reply"), st.sampled_from(WORDS), st.integers(1, 4)),
    st.tuples(st.just("interrupt_prefill"), st.sampled_from(WORDS), st.integers(40, 160)),
    st.tuples(st.just("clear"), st.just(""), st.just(0)),
    st.tuples(st.just("system"), st.sampled_from(WORDS), st.just(0)),
    st.tuples(st.just("save_restore"), st.just(""), st.just(0)),
)


@pytest.mark.slow
@pytest.mark.timeout(900)  # several real-model conversations in one test
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step, min_size=3, max_size=10))
def test_session_invariants_hold_after_every_step(engine: Engine,
                                                  steps: list[tuple[str, str, int]]) -> None:
    from kvchat.app import chat_template_for

    engine.kv_clear()
    session = Session(engine, chat_template_for(engine), SamplingSettings(temperature=0, seed=1),
                      max_tokens=24, overflow="shift")
    for kind, word, n in steps:
        if kind == "send":
            # Long enough that a few turns overflow the 512-token context and shift.
            turn(session, f"Tell me about {word}. " * n)
        elif kind == "interrupt_reply":
            turn(session, f"Write about {word}.", stop_after=n)
        elif kind == "interrupt_prefill":
            def stop(done: int, total: int) -> None:
                raise _StopPrefill

            session.on_prefill = stop
            # A prompt longer than one chunk would be, so the callback fires mid-way.
            with pytest.raises((_StopPrefill, KvchatError)):
                turn(session, " ".join([word] * n))
            session.on_prefill = None
        elif kind == "clear":
            session.clear()
        elif kind == "system":
            session.set_system(f"You like {word}.")
        else:
            record, tokens, state = session.to_record(), list(session.tokens), engine.state_bytes()
            engine.kv_clear()
            restored = Session(engine, session.template, session.sampling, session.max_tokens, "shift")
            restored.restore(record, tokens, state)
            session = restored
        check_invariants(session, engine)


# -- the same, and more, on the fake engine ---------------------------------------------

# A few seconds; raise KVCHAT_FAKE_EXAMPLES to hunt longer (1,500 examples: ~25,000 steps).
FAKE_EXAMPLES = int(os.environ.get("KVCHAT_FAKE_EXAMPLES", "150"))
fake_step = st.one_of(
    st.tuples(st.just("send"), st.sampled_from(WORDS), st.integers(1, 8)),
    st.tuples(st.just("interrupt_reply"), st.sampled_from(WORDS), st.integers(1, 4)),
    st.tuples(st.just("interrupt_prefill"), st.sampled_from(WORDS), st.integers(1, 40)),
    st.tuples(st.just("undo"), st.just(""), st.just(0)),
    st.tuples(st.just("retry"), st.just(""), st.integers(0, 3)),
    st.tuples(st.just("clear"), st.just(""), st.just(0)),
    st.tuples(st.just("system"), st.sampled_from(WORDS), st.just(0)),
    st.tuples(st.just("save_restore"), st.just(""), st.just(0)),
)


@settings(max_examples=FAKE_EXAMPLES, deadline=None)
@given(kind=st.sampled_from(["kv", "swa", "recurrent", "hybrid"]),
       family=st.sampled_from(["chatml", "gemma", "thinking"]),
       n_ctx=st.sampled_from([160, 256, 384]), temperature=st.sampled_from([0.0, 0.8]),
       checkpoint_max=st.integers(0, 4), steps=st.lists(fake_step, min_size=5, max_size=30))
def test_session_invariants_hold_on_the_fake_engine(kind: str, family: str, n_ctx: int, temperature: float,
                                                    checkpoint_max: int,
                                                    steps: list[tuple[str, str, int]]) -> None:
    engine = FakeEngine(kind, family=family, n_ctx=n_ctx)
    sampling = SamplingSettings(temperature=temperature, seed=1)

    def new_session() -> Session:
        return Session(engine, engine.template(), sampling, max_tokens=24, overflow="shift",
                       checkpoint_max=checkpoint_max)

    session = new_session()
    for kind_of_step, word, n in steps:
        after_reply = False
        evaluated = engine.evaluated
        try:
            if kind_of_step == "send":
                _reply, stats = turn(session, f"Tell me about {word}. " * n)
                after_reply = True
            elif kind_of_step == "interrupt_reply":
                _reply, stats = turn(session, f"Write about {word}.", stop_after=n)
                after_reply = True
            elif kind_of_step == "interrupt_prefill":
                def stop(done: int, total: int) -> None:
                    raise _StopPrefill

                session.on_prefill = stop
                try:
                    with pytest.raises(_StopPrefill):
                        turn(session, " ".join([word] * n))
                finally:
                    session.on_prefill = None
            elif kind_of_step == "undo":
                session.undo()
            elif kind_of_step == "retry":
                _reply, stats = turn(session, None, stop_after=n or None)
                after_reply = True
            elif kind_of_step == "clear":
                session.clear()
            elif kind_of_step == "system":
                session.set_system(f"You like {word}.")
            else:
                record, tokens, state = session.to_record(), list(session.tokens), engine.state_bytes()
                engine.kv_clear()
                session = new_session()
                session.restore(record, tokens, state)
        except (SessionError, UsageError):
            pass  # nothing to undo, a message the context cannot hold: refused, nothing changed
        check_session(session, engine, after_reply=after_reply)
        if after_reply:
            # The turn's figures are the engine's own: what it evaluated (every token
            # generated but the last), and the prompt split into reused and evaluated.
            assert engine.evaluated - evaluated == stats.evaluated_tokens + stats.completion_tokens - 1
            assert stats.reused_tokens + stats.evaluated_tokens == stats.prompt_tokens
