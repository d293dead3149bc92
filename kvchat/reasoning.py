"""Telling a thinking model's reasoning from its answer, as the text streams.

Thinking models (Qwen3, DeepSeek-R1, SmolLM3, ...) write their reasoning between
`<think>` and `</think>`; some templates open the block in the generation prompt,
so the reply starts inside it. `ReasoningSplitter` takes the reply's text piece
by piece and says which part is reasoning and which is answer, holding back a
piece that may be the start of a tag until the next one decides. The tags
themselves belong to neither part. What stays in the history is the model's full
text: the chat template decides whether old reasoning is kept (kvchat.session).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvchat.errors import ModelFormatError

if TYPE_CHECKING:
    from kvchat.chat_template import ChatTemplate, Message

OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"


def template_has_reasoning(source: str) -> bool:
    """A template that knows about reasoning blocks (it strips or opens them)."""
    return CLOSE_TAG in source


def opens_in_prompt(prompt: str) -> bool:
    """The rendered prompt ends inside an open reasoning block."""
    return prompt.rfind(OPEN_TAG) > prompt.rfind(CLOSE_TAG)


class ReasoningSplitter:
    """Split streamed text into (reasoning, answer) parts."""

    def __init__(self, *, inside: bool = False) -> None:
        self.inside = inside
        self._held = ""

    def feed(self, text: str) -> tuple[str, str]:
        """Reasoning and answer text decided by this piece (either may be '')."""
        data = self._held + text
        self._held = ""
        reasoning: list[str] = []
        answer: list[str] = []
        while data:
            tag = CLOSE_TAG if self.inside else OPEN_TAG
            at = data.find(tag)
            if at >= 0:
                (reasoning if self.inside else answer).append(data[:at])
                data = data[at + len(tag) :]
                self.inside = not self.inside
                continue
            keep = _partial_suffix(data, tag)
            (reasoning if self.inside else answer).append(data[: len(data) - keep])
            self._held = data[len(data) - keep :]
            break
        return "".join(reasoning), "".join(answer)

    def flush(self) -> tuple[str, str]:
        """What is held back, once the reply has ended."""
        held, self._held = self._held, ""
        return (held, "") if self.inside else ("", held)

    def split(self, text: str, *, last: bool) -> tuple[str, str, bool]:
        """One token's text as (reasoning, answer), and whether the token counts as
        reasoning (it wrote some, or fell inside a block); `last`: the reply ends with
        it, so what was held back is given out too."""
        was_inside = self.inside
        reasoning, answer = self.feed(text)
        if last:
            more_reasoning, more_answer = self.flush()
            reasoning, answer = reasoning + more_reasoning, answer + more_answer
        return reasoning, answer, bool(reasoning) or (was_inside and self.inside)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def prefilled_reply(template: ChatTemplate, messages: list[Message], kv_text: str) -> str:
    """Text the generation prompt already wrote into the reply (a reasoning block
    opened, or closed empty by enable_thinking=false): it is part of the reply as
    the template renders it back, so the history keeps it with the model's text.
    `kv_text` is the rendered conversation with the generation prompt."""
    from kvchat.chat_template import TURN_SENTINELS

    try:
        before = template.render(messages, add_generation_prompt=False)
        reply: Message = {"role": "assistant", "content": TURN_SENTINELS[1]}
        with_reply = template.render([*messages, reply], add_generation_prompt=False)
    except ModelFormatError:
        return ""
    if not with_reply.startswith(before) or TURN_SENTINELS[1] not in with_reply:
        return ""
    header = with_reply[len(before) : with_reply.index(TURN_SENTINELS[1])]
    start = len(before) + len(header)
    if not kv_text.startswith(before + header):
        return ""
    tail = kv_text[start:]
    return tail if OPEN_TAG in tail else ""
