"""The AMX guard: where llama.cpp was built with AMX, weights load without its extra
CPU buffer types (its AMX matmul kernel segfaults on some Xeons), unless KVCHAT_AMX=1."""

from __future__ import annotations

import pytest

from kvchat.engine import runtime as engine


def test_amx_build_loads_weights_without_extra_buffer_types(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(engine.AMX_ENV, raising=False)
    monkeypatch.setattr(engine, "system_info", lambda: "CPU : AVX2 = 1 | AMX_INT8 = 1 | REPACK = 1 |")
    reason = engine.amx_guard()
    assert reason is not None and "KVCHAT_AMX=1" in reason
    monkeypatch.setenv(engine.AMX_ENV, "1")
    assert engine.amx_guard() is None


def test_no_amx_keeps_repacking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(engine.AMX_ENV, raising=False)
    monkeypatch.setattr(engine, "system_info", lambda: "CPU : AVX2 = 1 | REPACK = 1 |")
    assert engine.amx_guard() is None


def test_tools_get_the_same_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    import llama_tools

    monkeypatch.delenv(engine.AMX_ENV, raising=False)
    monkeypatch.delenv("LLAMA_ARG_REPACK", raising=False)
    monkeypatch.setattr(engine, "system_info", lambda: "CPU : AMX_INT8 = 1 |")
    assert llama_tools.tool_env()["LLAMA_ARG_REPACK"] == "0"
    monkeypatch.setattr(engine, "system_info", lambda: "CPU : AVX2 = 1 |")
    assert "LLAMA_ARG_REPACK" not in llama_tools.tool_env()
