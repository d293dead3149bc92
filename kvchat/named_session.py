"""A Session bound to a name on disk: resume without re-evaluating, save after each turn.

On open, the saved model identity and context settings are compared with what
the user asked for; flags the user did not give take the saved values. Any real
mismatch is explained in one message, and `rebuild=True` re-evaluates the history
instead of restoring the KV state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import socket
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from kvchat import manifest_log, saved_sessions, session_store
from kvchat.conversation import Conversation, StateLoader
from kvchat.errors import SessionError
from kvchat.kv_files import Manifest
from kvchat.kv_store import KvStore, PendingSave, RangeSink, SaveResult
from kvchat.saved_sessions import Saved
from kvchat.sequences import common_prefix
from kvchat.settings import keys_in


@dataclass(frozen=True)
class ContextSettings:
    """The settings a saved KV state depends on (flash attention: the mode that ran)."""

    n_ctx: int
    type_k: str
    type_v: str
    flash_attn: str

    def as_record(self) -> dict[str, Any]:
        return {"n_ctx": self.n_ctx, "type_k": self.type_k, "type_v": self.type_v,
                "flash_attn": self.flash_attn}


# The cache types recorded for a session on a server, which decides them itself.
SERVER_DECIDES = "server"


def saved_server(record: dict[str, Any]) -> str | None:
    """The server a saved session ran on (None: a model loaded here)."""
    server = record["model"].get("server")
    return server if isinstance(server, str) else None


def saved_settings(saved: Saved) -> ContextSettings:
    s = saved.record["settings"]
    return ContextSettings(int(s["n_ctx"]), s["type_k"], s["type_v"], s["flash_attn"])


def mismatches(
    saved: Saved, model_identity: dict[str, Any], settings: ContextSettings
) -> list[str]:
    """Human-readable differences that make the saved KV state unusable."""
    problems = []
    was = saved.record["model"]
    if was["sha256"] != model_identity["sha256"] or was["size"] != model_identity["size"]:
        if was["path"] == model_identity["path"]:
            problems.append(f"the model file {Path(was['path']).name} changed since the session was saved")
        else:
            before, now = Path(was["path"]).name, Path(model_identity["path"]).name
            if before == now:  # same file name in another folder: the folders tell them apart
                before, now = was["path"], model_identity["path"]
            problems.append(f"it was saved with {before}, not {now}")
    old = saved_settings(saved)
    for field_name, label in (("n_ctx", "--ctx"), ("type_k", "--cache-type-k"),
                              ("type_v", "--cache-type-v"), ("flash_attn", "--flash-attn")):
        before, now = getattr(old, field_name), getattr(settings, field_name)
        if field_name == "flash_attn" and "auto" in (before, now):
            # Files from before kvchat recorded the mode that ran say "auto" (which was
            # off on a CPU); with GPUs, llama.cpp may not say what auto became.
            continue
        if SERVER_DECIDES in (before, now):
            continue  # a server's cache types are its own, not a setting of this session
        if before != now:
            problems.append(f"{label} was {before}, now {now}")
    return problems


class NamedSession:
    """Holds the session's lock from open to close; saves after every turn (a manifest
    in the KV store: each save writes the cells its last one did not cover)."""

    def __init__(self, name: str) -> None:
        self.name = session_store.check_name(name)
        self.path = session_store.session_path(name)  # a .kvs file from before the store
        self.store = KvStore()
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(session_store.locked(name))
        self.saved: Saved | None = None
        try:
            self.saved = saved_sessions.load(name, store=self.store)
        except BaseException:
            self._lock.close()
            raise
        # The manifest as last read or written: what the next save builds on.
        self.manifest: Manifest | None = self.saved.manifest if self.saved else None
        # Set by attach when a damaged block cost some of the KV: what to tell the user.
        self.damage_notice: str | None = None
        self.created = self.saved.record.get("created", time.time()) if self.saved else time.time()
        self.model_identity: dict[str, Any] | None = None
        self.settings: ContextSettings | None = None
        # The settings' "rendering" group as the conversation renders now (kvchat.app sets it).
        self.rendering: dict[str, Any] = {}
        # The digest of what changes the KV bytes (kvchat.prefix_cache.Fingerprint) of the
        # model loaded here, set by its backend before a save: the key the prefix cache's
        # blocks have too. None: a server's session, or no model (an import).
        self.kv_digest: bytes | None = None

    @property
    def exists(self) -> bool:
        return self.saved is not None

    def saved_model_path(self) -> Path | None:
        return Path(self.saved.record["model"]["path"]) if self.saved else None

    def saved_settings(self) -> ContextSettings | None:
        return saved_settings(self.saved) if self.saved else None

    def saved_values(self, *, rebuild: bool = False) -> dict[str, Any]:
        """The saved settings, by setting name (kvchat.settings: flag > session > ...).

        Not the server a session ran on: the user picks the engine each time (a session
        made on a server and resumed here is re-evaluated here). With `rebuild`, not the
        flash-attention mode either: the saved one is what ran (auto's choice), and a
        rebuild decides it again for the settings it is given."""
        saved = self.saved_settings()
        if saved is None:
            return {}
        assert self.saved is not None
        values: dict[str, Any] = {}
        if saved_server(self.saved.record) is None:  # on a server, the server decided these
            values = {"model": str(self.saved_model_path()), "ctx": saved.n_ctx,
                      "cache_type_k": saved.type_k, "cache_type_v": saved.type_v}
            if saved.flash_attn != "auto" and not rebuild:
                values["flash_attn"] = saved.flash_attn
        # Sampling and the reply limit as they were at the last save (/set included),
        # and how the transcript was rendered.
        for section, keys in (("sampling", keys_in("saved")), ("rendering", keys_in("rendering"))):
            given = self.saved.record.get(section)
            if isinstance(given, dict):
                values.update({k: given[k] for k in keys if given.get(k) is not None})
        return values

    def moved_from(self, identity: dict[str, Any]) -> str | None:
        """Where the saved session ran, when that is not where `identity` (the model in
        use) runs: another server, or a server versus this machine. None: same place."""
        if self.saved is None:
            return None
        before, now = saved_server(self.saved.record), identity.get("server")
        if before == now:
            return None
        return before or "this machine"

    def check(self, identity: dict[str, Any], settings: ContextSettings, *, rebuild: bool) -> None:
        """Refuse a saved session whose model (`identity`: session_store.model_identity,
        or a server's model) or context settings do not match, unless rebuilding."""
        self.model_identity = identity
        self.settings = settings
        if self.saved is None or rebuild:
            return
        problems = mismatches(self.saved, self.model_identity, settings)
        if problems:
            raise SessionError(
                f"session '{self.name}' cannot be resumed as saved: " + "; ".join(problems),
                hint="drop the conflicting flags, or add --rebuild to re-evaluate it from the transcript",
            )

    def attach(self, session: Conversation, *, rebuild: bool) -> int:
        """Put the saved conversation into `session`; returns tokens re-evaluated."""
        if self.saved is None:
            return 0
        same_model = (
            self.model_identity is not None
            and self.saved.record["model"]["sha256"] == self.model_identity["sha256"]
        )
        if not rebuild:
            state: bytes | StateLoader = self._loader() if self.saved.legacy is None \
                else self.saved.legacy.state
            return session.restore(self.saved.record, self.saved.tokens, state, self.saved.checkpoints)
        if same_model:
            return session.restore(self.saved.record, self.saved.tokens, None)
        return session.restore_from_messages(self.saved.record)

    def fingerprint_of(self, record: dict[str, Any]) -> bytes:
        """The digest a save keys its blocks by: the loaded model's KV fingerprint, shared
        with the prefix cache; a server's slot file is this session's own (salted)."""
        if "server" in record["model"]:
            return saved_sessions.fingerprint(record, self.server_file_name())
        return self.kv_digest if self.kv_digest is not None else saved_sessions.fingerprint(record)

    def _loader(self) -> StateLoader:
        """Restore the manifest's chain block by block, each checked against the
        manifest's own fingerprint (`check` compared the model and settings: a session
        saved under an older digest still restores; its next save writes its blocks
        under the current one); a damaged block ends it there (the conversation
        evaluates the rest) and is reported in `damage_notice`."""
        assert self.saved is not None and self.saved.manifest is not None
        manifest = self.saved.manifest

        def load(sink: RangeSink) -> int:
            restored = self.store.restore(manifest, sink)
            damage = restored.damage
            if damage is not None:
                others = [n for _, n in damage.affected if n != self.name]
                self.damage_notice = (
                    f"session '{self.name}': the saved KV from token {damage.start} could not be used "
                    f"({damage.reason}); re-evaluating {int(manifest.record['n_kv']) - restored.n_tokens} "
                    "tokens" + (f" (also affects: {', '.join(others)})" if others else ""))
            return restored.n_tokens

        return load

    def save(self, session: Conversation, n_ctx_cells: int) -> int:
        """Save now (prepare_save, then finish_save); returns bytes written."""
        return self.finish_save(self.prepare_save(session, n_ctx_cells)).bytes_written

    def prepare_save(self, session: Conversation, n_ctx_cells: int, *,
                     base: Manifest | None = None) -> PendingSave:
        """The part of a save that reads the conversation and its engine: the record,
        the tokens, the cells the last save (or `base`, another conversation's manifest
        this one may share blocks with) did not cover. A server that renders messages
        itself keeps no state here: the transcript. `n_ctx_cells`: the cells the
        context has (0 where a server does not say). The files are written by
        `finish_save`, from any thread."""
        assert self.model_identity is not None and self.settings is not None
        saved = session.saved_state()
        record = {
            **session.to_record(),
            "name": self.name,
            "created": self.created,
            "updated": time.time(),
            "model": self.model_identity,
            "settings": self.settings.as_record(),
            # The cells llama.cpp made (n_ctx rounded up to 256): what n_kv is measured against.
            **({"n_ctx_cells": n_ctx_cells} if n_ctx_cells else {}),
            "sampling": {**dataclasses.asdict(session.sampling), "max_tokens": session.max_tokens},
            "rendering": self.rendering,
        }
        record = {**record, "format_version": session_store.FORMAT_VERSION}
        # Checked as a reader will get it (JSON's copy: the store's `pending.record`), and
        # incrementally: what the last save carried over was checked then (a save costs
        # the turn, not the history).
        known = self.manifest
        kept_tokens = common_prefix(known.tokens, saved.tokens) if known is not None else 0
        try:
            array("i", saved.tokens[kept_tokens:])
        except (OverflowError, TypeError):
            self._refuse("a token id is not a 32-bit integer")
        if base is not None and known is not None and len(known.chain) >= len(base.chain):
            base = None  # its own chain goes at least as far
        pending = self.store.prepare(saved_sessions.kind_of(self.name), self.name, record, saved.tokens,
                                     saved.source, self.fingerprint_of(record), n_kv=saved.n_kv,
                                     extra=saved.checkpoints, previous=known, base=base)
        kept = {key: manifest_log.kept_items(pending.delta, known.record, key)
                for key in session_store.LISTS} if known is not None else {}
        problem = session_store.record_problem(pending.record, saved.tokens, kept=kept,
                                               kept_tokens=kept_tokens)
        if problem:
            self._refuse(problem)
        return pending

    def _refuse(self, problem: str) -> NoReturn:
        raise SessionError(
            f"did not save session '{self.name}': its record is invalid ({problem})"
            + (", the previously saved copy is intact" if self.saved else ""),
            hint="a kvchat bug or a misbehaving server; rerun with --debug for details")

    def finish_save(self, pending: PendingSave) -> SaveResult:
        """Write a prepared save: blocks, then the manifest; a .kvs file of this name
        (from before the store) is removed once the manifest is durable."""
        try:
            result = self.store.commit(pending)
        except OSError as exc:
            reason = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (
                exc.strerror or str(exc))
            raise SessionError(
                f"could not save session '{self.name}': {reason}"
                + (" (the previously saved copy is intact)" if self.saved else ""),
                hint=f"free space or fix permissions in {self.store.root}, then send another message "
                     "to save again") from exc
        self.manifest = result.manifest
        self.saved = Saved(self.name, result.manifest.record, result.manifest.tokens,
                           result.manifest.extra, manifest=result.manifest)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # moved to the store
        session_store.remove_stale_temps(self.path)  # a .kvs save killed before the store
        return result

    def server_file_name(self) -> str:
        """The file on a llama-server this session's slot is saved to: one per session
        and client (host and kvchat home), rewritten by each save."""
        key = f"{socket.gethostname()}\0{self.path.resolve()}".encode()
        return f"kvchat-{hashlib.blake2b(key, digest_size=10).hexdigest()}.bin"

    def close(self) -> None:
        """Release the lock; a name that was never saved leaves no .lock file behind
        (removed while still held, so no other process holds it)."""
        try:
            if not saved_sessions.exists(self.name):
                with contextlib.suppress(OSError):
                    self.path.with_suffix(".lock").unlink()
        finally:
            self._lock.close()

    def __enter__(self) -> NamedSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def import_file(path: Path, name: str) -> None:
    """Put a .kvs file (`sessions export NAME -f kvs`, or a session file of an older
    kvchat) into the store as `name`; an existing session of that name is refused."""
    try:
        if not path.is_file():
            raise SessionError(f"{path} is not a file", hint="give the path of a .kvs file")
    except OSError as exc:
        raise SessionError(f"cannot read {path}: {exc.strerror or exc}",
                           hint="check its permissions") from None
    legacy = session_store.load(path)
    with NamedSession(name) as named:
        if named.exists:
            raise SessionError(f"session '{name}' already exists",
                               hint=f"give another name: `kvchat sessions import {path} NEWNAME`")
        record = {**legacy.record, "name": name}
        n_kv = int(record["n_kv"])
        whole = saved_sessions.WholeState(legacy.state, n_kv)
        named.store.save(saved_sessions.kind_of(name), name, record, legacy.tokens, whole,
                         named.fingerprint_of(record), n_kv=n_kv, extra=legacy.checkpoints)
