"""One resolver: flag > saved session > KVCHAT_* > config.toml > default, every value
typed and checked, a bad one refused naming where it came from (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from kvchat import config
from kvchat.errors import ExitCode, UsageError
from kvchat.settings import MAX_CTX, MIN_CTX, SETTINGS, resolve

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in [k for k in os.environ if k.startswith("KVCHAT_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path))
    config._read_table.cache_clear()
    yield tmp_path
    config._read_table.cache_clear()


def _config(home: Path, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    (home / "config.toml").write_bytes(data)
    config._read_table.cache_clear()


def test_precedence_flag_session_env_file_default(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve().temperature == 0.8 and resolve().sources["temperature"] == "default"
    _config(home, "[defaults]\ntemperature = 0.5\nctx = '8k'\n")
    assert resolve().temperature == 0.5 and resolve().ctx == 8192
    monkeypatch.setenv("KVCHAT_TEMPERATURE", "0.3")
    assert resolve().temperature == 0.3 and resolve().sources["temperature"] == "env"
    assert resolve(saved={"temperature": 0.2}).temperature == 0.2
    got = resolve({"temperature": "0.1"}, saved={"temperature": 0.2})
    assert got.temperature == 0.1 and got.sources["temperature"] == "flag"


def test_a_session_value_that_hides_the_environment_says_so(home: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVCHAT_CTX", "8192")
    got = resolve(saved={"ctx": 4096})
    assert got.ctx == 4096
    assert got.overridden and "KVCHAT_CTX=" in got.overridden[0] and "4096" in got.overridden[0]
    assert resolve(saved={"ctx": 8192}).overridden == ()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KVCHAT_TEMPERATURE": "hot"}, "KVCHAT_TEMPERATURE='hot' is not a number"),
        ({"KVCHAT_TEMPERATURE": "-1"}, "KVCHAT_TEMPERATURE='-1' must be at least 0"),
        ({"KVCHAT_TEMPERATURE": "nan"}, "KVCHAT_TEMPERATURE='nan' is not a finite number"),
        ({"KVCHAT_TOP_P": "5"}, "KVCHAT_TOP_P='5' must be at most 1"),
        ({"KVCHAT_TOP_K": "x"}, "KVCHAT_TOP_K='x' is not a whole number"),
        ({"KVCHAT_MIN_P": "x"}, "KVCHAT_MIN_P='x' is not a number"),
        ({"KVCHAT_SEED": "x"}, "KVCHAT_SEED='x' is not a seed"),
        ({"KVCHAT_MAX_TOKENS": "-3"}, "KVCHAT_MAX_TOKENS='-3' must be at least 1"),
        ({"KVCHAT_MAX_TOKENS": "0"}, "KVCHAT_MAX_TOKENS='0' must be at least 1"),
        ({"KVCHAT_CTX": "abc"}, "KVCHAT_CTX='abc' is not a token count"),
        ({"KVCHAT_NGL": "lots"}, "KVCHAT_NGL='lots' is not a layer count"),
        ({"KVCHAT_CACHE_TYPE_K": "q3"}, "KVCHAT_CACHE_TYPE_K='q3' is not a cache type"),
        ({"KVCHAT_OVERFLOW": "wrap"}, "KVCHAT_OVERFLOW='wrap' is not one of shift, stop"),
    ],
)
def test_bad_environment_values_name_their_variable(home: Path, monkeypatch: pytest.MonkeyPatch,
                                                    env: dict[str, str], message: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UsageError) as err:
        resolve()
    assert str(err.value).startswith(message) and err.value.exit_code == ExitCode.USAGE


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[defaults]\ntemperature = "hot"\n', "config.toml [defaults] temperature = 'hot' is not a number"),
        ("[defaults]\nctx = 'abc'\n", "config.toml [defaults] ctx = 'abc' is not a token count"),
        ("[defaults]\nmax_tokens = -5\n", "config.toml [defaults] max_tokens = -5 must be at least 1"),
        ("[defaults]\nsystem = 5\n", "config.toml [defaults] system = 5 is not a text value"),
        ("[defaults]\ntemperature = true\n", "config.toml [defaults] temperature = True is not a number"),
        ("[defaults]\nbatchsize = 8\n", "unknown setting(s) batchsize"),
        ("defaults = 5\n", "'defaults' must be a table"),
        ("[other]\nx = 1\n", "unknown key(s) other"),
        ("[defaults\n", "cannot read"),
    ],
)
def test_bad_config_values_name_the_file(home: Path, text: str, message: str) -> None:
    _config(home, text)
    with pytest.raises(UsageError) as err:
        resolve()
    assert message in str(err.value)


def test_config_that_is_not_utf8_is_refused(home: Path) -> None:
    _config(home, b"[defaults]\nsystem = '\xe9t\xe9'\n")
    with pytest.raises(UsageError, match="not UTF-8"):
        resolve()


def test_every_config_key_is_used(home: Path) -> None:
    # Each documented key changes the resolved settings (none is accepted and ignored).
    values = {"model": "'x.gguf'", "ctx": "2048", "ctx_max": "4096", "cache_type_k": "'q8_0'",
              "cache_type_v": "'q8_0'", "flash_attn": "'on'", "ngl": "0", "threads": "1", "batch": "64",
              "max_tokens": "9", "temperature": "0.1", "top_k": "5", "top_p": "0.5", "min_p": "0.2",
              "repeat_penalty": "1.1", "seed": "3", "system": "'terse'", "overflow": "'stop'",
              "recent_chats": "5", "prefix_cache": "false", "prefix_cache_size": "'500M'",
              "kv_store_size": "'2G'",
              "chat_template": "'gemma'", "raw": "true", "think": "'off'", "checkpoints": "3",
              "checkpoint_mib": "64", "speculative": "'off'", "draft": "'d.gguf'",
              "server": "'http://gpu-box:8080/'", "api_key": "'k'", "server_timeout": "30",
              "tls_verify": "false"}
    assert set(values) == set(SETTINGS)
    _config(home, "[defaults]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
    got = resolve()
    assert all(got.sources[k] == "config" for k in values)
    assert (got.batch, got.ngl, got.threads, got.ctx_max, got.repeat_penalty) == (64, 0, 1, 4096, 1.1)
    assert got.recent_chats == 5
    assert (got.prefix_cache, got.prefix_cache_size) == (False, 500 * 1024**2)
    assert got.kv_store_size == 2 * 1024**3
    assert (got.chat_template, got.raw, got.think, got.checkpoints, got.checkpoint_mib) == \
        ("gemma", True, "off", 3, 64.0)
    assert (got.speculative, got.draft) == ("off", "d.gguf")
    assert (got.server, got.api_key, got.server_timeout, got.tls_verify) == \
        ("http://gpu-box:8080", "k", 30.0, False)


@pytest.mark.parametrize(("raw", "size"), [("4G", 4 * 1024**3), ("500M", 500 * 1024**2),
                                           ("2GiB", 2 * 1024**3), ("1.5k", 1536), (1024, 1024), ("0", 0)])
def test_prefix_cache_sizes(home: Path, raw: object, size: int) -> None:
    assert resolve({"prefix_cache_size": raw}).prefix_cache_size == size

@pytest.mark.parametrize(("name", "raw"), [("prefix_cache_size", "lots"), ("prefix_cache_size", "-1G"),
                                           ("prefix_cache", "maybe")])
def test_bad_prefix_cache_values_are_refused(home: Path, monkeypatch: pytest.MonkeyPatch, name: str,
                                             raw: str) -> None:
    monkeypatch.setenv(f"KVCHAT_{name.upper()}", raw)
    with pytest.raises(UsageError, match=f"KVCHAT_{name.upper()}"):
        resolve()


@pytest.mark.parametrize("value", ["1e30", "99999999", "4294967808", str(MAX_CTX + 1), "1", str(MIN_CTX - 1)])
def test_absurd_contexts_are_refused_before_llama_cpp(home: Path, value: str) -> None:
    with pytest.raises(UsageError, match="--ctx"):
        resolve({"ctx": value})


# --- through the command line: the table of bad inputs -------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "code", "start"),
    [
        (["run", "hi"], {"KVCHAT_TEMPERATURE": "hot"}, ExitCode.USAGE,
         "kvchat: error: KVCHAT_TEMPERATURE='hot'"),
        (["run", "hi"], {"KVCHAT_CTX": "abc"}, ExitCode.USAGE, "kvchat: error: KVCHAT_CTX='abc'"),
        (["run", "--temperature", "nan", "hi"], {}, ExitCode.USAGE, "kvchat: error: --temperature 'nan'"),
        (["run", "--ctx", "1e30", "hi"], {}, ExitCode.USAGE, "kvchat: error: --ctx '1e30'"),
        (["run", "--ctx", "10", "hi"], {}, ExitCode.USAGE, "kvchat: error: --ctx '10'"),
        (["run", "--threads", "0", "hi"], {}, ExitCode.USAGE, "kvchat: error: --threads '0'"),
        (["bench", "--cache-types", ""], {}, ExitCode.USAGE, "kvchat: error: --cache-types is empty"),
        (["estimate", "--ctx", "4k,zz"], {}, ExitCode.USAGE, "kvchat: error: --ctx 'zz'"),
    ],
)
def test_bad_input_table(kv_env: dict[str, str], args: list[str], env: dict[str, str], code: int,
                         start: str) -> None:
    result = subprocess.run([sys.executable, "-m", "kvchat", *args], input="", capture_output=True, text=True,
                            env={**kv_env, **env}, cwd=REPO, timeout=120)
    assert result.returncode == code
    assert result.stderr.startswith(start) and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_kvchat_alone_prints_help_on_stdout_and_succeeds(kvchat) -> None:  # noqa: ANN001
    result = kvchat()
    assert result.returncode == 0 and "Usage: kvchat" in result.stdout and result.stderr == ""


def test_declining_sessions_rm_is_not_an_error(kvchat, kv_env: dict[str, str]) -> None:  # noqa: ANN001
    created = kvchat("run", "--session", "keep", "-n", "2", "--temperature", "0", "--ctx", "512", "Hi")
    assert created.returncode == 0, created.stderr
    child = pexpect.spawn(sys.executable, ["-m", "kvchat", "sessions", "rm", "keep"], env=kv_env,
                          cwd=str(REPO), encoding="utf-8", timeout=60)
    child.expect(r"Delete session 'keep'\?")
    child.sendline("n")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "nothing deleted" in child.before
    assert kvchat("sessions", "show", "keep").returncode == 0
