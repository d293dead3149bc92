"""The models.toml catalogue: short names for GGUF chat models on the Hub.

The bundled models.toml (shipped in the wheel), with the user's models.toml in
kvchat's config folder applied on top, entry by entry and key by key. Names match
case-insensitively, an entry's aliases too; ollama's `name:size` spelling
(`qwen2.5:0.5b`) names the entry `name-size`, and an unknown name gets suggestions.
"""

from __future__ import annotations

import importlib.resources
import re
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from kvchat import config
from kvchat.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

DEFAULT_QUANT = "Q4_K_M"
NAME = r"[A-Za-z0-9][\w.\-]*"
QUANT = r"[A-Za-z0-9][\w.\-]*"
REPO_RE = re.compile(rf"^(?P<repo>{NAME}/{NAME})(?::(?P<quant>{QUANT}))?$")
# ollama's tags name a size (qwen2.5:0.5b, smollm2:135m), which is an entry of its own here
SIZE_TAG_RE = re.compile(r"\d+(?:\.\d+)?[bmk]", re.IGNORECASE)
_ENTRY_KEYS = {"repo", "file", "quant", "note", "aliases", "bundled"}


@dataclass(frozen=True)
class CatalogEntry:
    """One models.toml entry."""

    name: str
    repo: str
    file: str | None  # pattern with {quant}; None: any GGUF of the repo carrying the quant
    quant: str
    note: str = ""
    aliases: tuple[str, ...] = ()
    bundled: bool = False

    def filename(self, quant: str) -> str | None:
        return self.file.format(quant=quant) if self.file else None


def _bundled_catalogue_text() -> str:
    resource = importlib.resources.files("kvchat").joinpath("models.toml")
    if resource.is_file():
        return resource.read_text(encoding="utf-8")
    # an editable install: the wheel's force-include is not there, the repo's file is
    return (Path(__file__).resolve().parent.parent / "models.toml").read_text(encoding="utf-8")


def _parse_catalogue(text: str, source: str, base: dict[str, CatalogEntry]) -> dict[str, CatalogEntry]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"cannot read {source}: {exc}", hint="fix or remove that file") from None
    table = data.get("models", {})
    if not isinstance(table, dict):
        raise UsageError(f"{source}: [models] must be a table of entries")
    entries = dict(base)
    for name, fields in table.items():
        if not isinstance(fields, dict):
            raise UsageError(f"{source}: models.{name} must be a table")
        unknown = sorted(set(fields) - _ENTRY_KEYS)
        if unknown:
            raise UsageError(
                f"{source}: models.{name}: unknown key(s) {', '.join(unknown)}",
                hint=f"known: {', '.join(sorted(_ENTRY_KEYS))}",
            )
        text_keys = ("repo", "file", "quant", "note")
        wrong = sorted(k for k in text_keys if k in fields and not isinstance(fields[k], str))
        if "aliases" in fields and not (isinstance(fields["aliases"], list)
                                        and all(isinstance(a, str) for a in fields["aliases"])):
            wrong.append("aliases")
        if "bundled" in fields and not isinstance(fields["bundled"], bool):
            wrong.append("bundled")
        if wrong:
            raise UsageError(
                f"{source}: models.{name}: {', '.join(wrong)} must be "
                + ("text" if set(wrong) <= {"repo", "file", "quant", "note"} else "of the right type"),
                hint='e.g. repo = "user/name", file = "name-{quant}.gguf", aliases = ["short"]',
            )
        previous = entries.get(name)
        if previous is None and "repo" not in fields:
            raise UsageError(f"{source}: models.{name} needs a repo (user/name on the Hugging Face Hub)")
        values = {
            "name": name,
            "repo": fields.get("repo", previous.repo if previous else ""),
            "file": fields.get("file", previous.file if previous else None),
            "quant": str(fields.get("quant", previous.quant if previous else DEFAULT_QUANT)),
            "note": str(fields.get("note", previous.note if previous else "")),
            "aliases": tuple(fields.get("aliases", previous.aliases if previous else ())),
            "bundled": bool(fields.get("bundled", previous.bundled if previous else False)),
        }
        entry = CatalogEntry(**values)
        if not REPO_RE.match(entry.repo) or ":" in entry.repo:
            raise UsageError(f"{source}: models.{name}: repo must look like user/name, got '{entry.repo}'")
        if entry.file is not None and "{quant}" not in entry.file:
            raise UsageError(f"{source}: models.{name}: file must contain {{quant}}")
        if entry.file is not None:
            try:
                entry.file.format(quant=DEFAULT_QUANT)
            except (KeyError, IndexError, ValueError, AttributeError):
                raise UsageError(
                    f"{source}: models.{name}: file pattern '{entry.file}' has a field other than {{quant}}",
                    hint="write braces as {{ }} and use only {quant}",
                ) from None
        entries[name] = entry
    return entries


@cache
def _catalogue_for(user_file: Path, user_mtime: float) -> dict[str, CatalogEntry]:
    entries = _parse_catalogue(_bundled_catalogue_text(), "the bundled models.toml", {})
    if user_file.is_file():
        try:
            text = user_file.read_text(encoding="utf-8")
        except UnicodeError:
            raise UsageError(f"cannot read {user_file}: it is not UTF-8 text",
                             hint="fix or remove that file") from None
        entries = _parse_catalogue(text, str(user_file), entries)
    return entries


def catalogue() -> dict[str, CatalogEntry]:
    """Bundled models.toml with the user's models.toml applied on top, by name."""
    user_file = config.paths().user_models_file
    mtime = user_file.stat().st_mtime if user_file.is_file() else 0.0
    return _catalogue_for(user_file, mtime)


def find_entry(name: str) -> CatalogEntry | None:
    """An entry by name or alias, case-insensitively."""
    wanted = name.casefold()
    for entry in catalogue().values():
        if entry.name.casefold() == wanted or wanted in (a.casefold() for a in entry.aliases):
            return entry
    return None


def alias_entry(name: str, tag: str | None) -> tuple[CatalogEntry | None, str | None]:
    """The entry `name[:tag]` names, and the quant it asks for (None: the entry's own).
    A size tag as ollama writes them (`qwen2.5:0.5b`, `smollm2:135m`) is part of the
    name (`qwen2.5-0.5b`), never a quant."""
    if tag is not None and SIZE_TAG_RE.fullmatch(tag):
        return find_entry(f"{name}-{tag}"), None
    return find_entry(name), tag


def family_members(name: str) -> list[str]:
    """Entries named `name-SIZE...` (llama3.2 -> llama3.2-1b, llama3.2-3b), smallest first."""
    prefix = f"{name.casefold()}-"
    scale = {"k": 1e3, "m": 1e6, "b": 1e9}

    def size(entry_name: str) -> tuple[float, str]:
        rest = entry_name[len(prefix):]
        found = SIZE_TAG_RE.fullmatch(rest)
        return (float(rest[:-1]) * scale[rest[-1].lower()] if found else float("inf"), rest)

    return sorted((e.name for e in catalogue().values() if e.name.casefold().startswith(prefix)), key=size)


def suggest_entries(name: str) -> list[str]:
    """Catalogue names a user may have meant by an unknown `name`: the family's sizes,
    else the names (or aliases) spelled closest, each entry once."""
    import difflib

    members = family_members(name)
    if members:
        return members
    spellings = {spelling.casefold(): e.name
                 for e in catalogue().values() for spelling in (e.name, *e.aliases)}
    close = difflib.get_close_matches(name.casefold(), list(spellings), n=5, cutoff=0.75)
    return list(dict.fromkeys(spellings[c] for c in close))[:3]
