"""Speculative decoding on the real model: the same tokens as plain decoding, and a
KV cache that never keeps a rejected draft token."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvchat.app import chat_template_for
from kvchat.cache_types import parse_cache_type
from kvchat.conversation import TurnStats
from kvchat.engine import Engine, EngineSettings
from kvchat.engine_api import ChatEngine, SamplingSettings, TokenEvent
from kvchat.session import Session
from kvchat.speculative import DraftPolicy, ModelDrafter, NgramDrafter, Speculator, vocab_mismatch
from kvchat.speculative_engine import SpeculativeEngine

F16 = parse_cache_type("f16")
GREEDY = SamplingSettings(temperature=0, seed=1)
# Batched and one-token evaluation may round differently in the last bits: a token
# may flip only where the two best logits are this close.
TIE_MARGIN = 0.05

TEXT = """The river rises in the hills above the old mill town. In spring it floods the
meadows, and the farmers move their sheep to the higher fields. In summer the water
runs low and clear, and children wade across the shallows to the island where the
herons nest. In autumn the leaves turn the current gold and red. In winter the
edges freeze, and the mill wheel stands still until the thaw."""

PROMPTS = [
    f"Repeat the following text exactly, word for word:\n\n{TEXT}",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
    "Add a docstring to each function above and print the whole code again.",
    "Write a short story about a lighthouse keeper.",
]


def _settings(n_ctx: int = 4096) -> EngineSettings:
    return EngineSettings(n_ctx=n_ctx, type_k=F16, type_v=F16, n_threads=2)


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[Engine]:
    with Engine(model_path, _settings()) as eng:
        yield eng


def _speculator(n_draft: int = 4) -> Speculator:
    # Start drafting at once: the timing-driven pause is tested without a model.
    return Speculator(NgramDrafter(), DraftPolicy(n_draft=n_draft, t_plain_s=0.01, min_gain=0.0))


def _with(engine: Engine, speculator: Speculator | None) -> ChatEngine:
    """`engine`, drafting with `speculator` (not closed here: the module's engine, and the
    speculator's counters, outlive each test's wrapper)."""
    return engine if speculator is None else SpeculativeEngine(engine, speculator)


def _reply(engine: Engine, prompt: str, *, speculator: Speculator | None, max_tokens: int = 64,
           sampling: SamplingSettings = GREEDY) -> tuple[list[int], Session, TurnStats]:
    engine.kv_clear()
    chat = _with(engine, speculator)
    session = Session(chat, chat_template_for(engine), sampling, max_tokens)
    turn = session.send(prompt)
    tokens = [e.token for e in turn]
    return tokens, session, turn.stats


def _explain_difference(engine: Engine, history: list[int], plain: list[int], spec: list[int]) -> None:
    """Where the two replies part, plain decoding faced a near-tie that batched evaluation
    alone tips the other way.

    Batched and one-token evaluation round differently (on this CPU build and Q4_1
    model, logits of the same position differ by up to about one unit somewhere in the
    vocabulary). So the test rebuilds the logits plain decoding saw (prompt in one
    batch, reply one token at a time) and asserts: the two tokens are its best two
    (in either order: see below), and their gap is smaller than the change batched
    evaluation makes at that position.
    """
    at = next(i for i, (a, b) in enumerate(zip(plain, spec, strict=False)) if a != b)
    engine.kv_clear()
    *_, batched = engine.eval_logits(history + plain[:at])
    engine.kv_clear()
    if at == 0:
        *_, rows = engine.eval_logits(history)
    else:
        engine.eval(history)
        for token in plain[: at - 1]:
            engine.eval([token])
        rows = next(engine.eval_logits(plain[at - 1 : at]))
    seen = rows[-1]
    best = np.argsort(seen)[-2:]
    # The rebuild's prefill is split into other batches than the plain run's (its
    # chunks follow the clock), which rounds differently again: at a near-tie it may
    # rank the two the other way round, so their order is not checked.
    assert {int(best[0]), int(best[1])} == {plain[at], spec[at]}, (at, best, plain[at], spec[at])
    gap = float(seen[best[1]] - seen[best[0]])
    noise = float(np.abs(seen - batched[-1]).max())
    assert gap < noise, f"token {at}: a gap of {gap:.4f} is beyond batched rounding ({noise:.4f})"


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS, ids=["repeat", "docstrings", "story"])
def test_ngram_gives_the_tokens_of_plain_decoding(engine: Engine, prompt: str) -> None:
    plain, plain_session, _ = _reply(engine, prompt, speculator=None)
    speculator = _speculator()
    spec, session, stats = _reply(engine, prompt, speculator=speculator)
    history = plain_session.tokens[: len(plain_session.tokens) - len(plain)]
    if spec != plain:
        _explain_difference(engine, history, plain, spec)
    assert stats.drafted_tokens == speculator.counters.drafted
    assert stats.accepted_tokens == speculator.counters.accepted


def test_the_greedy_shortcut_picks_what_the_native_greedy_sampler_picks(engine: Engine) -> None:
    """At temperature 0 `Engine.sample` takes numpy's argmax instead of running the
    native chain; at every output of a batch it must pick the native greedy token."""
    import llama_cpp.llama_cpp as llama

    engine.set_sampling(GREEDY)
    engine.kv_clear()
    tokens = engine.tokenize(TEXT, add_special=True)
    engine.eval_batch(tokens)
    native = llama.llama_sampler_init_greedy()
    try:
        for i in range(len(tokens)):
            assert engine.sample(i) == llama.llama_sampler_sample(native, engine._ctx, i), i
    finally:
        llama.llama_sampler_free(native)
        engine.kv_clear()


@pytest.mark.slow
def test_copying_prompts_accept_most_drafts(engine: Engine) -> None:
    speculator = _speculator()
    tokens, _session, turn = _reply(engine, PROMPTS[0], speculator=speculator)
    assert turn.drafted_tokens > 0
    assert turn.accepted_tokens >= 0.5 * len(tokens), (turn.accepted_tokens, len(tokens))


def _cache_matches(engine: Engine, n_tokens: int) -> None:
    oldest, newest = engine.kv_span()
    assert engine.n_past == n_tokens
    assert (oldest, newest) == ((0, n_tokens - 1) if n_tokens else (-1, -1))


@pytest.mark.slow
def test_the_cache_holds_the_history_after_every_token(engine: Engine) -> None:
    engine.kv_clear()
    prompt = engine.tokenize(PROMPTS[0], add_special=True)
    engine.eval(prompt)
    engine.set_sampling(GREEDY)
    events: list[TokenEvent] = []
    ahead: list[int] = []
    for event in SpeculativeEngine(engine, _speculator(n_draft=8)).generate(100, context=prompt):
        events.append(event)
        oldest, newest = engine.kv_span()
        assert (oldest, newest + 1) == (0, engine.n_past)
        # Everything yielded but the last token is in the cache, plus at most the
        # accepted tokens of this step still to be yielded; never a rejected one.
        ahead.append(engine.n_past - (len(prompt) + len(events) - 1))
    for j, excess in enumerate(ahead):
        assert excess >= 0
        following = events[j + 1 : j + 1 + excess]
        assert len(following) == excess and all(e.drafted == 0 for e in following)
        assert ahead[j + 1 : j + 1 + excess] == list(range(excess - 1, -1, -1))
    assert sum(e.drafted for e in events) > sum(e.accepted for e in events) > 0
    assert max(ahead) > 0  # some steps did keep several tokens
    _cache_matches(engine, len(prompt) + len(events) - 1)


@pytest.mark.slow
def test_stopping_inside_a_verified_draft_leaves_only_what_was_yielded(engine: Engine) -> None:
    engine.kv_clear()
    prompt = engine.tokenize(PROMPTS[0], add_special=True)
    engine.eval(prompt)
    engine.set_sampling(GREEDY)
    stream = SpeculativeEngine(engine, _speculator(n_draft=16)).generate(None, context=prompt)
    taken = []
    for event in stream:
        taken.append(event)
        if event.accepted >= 3:  # the first token of a step with more to come
            break
    stream.close()
    assert taken[-1].accepted >= 3
    _cache_matches(engine, len(prompt) + len(taken) - 1)
    # max_tokens inside a step: the same rule.
    engine.kv_clear()
    engine.eval(prompt)
    events = list(SpeculativeEngine(engine, _speculator(n_draft=16)).generate(37, context=prompt))
    assert len(events) == 37
    _cache_matches(engine, len(prompt) + 36)


class _RecordingDrafter(NgramDrafter):
    """An n-gram drafter that remembers every draft it made."""

    def __init__(self) -> None:
        super().__init__()
        self.drafts: list[list[int]] = []

    def draft(self, context: list[int], n_max: int) -> list[int]:  # type: ignore[override]
        made = super().draft(context, n_max)
        if made:
            self.drafts.append(made)
        return made


@pytest.mark.slow
def test_at_temperature_a_draft_token_is_kept_only_where_the_target_sampled_it(engine: Engine) -> None:
    warm = SamplingSettings(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, seed=7)
    drafter = _RecordingDrafter()
    speculator = Speculator(drafter, DraftPolicy(n_draft=4, t_plain_s=0.01, min_gain=0.0))
    engine.kv_clear()
    chat = SpeculativeEngine(engine, speculator)
    session = Session(chat, chat_template_for(engine), warm, 64)
    events = list(session.send(PROMPTS[0]))
    steps = [j for j, e in enumerate(events) if e.drafted]
    assert len(steps) == len(drafter.drafts) > 0
    for j, draft in zip(steps, drafter.drafts, strict=True):
        event = events[j]
        assert event.drafted == len(draft)
        kept = [e.token for e in events[j : j + event.accepted]]
        # The accepted tokens are the draft's first ones, sampled by the target one by one;
        # the token after them is the target's own choice, never the rejected draft token.
        assert kept == draft[: event.accepted]
        nxt = j + event.accepted
        if event.accepted < len(draft) and nxt < len(events):
            assert events[nxt].token != draft[event.accepted]
    assert sum(e.accepted for e in events) > 0


@pytest.mark.slow
def test_sessions_across_turns_keep_the_same_tokens(engine: Engine) -> None:
    turns = [PROMPTS[0], "Now say it again, shorter.", "Thanks. Repeat the first sentence."]

    def conversation(speculator: Speculator | None) -> list[tuple[list[int], list[int]]]:
        """(history before the reply, reply) of every turn."""
        engine.kv_clear()
        chat = _with(engine, speculator)
        replies = []
        session = Session(chat, chat_template_for(engine), GREEDY, 40)
        for text in turns:
            reply = [e.token for e in session.send(text)]
            _cache_matches(engine, len(session.tokens) - 1)
            replies.append((session.tokens[: len(session.tokens) - len(reply)], reply))
        return replies

    plain = conversation(None)
    spec = conversation(_speculator())
    for (history, plain_reply), (spec_history, spec_reply) in zip(plain, spec, strict=True):
        assert spec_history == history
        if spec_reply != plain_reply:
            _explain_difference(engine, history, plain_reply, spec_reply)
            break  # the conversations part here, by a tie


@pytest.mark.slow
def test_a_draft_model_gives_the_tokens_of_plain_decoding(engine: Engine, model_path: Path) -> None:
    # SmolLM2 as its own draft model: only the mechanics are checked (no speed-up).
    draft = Engine(model_path, _settings())
    assert vocab_mismatch(engine, draft) is None
    draft.set_sampling(GREEDY)
    speculator = Speculator(ModelDrafter(draft, engine.n_vocab),
                            DraftPolicy(n_draft=4, t_plain_s=0.01, min_gain=0.0))
    try:
        for prompt in (PROMPTS[0], PROMPTS[2]):
            plain, plain_session, _ = _reply(engine, prompt, speculator=None, max_tokens=40)
            spec, _session, stats = _reply(engine, prompt, speculator=speculator, max_tokens=40)
            if spec != plain:
                history = plain_session.tokens[: len(plain_session.tokens) - len(plain)]
                _explain_difference(engine, history, plain, spec)
            # The same model drafting greedily (one token at a time) against batched
            # verification: most drafts are kept; the rest part at near-ties that batched
            # rounding tips (measured 71% on the story prompt on a loaded 2-core CPU).
            assert stats.acceptance > 0.5
    finally:
        speculator.close()


def test_a_model_with_another_vocabulary_cannot_draft(engine: Engine, gemma_path: Path) -> None:
    with Engine(gemma_path, _settings(512)) as gemma:
        reason = vocab_mismatch(engine, gemma)
    assert reason is not None and "vocabulary sizes differ" in reason


def test_the_header_s_vocabulary_is_the_loaded_one(engine: Engine, model_path: Path,
                                                   gemma_path: Path) -> None:
    # `estimate --draft` checks vocabularies from GGUF headers with the rule `run --draft` applies
    # to loaded models: the header must say what llama.cpp loads.
    from kvchat.model_spec import read_spec

    vocab = read_spec(str(model_path)).vocabulary
    assert vocab is not None and vocab.n_vocab == engine.n_vocab
    assert (vocab.bos_token, vocab.eos_token, vocab.add_bos) == (engine.bos_token, engine.eos_token,
                                                                  engine.add_bos)
    assert all(vocab.token_text(t) == engine.token_text(t) for t in range(engine.n_vocab))
    assert vocab_mismatch(vocab, engine) is None
    gemma = read_spec(str(gemma_path)).vocabulary
    assert gemma is not None and "vocabulary sizes differ" in (vocab_mismatch(vocab, gemma) or "")
