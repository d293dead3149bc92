"""Reading a GGUF on the Hugging Face Hub without downloading it: a seekable file
over HTTP range requests (`kvchat estimate` and `show` read only the header)."""

from __future__ import annotations

import io
from typing import Any
from urllib.parse import urlparse

from kvchat.errors import NetworkError
from kvchat.hub import (
    REMOTE_FIRST_FETCH_BYTES,
    REMOTE_MAX_FETCH_BYTES,
    REMOTE_READ_LIMIT_BYTES,
    hub_errors,
    require_online,
)


class RemoteFile(io.RawIOBase):
    """A read-only, seekable view of one file on the Hub, read through HTTP range requests.

    What was fetched is kept, so a header parser reading many small fields makes few
    requests: a miss fetches `first_fetch_bytes`, and each miss right after the previous
    fetch doubles that (up to `max_fetch_bytes`), as a sequential header read does.
    `bytes_fetched` counts body bytes received; past `limit_bytes` a read raises rather
    than pull tensor data.
    """

    def __init__(
        self, url: str, size: int, *, name: str, headers: dict[str, str] | None = None,
        limit_bytes: int = REMOTE_READ_LIMIT_BYTES, first_fetch_bytes: int = REMOTE_FIRST_FETCH_BYTES,
        max_fetch_bytes: int = REMOTE_MAX_FETCH_BYTES,
    ) -> None:
        super().__init__()
        self.url = url
        self.size = size
        self.name = name
        self.bytes_fetched = 0
        self.requests = 0
        self.limit_bytes = limit_bytes
        self._headers = dict(headers or {})
        self._first_fetch = first_fetch_bytes
        self._max_fetch = max_fetch_bytes
        self._next_fetch = first_fetch_bytes
        self._spans: list[tuple[int, bytes]] = []  # (start offset, data), fetched so far
        self._last_end = -1
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        end = self.size if size is None or size < 0 else min(self.size, self._pos + size)
        pieces = []
        pos = self._pos
        while pos < end:
            span_start, data = self._span_at(pos, end)
            piece = data[pos - span_start : end - span_start]
            if not piece:
                break
            pieces.append(piece)
            pos += len(piece)
        self._pos = pos
        return b"".join(pieces)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _span_at(self, pos: int, end: int) -> tuple[int, bytes]:
        for start, data in self._spans:
            if start <= pos < start + len(data):
                return start, data
        if pos == self._last_end:
            self._next_fetch = min(self._next_fetch * 2, self._max_fetch)
        else:
            self._next_fetch = self._first_fetch
        stop = min(self.size, pos + max(self._next_fetch, end - pos))
        data = self._fetch(pos, stop)
        self._spans.append((pos, data))
        self._last_end = pos + len(data)
        return pos, data

    def _fetch(self, start: int, stop: int) -> bytes:
        """Bytes [start, stop): a Range request, read no further than asked even on a 200."""
        from huggingface_hub import get_session

        if self.bytes_fetched + (stop - start) > self.limit_bytes:
            raise NetworkError(
                f"reading {self.name} remotely needed more than {self.limit_bytes // (1024 * 1024)} MiB",
                hint="this looks like tensor data, not a header; download the model with `kvchat pull`",
            )
        repo = "/".join(self.name.split("/")[:2])
        headers = {**self._headers, "Range": f"bytes={start}-{stop - 1}"}
        with hub_errors(f"reading {self.name}", repo):
            with get_session().stream("GET", self.url, headers=headers, follow_redirects=True) as response:
                if response.status_code not in (200, 206):
                    from huggingface_hub import hf_raise_for_status

                    hf_raise_for_status(response)
                skip = start if response.status_code == 200 else 0  # a server that ignored Range
                want = stop - start
                data = bytearray()
                for chunk in response.iter_bytes():
                    self.bytes_fetched += len(chunk)
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                    data += chunk
                    if len(data) >= want:
                        break
            self.requests += 1
        return bytes(data[:want])


def open_remote_file(repo: str, filename: str, revision: str = "main") -> RemoteFile:
    """A RemoteFile for `filename` in `repo`: one HEAD request, no data read yet."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    require_online(f"{repo}/{filename}")
    with hub_errors(f"opening {filename}", repo):
        meta = get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision))
    if meta.size is None:
        raise NetworkError(f"the Hub gave no size for {repo}/{filename}", hint="check HF_ENDPOINT")
    headers = build_hf_headers()
    headers["Accept-Encoding"] = "identity"
    if urlparse(meta.location).netloc != urlparse(constants.ENDPOINT).netloc:
        headers.pop("authorization", None)
    return RemoteFile(meta.location, meta.size, name=f"{repo}/{filename}", headers=headers)
