"""The Session's invariants, driven by hypothesis on the real model.

Random sequences of send (with and without an interrupt mid-reply or
mid-prefill), overflow shift (a 512-token context fills up in a few turns), clear,
set-system, save and restore. After every step:

- the engine holds exactly the cells the session says (llama.cpp's own count);
- the cached tokens are a prefix of the token history, which runs at most the
  not-yet-evaluated tokens past them;
- the token history, detokenized, is the cached text (BOS aside);
- every turn mark points at a user message, at the token and character where that
  turn starts in the history.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvchat.app import chat_template_for
from kvchat.cache_types import parse_cache_type
from kvchat.engine import Engine, EngineSettings
from kvchat.engine_api import SamplingSettings
from kvchat.errors import KvchatError
from kvchat.session import Session

F16 = parse_cache_type("f16")
WORDS = ["cats", "the sea", "Paris", "prime numbers", "tea", "a short poem", "bread", "日本", "ok"]


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[Engine]:
    with Engine(model_path, EngineSettings(n_ctx=512, type_k=F16, type_v=F16, n_threads=2)) as eng:
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
    engine.kv_clear()
    session = Session(engine, chat_template_for(engine), SamplingSettings(temperature=0, seed=1),
                      max_tokens=24, overflow="shift")
    for kind, word, n in steps:
        if kind == "send":
            # Long enough that a few turns overflow the 512-token context and shift.
            list(session.send(f"Tell me about {word}. " * n))
        elif kind == "interrupt_reply":
            stream = session.send(f"Write about {word}.")
            for i, _event in enumerate(stream):
                if i + 1 >= n:
                    break
            stream.close()
        elif kind == "interrupt_prefill":
            def stop(done: int, total: int) -> None:
                raise _StopPrefill

            session.on_prefill = stop
            # A prompt longer than one chunk would be, so the callback fires mid-way.
            with pytest.raises((_StopPrefill, KvchatError)):
                list(session.send(" ".join([word] * n)))
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
