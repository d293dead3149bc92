"""The Hugging Face Hub: listings, verified resumable downloads, the local cache, remote header reads.

Model files live in the standard Hugging Face cache (`HF_HOME` / `HF_HUB_CACHE`), so files
that other tools downloaded are reused and ours are reused by them. Downloads go through
huggingface_hub (`http_get` for plain HTTP, `hf_hub_download` for Xet-backed files and for
the cache's snapshot links); kvchat adds a partial file that survives the process (so a
second `pull` resumes where the first stopped) and a sha256 check against the Hub's
metadata before a file is put where anything can find it.

huggingface_hub is imported lazily: it costs ~0.2 s and `kvchat --help` must stay fast.
Nothing here prints; progress goes to a `DownloadProgress` the caller passes in.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from kvchat.errors import KvchatError, ModelNotFoundError, NetworkError
from kvchat.gguf import SPLIT_NAME_RE

_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
_HASH_CHUNK = 4 * 1024 * 1024

# A GGUF header (metadata + tensor infos) is a few MiB even with a 256k-token vocabulary;
# a remote read going past this is reading tensor data, which an estimate never needs.
REMOTE_READ_LIMIT_BYTES = 64 * 1024 * 1024
REMOTE_FIRST_FETCH_BYTES = 256 * 1024
REMOTE_MAX_FETCH_BYTES = 8 * 1024 * 1024


class AccessDeniedError(NetworkError):
    """The Hub refused access: a gated repo whose licence is not accepted, or a private one."""


class DownloadProgress(Protocol):
    """What a download reports; the CLI renders it, tests record it."""

    def start(self, label: str, total_bytes: int | None, done_bytes: int) -> None: ...

    def advance(self, n_bytes: int) -> None: ...

    def verify(self, label: str) -> None: ...

    def finish(self) -> None: ...


@dataclass(frozen=True)
class RemoteFileInfo:
    """One file of a Hub repo, with what the Hub says about its content."""

    name: str
    size: int | None
    sha256: str | None  # LFS files
    blob_id: str | None  # git blob sha1, for files stored in git itself


@dataclass(frozen=True)
class RepoListing:
    repo: str
    revision: str
    commit: str
    files: tuple[RemoteFileInfo, ...]

    def file(self, name: str) -> RemoteFileInfo:
        for info in self.files:
            if info.name == name:
                return info
        raise ModelNotFoundError(f"'{name}' is not in {self.repo}")


@dataclass(frozen=True)
class CachedGGUF:
    """A GGUF model in the local Hugging Face cache (all parts of a split model)."""

    repo: str
    commit: str
    filename: str  # first part, relative to the repo root
    parts: tuple[Path, ...]  # snapshot paths, first part first
    size_bytes: int

    @property
    def path(self) -> Path:
        return self.parts[0]


# --- the cache ------------------------------------------------------------------------


def cache_dir() -> Path:
    """The Hugging Face hub cache (HF_HUB_CACHE, else HF_HOME/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in (
        "1", "ON", "YES", "TRUE",
    )


def _repo_folder(repo: str) -> Path:
    return cache_dir() / ("models--" + repo.replace("/", "--"))


def _repo_from_folder(name: str) -> str | None:
    if not name.startswith("models--"):
        return None
    return name[len("models--"):].replace("--", "/", 1)


def gguf_groups(names: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    """GGUF files grouped into models: a split model's parts under its first part's name.

    Parts are sorted; a group whose part count does not match `-of-NNNNN` is kept as it
    is (the caller decides whether an incomplete set is usable).
    """
    groups: dict[str, list[str]] = {}
    for name in sorted(names):
        if not name.lower().endswith(".gguf"):
            continue
        match = SPLIT_NAME_RE.match(name)
        key = f"{match['stem']}-00001-of-{match['count']}.gguf" if match else name
        groups.setdefault(key, []).append(name)
    return groups


def is_complete(parts: list[str]) -> bool:
    match = SPLIT_NAME_RE.match(parts[0])
    return match is None or len(parts) == int(match["count"])


def cached_files(repo: str, revision: str = "main") -> dict[str, Path]:
    """Files of `repo` in the local cache, name -> snapshot path, for one revision.

    The revision's ref (refs/main) picks the snapshot; without one (a cache written by a
    commit-pinned download), the newest snapshot wins. Dangling links are skipped.
    """
    folder = _repo_folder(repo)
    snapshots = folder / "snapshots"
    if not snapshots.is_dir():
        return {}
    ref = folder / "refs" / revision
    chosen: list[Path]
    if ref.is_file():
        chosen = [snapshots / ref.read_text().strip()]
    elif (snapshots / revision).is_dir():
        chosen = [snapshots / revision]
    else:
        chosen = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)[:1]
    found: dict[str, Path] = {}
    for snapshot in chosen:
        for path in snapshot.rglob("*"):
            if path.is_file():
                found.setdefault(path.relative_to(snapshot).as_posix(), path)
    return found


def cached_ggufs() -> list[CachedGGUF]:
    """Every complete GGUF model in the cache (one entry per model, split parts merged)."""
    root = cache_dir()
    if not root.is_dir():
        return []
    models: list[CachedGGUF] = []
    for folder in sorted(root.iterdir()):
        repo = _repo_from_folder(folder.name)
        snapshots = folder / "snapshots"
        if repo is None or not snapshots.is_dir():
            continue
        seen: set[str] = set()
        ref = folder / "refs" / "main"
        main_commit = ref.read_text().strip() if ref.is_file() else None
        # refs/main first, then newest: the same file in an older snapshot is not listed twice
        ordered = sorted(
            snapshots.iterdir(), key=lambda p: (p.name != main_commit, -p.stat().st_mtime)
        )
        for snapshot in ordered:
            names = [
                p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*.gguf") if p.is_file()
            ]
            for first, parts in gguf_groups(names).items():
                if first in seen or not is_complete(parts):
                    continue
                seen.add(first)
                paths = tuple(snapshot / part for part in parts)
                models.append(
                    CachedGGUF(
                        repo=repo,
                        commit=snapshot.name,
                        filename=parts[0],
                        parts=paths,
                        size_bytes=sum(p.stat().st_size for p in paths),
                    )
                )
    return models


def delete_cached(repo: str, parts: tuple[Path, ...]) -> int:
    """Remove a cached model's snapshot links and the blobs nothing else links to; bytes freed."""
    folder = _repo_folder(repo)
    blobs_in_use: dict[Path, int] = {}
    for link in (folder / "snapshots").rglob("*"):
        if link.is_symlink():
            target = link.resolve()
            blobs_in_use[target] = blobs_in_use.get(target, 0) + 1
    freed = 0
    for part in parts:
        blob = part.resolve() if part.is_symlink() else None
        size = part.stat().st_size if part.exists() else 0
        part.unlink(missing_ok=True)
        if blob is None:  # a copy, not a link (caches on filesystems without symlinks)
            freed += size
        elif blobs_in_use.get(blob, 0) <= 1 and blob.parent.name == "blobs":
            blob.unlink(missing_ok=True)
            freed += size
        if blob is not None:
            blobs_in_use[blob] = blobs_in_use.get(blob, 1) - 1
        _remove_empty_parents(part.parent, stop=folder / "snapshots")
    return freed


def _remove_empty_parents(directory: Path, *, stop: Path) -> None:
    while directory != stop and stop in directory.parents:
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


# --- errors ---------------------------------------------------------------------------


@contextmanager
def hub_errors(what: str, repo: str) -> Iterator[None]:
    """Turn huggingface_hub / HTTP failures into one KvchatError that says what to do."""
    import httpx2
    from huggingface_hub import errors as hf_errors

    page = f"https://huggingface.co/{repo}"
    try:
        yield
    except KvchatError:
        raise
    except hf_errors.GatedRepoError as exc:
        raise AccessDeniedError(
            f"{repo} is a gated repo and this account has no access ({_status(exc)})",
            hint=f"accept its licence at {page}, then log in with `hf auth login` or set HF_TOKEN",
        ) from None
    except hf_errors.RepositoryNotFoundError as exc:
        if _status(exc) == "HTTP 401":
            raise AccessDeniedError(
                f"{repo} was not found on the Hugging Face Hub, or it is private ({_status(exc)})",
                hint="check the name; for a private or gated repo `hf auth login` or set HF_TOKEN",
            ) from None
        raise ModelNotFoundError(
            f"no repo {repo} on the Hugging Face Hub", hint="check the name, or see `kvchat list --available`"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise ModelNotFoundError(f"{repo} has no such revision", hint="check the revision") from None
    except hf_errors.RemoteEntryNotFoundError:
        raise ModelNotFoundError(f"{what}: no such file in {repo}", hint=f"see the files at {page}") from None
    except (hf_errors.OfflineModeIsEnabled, hf_errors.LocalEntryNotFoundError):
        raise NetworkError(
            f"{what}: offline (HF_HUB_OFFLINE is set) and not in the local cache",
            hint="unset HF_HUB_OFFLINE to download it, or use a model from `kvchat list`",
        ) from None
    except hf_errors.HfHubHTTPError as exc:
        code = _status(exc)
        if code in ("HTTP 401", "HTTP 403"):
            raise AccessDeniedError(
                f"{what}: the Hub refused access to {repo} ({code})",
                hint=f"accept the licence at {page} if it asks, then `hf auth login` or set HF_TOKEN",
            ) from None
        raise NetworkError(f"{what}: the Hub answered {code}", hint="try again later") from None
    except (httpx2.TransportError, ConnectionError, TimeoutError) as exc:
        raise NetworkError(
            f"{what}: cannot reach the Hugging Face Hub ({type(exc).__name__})",
            hint="check the connection (HF_ENDPOINT, proxy), or use a model from `kvchat list`",
        ) from None


def _status(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    return f"HTTP {code}" if code else type(exc).__name__


def require_online(what: str) -> None:
    if is_offline():
        raise NetworkError(
            f"{what}: offline (HF_HUB_OFFLINE is set) and not in the local cache",
            hint="unset HF_HUB_OFFLINE to download it, or use a model from `kvchat list`",
        )


# --- listings and downloads -------------------------------------------------------------


def list_repo(repo: str, revision: str = "main") -> RepoListing:
    """The repo's files at `revision` with sizes and hashes (one API call)."""
    from huggingface_hub import HfApi

    require_online(repo)
    with hub_errors(f"listing {repo}", repo):
        info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    files = tuple(
        RemoteFileInfo(
            name=s.rfilename,
            size=s.lfs.size if s.lfs else s.size,
            sha256=s.lfs.sha256 if s.lfs else None,
            blob_id=s.blob_id,
        )
        for s in info.siblings or ()
    )
    if not info.sha:
        raise NetworkError(f"the Hub gave no commit for {repo}", hint="check HF_ENDPOINT")
    return RepoListing(repo=repo, revision=revision, commit=info.sha, files=files)


class _ProgressBridge:
    """Looks enough like tqdm for huggingface_hub, forwards to a DownloadProgress."""

    def __init__(
        self, progress: DownloadProgress | None, label: str, *, total: int | None = None,
        initial: int = 0, **_: Any,
    ) -> None:
        self._progress = progress
        self.n = initial
        self.total = total
        if progress is not None:
            progress.start(label, total, initial)

    def update(self, n: int | float = 1) -> None:
        self.n += int(n)
        if self._progress is not None:
            self._progress.advance(int(n))

    def refresh(self) -> None:
        pass

    def set_description(self, *_: Any, **__: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _ProgressBridge:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _bridge(progress: DownloadProgress | None, label: str) -> Any:
    def make(**kwargs: Any) -> _ProgressBridge:
        return _ProgressBridge(progress, label, **kwargs)

    return make


def download(
    listing: RepoListing, names: list[str], progress: DownloadProgress | None = None
) -> list[Path]:
    """Download `names` (e.g. all parts of a split model) into the cache; their snapshot paths.

    Files already in the cache are not fetched again. Each new file is checked against
    the Hub's sha256 (or git blob id) before it enters the cache.
    """
    require_online(listing.repo)
    return [_download_one(listing, listing.file(name), progress) for name in names]


def _download_one(listing: RepoListing, info: RemoteFileInfo, progress: DownloadProgress | None) -> Path:
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    repo, commit = listing.repo, listing.commit
    label = f"{repo}/{info.name}"
    folder = _repo_folder(repo)
    pointer = folder / "snapshots" / commit / info.name
    if pointer.exists():
        _write_ref(folder, listing.revision, commit)
        return pointer
    with hub_errors(f"downloading {info.name}", repo):
        meta = get_hf_file_metadata(hf_hub_url(repo, info.name, revision=commit))
        if meta.etag is None:
            raise NetworkError(f"the Hub gave no ETag for {label}", hint="check HF_ENDPOINT")
        blob = folder / "blobs" / meta.etag
        if meta.xet_file_data is not None and _xet_available() and not blob.exists():
            # Xet transfers are chunked and cached by hf_xet itself, which is how they resume.
            bar = _bridge(progress, label)
            path = Path(hf_hub_download(repo, info.name, revision=commit, tqdm_class=bar))
            try:
                _verify(path, info, label, progress)
            except NetworkError:
                target = path.resolve()
                path.unlink(missing_ok=True)
                target.unlink(missing_ok=True)
                raise
        else:
            if not blob.exists():
                _fetch_blob(meta.location, blob, info, meta.size, label, progress)
            # The blob is in place: this only links it into the snapshot (one HEAD request).
            path = Path(hf_hub_download(repo, info.name, revision=commit))
    _write_ref(folder, listing.revision, commit)
    if progress is not None:
        progress.finish()
    return path


def _xet_available() -> bool:
    """Whether hf_xet (huggingface_hub's chunked Xet transfers) is installed; checked
    here because huggingface_hub's own check is not part of its public API."""
    import importlib.util

    return importlib.util.find_spec("hf_xet") is not None


def _write_ref(folder: Path, revision: str, commit: str) -> None:
    """refs/<revision> -> commit, so the file is found by revision name offline."""
    if revision == commit:
        return
    ref = folder / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    if not ref.is_file() or ref.read_text().strip() != commit:
        tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
        tmp.write_text(commit)
        os.replace(tmp, ref)


def _fetch_blob(
    url: str, blob: Path, info: RemoteFileInfo, size: int | None, label: str,
    progress: DownloadProgress | None,
) -> None:
    """Download to `<blob>.incomplete` (resuming what is there), verify, then rename into place."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    blob.parent.mkdir(parents=True, exist_ok=True)
    partial = blob.with_name(blob.name + ".incomplete")
    lock = cache_dir() / ".locks" / blob.parent.parent.name / f"{blob.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    headers = build_hf_headers()
    if urlparse(url).netloc != urlparse(constants.ENDPOINT).netloc:
        headers.pop("authorization", None)  # a signed CDN URL: the token stays with the Hub
    with WeakFileLock(str(lock)):
        if blob.exists():
            return
        done = partial.stat().st_size if partial.exists() else 0
        if size is not None and done > size:
            partial.unlink()
            done = 0
        if size is not None:
            _check_disk_space(size - done, blob.parent)
        try:
            with partial.open("ab") as fh:
                _stream_into(fh, url, done, headers, size, label, progress)
        except (httpx2.TransportError, ConnectionError, TimeoutError) as exc:
            raise NetworkError(
                f"download of {label} interrupted ({type(exc).__name__}); "
                f"{_size_text(partial)} kept",
                hint="run the same command again to resume",
            ) from None
        except OSError as exc:
            if "Consistency check failed" not in str(exc):
                raise
            partial.unlink(missing_ok=True)
            raise NetworkError(
                f"download of {label} ended at the wrong size", hint="run the same command again"
            ) from None
        try:
            _verify(partial, info, label, progress)
        except NetworkError:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, blob)


_STREAM_CHUNK = 1024 * 1024
_STREAM_ATTEMPTS = 5


def _stream_into(fh: Any, url: str, done: int, headers: dict[str, str], size: int | None, label: str,
                 progress: DownloadProgress | None) -> None:
    """GET `url` from byte `done` on and append it to `fh` (opened for appending), through
    huggingface_hub's public HTTP session (its proxies, certificates and user agent).

    A connection dropped mid-body is resumed from what was written, up to
    `_STREAM_ATTEMPTS` times in a row without progress."""
    import httpx2
    from huggingface_hub import get_session, hf_raise_for_status

    if progress is not None:
        progress.start(label, size, done)
    failures = 0
    while True:
        before = done
        request_headers = {**headers, "Accept-Encoding": "identity"}
        if done:
            request_headers["Range"] = f"bytes={done}-"
        try:
            with get_session().stream("GET", url, headers=request_headers, follow_redirects=True) as response:
                if response.status_code == 416 and size is not None and done == size:
                    return  # already whole: nothing past the end
                hf_raise_for_status(response)
                if done and response.status_code == 200:  # a server that ignored Range: start over
                    fh.seek(0)
                    fh.truncate()
                    done = 0
                for chunk in response.iter_bytes(_STREAM_CHUNK):
                    fh.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress.advance(len(chunk))
            break
        except httpx2.TransportError:
            fh.flush()
            failures = 0 if done > before else failures + 1
            if failures >= _STREAM_ATTEMPTS or (size is not None and done >= size):
                raise
    if size is not None and done != size:
        raise OSError(f"Consistency check failed: {label} is {done} bytes, the Hub said {size}")


def _size_text(path: Path) -> str:
    from kvchat.units import format_bytes

    return format_bytes(path.stat().st_size if path.exists() else 0)


def _check_disk_space(needed: int, directory: Path) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        from kvchat.units import format_bytes

        raise KvchatError(
            f"not enough disk space in {directory}: {format_bytes(needed)} needed, {format_bytes(free)} free",
            hint="free some space, or set HF_HOME to a larger disk",
        )


def _verify(path: Path, info: RemoteFileInfo, label: str, progress: DownloadProgress | None) -> None:
    """Compare the file with the Hub's sha256 (LFS) or git blob sha1; the caller deletes a bad one."""
    if info.sha256 is None and (info.blob_id is None or not _SHA1_RE.match(info.blob_id)):
        return
    if progress is not None:
        progress.verify(label)
    if info.sha256 is not None:
        expected, digest = info.sha256.lower(), hashlib.sha256()
    else:
        assert info.blob_id is not None
        expected, digest = info.blob_id.lower(), hashlib.sha1()  # noqa: S324 (git's object id)
        digest.update(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    actual = digest.hexdigest()
    if actual != expected:
        raise NetworkError(
            f"download of {label} is corrupted: its hash {actual[:12]}… does not match "
            f"the Hub's {expected[:12]}…; the file was deleted",
            hint="run the same command again",
        )


# --- remote reads without downloading ---------------------------------------------------
