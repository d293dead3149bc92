"""One name for a model everywhere: the one `kvchat list` gives it (catalogue alias or Hub
reference), else the file's stem — in the prefix cache's and the sessions' listings too,
for a model run here or on a server. In-process through Typer's CliRunner, no model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hub_server import make_gguf
from typer.testing import CliRunner

from kvchat import registry, session_store
from kvchat.cli import app

SERVER = "http://127.0.0.1:8080"


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated home and a Hugging Face cache holding test/Tiny-GGUF's Q4_K_M file."""
    from kvchat import hub

    cache = tmp_path / "hf" / "hub"
    repo = cache / "models--test--Tiny-GGUF"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    blob = make_gguf(repo / "blobs" / ("b" * 64), tensor_bytes=1024)
    (snapshot / "Tiny-Q4_K_M.gguf").symlink_to(f"../../blobs/{blob.name}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hub, "cache_dir", lambda: cache)
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path / "kvchat"))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "250")
    return snapshot / "Tiny-Q4_K_M.gguf"


NAME = "test/Tiny-GGUF:Q4_K_M"  # as `kvchat list` names the file above


def test_a_model_known_by_path_file_name_or_server_id(tiny: Path, tmp_path: Path) -> None:
    assert registry.model_name_for(str(tiny)) == NAME
    assert registry.model_name_for("Tiny-Q4_K_M.gguf") == NAME  # the prefix cache records the file name
    assert registry.model_name_for("/elsewhere/Other-Q8_0.gguf") == "Other-Q8_0"
    mine = make_gguf(tmp_path / "mine", tensor_bytes=64)  # a file of one's own, without .gguf
    assert registry.model_name_for(str(mine)) == "mine"
    for served in ("smollm2", "Qwen/Qwen2.5-7B-Instruct"):  # a server's model id stays as it is
        assert registry.model_name_for(served) == served


def test_a_session_on_a_server_names_its_model_and_the_server(tiny: Path) -> None:
    remote = {"path": f"{SERVER} /models/Other-Q8_0.gguf", "size": 0, "sha256": "x", "server": SERVER}
    assert session_store.model_display_name(remote) == f"Other-Q8_0 on {SERVER}"
    same_file = {**remote, "path": f"{SERVER} {tiny}"}  # a local server on a downloaded model
    assert session_store.model_display_name(same_file) == f"{NAME} on {SERVER}"
    by_id = {**remote, "path": f"{SERVER} smollm2"}
    assert session_store.model_display_name(by_id) == f"smollm2 on {SERVER}"
    assert session_store.model_display_name({"path": str(tiny), "size": 1, "sha256": "x"}) == NAME


def _session(name: str, model: dict[str, object]) -> None:
    record = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        "dropped": [], "kv_text": "", "turns": [], "n_kv": 3, "model": model,
        "settings": {"n_ctx": 256, "type_k": "f16", "type_v": "f16", "flash_attn": "off"},
    }
    path = session_store.session_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    session_store.save(path, record, [1, 2, 3, 4], b"state")


def test_sessions_list_and_show_use_the_name(tiny: Path) -> None:
    _session("here", {"path": str(tiny), "size": 1, "sha256": "00"})
    _session("there", {"path": f"{SERVER} /srv/Other-Q8_0.gguf", "size": 0, "sha256": "x", "server": SERVER})
    cli = CliRunner()
    rows = {r["name"]: r["model"] for r in json.loads(cli.invoke(app, ["sessions", "list", "--json"]).stdout)}
    assert rows == {"here": NAME, "there": f"Other-Q8_0 on {SERVER}"}
    shown = cli.invoke(app, ["sessions", "show", "there"]).stdout
    assert shown.startswith(f"session there: model Other-Q8_0 on {SERVER}, ")
    exported = cli.invoke(app, ["sessions", "export", "here"]).stdout
    assert f"Model: `{NAME}`" in exported


def test_cache_list_and_stats_use_the_name(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvchat.prefix_store import IndexEntry, Store

    now = time.time()
    entries = {key: IndexEntry(key=key, parent="", start=0, end=256, fingerprint="f", model=model, bytes=100,
                               created=now, last_used=now, hits=1)
               for key, model in (("k1", "Tiny-Q4_K_M.gguf"), ("k2", "Gone-F16.gguf"))}
    monkeypatch.setattr(Store, "read_index", lambda self: entries)
    cli = CliRunner()
    listed = json.loads(cli.invoke(app, ["cache", "list", "--json"]).stdout)
    assert sorted((e["model"], e["file"]) for e in listed) == [("Gone-F16", "Gone-F16.gguf"),
                                                                (NAME, "Tiny-Q4_K_M.gguf")]
    table = cli.invoke(app, ["cache", "list"]).stdout
    assert NAME in table and "Tiny-Q4_K_M.gguf" not in table
    stats = json.loads(cli.invoke(app, ["cache", "stats", "--json"]).stdout)
    assert stats["models"] == ["Gone-F16", NAME]
    assert f"models   Gone-F16, {NAME}" in cli.invoke(app, ["cache", "stats"]).stdout


def test_sessions_rm_takes_several_names_all_or_none(tiny: Path) -> None:
    for name in ("a", "b", "c"):
        _session(name, {"path": str(tiny), "size": 1, "sha256": "00"})
    cli = CliRunner()
    missing = cli.invoke(app, ["sessions", "rm", "a", "nope", "--yes"])
    assert missing.exit_code != 0 and "nope" in str(missing.exception)
    assert all(session_store.session_path(n).exists() for n in "abc")  # nothing deleted
    refused = cli.invoke(app, ["sessions", "rm", "a", "b"])  # no terminal to ask on
    assert "not deleting sessions 'a', 'b' without confirmation" in str(refused.exception)
    done = cli.invoke(app, ["sessions", "rm", "a", "b", "a", "--yes"])
    assert done.exit_code == 0, done.output
    assert [n for n in "abc" if session_store.session_path(n).exists()] == ["c"]
