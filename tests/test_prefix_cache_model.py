"""The prefix cache on the real models: llama.cpp's states cut and join exactly, and
answers at temperature 0 are the same with the cache as without it."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from kvchat import kv_state
from kvchat.app import chat_template_for
from kvchat.cache_types import parse_cache_type
from kvchat.conversation import TurnStats
from kvchat.engine import Engine, EngineSettings
from kvchat.engine_api import SamplingSettings
from kvchat.kv_files import read_block_head
from kvchat.prefix_cache import Fingerprint, PrefixCache, Store
from kvchat.session import Session

F16 = parse_cache_type("f16")
GREEDY = SamplingSettings(temperature=0, seed=1)
_VOCAB = ("the device reset button error code manual battery light blinks twice when power is "
          "low press hold seconds until screen shows menu select settings factory restore warranty "
          "covers parts labour service centre contact support email phone hours weekday firmware update")
WORDS = tuple(_VOCAB.split())


def document(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    sentences = []
    while sum(len(s.split()) for s in sentences) < n_words:
        words = [rng.choice(WORDS) for _ in range(rng.randrange(6, 14))]
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


def fingerprint(engine: Engine) -> Fingerprint:
    s = engine.settings
    return Fingerprint("test-" + engine.model_path.name, engine.model_path.name, s.type_k.name,
                       s.type_v.name, engine.flash_attn, s.swa_full, 0, s.n_batch, s.n_ubatch, "test")


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[Engine]:
    # One thread: these tests compare token ids, not speed, on a machine shared with others.
    with Engine(model_path, EngineSettings(n_ctx=2048, type_k=F16, type_v=F16, n_threads=1,
                                           flash_attn="off")) as eng:
        yield eng


def text_of(engine: Engine, tokens: list[int]) -> str:
    return b"".join(engine.token_piece(t) for t in tokens).decode("utf-8", errors="replace")


def answer(engine: Engine, prompt: str, *, cache: PrefixCache | None, system: str | None = None,
           shared_chars: int | None = None, max_tokens: int = 8) -> tuple[list[int], TurnStats]:
    engine.kv_clear()
    session = Session(engine, chat_template_for(engine), GREEDY, max_tokens=max_tokens)
    session.prefix_cache = cache
    if system:
        session.set_system(system)
    turn = session.send(prompt, shared_chars=shared_chars)
    tokens = [e.token for e in turn]
    return tokens, turn.stats


def test_cut_and_join_rebuild_llamacpps_own_state(engine: Engine) -> None:
    engine.kv_clear()
    engine.eval(engine.tokenize(document(400), add_special=True)[:300])
    state = kv_state.parse(engine.state_bytes())
    (part,) = state.parts
    assert part.complete and part.n_cells == 300 and part.v_trans == 1
    pieces = [kv_state.parse_part(memoryview(kv_state.cut(part, a, b))) for a, b in ((0, 100), (100, 300))]
    joined = kv_state.join([(p, 0, p.n_cells) for p in pieces])
    assert state.header + joined == engine.state_bytes()
    engine.load_state_bytes(state.header + kv_state.cut(part, 0, 100), 100)
    assert engine.n_past == 100


@pytest.mark.slow
def test_answers_with_the_cache_equal_answers_without(engine: Engine, tmp_path: Path) -> None:
    cache = PrefixCache(fingerprint(engine), store=Store(tmp_path), min_tokens=32, block_tokens=64)
    doc = document(160)
    questions = ["How do I reset the device?", "What does the light mean?", "Who do I contact?"]
    restored = []
    for i, question in enumerate(questions):
        prompt = f"{doc}\n\n{question}"
        system = "You answer from the manual." if i % 2 else None
        plain, _ = answer(engine, prompt, cache=None, system=system)
        cached, stats = answer(engine, prompt, cache=cache, system=system, shared_chars=len(doc))
        assert cached == plain, question
        turn = stats
        restored.append(turn.prefix_cache_tokens)
        assert turn.evaluated_tokens + turn.prefix_cache_tokens == turn.prompt_tokens
    assert restored[0] == 0  # nothing stored yet
    assert restored[2] > 0  # the first prompt's start (no system prompt) serves the third
    # The system prompt changes every token after it: the second prompt shares nothing.
    assert restored[1] == 0


@pytest.mark.slow
def test_a_prefix_the_tokenizer_merges_differently_is_not_used(engine: Engine, tmp_path: Path) -> None:
    cache = PrefixCache(fingerprint(engine), store=Store(tmp_path), min_tokens=64, block_tokens=4096)
    template = chat_template_for(engine)
    doc = document(120, seed=3)

    def tokens_of(content: str) -> list[int]:
        text = template.render([{"role": "user", "content": content}], add_generation_prompt=True)
        return engine.tokenize(text, add_special=True)

    stored = tokens_of(f"{doc} Look at the\n\nWhat now?")
    cut = next(k for k in range(len(stored), 0, -1)
               if text_of(engine, stored[:k]).endswith("Look at the"))
    engine.kv_clear()
    cache.prefill(engine, stored, [cut])
    cache.commit()
    assert {e.end for e in Store(tmp_path).read_index().values()} == {cut}
    # "the" then "re": the same characters up to the cut, another token there (" there").
    longer = f"{doc} Look at there\n\nWhat now?"
    assert text_of(engine, tokens_of(longer)).startswith(text_of(engine, stored[:cut]))
    assert tokens_of(longer)[:cut] != stored[:cut]
    plain, _ = answer(engine, longer, cache=None)
    cached, stats = answer(engine, longer, cache=cache)
    assert cached == plain
    assert stats.prefix_cache_tokens == 0


@pytest.mark.slow
def test_gemma_sliding_window_resumes_exactly(gemma_path: Path, tmp_path: Path) -> None:
    settings = EngineSettings(n_ctx=2048, type_k=F16, type_v=F16, n_threads=1, flash_attn="off")
    with Engine(gemma_path, settings) as gemma:
        assert gemma.memory_kind == "swa"
        cache = PrefixCache(fingerprint(gemma), store=Store(tmp_path), min_tokens=64, block_tokens=256,
                            memory_kind=gemma.memory_kind)
        doc = document(720, seed=5)  # ~830 tokens, past the 512-token window
        results = []
        for question in ("How do I reset the device?", "What is covered?"):
            prompt = f"{doc}\n\n{question}"
            plain, _ = answer(gemma, prompt, cache=None)
            cached, stats = answer(gemma, prompt, cache=cache, shared_chars=len(doc))
            assert cached == plain, question
            results.append(stats.prefix_cache_tokens)
        assert results[0] == 0 and results[1] > 512
        store = Store(tmp_path)
        entries = store.read_index().values()
        own = {e.key: read_block_head(store.block_path(e.block)).tokens for e in entries}
        kinds = {kind for e in entries for kind, _ in store.read_segment(e, [0] * e.start + own[e.key]).parts}
        # Full-attention cells cut into segments; the window kept whole at the piped
        # document's end, and not at the block boundary (768) just before it.
        assert kinds == {0, 1, 2}
        assert sorted((e.end, e.resumable) for e in entries)[-2:] == [(768, False), (results[1], True)]


def test_another_fingerprint_finds_nothing(engine: Engine, tmp_path: Path) -> None:
    fp = fingerprint(engine)
    cache = PrefixCache(fp, store=Store(tmp_path), min_tokens=64, block_tokens=128)
    doc = document(100, seed=9)
    answer(engine, f"{doc}\n\nWhy?", cache=cache, shared_chars=len(doc), max_tokens=2)
    other = PrefixCache(replace(fp, type_k="q8_0"), store=Store(tmp_path), min_tokens=64, block_tokens=128)
    _, stats = answer(engine, f"{doc}\n\nHow?", cache=other, shared_chars=len(doc), max_tokens=2)
    assert stats.prefix_cache_tokens == 0
    _, stats = answer(engine, f"{doc}\n\nHow?", cache=cache, shared_chars=len(doc), max_tokens=2)
    assert stats.prefix_cache_tokens > 0


def _run_json(kvchat, *args: str, stdin: str) -> dict:  # noqa: ANN001
    result = kvchat("run", "--json", "--temperature", "0", "-n", "6", "--ctx", "2048", "--threads", "1",
                    *args, stdin=stdin)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_run_restores_the_piped_document_from_disk(kvchat, kv_env: dict[str, str]) -> None:
    doc = document(250, seed=11)
    first = _run_json(kvchat, "How do I reset it?", stdin=doc)
    second = _run_json(kvchat, "What does the light mean?", stdin=doc)
    plain = _run_json(kvchat, "What does the light mean?", "--no-prefix-cache", stdin=doc)
    assert first["cache"]["prefix_cache_tokens"] == 0
    assert second["cache"]["prefix_cache_tokens"] > 250
    assert second["cache"]["evaluated_tokens"] < 40
    assert plain["cache"]["prefix_cache_tokens"] == 0
    assert second["text"] == plain["text"]
    stats = kvchat("run", "--stats", "-n", "2", "--threads", "1", "Again?", stdin=doc)
    assert "tokens from the prefix cache" in stats.stderr
    listed = json.loads(kvchat("cache", "list", "--json").stdout)
    assert listed and all(e["model"] == "smollm2-135m" and e["file"].endswith(".gguf") for e in listed)
    assert sum(e["hits"] for e in listed) >= 2
    paths = kvchat("paths").stdout
    assert "prefix cache" in paths and str(Path(kv_env["KVCHAT_HOME"]) / "kv-store" / "prefix") in paths
    assert json.loads(kvchat("cache", "stats", "--json").stdout)["entries"] == len(listed)
    assert kvchat("cache", "clear").returncode == 2  # piped stdin: no confirmation, no deletion
    assert kvchat("cache", "clear", "--yes").returncode == 0
    assert json.loads(kvchat("cache", "stats", "--json").stdout)["entries"] == 0


def test_short_prompts_print_nothing_about_the_cache(kvchat) -> None:
    result = kvchat("run", "--stats", "-n", "2", "--threads", "1", "Hi")
    assert result.returncode == 0, result.stderr
    assert "prefix cache" not in result.stderr


def test_a_prefix_stored_at_one_context_size_serves_another(engine: Engine, model_path: Path,
                                                             tmp_path: Path) -> None:
    """n_ctx is not in the key: a state holds cells, and loads into any context with room."""
    cache = PrefixCache(fingerprint(engine), store=Store(tmp_path), min_tokens=32, block_tokens=64)
    doc = document(100, seed=13)
    answer(engine, f"{doc}\n\nWhy?", cache=cache, shared_chars=len(doc), max_tokens=2)
    settings = replace(engine.settings, n_ctx=4096)
    with Engine(model_path, settings) as bigger:
        plain, _ = answer(bigger, f"{doc}\n\nHow?", cache=None, max_tokens=6)
        cached, stats = answer(bigger, f"{doc}\n\nHow?", cache=PrefixCache(
            fingerprint(bigger), store=Store(tmp_path), min_tokens=32, block_tokens=64), max_tokens=6,
            shared_chars=len(doc))
    assert stats.prefix_cache_tokens > 64
    assert cached == plain


class _WholeStateOnly:
    """The engine seen without its range reads: the prefix cache cuts whole states."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def n_past(self) -> int:
        return self._engine.n_past

    def eval(self, tokens: list[int], progress: object = None) -> None:
        self._engine.eval(tokens)

    def state_bytes(self) -> bytes:
        return self._engine.state_bytes()

    def load_state_bytes(self, data: bytes, n_tokens: int) -> None:
        self._engine.load_state_bytes(data, n_tokens)

    def kv_clear(self) -> None:
        self._engine.kv_clear()


@pytest.mark.slow
def test_segments_read_by_range_are_the_cuts_of_the_whole_state(engine: Engine, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain KV cache's segments are read cell range by cell range (never the whole
    history at each boundary); the files are byte for byte what cutting whole states gave."""
    tokens = engine.tokenize(document(400), add_special=True)[:300]
    stored = {}
    for name, seen in (("ranges", engine), ("whole", _WholeStateOnly(engine))):
        engine.kv_clear()
        cache = PrefixCache(fingerprint(engine), store=Store(tmp_path / name), min_tokens=32, block_tokens=64)
        with monkeypatch.context() as m:
            if name == "ranges":
                m.setattr(engine, "state_bytes", lambda: pytest.fail("the whole state was read"))
            cache.prefill(seen, tokens, marks=(100,))  # type: ignore[arg-type]
        assert cache.commit() > 0
        stored[name] = {p.name: p.read_bytes() for p in (tmp_path / name / "blocks").glob("*/*.kvb")}
    assert len(stored["ranges"]) == 5 and stored["ranges"] == stored["whole"]  # 64 100 128 192 256
