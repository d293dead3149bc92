"""One resolver: flag > saved session > KVCHAT_* > config.toml > default, every value
typed and checked, a bad one refused naming where it came from (exit 2)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import pexpect
import pytest
import typer

from kvchat import config, setting_table
from kvchat.engine_api import SamplingSettings
from kvchat.errors import ExitCode, UsageError
from kvchat.prefix_cache import Fingerprint, PrefixCache, Store
from kvchat.session import Session
from kvchat.settings import (
    LOAD_KEYS,
    MAX_CTX,
    MIN_CTX,
    OVERFLOW_POLICIES,
    SETTINGS,
    SPECULATIVE_MODES,
    Settings,
    default,
    keys_in,
    resolve,
)
from kvchat.ui.commands import SET_KEYS, parse_setting

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
              "repeat_penalty": "1.1", "presence_penalty": "0.5", "frequency_penalty": "-0.5",
              "seed": "3", "system": "'terse'", "overflow": "'stop'",
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

def test_prefix_cache_size_is_a_deprecated_name_of_the_one_kv_store_budget(home: Path) -> None:
    assert (resolve().prefix_cache_size, resolve().store_budget) == (None, None)  # auto: half the free disk
    assert resolve({"prefix_cache_size": "1G"}).store_budget == 1024**3
    assert resolve({"prefix_cache_size": "1G", "kv_store_size": "2G"}).store_budget == 2 * 1024**3
    assert resolve({"prefix_cache_size": "0"}).store_budget is None  # 0: the cache off, not the store
    assert "kv_store_size" in SETTINGS["prefix_cache_size"].help


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


# --- everything else is derived from the table ----------------------------------------------


def _click_commands() -> dict[str, click.Command]:
    from kvchat.cli import app

    group = typer.main.get_command(app)
    assert isinstance(group, click.Group)
    return dict(group.commands)


def _setting_params(command: click.Command) -> dict[str, click.Option]:
    """The command's options that are settings (bench's MODEL argument is not one)."""
    return {p.name: p for p in command.params if p.name in SETTINGS and isinstance(p, click.Option)}


@pytest.mark.parametrize("name", ["run", "chat"])
def test_chat_commands_take_every_flag_of_the_table_as_written_there(name: str) -> None:
    params = _setting_params(_click_commands()[name])
    assert set(params) == {n for n, s in SETTINGS.items() if s.flags}
    for key, param in params.items():
        setting = SETTINGS[key]
        assert param.help == setting.help and param.metavar == setting.metavar
        # None: not given, so the resolver falls through to KVCHAT_*, config.toml, the table.
        assert param.default is None
        if isinstance(setting.default, bool):
            assert param.opts == [setting.flags[0]] and param.secondary_opts == [
                "--no-" + setting.flags[0].removeprefix("--")]
        else:
            assert param.opts == list(setting.flags) and param.secondary_opts == []


@pytest.mark.parametrize("name", ["estimate", "bench"])
def test_other_commands_spell_their_setting_flags_as_run_does(name: str) -> None:
    run = _setting_params(_click_commands()["run"])
    params = _setting_params(_click_commands()[name])
    assert params, f"{name} takes no setting"
    for key, param in params.items():
        assert (param.opts, param.secondary_opts, param.help) == \
            (run[key].opts, run[key].secondary_opts, run[key].help), key


def test_estimate_takes_the_shared_draft_option() -> None:
    drafts = [p for p in _click_commands()["estimate"].params if "--draft" in getattr(p, "opts", [])]
    assert [p.name for p in drafts] == ["draft"] and drafts[0].help == SETTINGS["draft"].help


def test_help_texts_show_the_table_defaults() -> None:
    assert "(default 0.8)" in SETTINGS["temperature"].help
    assert "ctx_max (32768)" in SETTINGS["ctx"].help
    assert "(default 256)" in SETTINGS["checkpoint_mib"].help  # as typed, not 256.0
    assert "(default on;" in SETTINGS["prefix_cache"].help
    assert "KVCHAT_API_KEY" in SETTINGS["api_key"].help
    changed = tuple(replace(s, default={"temperature": 0.3, "ctx_max": 8192}.get(s.name, s.default))
                    for s in setting_table._TABLE)
    helps = setting_table._with_help(changed)
    assert "(default 0.3)" in helps["temperature"].help and "ctx_max (8192)" in helps["ctx"].help
    assert not any("{" in s.help for s in SETTINGS.values())


def test_settings_fields_are_the_table_with_its_defaults(home: Path) -> None:
    names = [f.name for f in dataclasses.fields(Settings)]
    assert names == [*SETTINGS, "sources", "overridden"]
    plain = Settings()
    assert all(getattr(plain, name) == getattr(resolve(), name) == default(name) for name in SETTINGS)


def test_sampling_settings_are_the_sampling_group() -> None:
    assert [f.name for f in dataclasses.fields(SamplingSettings)] == list(keys_in("sampling"))
    assert dataclasses.asdict(SamplingSettings()) == {k: default(k) for k in keys_in("sampling")}
    # What a named session saves (its sampler and reply limit) is what it gives back on resume.
    assert set(keys_in("saved")) == {*keys_in("sampling"), "max_tokens"}


def _session_default(name: str) -> Any:
    (found,) = [f for f in dataclasses.fields(Session) if f.name == name]
    assert found.default_factory is not dataclasses.MISSING
    return found.default_factory()


def test_a_changed_table_default_changes_every_class_that_carries_it(home: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    fingerprint = Fingerprint("ab" * 32, "m.gguf", "f16", "f16", "off", False, 0, 512, 512, "0")
    assert PrefixCache(fingerprint, store=Store(tmp_path)).limit_bytes == 4 * 1024**3
    assert (_session_default("overflow"), _session_default("checkpoint_max"),
            _session_default("checkpoint_mib"), _session_default("max_tokens")) == ("shift", 8, 256.0, None)
    for name, value in {"temperature": 0.3, "top_k": 7, "seed": 5, "overflow": "stop", "checkpoints": 2,
                        "checkpoint_mib": 64.0, "max_tokens": 9, "prefix_cache_size": "1G"}.items():
        monkeypatch.setitem(SETTINGS, name, replace(SETTINGS[name], default=value))
    assert (SamplingSettings().temperature, SamplingSettings().top_k, SamplingSettings().seed) == (0.3, 7, 5)
    assert (Settings().temperature, resolve().temperature, resolve().sources["temperature"]) == \
        (0.3, 0.3, "default")
    assert (_session_default("overflow"), _session_default("checkpoint_max"),
            _session_default("checkpoint_mib"), _session_default("max_tokens")) == ("stop", 2, 64.0, 9)
    assert PrefixCache(fingerprint, store=Store(tmp_path)).limit_bytes == 1024**3


def test_repl_set_keys_are_the_table_group_spelled_as_their_flags_too() -> None:
    assert keys_in("repl") == SET_KEYS
    for key in SET_KEYS:
        for flag in SETTINGS[key].flags:
            assert parse_setting(flag.lstrip("-"), str(SETTINGS[key].default))[0] == key
    with pytest.raises(UsageError, match="unknown setting 'ctx'"):
        parse_setting("ctx", "4096")  # a setting, but not one a chat can change


def test_groups_hold_known_settings_only() -> None:
    assert LOAD_KEYS == keys_in("load") == ("model", "ctx", "cache_type_k", "cache_type_v", "flash_attn")
    assert set(keys_in("load")) - {"model"} <= set(keys_in("local"))
    assert not set(keys_in("local")) & set(keys_in("sampling"))
    assert SETTINGS["overflow"].parse("stop") in OVERFLOW_POLICIES
    assert all(SETTINGS["speculative"].parse(mode) == mode for mode in SPECULATIVE_MODES)


def test_the_table_imports_no_engine_and_the_engine_interface_stays_light() -> None:
    code = ("import sys, kvchat.engine_api, kvchat.settings; "
            "print(sorted(m for m in ('kvchat.speculative', 'kvchat.engine', 'llama_cpp', 'typer', 'rich') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                            timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
