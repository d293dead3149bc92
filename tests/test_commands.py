"""Slash commands of the chat REPL: parsing, validation and completion (pure functions)."""

from __future__ import annotations

import pytest

from kvchat.errors import UsageError
from kvchat.ui.commands import (
    COMMANDS,
    SET_KEYS,
    Command,
    completions,
    is_command,
    parse_command,
    parse_setting,
    unescape_message,
)


def test_every_documented_command_parses() -> None:
    assert set(COMMANDS) == {"/help", "/system", "/clear", "/save", "/load", "/sessions", "/stats",
                             "/set", "/info", "/exit", "/undo", "/retry", "/copy"}
    for name in ("/help", "/clear", "/sessions", "/stats", "/info", "/exit", "/system", "/set", "/undo",
                 "/retry"):
        assert parse_command(name) == Command(name)
    with pytest.raises(UsageError, match="takes no argument"):
        parse_command("/undo 2")


def test_arguments_are_kept() -> None:
    assert parse_command("/system  You are terse.  ") == Command("/system", "You are terse.")
    assert parse_command("/save work") == Command("/save", "work")
    assert parse_command("/LOAD work") == Command("/load", "work")


def test_aliases() -> None:
    assert parse_command("/quit").name == "/exit"
    assert parse_command("/q").name == "/exit"
    assert parse_command("/?").name == "/help"
    assert parse_command("/bye").name == "/exit"  # ollama's


def test_copy_takes_code_or_nothing() -> None:
    assert parse_command("/copy") == Command("/copy")
    assert parse_command("/copy CODE") == Command("/copy", "code")
    with pytest.raises(UsageError, match=r"usage: /copy \[code\]"):
        parse_command("/copy all")
    assert completions("/copy c") == ["code"] and completions("/copy x") == []


def test_unknown_command_lists_what_exists() -> None:
    with pytest.raises(UsageError) as err:
        parse_command("/frobnicate now")
    message = str(err.value)
    assert "unknown command /frobnicate" in message
    assert all(name in message for name in COMMANDS)
    assert "//frobnicate now" in message  # how to send it as a message instead


def test_a_path_typed_at_the_prompt_gets_the_double_slash_hint() -> None:
    with pytest.raises(UsageError) as err:
        parse_command("/etc/hosts has a typo, look")
    message = str(err.value)
    assert message.startswith("/etc/hosts is not a command")
    assert "type //etc/hosts has a typo, look" in message


@pytest.mark.parametrize("line", ["/save", "/load", "/save two words", "/clear now", "/info x", "/set top_k"])
def test_wrong_arguments_say_the_usage(line: str) -> None:
    with pytest.raises(UsageError):
        parse_command(line)


def test_set_parses_typed_values() -> None:
    assert parse_command("/set temperature 0.2") == Command("/set", "temperature 0.2", "temperature", 0.2)
    assert parse_command("/set temp 0").value == 0.0
    assert parse_command("/set top_k 20") == Command("/set", "top_k 20", "top_k", 20)
    assert parse_command("/set top-p 0.5").key == "top_p"
    assert parse_command("/set max_tokens 64").value == 64
    assert parse_command("/set max_tokens none").value is None
    assert parse_command("/set seed 42").value == 42
    assert parse_command("/set seed random").value is None
    assert parse_command("/set min_p 0.1").value == 0.1


@pytest.mark.parametrize(
    ("key", "raw", "fragment"),
    [
        ("temperature", "-1", "at least 0"),
        ("temperature", "hot", "is not a number"),
        ("top_p", "1.5", "at most 1"),
        ("top_k", "2.5", "whole number"),
        ("max_tokens", "0", "at least 1"),
        ("temperature", "none", "is not a number"),
        ("colour", "red", "unknown setting"),
    ],
)
def test_set_rejects_bad_values(key: str, raw: str, fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        parse_setting(key, raw)


def test_unknown_setting_lists_the_keys() -> None:
    with pytest.raises(UsageError) as err:
        parse_command("/set colour red")
    assert all(key in str(err.value) for key in SET_KEYS)


def test_what_counts_as_a_command() -> None:
    assert is_command("/help")
    assert is_command("/?")
    assert not is_command("hello /help")
    assert not is_command("/")
    assert not is_command("//etc/hosts is a file")
    assert not is_command("/ 2")
    assert unescape_message("//etc/hosts") == "/etc/hosts"
    assert unescape_message("plain") == "plain"


def test_completion_of_command_names() -> None:
    assert completions("/he") == ["/help"]
    assert set(completions("/s")) == {"/system", "/save", "/sessions", "/stats", "/set"}
    assert "/exit" in completions("/")
    assert completions("hello") == []
    assert completions("/help\nmore") == []


def test_completion_of_arguments() -> None:
    names = ["work", "weekend", "notes"]
    assert completions("/load w", names) == ["weekend", "work"]
    assert completions("/save n", names) == ["notes"]
    assert completions("/set te") == ["temperature"]
    assert completions("/set top") == ["top_k", "top_p"]  # the settings table's order
    assert completions("/system w", names) == []
    assert completions("/load work x", names) == []


def test_every_command_s_examples_are_lines_of_their_own() -> None:
    """click joins a docstring's lines unless a paragraph starts with \\b; `bench --help`
    once ran its examples together."""
    import click
    import typer

    from kvchat.cli import app

    def walk(command: click.Command, path: list[str]) -> list[tuple[str, str]]:
        found = [(" ".join(path), command.get_help(click.Context(command, info_name=" ".join(path))))]
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                found += walk(sub, [*path, name])
        return found

    helps = walk(typer.main.get_command(app), ["kvchat"])
    assert len(helps) > 10
    for path, text in helps:
        if "Examples:" not in text:
            continue
        after = text.split("Examples:", 1)[1].strip("\n").split("\n\n", 1)[0].splitlines()
        assert after and all(line.count("kvchat ") == 1 for line in after), (path, after)
