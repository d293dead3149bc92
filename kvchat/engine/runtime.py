"""llama.cpp for the whole process: its log (what it allocated is learnt from it),
backend initialisation, what the build supports, and the AMX guard."""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_cpp.llama_cpp as llama

from kvchat.errors import KvchatError, ModelLoadError, UsageError

_MAX_KEPT_LINE = 4096  # a 1 MiB general.name echoed in the log is not kept whole


class _Log:
    """Process-wide llama.cpp log sink: records lines, echoes them when verbose."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.echo = False
        self._partial: list[str] = []
        self._partial_len = 0
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        """Linear in what arrives: a line fed in many pieces is joined once, and
        what is kept of each line is cut to _MAX_KEPT_LINE characters."""
        with self._lock:
            if self.echo:
                sys.stderr.write(text)
            *complete, rest = text.split("\n")
            if complete:
                first = "".join([*self._partial, complete[0]])
                self._partial, self._partial_len = [], 0
                self.lines.extend(line[:_MAX_KEPT_LINE] for line in (first, *complete[1:]))
            if rest and self._partial_len < _MAX_KEPT_LINE:
                self._partial.append(rest)
                self._partial_len += len(rest)

    def mark(self) -> int:
        with self._lock:
            return len(self.lines)

    def since(self, mark: int) -> list[str]:
        with self._lock:
            return self.lines[mark:]


_LOG = _Log()


# llama_cpp's ctypes bindings carry no types: the decorator is untyped.
@llama.llama_log_callback  # type: ignore[untyped-decorator]
def _log_callback(level: int, text: bytes | None, user_data: ctypes.c_void_p) -> None:
    if text:
        _LOG.write(text.decode("utf-8", errors="replace"))


llama.llama_log_set(_log_callback, ctypes.c_void_p(0))
llama.llama_backend_init()


def builtin_templates() -> list[str]:
    """Names of llama.cpp's built-in chat templates (llama_chat_builtin_templates)."""
    n = llama.llama_chat_builtin_templates((ctypes.c_char_p * 0)(), 0)
    names = (ctypes.c_char_p * max(n, 1))()
    n = llama.llama_chat_builtin_templates(names, n)
    return [names[i].decode() for i in range(max(n, 0))]


def system_info() -> str:
    return (llama.llama_print_system_info() or b"").decode("utf-8", errors="replace")


# Set to 1 to let llama.cpp put weights in its AMX buffer all the same.
AMX_ENV = "KVCHAT_AMX"


def amx_guard() -> str | None:
    """Why weights load without llama.cpp's extra CPU buffer types here, or None.

    On CPUs with AMX, a llama.cpp built for the machine puts weights in its AMX
    buffer first, and its matrix kernel crashes the process on some of them (seen
    on Xeon machines with Q4_1 and Q4_K weights: a segfault in
    ggml_backend_amx_mul_mat; ggml-org/llama.cpp#20824, #26954). Without the extra
    buffer types (llama.cpp's --no-repack) weights stay in the plain CPU buffer:
    slower prompt processing, never a crash. KVCHAT_AMX=1 opts back in.
    """
    if os.environ.get(AMX_ENV) == "1" or "AMX_INT8 = 1" not in system_info():
        return None
    return ("llama.cpp's AMX kernels crash on some CPUs; weights load without repacking "
            f"({AMX_ENV}=1 allows it)")


def supports_gpu_offload() -> bool:
    return bool(llama.llama_supports_gpu_offload())


def backend_version() -> str:
    """The llama-cpp-python version, which pins the llama.cpp it vendors."""
    import llama_cpp

    return str(llama_cpp.__version__)


def load_model(model_path: Path, n_gpu_layers: int, tensor_split: tuple[float, ...]) -> Any:
    """The model's weights, loaded (a ctypes handle; the caller frees it)."""
    mparams = llama.llama_model_default_params()
    mparams.n_gpu_layers = n_gpu_layers
    if amx_guard() is not None:
        mparams.use_extra_bufts = False
    if tensor_split:  # llama.cpp copies it while loading (llama_model's constructor)
        split = (ctypes.c_float * llama.llama_max_devices())(*tensor_split)
        mparams.tensor_split = ctypes.cast(split, ctypes.POINTER(ctypes.c_float))
    model = llama.llama_model_load_from_file(str(model_path).encode(), mparams)
    if not model:
        raise ModelLoadError(f"llama.cpp could not load '{model_path}'",
                             hint="run with --verbose to see llama.cpp's reason")
    return model


def apply_builtin_template(name: str, messages: Sequence[dict[str, str]], *,
                           add_generation_prompt: bool) -> str:
    """Render `messages` with llama.cpp's built-in template `name`
    (llama_chat_apply_template; see builtin_templates())."""
    keep = [(m["role"].encode(), m["content"].encode()) for m in messages]
    chat = (llama.llama_chat_message * max(len(keep), 1))()
    for i, (role, content) in enumerate(keep):
        chat[i].role = role
        chat[i].content = content
    size = max(256, 2 * sum(len(r) + len(c) for r, c in keep) + 256)
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = llama.llama_chat_apply_template(name.encode(), chat, len(keep), add_generation_prompt, buf, size)
        if n < 0:
            raise UsageError(f"llama.cpp has no built-in chat template '{name}'",
                             hint="see `kvchat show MODEL` or pass a Jinja file to --chat-template")
        if n <= size:
            return buf.raw[:n].decode("utf-8", errors="replace")
        size = n + 1
    raise KvchatError(f"llama.cpp's '{name}' template output did not fit its buffer")
