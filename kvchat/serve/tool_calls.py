"""Tool calls in a model's reply, as OpenAI `tool_calls`.

The formats of the catalogue's families:

- Qwen 2.5/3, Hermes, SmolLM3 and other ChatML tool templates: each call is
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, after any text;
- Llama 3.1/3.2/3.3: the reply is a JSON object `{"name": ..., "parameters": {...}}`
  (optionally after `<|python_tag|>`), several separated by `;` or new lines.

Only calls to functions the request declared are taken: a reply that merely is
JSON stays text. While a reply streams, `ToolCallStream` passes text through and
holds back what may be a call, so that a call is never shown as text.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
_HERMES = re.compile(re.escape(OPEN_TAG) + r"(.*?)(?:" + re.escape(CLOSE_TAG) + r"|\Z)", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as OpenAI sends it

    def to_openai(self, index: int | None = None) -> dict[str, object]:
        call: dict[str, object] = {"id": self.id, "type": "function",
                                   "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def _call(obj: object, names: Collection[str]) -> ToolCall | None:
    """A call from a decoded JSON value: a declared name and an object of arguments."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(name, str) or name not in names or not isinstance(args, dict):
        return None
    return ToolCall("call_" + uuid.uuid4().hex[:24], name, json.dumps(args, ensure_ascii=False))


def _json_values(text: str) -> list[object] | None:
    """The JSON values `text` is made of (separated by whitespace or `;`), or None."""
    decoder = json.JSONDecoder()
    values: list[object] = []
    at = 0
    while True:
        while at < len(text) and (text[at].isspace() or text[at] == ";"):
            at += 1
        if at == len(text):
            return values
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return None
        values.append(value)


def parse_tool_calls(text: str, names: Collection[str]) -> tuple[str, list[ToolCall]]:
    """(the reply's text apart from its calls, the calls); ([text], []) when none."""
    if OPEN_TAG in text:
        calls: list[ToolCall] = []
        for match in _HERMES.finditer(text):
            values = _json_values(match.group(1).strip())
            found = [_call(v, names) for v in values or []]
            if not found or None in found:
                return text, []
            calls.extend(c for c in found if c is not None)
        return text[: text.index(OPEN_TAG)].strip(), calls
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG) :].strip()
    if body.startswith("{"):
        values = _json_values(body)
        found = [_call(v, names) for v in values or []]
        if found and None not in found:
            return "", [c for c in found if c is not None]
    return text, []


def _partial_suffix(text: str, tag: str) -> int:
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ToolCallStream:
    """Streams a reply's text while holding back what may be a tool call: from a
    `<tool_call>` tag on, or the whole reply where it opens like Llama's JSON."""

    def __init__(self, names: Collection[str]) -> None:
        self.names = names
        self._text = ""
        self._sent = 0
        self._holding = False

    def feed(self, piece: str) -> str:
        """The text that can be shown now."""
        self._text += piece
        if self._holding:
            return ""
        lead = self._text.lstrip()
        if self._sent == 0 and (not lead or lead.startswith(("{", PYTHON_TAG[: len(lead)]))):
            # Maybe a JSON call (or only whitespace yet): decide when the reply ends.
            self._holding = bool(lead) and (lead.startswith("{") or lead.startswith(PYTHON_TAG))
            return ""
        at = self._text.find(OPEN_TAG, self._sent)
        end = at if at >= 0 else len(self._text) - _partial_suffix(self._text, OPEN_TAG)
        self._holding = at >= 0
        out, self._sent = self._text[self._sent : end], end
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(the rest of the text to show, the calls) once the reply has ended."""
        _, calls = parse_tool_calls(self._text, self.names)
        if not calls:
            return self._text[self._sent :], []
        at = self._text.find(OPEN_TAG)
        return (self._text[self._sent : at] if at > self._sent else ""), calls
