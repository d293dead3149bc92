"""llama.cpp's own tools (llama-server, rpc-server, llama-bench), built once per
llama-cpp-python version from the llama.cpp it vendors.

Tests and benchmarks share this script: the tools are the anchors kvchat is
measured against and the real engines its remote path is tested with. Nothing is
built inside the repository and no binary is committed: the sdist of the
installed llama-cpp-python is downloaded from the package index (sha256 checked) and built with
cmake under a cache folder keyed by version

    $KVCHAT_TOOLS_CACHE (default ~/.cache/kvchat-dev/llama-tools)/<version>/bin

Usage:  python benchmarks/llama_tools.py          build if needed, print the paths
        python benchmarks/llama_tools.py --check  exit 1 unless already built
From Python: `tool_path("llama-server")` builds on first use and returns the path;
`with LlamaServer(tool_path("llama-server"), "-m", model) as server:` runs one on a
free loopback port until it answers /health (its log kept in `server.log`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from importlib.metadata import version
from pathlib import Path
from types import TracebackType

import httpx2

TOOLS = ("llama-server", "rpc-server", "llama-bench")


def _target(source: Path, tool: str) -> str:
    """The CMake target that builds `tool`: llama.cpp renamed rpc-server's target
    (and binary) to ggml-rpc-server; kvchat's cache keeps the tool's own name."""
    rpc_cmake = source / "tools" / "rpc" / "CMakeLists.txt"
    if tool == "rpc-server" and rpc_cmake.is_file() and "ggml-rpc-server" in rpc_cmake.read_text():
        return "ggml-rpc-server"
    return tool


def llama_cpp_python_version() -> str:
    return version("llama-cpp-python")


def cache_dir() -> Path:
    root = os.environ.get("KVCHAT_TOOLS_CACHE") or Path.home() / ".cache" / "kvchat-dev" / "llama-tools"
    return Path(root) / llama_cpp_python_version()


def built() -> dict[str, Path] | None:
    """The tool paths if every tool is built for the installed version, else None."""
    bin_dir = cache_dir() / "bin"
    paths = {name: bin_dir / name for name in TOOLS}
    return paths if all(p.is_file() and os.access(p, os.X_OK) for p in paths.values()) else None


def _fetch_sdist(into: Path) -> Path:
    """Download the installed version's sdist from the package index's simple API and
    check its sha256. (`pip download --no-binary :all:` would build the sdist's build
    dependencies, cmake included, from source just to read its metadata.)"""
    index = os.environ.get("KVCHAT_PYPI_SIMPLE", "https://pypi.org/simple")
    request = urllib.request.Request(f"{index}/llama-cpp-python/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    name = f"llama_cpp_python-{llama_cpp_python_version()}.tar.gz"
    (entry,) = [f for f in files if f["filename"] == name]
    target = into / name
    digest = hashlib.sha256()
    with urllib.request.urlopen(entry["url"], timeout=300) as response, target.open("wb") as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != entry["hashes"]["sha256"]:
        raise RuntimeError(f"{name}: sha256 mismatch with the index")
    return target


def _extract_llama_cpp(sdist: Path, into: Path) -> Path:
    """Unpack vendor/llama.cpp only (models and docs are not needed to build)."""
    with tarfile.open(sdist) as tar:
        members = [
            m for m in tar.getmembers()
            if "/vendor/llama.cpp/" in m.name and "/vendor/llama.cpp/models/" not in m.name
            and (m.isfile() or m.isdir())
        ]
        extract_checked(tar, members, into)
    (source,) = into.glob("llama_cpp_python-*/vendor/llama.cpp")
    return source


def extract_checked(tar: tarfile.TarFile, members: list[tarfile.TarInfo], into: Path) -> None:
    """Extract `members` with tarfile's 'data' filter where this Python has it (3.12,
    3.11.4, 3.10.12 on); elsewhere (Debian 12's 3.11.2, which pyproject allows) check
    each member as that filter would: only regular files and folders, a relative name
    without '..' that stays inside `into`, no setuid or group/other-write bits."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(into, members=members, filter="data")
        return
    root = into.resolve()
    for member in members:
        name = Path(member.name)
        inside = (root / name).resolve()
        if not (member.isfile() or member.isdir()) or name.is_absolute() or ".." in name.parts \
                or (inside != root and root not in inside.parents):
            raise RuntimeError(f"{tar.name}: refusing to extract {member.name!r} (a link, a device, or a "
                               "path outside the target folder)")
        member.mode &= 0o755
    tar.extractall(into, members=members)  # noqa: S202 - every member checked above


def _logged(command: list[str], log: Path) -> None:
    with log.open("a") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        raise RuntimeError(f"{' '.join(command[:3])} failed ({result.returncode}); the end of {log}:\n"
                           + "\n".join(tail))


def build(jobs: int | None = None) -> dict[str, Path]:
    """Build the tools unless they are already there; safe to call from two processes."""
    target = cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    with open(target / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second caller waits, then finds them built
        done = built()
        if done is not None:
            return done
        with tempfile.TemporaryDirectory(prefix="llama-tools-", dir=target) as tmp:
            work = Path(tmp)
            source = _extract_llama_cpp(_fetch_sdist(work), work)
            build_dir = work / "build"
            targets = {tool: _target(source, tool) for tool in TOOLS}
            log = target / "build.log"  # kept: a failed build says why
            _logged(["cmake", "-S", str(source), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                     "-DGGML_RPC=ON", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF",
                     "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
                     "-DLLAMA_BUILD_TOOLS=ON"], log)
            _logged(["cmake", "--build", str(build_dir), "--config", "Release",
                     "-j", str(jobs or os.cpu_count() or 2), "--target", *targets.values()], log)
            bin_dir = target / "bin"
            bin_dir.mkdir(exist_ok=True)
            for name, made in targets.items():
                shutil.copy2(build_dir / "bin" / made, bin_dir / name)
        done = built()
        assert done is not None
        return done


def tool_path(name: str) -> Path:
    """Path of one tool, building all of them on first use (about 20 min on 2 cores)."""
    return build()[name]


# --- running them ------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tool_env() -> dict[str, str]:
    """The environment for llama.cpp's tools: weights load as kvchat loads them, so
    without repacking where kvchat's AMX guard says so (kvchat.engine.amx_guard)."""
    from kvchat.engine import amx_guard

    env = dict(os.environ)
    if amx_guard() is not None:
        env["LLAMA_ARG_REPACK"] = "0"  # llama-server's --no-repack
    return env


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
                                     stdout=self._log, stderr=subprocess.STDOUT, env=tool_env())
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


if __name__ == "__main__":
    if "--check" in sys.argv[1:]:
        sys.exit(0 if built() else 1)
    for tool, path in build().items():
        print(f"{tool}\t{path}")
