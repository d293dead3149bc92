"""Sessions on the real model: exact KV reuse, overflow, interrupts, persistence."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvchat import saved_sessions, session_store
from kvchat.app import chat_template_for
from kvchat.cache_types import parse_cache_type
from kvchat.chat_template import ChatTemplate, preamble_length
from kvchat.conversation import TurnStats
from kvchat.engine import Engine, EngineSettings
from kvchat.engine_api import SamplingSettings
from kvchat.errors import ExitCode, SessionError
from kvchat.session import Session

F16 = parse_cache_type("f16")
GREEDY = SamplingSettings(temperature=0, seed=1)


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[Engine]:
    with Engine(model_path, EngineSettings(n_ctx=4096, type_k=F16, type_v=F16, n_threads=2)) as eng:
        yield eng


@pytest.fixture(scope="module")
def small_engine(model_path: Path) -> Iterator[Engine]:
    with Engine(model_path, EngineSettings(n_ctx=512, type_k=F16, type_v=F16, n_threads=2)) as eng:
        yield eng


def _fresh(engine: Engine, **kwargs) -> Session:  # noqa: ANN003
    engine.kv_clear()
    return Session(engine, chat_template_for(engine), GREEDY, **kwargs)


def _turn(session: Session, text: str) -> tuple[str, list[int], TurnStats]:
    turn = session.send(text)
    events = list(turn)
    return "".join(e.text for e in events), [e.token for e in events], turn.stats


@pytest.mark.slow
def test_twenty_turns_evaluate_only_each_turns_new_tokens(engine: Engine) -> None:
    session = _fresh(engine, max_tokens=16)
    for i in range(20):
        before = list(session.tokens)
        engine.perf_reset()
        _text, generated, stats = _turn(session, f"Question {i}: name an animal.")
        perf = engine.perf()
        # The history before the turn is still there, untouched, as a prefix.
        assert session.tokens[: len(before)] == before
        # llama.cpp's own counters: prefill evaluated exactly the new tokens (plus
        # the previous reply's last token, sampled but not yet evaluated) and
        # decoding evaluated each generated token but the last.
        assert stats.reused_tokens == (len(before) - 1 if i else 0)
        new_in_turn = len(session.tokens) - len(before) - len(generated)
        assert stats.evaluated_tokens == new_in_turn + (1 if i else 0)
        assert perf.prompt_tokens + perf.eval_tokens == stats.evaluated_tokens + len(generated) - 1
        # Generated tokens are kept as generated, never re-tokenized.
        assert session.tokens[-len(generated):] == generated
    assert sum(m["role"] == "user" for m in session.messages) == 20


def test_cached_text_matches_the_template_rendering(engine: Engine) -> None:
    session = _fresh(engine, max_tokens=12)
    session.set_system("You are terse.")
    for i in range(3):
        _turn(session, f"Say {i}.")
    rendered = session.template.render(session.messages, add_generation_prompt=False)
    assert rendered.startswith(session.kv_text)


@pytest.mark.slow
@pytest.mark.timeout(900)  # 30 turns on a busy 2-core machine
def test_overflow_shift_over_thirty_turns(small_engine: Engine) -> None:
    session = _fresh(small_engine, max_tokens=40, overflow="shift")
    session.set_system("You are terse.")
    dropped = 0
    for i in range(30):
        small_engine.perf_reset()
        stats = _turn(session, f"Question {i}: tell me a fact about the number {i}.")[2]
        perf = small_engine.perf()
        dropped += stats.dropped_turns
        assert len(session.tokens) <= small_engine.n_ctx
        assert small_engine.n_past in (len(session.tokens), len(session.tokens) - 1)
        # Shifting, not re-evaluating: only this turn's tokens were computed.
        assert perf.prompt_tokens + perf.eval_tokens == stats.evaluated_tokens + stats.completion_tokens - 1
        assert session.messages[0] == {"role": "system", "content": "You are terse."}
    assert dropped > 0
    assert len(session.dropped) == 2 * dropped
    rendered = session.template.render(session.messages, add_generation_prompt=False)
    assert rendered.startswith(session.kv_text)


@pytest.mark.slow
def test_overflow_stop_refuses_and_changes_nothing(small_engine: Engine) -> None:
    session = _fresh(small_engine, max_tokens=60, overflow="stop")
    with pytest.raises(SessionError, match="context is full"):
        for i in range(30):
            _turn(session, f"Question {i}: tell me a fact about the number {i}.")
    tokens, messages = list(session.tokens), list(session.messages)
    with pytest.raises(SessionError):
        _turn(session, "one more")
    assert session.tokens == tokens and session.messages == messages


@pytest.mark.slow
def test_interrupted_reply_is_kept_consistently(engine: Engine) -> None:
    session = _fresh(engine, max_tokens=200)
    stream = session.send("Repeat the word hello 500 times.")
    partial = [next(stream) for _ in range(10)]
    stream.close()
    assert stream.stats.stop_reason == "interrupted"
    assert session.messages[-1] == {"role": "assistant", "content": "".join(e.text for e in partial)}
    assert session.tokens[-10:] == [e.token for e in partial]
    engine.perf_reset()
    before = len(session.tokens)
    assert _turn(session, "Thanks.")[2].reused_tokens == before - 1
    assert session.tokens[:before][-10:] == [e.token for e in partial]


def test_preamble_of_a_default_system_prompt() -> None:
    template = ChatTemplate(
        "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
        "<s>default</s>{% endif %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
    )
    assert preamble_length(template) == len("<s>default</s>")
    assert preamble_length(ChatTemplate(None)) == 0


# -- persistence through the CLI ----------------------------------------------------


def _run_json(kvchat, *args: str):  # noqa: ANN001,ANN202
    result = kvchat("run", "--json", "--temperature", "0", "--max-tokens", "12", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_named_session_resumes_without_reevaluating(kvchat, kv_env: dict[str, str]) -> None:
    first = _run_json(kvchat, "--session", "work", "My name is Ada.")
    saved = saved_sessions.load_existing("work")
    n_tokens = first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
    assert len(saved.tokens) == n_tokens
    assert saved.record["format_version"] == session_store.FORMAT_VERSION
    assert saved.record["model"]["sha256"]
    assert saved.record["settings"]["n_ctx"] == first["settings"]["n_ctx"]  # --ctx auto, resolved once
    second = _run_json(kvchat, "--session", "work", "What is my name?")
    # Everything cached came from the file: only the new turn was evaluated.
    assert second["cache"]["reused_tokens"] == n_tokens - 1
    assert second["cache"]["evaluated_tokens"] == second["usage"]["prompt_tokens"] - n_tokens + 1
    record = saved_sessions.load_existing("work").record
    assert [m["role"] for m in record["messages"]] == ["user", "assistant", "user", "assistant"]


def test_session_file_is_about_the_size_of_its_kv(kvchat, kv_env: dict[str, str]) -> None:
    _run_json(kvchat, "--session", "sized", "Write two sentences about rivers.")
    saved = saved_sessions.load_existing("sized")
    n_kv = saved.record["n_kv"]
    kv_bytes = n_kv * 30 * 2 * (3 * 64) * 2  # layers x (K, V) x (kv heads x head dim) x f16
    transcript = len(json.dumps(saved.record["messages"]).encode())
    (info,) = saved_sessions.list_sessions()  # its manifest and blocks
    assert info.size + info.shared <= 1.1 * kv_bytes + 2 * transcript + 4096


@pytest.mark.slow
def test_changed_settings_are_refused_then_rebuilt(kvchat) -> None:
    n_ctx = _run_json(kvchat, "--session", "s", "Hello.")["settings"]["n_ctx"]
    refused = kvchat("run", "--session", "s", "--ctx", "2048", "Hi again.")
    assert refused.returncode == ExitCode.SESSION
    assert f"--ctx was {n_ctx}, now 2048" in refused.stderr and "--rebuild" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    rebuilt = _run_json(kvchat, "--session", "s", "--ctx", "2048", "--rebuild", "Hi again.")
    assert rebuilt["settings"]["n_ctx"] == 2048
    # re-evaluated by --rebuild in this run: evaluated, not reused (issue 11, item 19)
    assert rebuilt["cache"]["reused_tokens"] == 0 and rebuilt["cache"]["rebuilt_tokens"] > 0
    assert rebuilt["cache"]["evaluated_tokens"] == rebuilt["usage"]["prompt_tokens"]
    again = _run_json(kvchat, "--session", "s", "And again.")  # saved settings now 2048
    assert again["settings"]["n_ctx"] == 2048 and again["cache"]["reused_tokens"] > 0


def test_a_session_in_use_is_locked(kvchat, kv_env: dict[str, str]) -> None:
    _run_json(kvchat, "--session", "busy", "Hello.")
    with session_store.locked("busy"):
        result = kvchat("run", "--session", "busy", "Hi.")
    assert result.returncode == ExitCode.SESSION
    assert "in use" in result.stderr and str(os.getpid()) in result.stderr


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_session_files_are_reported_not_loaded(kvchat, kv_env: dict[str, str], damage: str) -> None:
    _run_json(kvchat, "--session", "hurt", "Hello.")
    path = saved_sessions.load_existing("hurt").path
    assert path is not None
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) - 100]
    path.write_bytes(bytes(data))
    result = kvchat("run", "--session", "hurt", "Hi.")
    assert result.returncode == ExitCode.SESSION
    assert ("corrupt" in result.stderr) or ("truncated" in result.stderr)
    assert "Traceback" not in result.stderr


def _record(i: int) -> dict:
    """A minimal record that passes session_store's schema check on load."""
    return {"i": i, "n_kv": 0, "messages": [], "model": {"path": "m.gguf", "size": 1, "sha256": "0" * 64},
            "settings": {"n_ctx": 4096, "type_k": "f16", "type_v": "f16", "flash_attn": "off"}}


def _save_forever(path: str, home: str) -> None:
    os.environ["KVCHAT_HOME"] = home
    i = 0
    while True:
        i += 1
        session_store.save(Path(path), _record(i), [i] * 1000, os.urandom(1) * (8 << 20))


def test_sigkill_during_save_never_damages_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "sessions" / "k.kvs"
    session_store.save(path, _record(0), [0], b"x" * 1000)
    ctx = multiprocessing.get_context("fork")
    for delay in (0.05, 0.11, 0.17, 0.23, 0.31):
        proc = ctx.Process(target=_save_forever, args=(str(path), str(tmp_path)))
        proc.start()
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        saved = session_store.load(path)  # whole and verified, old or new
        assert saved.tokens == [saved.record["i"]] * (1000 if saved.record["i"] else 1)
    # A killed save may leave its temp file behind; it is never taken for a session.
    assert [p.name for p in path.parent.glob("*.kvs")] == ["k.kvs"]


@pytest.mark.slow
def test_sessions_list_show_export_rm(kvchat) -> None:
    _run_json(kvchat, "--session", "notes", "--system", "Be brief.", "Name a fruit.")
    listed = json.loads(kvchat("sessions", "list", "--json").stdout)
    assert [row["name"] for row in listed] == ["notes"] and listed[0]["turns"] == 1
    shown = kvchat("sessions", "show", "notes")
    assert "[user] Name a fruit." in shown.stdout and "[system] Be brief." in shown.stdout
    markdown = kvchat("sessions", "export", "notes").stdout
    assert markdown.startswith("# Session notes") and "## user" in markdown
    exported = json.loads(kvchat("sessions", "export", "notes", "--format", "json").stdout)
    assert [m["role"] for m in exported["messages"]] == ["system", "user", "assistant"]
    refused = kvchat("sessions", "rm", "notes")
    assert refused.returncode == ExitCode.USAGE and "--yes" in refused.stderr
    assert kvchat("sessions", "rm", "notes", "--yes").returncode == 0
    missing = kvchat("sessions", "show", "notes")
    assert missing.returncode == ExitCode.SESSION and "no session named" in missing.stderr
    bad = kvchat("run", "--session", "../evil", "hi")
    assert bad.returncode == ExitCode.USAGE


def test_a_reply_cut_inside_a_character_leaves_the_cached_text_true(engine: Engine) -> None:
    """max_tokens may end a reply inside a multi-byte character: the cached text then
    ends in U+FFFD as the streamed reply does, and the next turn appends after it
    without writing a second U+FFFD of its own into the token history."""
    session = _fresh(engine, max_tokens=1)
    reply = "".join(e.text for e in session.send("日本"))  # SmolLM2's first byte token
    assert reply.endswith("\ufffd")

    def detokenized() -> str:
        data = b"".join(engine.token_piece(t, special=True) for t in session.tokens)
        return data.decode("utf-8", errors="replace")

    assert detokenized() == session.kv_text
    before = list(session.tokens)
    stats = _turn(session, "ok")[2]
    assert session.tokens[: len(before)] == before and stats.reevaluated_tokens == 0
    assert detokenized() == session.kv_text


def test_penalties_look_back_over_the_conversation_so_a_resumed_one_replies_the_same(engine: Engine) -> None:
    """The penalties' look-back is the conversation's last tokens, prompt included, set
    at each reply's start (as llama-server sets it per request): not what the engine
    sampled last. So a session resumed from its saved state replies to the next turn
    exactly as the session that never stopped."""
    penalised = SamplingSettings(temperature=0, seed=1, frequency_penalty=1.0, presence_penalty=0.5)
    first, second = "List the word cat ten times.", "Now list the word dog ten times."
    session = Session(engine, chat_template_for(engine), penalised, max_tokens=32)
    engine.kv_clear()
    _turn(session, first)
    record, tokens, state = session.to_record(), list(session.tokens), engine.state_bytes()
    record = json.loads(json.dumps(record))
    _text, went_on, _ = _turn(session, second)
    engine.kv_clear()
    resumed = Session(engine, chat_template_for(engine), penalised, max_tokens=32)
    resumed.restore(record, tokens, state)
    _text, again, _ = _turn(resumed, second)
    assert again == went_on
    engine.set_sampling(GREEDY)
