"""The OpenAI API's shapes: request bodies checked field by field into the
application layer's `Request`, replies and stream chunks, and errors as OpenAI
sends them (`{"error": {"message", "type", "param", "code"}}`).

Checks are about shape and range; what a request means is the application
layer's business. Fields OpenAI clients send that change nothing here (`user`,
`parallel_tool_calls`, zero penalties, ...) are accepted and ignored; fields that
would change the answer in a way this server cannot honour are a 400 that says so.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any, cast

from kvchat.app.serving import Outcome, Request
from kvchat.engine_api import SamplingSettings

MAX_STOPS = 16
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


class ApiError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"'{param}': {message}", param=param, code="invalid_value")


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body: one JSON object."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({str(exc)[:120]})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    return body


# -- fields ------------------------------------------------------------------------------


def _number(body: dict[str, Any], name: str, low: float, high: float, *,
            open_low: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, f"must be a number, not {json.dumps(value)[:40]}")
    if value < low or value > high or (open_low and value == low):
        raise _bad(name, f"must be {'above' if open_low else 'at least'} {low:g} and at most {high:g}")
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"must be a whole number, not {json.dumps(value)[:40]}")
    if not low <= value <= high:
        raise _bad(name, f"must be between {low} and {high}")
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(name, "must be true or false")
    return value


def _object(body: dict[str, Any], name: str) -> dict[str, Any]:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(name, "must be an object")
    return value


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise _bad("stop", "must be a string or a list of strings")
    if len(values) > MAX_STOPS:
        raise _bad("stop", f"at most {MAX_STOPS} stop strings")
    return tuple(v for v in values if v)


def _check_model(body: dict[str, Any], names: Collection[str]) -> None:
    model = body.get("model")
    if model is None:
        return  # one model is served: a client that names none gets it
    if not isinstance(model, str):
        raise _bad("model", "must be a string")
    if model not in names:
        raise ApiError(404, f"the model '{model[:200]}' is not served here; GET /v1/models lists it",
                       param="model", code="model_not_found")


def _unsupported(body: dict[str, Any]) -> None:
    """Options that would change the answer in a way this server cannot honour."""
    n = _integer(body, "n", 1, 1 << 30)
    if n is not None and n != 1:
        raise _bad("n", "only one choice per request (n = 1) is served")
    if body.get("logprobs") not in (None, False):
        raise _bad("logprobs", "log probabilities are not served")
    fmt = _object(body, "response_format")
    if fmt and fmt.get("type") != "text":
        raise _bad("response_format", "only {'type': 'text'} is served (no JSON mode or schema)")


def _sampling(body: dict[str, Any], default: SamplingSettings) -> SamplingSettings:
    s = default
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0, open_low=True)
    top_k = _integer(body, "top_k", 0, 1 << 30)
    min_p = _number(body, "min_p", 0.0, 1.0)
    repeat = _number(body, "repeat_penalty", 0.0, 10.0, open_low=True)
    # OpenAI's, applied as llama.cpp (and llama-server) applies them: over the last 64 tokens.
    presence = _number(body, "presence_penalty", -2.0, 2.0)
    frequency = _number(body, "frequency_penalty", -2.0, 2.0)
    seed = _integer(body, "seed", -(1 << 63), (1 << 64) - 1)
    return replace(
        s,
        temperature=s.temperature if temperature is None else temperature,
        top_p=s.top_p if top_p is None else top_p,
        top_k=s.top_k if top_k is None else top_k,
        min_p=s.min_p if min_p is None else min_p,
        repeat_penalty=s.repeat_penalty if repeat is None else repeat,
        presence_penalty=s.presence_penalty if presence is None else presence,
        frequency_penalty=s.frequency_penalty if frequency is None else frequency,
        # OpenAI seeds are 64-bit; llama.cpp's sampler takes 32 bits.
        seed=s.seed if seed is None else seed % (1 << 32),
    )


def _max_tokens(body: dict[str, Any], default: int | None) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = _integer(body, name, 1, 1 << 30)
        if value is not None:
            return value
    return default


# -- messages and tools ---------------------------------------------------------------------


def _content(value: Any, param: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _bad(param, "must be a string or a list of content parts")
    texts = []
    for i, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else None
            raise _bad(f"{param}[{i}]", f"only text parts are read (this part is {json.dumps(kind)[:40]})")
        texts.append(part["text"])
    return "\n".join(texts)


def _tool_call(value: Any, param: str) -> dict[str, Any]:
    fn = value.get("function") if isinstance(value, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise _bad(param, "must be {'type': 'function', 'function': {'name': ..., 'arguments': ...}}")
    arguments = fn.get("arguments", {})
    if isinstance(arguments, str):
        # Templates (Qwen, Llama 3.1, Hermes) write arguments as an object (`| tojson`):
        # give them the object the model wrote, as transformers does.
        with contextlib.suppress(ValueError):
            arguments = json.loads(arguments) if arguments.strip() else {}
    return {"id": str(value.get("id", "")), "type": "function",
            "function": {"name": fn["name"], "arguments": arguments}}


def _message(value: Any, i: int) -> dict[str, Any]:
    param = f"messages[{i}]"
    if not isinstance(value, dict):
        raise _bad(param, "must be an object with a role and content")
    given = value.get("role")
    role = _ROLES.get(given) if isinstance(given, str) else None
    if role is None:
        raise _bad(f"{param}.role", f"must be one of {', '.join(_ROLES)}")
    out: dict[str, Any] = {"role": role, "content": _content(value.get("content"), f"{param}.content")}
    calls = value.get("tool_calls")
    if role == "assistant" and calls is not None:
        if not isinstance(calls, list):
            raise _bad(f"{param}.tool_calls", "must be a list")
        out["tool_calls"] = [_tool_call(c, f"{param}.tool_calls[{j}]") for j, c in enumerate(calls)]
    for key in ("name", "tool_call_id", "reasoning_content"):
        if isinstance(value.get(key), str):
            out[key] = value[key]
    return out


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise _bad("messages", "must be a non-empty list of messages")
    messages = [_message(m, i) for i, m in enumerate(value)]
    if messages[-1]["role"] not in ("user", "tool"):
        raise _bad("messages", "the last message must be the user's (or a tool's result) to answer")
    return messages


def _tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    value = body.get("tools")
    if value is None or body.get("tool_choice") == "none":
        return None
    if not isinstance(value, list):
        raise _bad("tools", "must be a list of {'type': 'function', 'function': {...}}")
    for i, tool in enumerate(value):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(f"tools[{i}]",
                       "must be {'type': 'function', 'function': {'name': ..., 'parameters': ...}}")
    return value or None


def tool_names(tools: list[dict[str, Any]] | None) -> set[str]:
    return {t["function"]["name"] for t in tools or []}


# -- requests --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """A checked request: what to ask the model, and how to answer over HTTP."""

    request: Request
    stream: bool
    include_usage: bool


def chat_call(body: dict[str, Any], names: Collection[str], sampling: SamplingSettings,
              max_tokens: int | None) -> Call:
    """POST /v1/chat/completions."""
    _check_model(body, names)
    _unsupported(body)
    messages = _messages(body)
    tools = _tools(body)
    kwargs = _object(body, "chat_template_kwargs")
    request = Request(cast("list[dict[str, str]]", messages), _sampling(body, sampling),
                      _max_tokens(body, max_tokens), _stops(body), tools=tools,
                      template_kwargs={k: v for k, v in kwargs.items() if k != "tools"})
    return Call(request, _flag(body, "stream"), _flag(_object(body, "stream_options"), "include_usage"))


def completion_call(body: dict[str, Any], names: Collection[str], sampling: SamplingSettings) -> Call:
    """POST /v1/completions: plain text completion, no template."""
    _check_model(body, names)
    _unsupported(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _bad("prompt", "must be a non-empty string (token ids and several prompts are not served)")
    if _flag(body, "echo") or body.get("suffix") not in (None, "") or body.get("best_of") not in (None, 1):
        raise _bad("echo" if body.get("echo") else "suffix" if body.get("suffix") else "best_of",
                   "is not served")
    # OpenAI's legacy completions default to 16 tokens.
    request = Request([{"role": "user", "content": prompt}], _sampling(body, sampling),
                      _max_tokens(body, 16), _stops(body), raw=True)
    return Call(request, _flag(body, "stream"), _flag(_object(body, "stream_options"), "include_usage"))


# -- replies ---------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(outcome: Outcome) -> dict[str, Any]:
    return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": outcome.cached_tokens}}


def chat_chunk(cid: str, created: int, model: str, delta: dict[str, Any],
               finish: str | None = None) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def text_chunk(cid: str, created: int, model: str, text: str, finish: str | None = None) -> dict[str, Any]:
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(cid: str, created: int, model: str, obj: str, outcome: Outcome) -> dict[str, Any]:
    return {"id": cid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(outcome)}
