"""Render a conversation with the model's own Jinja chat template, sandboxed.

The template comes from, in order: `--chat-template NAME|FILE`; the GGUF
(`tokenizer.chat_template`); for a GGUF without one, llama.cpp's built-in
template of the family recognised from its special tokens or architecture;
else ChatML, said once. `--raw` renders no template at all (plain completion).
Jinja renders in an ImmutableSandboxedEnvironment, as llama.cpp and transformers
do, so a template can read but never change anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from datetime import date
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from jinja2 import TemplateError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

from kvchat.errors import ModelFormatError, UsageError

# A template is code from a downloaded file: each render gets a time budget and an
# output budget (on top of what the messages themselves bring), and no single value
# it builds (`'x' * 10**8`, a doubled string) may grow past MAX_VALUE_CHARS.
RENDER_TIMEOUT_S = 2.0
MAX_TEMPLATE_CHARS = 1 << 20
MAX_VALUE_CHARS = 1 << 22
_CHECK_EVERY = 1024

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Plain completion: the messages' texts back to back, nothing around them.
RAW = "{% for message in messages %}{{ message['content'] }}{% endfor %}"

Message = dict[str, str]
RenderFn = Callable[[Sequence[Message], bool], str]


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return date.today().strftime(fmt)


class TemplateLimitError(ModelFormatError):
    """The template ran too long or produced too much: broken or hostile."""


class TemplateFileError(UsageError):
    """The user's own `--chat-template FILE` does not compile or fails to render: theirs
    to fix, so a usage error naming the file (not the model's author's)."""

    def __init__(self, path: Path, exc: ModelFormatError) -> None:
        what = exc.message.replace("the model's chat template", f"the chat template {path}", 1)
        super().__init__(what, hint=f"fix {path.name}, or drop --chat-template to use the model's own")
        self.over_limit = isinstance(exc, TemplateLimitError)


class _Budget:
    """The deadline of the render in progress."""

    def __init__(self) -> None:
        self.deadline = float("inf")
        self.ticks = 0

    def tick(self) -> None:
        self.ticks += 1
        if self.ticks % _CHECK_EVERY == 0:
            self.check()

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(
                f"the model's chat template ran for more than {RENDER_TIMEOUT_S:g} s",
                hint="the template is broken or hostile; use another model or file",
            )


def _too_big(value: object) -> bool:
    return isinstance(value, (str, bytes, list, tuple)) and len(value) > MAX_VALUE_CHARS


class _LimitedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with time checks in loops and calls and size checks on operators."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def __init__(self, budget: _Budget, **options: Any) -> None:
        super().__init__(**options)
        self.budget = budget
        self.globals["range"] = self._range

    def _range(self, *args: int) -> Iterator[int]:
        budget = self.budget
        budget.check()
        for i in safe_range(*args):
            budget.tick()
            yield i

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        self.budget.tick()
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(right) > 64 \
                and abs(left) > 1:
            raise TemplateLimitError(
                "the model's chat template computes a huge power",
                hint="the template is broken or hostile; use another model or file",
            )
        if operator == "*" and isinstance(right, int) and isinstance(left, (str, list, tuple)):
            left, right = right, left
        if operator == "*" and isinstance(left, int) and isinstance(right, (str, list, tuple)) \
                and left * len(right) > MAX_VALUE_CHARS:
            raise TemplateLimitError(
                f"the model's chat template builds a value of {left * len(right)} items",
                hint="the template is broken or hostile; use another model or file",
            )
        result = super().call_binop(context, operator, left, right)
        if _too_big(result):
            raise TemplateLimitError(
                f"the model's chat template builds a value of {len(result)} items",
                hint="the template is broken or hostile; use another model or file",
            )
        return result

    def call(self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        self.budget.check()
        result = super().call(__context, __obj, *args, **kwargs)
        if _too_big(result):
            raise TemplateLimitError(
                f"the model's chat template builds a value of {len(result)} items",
                hint="the template is broken or hostile; use another model or file",
            )
        return result


class ChatTemplate:
    """A compiled chat template with the model's BOS/EOS token texts.

    `origin` says where it came from (shown by /info and `kvchat show`);
    `render_fn`, when given, renders instead of Jinja (llama.cpp's built-in
    templates); `variables` are extra names the template sees (enable_thinking);
    `file`: the user's --chat-template file the source was read from, whose
    failures are TemplateFileError.
    """

    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "",
                 origin: str | None = None, render_fn: RenderFn | None = None,
                 variables: dict[str, Any] | None = None, file: Path | None = None) -> None:
        self.file = file
        self.source = source or CHATML
        self.is_default = source is None and render_fn is None
        self.origin = origin or ("ChatML (kvchat's fallback)" if source is None
                                 else "tokenizer.chat_template")
        self.render_fn = render_fn
        self.variables = dict(variables or {})
        self._budget = _Budget()
        env = _LimitedEnvironment(self._budget, trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(self.source)
        except (TemplateError, RecursionError, MemoryError, ValueError, OverflowError) as exc:
            error = ModelFormatError(
                f"the model's chat template does not compile: {exc}",
                hint="report it to the model's author; kvchat cannot chat with it",
            )
            raise (error if file is None else TemplateFileError(file, error)) from exc
        self.bos_token = bos_token
        self.eos_token = eos_token

    @property
    def supports_thinking(self) -> bool:
        """The template switches reasoning on and off with `enable_thinking` (Qwen3 style)."""
        return self.render_fn is None and "enable_thinking" in self.source

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> str:
        if self.render_fn is not None:
            return self.render_fn(messages, add_generation_prompt)
        try:
            return self._render(messages, add_generation_prompt)
        except ModelFormatError as exc:
            if self.file is None:
                raise
            raise TemplateFileError(self.file, exc) from exc

    def _render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        context: dict[str, Any] = {
            **self.variables,
            "messages": list(messages),
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        limit = MAX_TEMPLATE_CHARS + 2 * sum(len(str(m.get("content", ""))) for m in messages)
        self._budget.deadline = time.monotonic() + RENDER_TIMEOUT_S
        parts: list[str] = []
        size = 0
        try:
            for piece in self._template.generate(**context):
                size += len(piece)
                if size > limit:
                    raise TemplateLimitError(
                        f"the model's chat template produced more than {limit} characters",
                        hint="the template is broken or hostile; use another model or file",
                    )
                parts.append(piece)
                self._budget.tick()
        except TemplateLimitError:
            raise
        except TemplateError as exc:
            raise ModelFormatError(
                f"the model's chat template failed: {str(exc)[:200]}",
                hint="check the roles of the messages (system first, then user/assistant)",
            ) from exc
        except (RecursionError, MemoryError, OverflowError, ArithmeticError, TypeError, ValueError,
                AttributeError, IndexError, KeyError) as exc:
            raise ModelFormatError(
                f"the model's chat template failed: {type(exc).__name__}: {str(exc)[:200]}",
                hint="the template is broken; use another model or file",
            ) from exc
        finally:
            self._budget.deadline = float("inf")
        return "".join(parts)


# Placeholder message texts for finding where a template puts things (no real text has NULs).
TURN_SENTINELS = ("\x00kvchat-a\x00", "\x00kvchat-b\x00", "\x00kvchat-c\x00")


def preamble_length(template: ChatTemplate) -> int:
    """Characters a template puts before the first user turn (e.g. a default
    system prompt), so that turn 1 can be dropped without dropping them.

    Found by rendering sentinel messages: the text before the second user
    message's content, after the first reply, is the user header; what precedes
    the first user header is the preamble. 0 when the template is not that regular.
    """
    one, reply, two = TURN_SENTINELS
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
    except TemplateLimitError:
        raise
    except TemplateFileError as exc:
        if exc.over_limit:
            raise
        return 0
    except ModelFormatError:
        return 0
    if not three.startswith(pair) or two not in three or one not in first:
        return 0
    header = three[len(pair) : three.index(two)]
    before_first = first[: first.index(one)]
    if header and before_first.endswith(header):
        return len(before_first) - len(header)
    return 0


# Control tokens that give a family away, most specific first, and the built-in
# llama.cpp template (llama-chat.cpp LLM_CHAT_TEMPLATES) that goes with each.
_FAMILY_TOKENS = (
    ("<start_of_turn>", "gemma"),
    ("<|start_header_id|>", "llama3"),
    ("<|channel|>", "gpt-oss"),
    ("<|start_of_role|>", "granite"),
    ("<|im_start|>", "chatml"),
    ("[INST]", "mistral-v7"),
    ("<|user|>", "phi3"),
)
_FAMILY_ARCH = {
    "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma",
    "llama": "llama2", "llama4": "llama4", "phi3": "phi3", "qwen2": "chatml", "qwen3": "chatml",
    "qwen3moe": "chatml", "lfm2": "chatml", "granite": "granite", "granitehybrid": "granite-4.0",
    "gpt-oss": "gpt-oss", "command-r": "command-r", "cohere2": "command-r", "exaone": "exaone3",
    "exaone4": "exaone4", "deepseek2": "deepseek2", "rwkv6": "rwkv-world", "rwkv7": "rwkv-world",
    "chatglm": "chatglm4", "glm4": "chatglm4", "minicpm": "minicpm",
}


class TemplateModel(Protocol):
    """What choosing a template needs from a loaded model (kvchat.engine.Engine, or
    llama-server through its API)."""

    def chat_template(self) -> str | None: ...
    def has_special_token(self, text: str) -> bool: ...
    def token_text(self, token: int) -> str: ...
    @property
    def bos_token(self) -> int: ...
    @property
    def eos_token(self) -> int: ...


def recognise_family(arch: str, has_token: Callable[[str], bool],
                     names: Sequence[str] | None = None) -> tuple[str, str] | None:
    """(built-in template name, how it was recognised) for a model without a
    template, from its control tokens, else its architecture. `names`: the
    built-in templates of the llama.cpp at hand (None: trust the tables)."""
    known = set(names) if names is not None else None
    for token, family in _FAMILY_TOKENS:
        if (known is None or family in known) and has_token(token):
            return family, f"its vocabulary has {token}"
    by_arch = _FAMILY_ARCH.get(arch)
    if by_arch is not None and (known is None or by_arch in known):
        return by_arch, f"architecture {arch}"
    return None


@runtime_checkable
class BuiltinTemplates(Protocol):
    """Capability of a model loaded here: llama.cpp's built-in templates, and the
    GGUF metadata that recognises a family without a template."""

    def metadata(self, key: str) -> str | None: ...
    def builtin_template_names(self) -> list[str]: ...
    def apply_builtin_template(self, name: str, messages: Sequence[Message], *,
                               add_generation_prompt: bool) -> str: ...


def _builtin(model: BuiltinTemplates, name: str, origin: str) -> ChatTemplate:
    def render(messages: Sequence[Message], add_generation_prompt: bool) -> str:
        return model.apply_builtin_template(name, messages, add_generation_prompt=add_generation_prompt)

    return ChatTemplate(None, origin=origin, render_fn=render)


def select_template(model: TemplateModel, override: str | None = None, *, raw: bool = False,
                    variables: dict[str, Any] | None = None) -> tuple[ChatTemplate, str | None]:
    """The template to chat with, and a one-line notice when the user should know
    (a fallback to ChatML). `override` is a built-in name or a Jinja file."""
    bos, eos = model.token_text(model.bos_token), model.token_text(model.eos_token)
    if raw:
        return ChatTemplate(RAW, bos_token=bos, eos_token=eos, origin="none (--raw: plain completion)"), None
    if override:
        path = Path(override).expanduser()
        if path.is_file():
            try:
                source = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise UsageError(f"cannot read the chat template {path}: {exc}",
                                 hint="pass a UTF-8 Jinja file or a built-in name") from exc
            return ChatTemplate(source, bos_token=bos, eos_token=eos, origin=f"file {path}",
                                variables=variables, file=path), None
        if not isinstance(model, BuiltinTemplates):
            raise UsageError(f"--chat-template '{override}' is not a file, and llama.cpp's built-in "
                             "templates are only at hand for a model loaded here",
                             hint="pass a Jinja file with --chat-template, or use the server's own template")
        names = model.builtin_template_names()
        if override in names:
            return _builtin(model, override, f"llama.cpp built-in '{override}' (--chat-template)"), None
        raise UsageError(f"--chat-template '{override}' is neither a file nor a built-in template",
                         hint="built-in names: " + ", ".join(names))
    own = model.chat_template()
    if own:
        return ChatTemplate(own, bos_token=bos, eos_token=eos, variables=variables), None
    if isinstance(model, BuiltinTemplates):
        found = recognise_family(model.metadata("general.architecture") or "", model.has_special_token,
                                 model.builtin_template_names())
        if found is not None:
            name, why = found
            origin = f"llama.cpp built-in '{name}' (no template in the GGUF; {why})"
            return _builtin(model, name, origin), None
    notice = ("the model has no chat template and kvchat does not recognise its family: using ChatML; "
              "pass --chat-template NAME|FILE, or --raw for plain completion")
    return ChatTemplate(None, bos_token=bos, eos_token=eos), notice
