"""llama.cpp's own servers for tests: start one on a free loopback port, wait until it
answers /health, keep its log, stop it (or kill it, to test what kvchat does then).

The binaries come from benchmarks/llama_tools.py (built once per llama-cpp-python
version, outside the repo). Where they are not built, a test is skipped with the
command that builds them, except in CI, where they are built on first use.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx2
import pytest
from llama_tools import built, tool_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def llama_tool(name: str) -> Path:
    """The tool's path; built on first use in CI, else skipped when missing."""
    paths = built()
    if paths is not None:
        return paths[name]
    if os.environ.get("CI"):
        return tool_path(name)
    pytest.skip("llama.cpp's tools are not built here: python benchmarks/llama_tools.py builds them "
                "(about 20 minutes, once per llama-cpp-python version)")


class LlamaServer:
    """A llama-server (or rpc-server: `health=False`) process on a free port."""

    def __init__(self, binary: Path, *args: str, health: bool = True, startup_s: float = 180) -> None:
        self.port = free_port()
        self.binary = binary
        self.args = list(args)
        self.health = health
        self.startup_s = startup_s
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile(prefix=f"{binary.name}-", suffix=".log", delete=False)  # noqa: SIM115 - the server writes it while it runs
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> str:
        return Path(self._log.name).read_text(encoding="utf-8", errors="replace")

    def start(self) -> LlamaServer:
        where = ["--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen([str(self.binary), *self.args, *where], stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.binary.name} exited ({self.proc.returncode}):\n{self.log[-3000:]}")
            if self._ready():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.binary.name} did not start in {self.startup_s:.0f}s:\n{self.log[-3000:]}")

    def _ready(self) -> bool:
        if not self.health:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        try:
            return httpx2.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx2.TransportError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        Path(self._log.name).unlink(missing_ok=True)
