"""Choosing a chat template: a user's own --chat-template file that is broken is the
user's usage error, about that file; the model's own broken template is the model's."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from kvchat.chat_template import Message, TemplateFileError, preamble_length, select_template
from kvchat.errors import ExitCode, ModelFormatError


class _Model:
    """What select_template reads from a loaded model, with a template of our choosing."""

    def __init__(self, template: str | None = None) -> None:
        self._template = template

    def chat_template(self) -> str | None:
        return self._template

    def metadata(self, key: str) -> str | None:
        return None

    def has_special_token(self, text: str) -> bool:
        return False

    def builtin_template_names(self) -> list[str]:
        return ["chatml"]

    def apply_builtin_template(self, name: str, messages: Sequence[Message], *,
                               add_generation_prompt: bool) -> str:
        return ""

    def token_text(self, token: int) -> str:
        return ""

    @property
    def bos_token(self) -> int:
        return 1

    @property
    def eos_token(self) -> int:
        return 2


HI = [{"role": "user", "content": "hi"}]


def test_a_file_that_does_not_compile_is_a_usage_error_about_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}")  # no endfor
    with pytest.raises(TemplateFileError) as caught:
        select_template(_Model(), str(path))
    error = caught.value
    assert error.exit_code == ExitCode.USAGE
    assert str(path) in error.message and "does not compile" in error.message
    assert "author" not in str(error) and "mine.jinja" in (error.hint or "")


def test_a_file_that_fails_to_render_is_a_usage_error_about_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.jinja"
    path.write_text("{{ raise_exception('only system roles, please') }}")
    template, _ = select_template(_Model(), str(path))
    with pytest.raises(TemplateFileError) as caught:
        template.render(HI, add_generation_prompt=True)
    assert caught.value.exit_code == ExitCode.USAGE
    assert str(path) in caught.value.message and "only system roles" in caught.value.message
    assert "roles of the messages" not in str(caught.value)  # the file is at fault, not the prompt
    assert preamble_length(template) == 0  # finding the preamble still tolerates it


def test_a_file_over_the_time_budget_is_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "mine.jinja"
    path.write_text("{{ 'x' * 100000000 }}")
    template, _ = select_template(_Model(), str(path))
    with pytest.raises(TemplateFileError) as caught:
        preamble_length(template)
    assert caught.value.over_limit and str(path) in caught.value.message


def test_the_model_s_own_broken_template_stays_the_model_s_fault() -> None:
    with pytest.raises(ModelFormatError) as caught:
        select_template(_Model("{% if %}"))
    assert caught.value.exit_code == ExitCode.BAD_MODEL and "author" in str(caught.value)
