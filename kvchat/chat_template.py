"""Render a conversation with the model's own Jinja chat template, sandboxed.

The template comes from the GGUF (`tokenizer.chat_template`); a model without one
gets ChatML. Rendering happens in Jinja's ImmutableSandboxedEnvironment, as
llama.cpp and transformers do, so a template can read but never change anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kvchat.errors import ModelFormatError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

Message = dict[str, str]


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return date.today().strftime(fmt)


class ChatTemplate:
    """A compiled chat template with the model's BOS/EOS token texts."""

    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source or CHATML
        self.is_default = source is None
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(self.source)
        except TemplateError as exc:
            raise ModelFormatError(
                f"the model's chat template does not compile: {exc}",
                hint="report it to the model's author; kvchat cannot chat with it",
            ) from exc
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> str:
        context: dict[str, Any] = {
            "messages": list(messages),
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        try:
            return self._template.render(**context)
        except TemplateError as exc:
            raise ModelFormatError(
                f"the model's chat template failed: {exc}",
                hint="check the roles of the messages (system first, then user/assistant)",
            ) from exc


_SENTINELS = ("\x00kvchat-a\x00", "\x00kvchat-b\x00", "\x00kvchat-c\x00")


def preamble_length(template: ChatTemplate) -> int:
    """Characters a template puts before the first user turn (e.g. a default
    system prompt), so that turn 1 can be dropped without dropping them.

    Found by rendering sentinel messages: the text before the second user
    message's content, after the first reply, is the user header; what precedes
    the first user header is the preamble. 0 when the template is not that regular.
    """
    one, reply, two = _SENTINELS
    try:
        first = template.render([{"role": "user", "content": one}], add_generation_prompt=False)
        pair = template.render(
            [{"role": "user", "content": one}, {"role": "assistant", "content": reply}],
            add_generation_prompt=False,
        )
        three = template.render(
            [
                {"role": "user", "content": one},
                {"role": "assistant", "content": reply},
                {"role": "user", "content": two},
            ],
            add_generation_prompt=False,
        )
    except ModelFormatError:
        return 0
    if not three.startswith(pair) or two not in three or one not in first:
        return 0
    header = three[len(pair) : three.index(two)]
    before_first = first[: first.index(one)]
    if header and before_first.endswith(header):
        return len(before_first) - len(header)
    return 0
