"""Fuzzing beyond the header reader: damaged GGUF files through `kvchat run` (bounded
in time and resident memory per file), and damaged session records through the
session store. The full run (250+ files) is benchmarks/fuzz_run.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvchat import saved_sessions, session_store
from kvchat.errors import SessionError
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

from gguf_fuzz import random_cases, run_case, structured_cases, write_case  # noqa: E402

TIME_BOUND_S = 120  # a hang bound per file, far above the few seconds each takes
RSS_BOUND_KIB = 1024 * 1024  # 1 GiB

# A sample of the structured cases that once aborted, hung or blew up, plus random damage.
SAMPLE = (
    "base",
    "llama.block_count=0",
    "llama.block_count=513",
    "llama.block_count=4294967295",
    "llama.attention.head_count=0",
    "llama.attention.head_count=3",
    "llama.attention.head_count_kv=0",
    "llama.embedding_length=0",
    "alignment=1",
    "sparse 64 GiB tail",
    "general.name 1 MiB",
    "tokens empty",
)


@pytest.fixture(scope="module")
def fuzz_cases(model_path: Path) -> list[tuple[str, bytes, int]]:
    cases = [c for c in structured_cases(model_path) if c[0] in SAMPLE]
    assert len(cases) == len(SAMPLE)
    cases += list(random_cases(cases[0][1], 8, seed=3))
    return cases


@pytest.mark.slow
def test_damaged_gguf_files_through_run(fuzz_cases, kv_env: dict[str, str], tmp_path: Path) -> None:  # noqa: ANN001
    failures = []
    for label, data, tail in fuzz_cases:
        path = tmp_path / "fuzz.gguf"
        write_case(path, data, tail)
        outcome = run_case(label, path, env=kv_env, timeout=TIME_BOUND_S)
        path.unlink()
        if outcome.verdict not in ("ok", "clean-error") or outcome.max_rss_kib > RSS_BOUND_KIB:
            failures.append(outcome)
        if label == "base":
            assert outcome.verdict == "ok", outcome  # the base model really runs
    assert not failures, failures


# -- session records -------------------------------------------------------------------------


def _session(tmp_path: Path) -> Path:
    record = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        "dropped": [],
        "kv_text": "<|im_start|>user\nHi",
        "turns": [{"message": 0, "token": 0, "char": 0}],
        "n_kv": 3,
        "model": {"path": "/m/model.gguf", "size": 1, "sha256": "00"},
        "settings": {"n_ctx": 256, "type_k": "f16", "type_v": "f16", "flash_attn": "off"},
    }
    path = tmp_path / "s.kvs"
    session_store.save(path, record, [1, 2, 3, 4], b"kv state bytes" * 10)
    return path


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_session_bytes_are_refused(tmp_path: Path, data: st.DataObject) -> None:
    path = _session(tmp_path)
    raw = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    path.write_bytes(bytes(raw))
    for with_state in (True, False):
        try:
            saved = session_store.load(path, with_state=with_state)
        except SessionError:
            continue
        assert session_store.record_problem(saved.record, saved.tokens) is None


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
_KEYS = ("messages", "dropped", "kv_text", "turns", "n_kv", "model", "settings", "created", "updated")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(_KEYS), _JSON, min_size=1, max_size=3))
def test_records_with_valid_checksums_are_validated(tmp_path: Path, changes: dict) -> None:
    """A record that checksums but holds anything at all: refused with SessionError, or
    accepted only when every field kvchat reads has the right type; `sessions list`
    (list_sessions) never fails because of it."""
    path = _session(tmp_path)
    saved = session_store.load(path)
    record = {**saved.record, **changes}
    session_store.write_container(path, record, saved.tokens, saved.state)
    try:
        loaded = session_store.load(path)
    except SessionError:
        return
    rec = loaded.record
    assert isinstance(rec["model"]["path"], str) and isinstance(rec["settings"]["n_ctx"], int)
    assert all(isinstance(m["content"], str) for m in rec["messages"] + rec.get("dropped", []))
    assert 0 <= rec["n_kv"] <= len(loaded.tokens)
    json.dumps(rec)


def test_list_survives_any_record(kv_env: dict[str, str]) -> None:
    folder = session_store.sessions_dir()
    folder.mkdir(parents=True)
    _session(folder).rename(folder / "good.kvs")
    damage = [
        lambda r: {**r, "settings": 5},
        lambda r: {**{k: v for k, v in r.items() if k != "settings"}, "Settings": r["settings"]},
        lambda r: {**r, "messages": [5]},
        lambda r: {**r, "n_kv": -5},
    ]
    for i, change in enumerate(damage):
        path = _session(folder)
        saved = session_store.load(path)
        session_store.write_container(path, change(saved.record), saved.tokens, saved.state)
        path.rename(folder / f"bad{i}.kvs")
    (folder / "dir.kvs").mkdir()
    infos = {i.name: i for i in saved_sessions.list_sessions()}
    assert infos["good"].model == "model"
    assert {n for n, i in infos.items() if i.model == "(damaged)"} == {"bad0", "bad1", "bad2", "bad3", "dir"}
