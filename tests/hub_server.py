"""A fake Hugging Face Hub on 127.0.0.1, speaking what huggingface_hub 2.x uses.

Endpoints:

- `GET /api/models/{repo}[/revision/{rev}]` (`?blobs=true` adds sizes, blob ids and LFS
  sha256): the repo's commit and siblings, as `HfApi.model_info` reads them.
- `HEAD|GET /{repo}/resolve/{rev}/{file}`: `X-Repo-Commit`, `ETag` (the sha256 for LFS
  files, the git blob sha1 otherwise), `X-Linked-Etag` / `X-Linked-Size` for LFS files,
  `Content-Length`, `Accept-Ranges`; GET honours `Range: bytes=a-b` with 206. No Xet
  headers, so huggingface_hub downloads over plain HTTP even with hf_xet installed.
- Errors as the Hub sends them: 404 with `X-Error-Code: RepoNotFound` / `EntryNotFound`
  / `RevisionNotFound`, 401 `RepoNotFound` for a private repo without the token, 403
  `GatedRepo` for a gated one.

Faults, for tests: `cut_after[(repo, file)] = n` sends n body bytes of the next full GET
of that file and drops the connection (once); `corrupt` serves flipped bytes while the
metadata keeps the true hash. Every request is logged with the body bytes it sent.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_CHUNK = 256 * 1024


@dataclass
class FakeFile:
    """A file served from memory or from disk, LFS (.gguf and other big files) or not."""

    data: bytes | None = None
    path: Path | None = None
    lfs: bool = True
    _sha256: str | None = None

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else self.path.stat().st_size  # type: ignore[union-attr]

    def read(self, start: int, stop: int) -> bytes:
        if self.data is not None:
            return self.data[start:stop]
        assert self.path is not None
        with self.path.open("rb") as fh:
            fh.seek(start)
            return fh.read(stop - start)

    def iter_range(self, start: int, stop: int):
        pos = start
        while pos < stop:
            end = min(stop, pos + _CHUNK)
            yield self.read(pos, end)
            pos = end

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            digest = hashlib.sha256()
            for chunk in self.iter_range(0, self.size):
                digest.update(chunk)
            self._sha256 = digest.hexdigest()
        return self._sha256

    @property
    def git_sha1(self) -> str:
        digest = hashlib.sha1(b"blob %d\0" % self.size)  # noqa: S324
        for chunk in self.iter_range(0, self.size):
            digest.update(chunk)
        return digest.hexdigest()


@dataclass
class FakeRepo:
    files: dict[str, FakeFile]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    token: str | None = None  # private: this bearer token is required
    gated: bool = False  # gated: 403 GatedRepo unless `token` is sent


@dataclass
class LoggedRequest:
    method: str
    path: str
    range: str | None
    status: int
    body_bytes: int
    authorization: str | None


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    cut_after: dict[tuple[str, str], int] = field(default_factory=dict)
    corrupt: set[tuple[str, str]] = field(default_factory=set)
    log: list[LoggedRequest] = field(default_factory=list)
    url: str = ""
    _server: ThreadingHTTPServer | None = None

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def requests_for(self, file: str, method: str = "GET") -> list[LoggedRequest]:
        return [r for r in self.log if r.method == method and r.path.endswith("/" + file)]


_RESOLVE_RE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_API_RE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+?)(?:/revision/(?P<rev>[^/]+))?$")
_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *_: object) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._handle(head=False)

    # --- dispatch ---------------------------------------------------------------------

    def _handle(self, *, head: bool) -> None:
        split = urlsplit(self.path)
        path = unquote(split.path)
        self._sent = 0
        self._status = 0
        try:
            if match := _API_RE.match(path):
                self._api(match["repo"], match["rev"] or "main", "blobs=true" in split.query, head)
            elif match := _RESOLVE_RE.match(path):
                self._resolve(match["repo"], match["rev"], match["file"], head)
            else:
                self._error(404, None, "not found")
        finally:
            self.fake.log.append(
                LoggedRequest(
                    "HEAD" if head else "GET", path, self.headers.get("Range"), self._status, self._sent,
                    self.headers.get("Authorization"),
                )
            )

    def _repo(self, name: str, rev: str) -> FakeRepo | None:
        repo = self.fake.repos.get(name)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        sent = self.headers.get("Authorization")
        allowed = repo.token is None or sent == f"Bearer {repo.token}"
        if not allowed and repo.gated:
            self._error(403, "GatedRepo", "Access to model is restricted. You must have access to it.")
            return None
        if not allowed:
            self._error(401, "RepoNotFound", "Invalid username or password.")
            return None
        if rev not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", "Invalid rev id")
            return None
        return repo

    def _api(self, name: str, rev: str, blobs: bool, head: bool) -> None:
        repo = self._repo(name, rev)
        if repo is None:
            return
        siblings = []
        for fname, f in sorted(repo.files.items()):
            entry: dict = {"rfilename": fname}
            if blobs:
                entry["size"] = f.size
                entry["blobId"] = f.git_sha1 if not f.lfs else hashlib.sha1(fname.encode()).hexdigest()  # noqa: S324
                if f.lfs:
                    entry["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": 134}
            siblings.append(entry)
        body = json.dumps(
            {"id": name, "modelId": name, "sha": repo.commit, "private": repo.token is not None,
             "gated": "manual" if repo.gated else False, "siblings": siblings}
        ).encode()
        self._status = 200
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
            self._sent = len(body)

    def _resolve(self, name: str, rev: str, fname: str, head: bool) -> None:
        repo = self._repo(name, rev)
        if repo is None:
            return
        f = repo.files.get(fname)
        if f is None:
            self._error(404, "EntryNotFound", "Entry not found", commit=repo.commit)
            return
        size = f.size
        start, stop, status = 0, size, 200
        range_header = self.headers.get("Range")
        if range_header and not head:
            match = _RANGE_RE.match(range_header.strip())
            if match:
                start = int(match[1])
                stop = min(size, int(match[2]) + 1) if match[2] else size
                if start >= size:
                    self._error(416, None, "Range Not Satisfiable")
                    return
                status = 206
        etag = f.sha256 if f.lfs else f.git_sha1
        self._status = status
        self.send_response(status)
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("ETag", f'"{etag}"')
        if f.lfs:
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(size))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(stop - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        self.end_headers()
        if head:
            return
        key = (name, fname)
        cut = self.fake.cut_after.pop(key, None) if start == 0 else None
        corrupt = key in self.fake.corrupt
        pos = start
        for chunk in f.iter_range(start, stop):
            if corrupt:
                chunk = bytes(b ^ 0xFF for b in chunk[:16]) + chunk[16:]
                corrupt = False
            if cut is not None and pos + len(chunk) > cut:
                chunk = chunk[: max(0, cut - pos)]
                self.wfile.write(chunk)
                self._sent += len(chunk)
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)  # a dropped connection, mid-body
                return
            try:
                self.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                return  # the client read what it wanted (a range reader on a 200) and left
            self._sent += len(chunk)
            pos += len(chunk)

    def _error(self, status: int, code: str | None, message: str, *, commit: str | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self._status = status
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def make_gguf(
    path: Path, *, arch: str = "llama", n_ctx_train: int = 4096, n_layer: int = 4, n_embd: int = 256,
    n_head: int = 8, n_head_kv: int = 2, n_vocab: int = 1000, tensor_bytes: int = 2 * 1024 * 1024,
    chat_template: str | None = "{% for m in messages %}{{ m.content }}{% endfor %}",
    name: str = "Tiny Test Model", split: tuple[int, int] | None = None,
) -> Path:
    """A small, valid GGUF: llama-style metadata, a vocabulary and `tensor_bytes` of tensor data."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_embd * 4)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_file_type(1)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i}" for i in range(n_vocab)])
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    if split is not None:
        writer.add_uint16("split.no", split[0])
        writer.add_uint16("split.count", split[1])
    n = max(1, tensor_bytes // 4)
    writer.add_tensor("token_embd.weight", np.arange(n, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


REPO_ROOT = Path(__file__).resolve().parent.parent


def kvchat_env(tmp: Path, hub: FakeHub | None = None, **extra: str) -> dict[str, str]:
    """Environment for a kvchat subprocess: isolated HF_HOME / KVCHAT_HOME, the fake hub."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "KVCHAT_"))}
    env.update(
        HF_HOME=str(tmp / "hf"), KVCHAT_HOME=str(tmp / "kvchat"), NO_COLOR="1", COLUMNS="200",
        HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_UPDATE_CHECK="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p),
    )
    env["HF_ENDPOINT"] = hub.url if hub is not None else "http://127.0.0.1:9"  # nothing listens there
    env.update(extra)
    return env


def run_kvchat(args: list[str], env: dict[str, str], *, timeout: float = 120):
    """`python -m kvchat ARGS` with stdin closed (not a terminal); the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "kvchat", *args], env=env, capture_output=True, text=True,
        stdin=subprocess.DEVNULL, timeout=timeout,
    )
