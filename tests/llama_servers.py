"""llama.cpp's own servers for tests (benchmarks/llama_tools.py runs them): a tool's
path, or a skip that says how to build it where it is missing, except in CI, where
it is built on first use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from llama_tools import LlamaServer, built, free_port, tool_path

__all__ = ["LlamaServer", "free_port", "llama_tool"]


def llama_tool(name: str) -> Path:
    """The tool's path; built on first use in CI, else skipped when missing."""
    paths = built()
    if paths is not None:
        return paths[name]
    if os.environ.get("CI"):
        return tool_path(name)
    pytest.skip("llama.cpp's tools are not built here: python benchmarks/llama_tools.py builds them "
                "(about 20 minutes, once per llama-cpp-python version)")
