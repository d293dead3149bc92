"""Session's logic on the fake engine (tests/fake_engine.py), in milliseconds.

The same situations as the real-model tests (tests/test_session.py,
tests/test_families.py) on every memory kind: overflow by shifting (kv) and by
dropping to half the context (swa, recurrent, hybrid), the stop policy, a template
that rewrites earlier turns, undo and retry with checkpoints, interrupts mid-prefill
and mid-reply, bounded checkpoints. After every step `check_session` asserts that
the history is the truth of the cache: the fake's cells are session.tokens[:n_past]
and its next token is computed from what a cold evaluation of them would show.
"""

from __future__ import annotations

import pytest
from fake_engine import FakeEngine, check_session, turn

from kvchat.conversation import TurnStats
from kvchat.engine_api import SamplingSettings
from kvchat.errors import SessionError, UsageError
from kvchat.session import Session

GREEDY = SamplingSettings(temperature=0, seed=1)
KINDS = ["kv", "swa", "recurrent", "hybrid"]
ROLLBACK_KINDS = ["swa", "recurrent", "hybrid"]


def _session(engine: FakeEngine, **kwargs: object) -> Session:
    return Session(engine, engine.template(), GREEDY, **kwargs)  # type: ignore[arg-type]


def _question(i: int, words: int = 6) -> str:
    return f"Question {i}: " + " ".join(f"word{j}" for j in range(words))


# -- the fake keeps llama.cpp's rules ------------------------------------------------


def test_fake_tokenizer_merges_like_bpe_and_renders_special_tokens() -> None:
    engine = FakeEngine()
    text = "<|im_start|>user\nhello  world 日本<|im_end|>\n"
    tokens = engine.tokenize(text, add_special=True)
    assert tokens[0] == engine.bos_token and engine.detokenize(tokens[1:]) == text
    # A space joins the word after it, so a cut between them tokenizes differently.
    assert engine.tokenize("a b", add_special=False) != (engine.tokenize("a ", add_special=False)
                                                          + engine.tokenize("b", add_special=False))
    assert engine.token_piece(engine.eos_token) == b"" and engine.token_piece(engine.eos_token, special=True)
    assert engine.tokenize("<|im_end|>", add_special=False, parse_special=False) != [engine.eos_token]


def test_fake_kv_cache_with_a_hole_answers_differently_until_shifted() -> None:
    engine = FakeEngine("kv")
    tokens = engine.tokenize("one two three four five six seven eight", add_special=True)
    engine.eval(tokens)
    assert engine.view() == engine.cold_view(tokens)
    assert engine.kv_remove(2, 4)
    # llama.cpp reports only the oldest and newest position: covers() cannot see the hole.
    assert engine.cells()[2:4] == [None, None] and engine.covers(len(tokens))
    assert engine.view() != engine.cold_view(tokens[:2] + tokens[4:])
    engine.kv_shift(4, -1, -2)
    assert engine.covers(len(tokens) - 2) and engine.view() == engine.cold_view(tokens[:2] + tokens[4:])


def test_fake_sliding_window_drops_old_cells_and_a_tail_removal_leaves_holes() -> None:
    engine = FakeEngine("swa", n_swa=16, n_ubatch=8)
    tokens = [engine.tokenize(f" w{i}", add_special=False)[0] for i in range(60)]
    engine.eval(tokens)
    assert engine.seq_pos_min() == 60 - engine.window_cells and engine.covers(60)
    assert not engine.can_shift() and engine.needs_checkpoints
    assert engine.kv_remove(55, -1) and engine.covers(55)  # the window before 55 is still there
    assert engine.kv_remove(40, -1) and not engine.covers(40)  # cells 25..35 are gone
    assert engine.view() != engine.cold_view(tokens[:40])


@pytest.mark.parametrize("kind", ["recurrent", "hybrid"])
def test_fake_recurrent_state_refuses_partial_removal_and_checkpoints_restore_it(kind: str) -> None:
    engine = FakeEngine(kind)
    tokens = [engine.tokenize(f" w{i}", add_special=False)[0] for i in range(50)]
    engine.eval(tokens[:30])
    saved = engine.checkpoint(30)
    assert saved.partial and saved.size == engine.state_size
    engine.eval(tokens[30:])
    assert engine.kv_remove(30, -1) is False and engine.n_past == 50 and engine.covers(50)
    assert engine.kv_remove(50, -1) is True and engine.n_past == 50  # past the end: nothing to do
    assert engine.restore_checkpoint(saved) and engine.n_past == 30
    assert engine.view() == engine.cold_view(tokens[:30]) and engine.cells() == tokens[:30]


# -- turns ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_each_turn_evaluates_only_its_new_tokens(kind: str) -> None:
    engine = FakeEngine(kind, n_ctx=2048)
    session = _session(engine, max_tokens=16)
    session.set_system("You are terse.")
    for i in range(20):
        before = list(session.tokens)
        engine.perf_reset()
        start = engine.evaluated
        _reply, stats = turn(session, _question(i))
        generated = len(session.tokens) - len(before) - (stats.evaluated_tokens - (1 if i else 0))
        assert session.tokens[: len(before)] == before
        assert stats.reused_tokens == (len(before) - 1 if i else 0) and stats.reevaluated_tokens == 0
        # The fake's own count: the prompt's new tokens plus every generated token but the last.
        assert engine.evaluated - start == stats.evaluated_tokens + stats.completion_tokens - 1
        assert generated == stats.completion_tokens
        check_session(session, engine, after_reply=True)
    assert sum(m["role"] == "user" for m in session.messages) == 20
    assert (len(session.checkpoints) > 0) == (kind != "kv") and not engine.restores


def test_the_reply_depends_on_what_the_cache_holds() -> None:
    """Two sessions with the same history answer the same; a cache that lost the
    start of the window answers otherwise (what lets these tests catch stale cells)."""
    replies = []
    for damage in (False, False, True):
        engine = FakeEngine("kv")
        session = _session(engine, max_tokens=12)
        turn(session, "Hello there, how are you?")
        if damage:
            engine.kv_remove(1, 3)
        replies.append(turn(session, "Tell me more.")[0])
    assert replies[0] == replies[1] != replies[2]


# -- overflow ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["kv", "swa"])
def test_overflow_shifts_without_re_evaluating(kind: str) -> None:
    """A cache that can shift positions (a sliding window too, where llama.cpp allows
    it) drops the oldest turn's cells and shifts the rest back."""
    engine = FakeEngine(kind, n_ctx=256, shift=True)
    session = _session(engine, max_tokens=24)
    session.set_system("You are terse.")
    dropped = 0
    for i in range(30):
        start = engine.evaluated
        _reply, stats = turn(session, _question(i))
        dropped += stats.dropped_turns
        assert len(session.tokens) <= engine.n_ctx
        # Shifting, not re-evaluating: only this turn's tokens were computed.
        assert engine.evaluated - start == stats.evaluated_tokens + stats.completion_tokens - 1
        assert stats.reevaluated_tokens == 0
        assert session.messages[0] == {"role": "system", "content": "You are terse."}
        assert session.tokens[0] == engine.bos_token
        assert session.kv_text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
        check_session(session, engine, after_reply=True)
    assert dropped > 0 and len(session.dropped) == 2 * dropped
    assert session.template.render(session.messages, add_generation_prompt=False).startswith(session.kv_text)


@pytest.mark.parametrize("kind", ROLLBACK_KINDS)
def test_overflow_without_shift_drops_to_half_and_re_evaluates_rarely(kind: str) -> None:
    engine = FakeEngine(kind, n_ctx=512)
    session = _session(engine, max_tokens=24)
    session.set_system("You are terse.")
    reevaluations = 0
    for i in range(40):
        _reply, stats = turn(session, _question(i))
        if stats.dropped_turns:
            reevaluations += 1
            assert stats.reevaluated_tokens > 0 and "cannot shift" in stats.reevaluated_reason
            # Dropped down to half the context at once, so that this comes back rarely.
            assert stats.prompt_tokens + session._reserve() <= engine.n_ctx // 2
        else:
            assert stats.reevaluated_tokens == 0
        assert session.tokens[0] == engine.bos_token
        assert session.messages[0]["role"] == "system"
        check_session(session, engine, after_reply=True)
    assert 0 < reevaluations <= 10


def test_overflow_drop_on_a_template_that_writes_the_bos_keeps_it() -> None:
    """Gemma-style: the template writes the BOS and merges the system prompt into the
    first user turn; dropping that turn keeps both (the system prompt moves into the
    next user turn, which is re-evaluated)."""
    engine = FakeEngine("swa", family="gemma", n_ctx=384)
    session = _session(engine, max_tokens=16)
    session.set_system("Be brief.")
    dropped = 0
    for i in range(25):
        _reply, stats = turn(session, _question(i))
        dropped += stats.dropped_turns
        assert session.tokens[0] == engine.bos_token and session.tokens[1] != engine.bos_token
        assert session.kv_text.startswith("<bos><start_of_turn>user\nBe brief.\n\n")
        check_session(session, engine, after_reply=True)
    assert dropped > 0


def test_overflow_stop_refuses_and_changes_nothing() -> None:
    engine = FakeEngine("kv", n_ctx=256)
    session = _session(engine, max_tokens=30, overflow="stop")
    with pytest.raises(SessionError, match="context is full"):
        for i in range(30):
            turn(session, _question(i))
    tokens, messages, n_past = list(session.tokens), list(session.messages), engine.n_past
    with pytest.raises(SessionError):
        turn(session, "one more")
    assert session.tokens == tokens and session.messages == messages and engine.n_past == n_past
    check_session(session, engine)


def test_a_message_larger_than_the_context_is_refused() -> None:
    engine = FakeEngine("kv", n_ctx=128)
    session = _session(engine, max_tokens=8)
    with pytest.raises(UsageError, match="raise --ctx"):
        turn(session, " ".join(f"w{i}" for i in range(200)))
    assert engine.n_past == 0 and session.tokens == []


# -- templates that rewrite earlier turns ------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ending", ["stopped", "eog"])
def test_a_trimmed_reply_is_re_evaluated_from_the_change_only(kind: str, ending: str) -> None:
    """A Gemma-style template trims every message: a reply that ends in whitespace
    (stopped right after it, as Ctrl-C would, or before its end of turn) renders
    differently next turn. The cache keeps the history up to the change, or goes back
    to the checkpoint before it where the memory cannot remove a tail, and the turn
    says why it evaluates the rest again."""
    engine = FakeEngine(kind, family="gemma", n_ctx=1024)
    session = _session(engine, max_tokens=40)
    engine.script("Fine, thanks.", "apples\npears\n")
    turn(session, "First question.")
    reply, _stats = turn(session, "List two fruits.", stop_after=4 if ending == "stopped" else None)
    assert reply == "apples\npears\n"
    before, reply_at = len(session.tokens), session.turns[-1].reply_token
    check_session(session, engine, after_reply=True)
    _reply, stats = turn(session, "And vegetables?")
    # The history's text after the change counts as re-evaluated, the template's own
    # turn separator included (at most the reply's 4 tokens, its end of turn and that).
    assert 0 < stats.reevaluated_tokens <= 6 and "template rewrote" in stats.reevaluated_reason
    if ending == "stopped" or kind in ("kv", "swa"):  # nothing to remove, or a tail removal
        assert stats.reused_tokens >= before - 3
    else:  # the state cannot drop the whitespace: back to the checkpoint before the reply
        assert engine.restores[-1] == stats.reused_tokens == reply_at - 1
    assert session.tokens[0] == engine.bos_token
    check_session(session, engine, after_reply=True)


def test_a_template_rewrite_keeps_earlier_replies_as_generated() -> None:
    """Generated tokens are never re-tokenized from text (kvchat.session's docstring),
    also when a template rewrite of the last reply forces a resync: the replies before
    it stay cached as generated, and only the changed reply is evaluated again."""
    engine = FakeEngine("kv", family="gemma", n_ctx=1024)
    session = _session(engine, max_tokens=40)
    engine.script(["Fine", ".", ".", " ok"], "apples\npears\n")  # '.' '.' where the tokenizer makes '..'
    turn(session, "First question.")
    first_reply = session.tokens[session.turns[0].reply_token :]
    turn(session, "List two fruits.", stop_after=4)
    before = len(session.tokens)
    _reply, stats = turn(session, "And vegetables?")
    check_session(session, engine, after_reply=True)
    at = session.turns[0].reply_token
    assert session.tokens[at : at + len(first_reply)] == first_reply
    assert stats.reused_tokens >= before - 3 and stats.reevaluated_tokens <= 4


@pytest.mark.parametrize("kind", KINDS)
def test_a_thinking_template_drops_old_reasoning_and_the_cache_follows(kind: str) -> None:
    engine = FakeEngine(kind, family="thinking", n_ctx=1024)
    session = _session(engine, max_tokens=40)
    engine.script("fine", "two and two</think>\n\nfour")
    turn(session, "Hello.")
    events = list(session.send("What is 2 + 2?"))
    assert "".join(e.reasoning_text for e in events) == "two and two"
    assert "".join(e.text for e in events) == "\n\nfour"
    assert session.messages[-1]["content"] == "<think>\ntwo and two</think>\n\nfour"
    user_at, reply_at = session.turns[-1].token, session.turns[-1].reply_token
    check_session(session, engine, after_reply=True)
    _reply, stats = turn(session, "And 3 + 3?")
    # The template drops the reasoning of the reply before the new message: the cache
    # keeps what comes before that reply (on memory that cannot remove a tail: the
    # checkpoint where the exchange began) and evaluates the reply again without it.
    assert "two and two" not in session.kv_text
    # (the checkpoint sits before the newline that ends the previous turn)
    assert stats.reused_tokens >= (reply_at - 2 if kind == "kv" else user_at - 1)
    assert stats.evaluated_tokens == stats.prompt_tokens - stats.reused_tokens
    check_session(session, engine, after_reply=True)


# -- undo and retry ---------------------------------------------------------------------


def test_kv_undo_and_retry_cost_one_token_without_checkpoints() -> None:
    engine = FakeEngine("kv", n_ctx=1024)
    session = _session(engine, max_tokens=16)
    for i in range(3):
        turn(session, _question(i))
    first, _ = turn(session, "Name a tree.")
    again, stats = turn(session, None)
    # The last prompt token is evaluated again by design: not re-evaluation worth a warning.
    assert again == first and stats.evaluated_tokens == 1 and stats.reevaluated_tokens == 0
    assert stats.reevaluated_reason == ""
    check_session(session, engine, after_reply=True)
    user = session.undo()
    assert user == {"role": "user", "content": "Name a tree."}
    assert not session.checkpoints
    check_session(session, engine)
    _reply, stats = turn(session, "Name a bird.")
    assert stats.reevaluated_tokens == 0
    check_session(session, engine, after_reply=True)


@pytest.mark.parametrize("kind", ROLLBACK_KINDS)
def test_undo_and_retry_restore_checkpoints(kind: str) -> None:
    engine = FakeEngine(kind, n_ctx=1024)
    session = _session(engine, max_tokens=32)
    for i in range(4):
        turn(session, _question(i))
    # A long reply: the window no longer covers its start, the state is past it.
    engine.script(" ".join(f"r{i}" for i in range(20)))
    first, _ = turn(session, "one more message")
    engine.script(" ".join(f"r{i}" for i in range(20)))
    restored = len(engine.restores)
    again, stats = turn(session, None)
    assert again == first and stats.evaluated_tokens == 1
    assert len(engine.restores) == restored + 1  # from the checkpoint one token before the reply
    check_session(session, engine, after_reply=True)
    n_history = len(session.tokens)
    session.undo()
    assert engine.restores[-1] == engine.n_past and engine.n_past < len(session.tokens) < n_history
    check_session(session, engine)
    _reply, stats = turn(session, "another message")
    assert 0 < stats.reevaluated_tokens <= 3 and stats.reevaluated_reason == "undo"
    check_session(session, engine, after_reply=True)


@pytest.mark.parametrize("kind", KINDS)
def test_a_system_prompt_the_user_changed_is_not_blamed_on_the_template(kind: str) -> None:
    # Issue 23, item 13: what follows a changed system prompt is new work the user asked
    # for, not history the cache lost ("the chat template rewrote earlier turns").
    engine = FakeEngine(kind, n_ctx=1024)
    session = _session(engine, max_tokens=8)
    session.set_system("You are terse.")
    for i in range(2):
        turn(session, _question(i))
    n_history = len(session.tokens)
    session.set_system("You answer in one word.")
    _reply, stats = turn(session, "Name a fruit.")
    if kind == "kv":
        assert stats.reevaluated_tokens == 0 and stats.reevaluated_reason == ""
    else:  # rolled back to a checkpoint before the change: those few tokens, and why
        assert stats.reevaluated_reason in ("", "the system prompt changed")
    assert stats.reused_tokens < n_history
    assert stats.evaluated_tokens == stats.prompt_tokens - stats.reused_tokens
    check_session(session, engine, after_reply=True)


def test_without_checkpoints_undo_re_evaluates_and_says_so() -> None:
    engine = FakeEngine("hybrid", n_ctx=1024)
    session = _session(engine, max_tokens=12, checkpoint_max=0)
    for i in range(4):
        turn(session, _question(i))
    n_history = len(session.tokens)
    session.undo()
    assert engine.n_past == 0  # nothing to roll back to: emptied, not left wrong
    check_session(session, engine)
    _reply, stats = turn(session, "after undo")
    assert stats.reevaluated_tokens > n_history // 2 and stats.reevaluated_reason == "undo"
    check_session(session, engine, after_reply=True)


def test_undo_without_an_exchange_is_refused() -> None:
    session = _session(FakeEngine("hybrid"), max_tokens=4)
    with pytest.raises(SessionError, match="no exchange"):
        session.undo()


# -- interrupts ----------------------------------------------------------------------------


class _StopPrefill(Exception):
    pass


@pytest.mark.parametrize("kind", KINDS)
def test_interrupted_prefill_keeps_history_and_cache_in_step(kind: str) -> None:
    engine = FakeEngine(kind, n_ctx=1024, n_batch=16)
    session = _session(engine, max_tokens=12)
    for i in range(3):
        turn(session, _question(i))
    tokens, messages = list(session.tokens), list(session.messages)

    def stop(done: int, total: int) -> None:
        if done >= 32:  # two chunks in, as Ctrl-C would
            raise _StopPrefill

    session.on_prefill = stop
    sent = session.send("interrupted " * 40)
    with pytest.raises(_StopPrefill):
        list(sent)
    session.on_prefill = None
    assert session.tokens == tokens and session.messages == messages
    assert sent.stats.stop_reason == "interrupted"
    # The previous reply's last token was evaluated with the prefill and stays.
    assert engine.n_past == len(tokens)
    check_session(session, engine)
    _reply, stats = turn(session, "after the interrupt")
    assert stats.reevaluated_tokens == 0 and stats.reused_tokens == len(tokens)
    check_session(session, engine, after_reply=True)


@pytest.mark.parametrize("kind", KINDS)
def test_interrupted_reply_is_kept_consistently(kind: str) -> None:
    engine = FakeEngine(kind, n_ctx=1024)
    session = _session(engine, max_tokens=200)
    turn(session, "Hello.")
    engine.script(" ".join(f"hello{i}" for i in range(50)))
    stream = session.send("Repeat the word hello 50 times.")
    partial = [next(stream) for _ in range(10)]
    stream.close()
    assert stream.stats.stop_reason == "interrupted"
    assert session.messages[-1] == {"role": "assistant", "content": "".join(e.text for e in partial)}
    assert session.tokens[-10:] == [e.token for e in partial]
    check_session(session, engine, after_reply=True)
    before = len(session.tokens)
    _reply, stats = turn(session, "Thanks.")
    assert stats.reused_tokens == before - 1 and stats.reevaluated_tokens == 0
    check_session(session, engine, after_reply=True)


def test_a_reply_cut_inside_a_character_leaves_the_cached_text_true() -> None:
    engine = FakeEngine("kv")
    session = _session(engine, max_tokens=1)
    engine.script("日本")
    reply, _ = turn(session, "日本")
    assert reply == "\ufffd" and session.kv_text.endswith("\ufffd")
    check_session(session, engine, after_reply=True)
    before = list(session.tokens)
    _reply, stats = turn(session, "ok")
    assert session.tokens[: len(before)] == before and stats.reevaluated_tokens == 0
    check_session(session, engine, after_reply=True)


# -- checkpoints -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ROLLBACK_KINDS)
def test_checkpoints_are_bounded_by_count_and_size(kind: str) -> None:
    engine = FakeEngine(kind, n_ctx=2048)
    session = _session(engine, max_tokens=8, checkpoint_max=3)
    for i in range(8):
        turn(session, _question(i))
        assert len(session.checkpoints) <= 3
        check_session(session, engine, after_reply=True)
    # The oldest go first: what is kept is the latest, the last one just before the reply.
    assert [c.n_tokens for c in session.checkpoints] == sorted(c.n_tokens for c in session.checkpoints)
    assert session.checkpoints[-1].n_tokens == session.turns[-1].reply_token - 1
    one = session.checkpoints[-1].checkpoint.size
    session.checkpoint_max, session.checkpoint_mib = 8, 2.5 * one / (1024 * 1024)
    for i in range(4):
        turn(session, _question(i))
        assert session.checkpoint_bytes <= 2.5 * one * 1.5  # windows vary a little in size
        check_session(session, engine, after_reply=True)
    assert 1 <= len(session.checkpoints) <= 3


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_restore_resume_without_re_evaluating(kind: str) -> None:
    engine = FakeEngine(kind, n_ctx=1024)
    session = _session(engine, max_tokens=12)
    for i in range(3):
        turn(session, _question(i))
    record, tokens, state = session.to_record(), list(session.tokens), engine.state_bytes()
    engine.kv_clear()
    resumed = _session(engine, max_tokens=12)
    assert resumed.restore(record, tokens, state) == 0
    check_session(resumed, engine, after_reply=True)
    _reply, stats = turn(resumed, "Again.")
    assert stats.reused_tokens == len(tokens) - 1 and stats.reevaluated_tokens == 0
    check_session(resumed, engine, after_reply=True)


def test_check_session_catches_a_window_with_holes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The safety net itself: were covers() to miss the holes a tail removal leaves in
    a sliding window, undo would keep that window, and the check says so."""
    engine = FakeEngine("swa", n_ctx=1024)
    session = _session(engine, max_tokens=32)
    turn(session, _question(0))
    engine.script(" ".join(f"r{i}" for i in range(30)))
    turn(session, "A long reply, please.")
    monkeypatch.setattr(engine, "covers", lambda n_tokens: True)
    session.undo()
    monkeypatch.undo()
    with pytest.raises(AssertionError, match="another context|other tokens"):
        check_session(session, engine)


# -- a conversation sent whole (kvchat serve) ------------------------------------------------


def _answer(session: Session, messages: list[dict[str, str]]) -> tuple[str, TurnStats]:
    stream = session.answer(messages)
    text = "".join(event.text for event in stream)
    stream.close()
    return text, stream.stats


@pytest.mark.parametrize("kind", KINDS)
def test_a_conversation_sent_whole_evaluates_only_what_is_new(kind: str) -> None:
    engine = FakeEngine(kind, n_ctx=2048)
    session = _session(engine, max_tokens=12, overflow="stop")
    messages = [{"role": "system", "content": "You are terse. " * 20}]
    for i in range(6):
        messages.append({"role": "user", "content": _question(i)})
        before = len(session.tokens)
        reply, stats = _answer(session, messages)
        messages.append({"role": "assistant", "content": reply})
        assert stats.reevaluated_tokens == 0
        if i:
            # The last reply's final token, and the new message with the template around it.
            assert stats.reused_tokens == before - 1
            assert stats.evaluated_tokens < 40
        check_session(session, engine, after_reply=True)
    assert session.messages == messages


def test_another_conversation_sent_whole_keeps_the_common_start_only() -> None:
    engine = FakeEngine("kv", n_ctx=2048)
    session = _session(engine, max_tokens=8, overflow="stop")
    system = {"role": "system", "content": "You are terse. " * 20}
    _answer(session, [system, {"role": "user", "content": _question(1)}])
    kept = len(engine.tokenize(session.template.render([system], add_generation_prompt=False),
                               add_special=True))
    fresh_engine = FakeEngine("kv", n_ctx=2048)
    fresh = _session(fresh_engine, max_tokens=8, overflow="stop")
    other = [system, {"role": "user", "content": _question(2)}]
    reply, stats = _answer(session, other)
    assert stats.reused_tokens >= kept - 2
    assert reply == _answer(fresh, other)[0]  # as if the first conversation had never been
    check_session(session, engine, after_reply=True)
    assert session.messages == [*other, {"role": "assistant", "content": reply}]


def test_adopt_takes_a_history_whose_cells_the_engine_holds() -> None:
    engine = FakeEngine("kv", n_ctx=2048)
    session = _session(engine, max_tokens=8, overflow="stop")
    messages = [{"role": "user", "content": _question(1)}]
    reply, _ = _answer(session, messages)
    record, tokens, n = session.to_record(), list(session.tokens), engine.n_past
    state = engine.state_bytes()
    other_engine = FakeEngine("kv", n_ctx=2048)
    other_engine.load_state_bytes(state, n)
    adopted = _session(other_engine, max_tokens=8, overflow="stop")
    adopted.adopt(record, tokens)
    check_session(adopted, other_engine, after_reply=True)
    follow = [*messages, {"role": "assistant", "content": reply}, {"role": "user", "content": _question(2)}]
    _, stats = _answer(adopted, follow)
    assert stats.reused_tokens == n and stats.evaluated_tokens < 30
    assert _answer(session, follow)[0] == adopted.messages[-1]["content"]  # the same cache, the same reply
