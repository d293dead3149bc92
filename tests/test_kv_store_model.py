"""The KV store on the real model: a range of cells read through the scratch sequence
is byte for byte the cut of the whole state, ranges restored one after another give
the cache back exactly (same bytes, same logits, same greedy continuation), and a
sliding-window model is saved whole."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvchat import kv_state
from kvchat.cache_types import parse_cache_type
from kvchat.engine import Engine, EngineSettings
from kvchat.engine_api import SamplingSettings
from kvchat.errors import SessionError
from kvchat.kv_store import SESSION, KvStore

F16 = parse_cache_type("f16")
GREEDY = SamplingSettings(temperature=0, seed=1)
FP = b"\x07" * 32

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[Engine]:
    # One thread: these tests compare bytes and token ids, not speed.
    with Engine(model_path, EngineSettings(n_ctx=2048, type_k=F16, type_v=F16, n_threads=1,
                                           flash_attn="off")) as eng:
        eng.set_sampling(GREEDY)
        yield eng


def history(engine: Engine, n: int) -> list[int]:
    rng = random.Random(n)
    words = ("the", "device", "reset", "button", "error", "code", "manual", "battery", "light",
             "blinks", "when", "power", "is", "low")
    text = " ".join(rng.choice(words) for _ in range(n))
    return engine.tokenize(text, add_special=True)[:n]


def continuation(engine: Engine, last: int, n: int = 12) -> list[int]:
    """Evaluate the history's last token, then the greedy reply (its logits are what the
    restored cells feed)."""
    engine.eval([last])
    return [event.token for event in engine.generate(max_tokens=n, stop_at_eog=False)]


def test_a_range_read_is_the_cut_of_the_whole_state(engine: Engine) -> None:
    assert engine.can_save_ranges and engine.memory_kind == "kv"
    tokens = history(engine, 700)
    engine.kv_clear()
    engine.eval(tokens)
    whole = engine.state_bytes()
    state = kv_state.parse(whole)
    (part,) = state.parts
    for start, end in ((0, 256), (256, 512), (512, 700), (650, 651)):
        assert engine.state_range_bytes(start, end) == state.header + kv_state.cut(part, start, end)
    # the scratch sequence is gone again: the cache holds seq 0's cells only
    assert engine.state_bytes() == whole and engine.cells_in_use() == len(tokens)


def test_ranges_restored_in_turn_give_the_cache_back_exactly(engine: Engine) -> None:
    tokens = history(engine, 900)
    *held, last = tokens
    engine.kv_clear()
    engine.eval(held)
    whole = engine.state_bytes()
    cuts = [0, 300, 512, len(held)]
    spans = list(zip(cuts, cuts[1:], strict=False))
    ranges = [engine.state_range_bytes(a, b) for a, b in spans]
    pieces = [kv_state.parse(r).parts[0] for r in ranges]
    assert kv_state.parse(whole).header + kv_state.join([(p, 0, p.n_cells) for p in pieces]) == whole
    engine.eval([last])
    logits = engine.last_logits()
    engine.kv_remove(len(held), -1)
    expected = continuation(engine, last)

    engine.kv_clear()
    for data, (a, b) in zip(ranges, spans, strict=True):
        engine.load_state_range(data, a, b)
    assert engine.n_past == len(held) and engine.state_bytes() == whole
    engine.eval([last])
    assert np.array_equal(engine.last_logits(), logits)  # attends to every restored cell
    engine.kv_remove(len(held), -1)
    assert continuation(engine, last) == expected
    with pytest.raises(SessionError):  # a range must follow what the cache holds
        engine.load_state_range(ranges[1], 300, 512)


def test_a_saved_conversation_resumes_with_the_same_answer(engine: Engine, tmp_path: Path) -> None:
    store = KvStore(tmp_path)
    *held, last = history(engine, 400)
    engine.kv_clear()
    engine.eval(held[:250])
    store.save(SESSION, "chat", {}, held[:250], engine, FP)
    engine.eval(held[250:])  # a second turn crosses the 256 boundary
    result = store.save(SESSION, "chat", {}, held, engine, FP)
    assert [(x.start, x.end) for x in result.manifest.chain] == [(0, 250), (250, 256), (256, 399)]
    assert result.blocks_written == 2  # only the new cells
    expected = continuation(engine, last)

    got = store.restore(store.read_manifest(SESSION, "chat"), engine, FP)
    assert got.n_tokens == 399 and got.damage is None
    assert continuation(engine, last) == expected


def test_a_sliding_window_model_is_saved_whole(gemma_path: Path, tmp_path: Path) -> None:
    with Engine(gemma_path, EngineSettings(n_ctx=1024, type_k=F16, type_v=F16, n_threads=1,
                                           flash_attn="off")) as gemma:
        assert not gemma.can_save_ranges and gemma.memory_kind == "swa"
        with pytest.raises(kv_state.StateFormatError):
            gemma.state_range_bytes(0, 1)
        gemma.set_sampling(GREEDY)
        *held, last = gemma.tokenize("The battery light blinks twice when the power is low. " * 40,
                                     add_special=True)
        gemma.eval(held)
        store = KvStore(tmp_path)
        result = store.save(SESSION, "g", {}, held, gemma, FP)
        assert [x.kind for x in result.manifest.chain] == ["whole"]
        expected = continuation(gemma, last)
        got = store.restore(store.read_manifest(SESSION, "g"), gemma, FP)
        assert got.n_tokens == len(held)
        assert continuation(gemma, last) == expected
