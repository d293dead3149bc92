"""One model answering clients that resend whole conversations (`kvchat serve`).

Editors, agents and the openai SDK send the whole conversation on every call.
`ServedModel.run` answers it through a token-exact `Session` (`Session.answer`):
the rendered conversation is matched by content against what the KV cache holds,
so a conversation that grew evaluates only what is new.

Past the live cache, conversations are kept in the KV store (kvchat.kv_store) as
`serve-*` recent manifests ("heads"): after each reply its new cells are written
(the turn's blocks and a small manifest, after the reply has gone out). A request
whose conversation a head holds better than the live cache gets that head
restored first. That one mechanism is how a conversation survives a restart of
the server, and how two clients taking turns (an editor and an agent, each with
its own long prompt) each evaluate only their new tokens: the outgoing client's
cells are on disk already, the incoming one's are read back (from the page cache,
mostly), never evaluated again. Measured with two clients of ~3,460 tokens each
(SmolLM2, 2 busy cores): a switch restores in 0.33-0.44 s where evaluating took
25 s; keeping each client's state in memory instead (state copy and load) takes
0.18 s but holds 81 MB of RAM per client, and is lost on restart, while the
blocks are written anyway. So: the store, one mechanism. A request that matches
neither starts on an empty cache, where the prefix cache (a known long system
prompt) applies.

The seam to the store is `_restore` and `_save`; everything else is the session's.
One model, one context: the caller runs one request at a time.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from kvchat.app.load import Warn, sampling_of
from kvchat.engine_api import SamplingSettings
from kvchat.errors import KvchatError, SessionError
from kvchat.kv_files import SERVED_PREFIX
from kvchat.sequences import common_prefix
from kvchat.settings import Settings

if TYPE_CHECKING:
    from kvchat.app.backends import LocalBackend
    from kvchat.chat_template import Message
    from kvchat.kv_files import Manifest
    from kvchat.kv_store import KvStore
    from kvchat.session import Session

HEAD_PREFIX = SERVED_PREFIX  # its conversations' names in the store
# Conversations kept on disk per model; the oldest is dropped past this (its aligned
# blocks stay as cache until the store evicts them).
MAX_HEADS = 16
# Restoring a token's cells from the store is at least this many times cheaper than
# evaluating it (measured ~60x: see above; bigger models gain more): a head is restored
# when the tokens it spares are worth more than reading all of it.
RESTORE_SPEEDUP = 20


@dataclass(frozen=True)
class Request:
    """One completion asked of the model. `messages` end with the message to answer;
    `raw` renders no template (/v1/completions: a single message with the prompt)."""

    messages: list[Message]
    sampling: SamplingSettings
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    raw: bool = False
    tools: list[dict[str, Any]] | None = None
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Delta:
    """Reply text as it comes: the answer part and the reasoning part."""

    text: str
    reasoning: str = ""


@dataclass(frozen=True)
class Outcome:
    """How a reply ended and what it cost; `cached_tokens`: prompt tokens not evaluated."""

    finish_reason: str  # stop, length, or cancelled (the client went away)
    text: str
    reasoning: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    restored_tokens: int  # read back from the KV store for this request


@dataclass
class Counters:
    """Totals since start, for /metrics."""

    replies: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    prefix_cache_hits: int = 0
    store_restores: int = 0
    store_restored_tokens: int = 0
    store_errors: int = 0


@dataclass
class _Head:
    """A conversation kept in the store: its manifest, and the text up to its last
    reply (`stem`): a later request that starts with the stem continues it."""

    manifest: Manifest
    kind: str
    kv_text: str
    stem: str
    pending: list[int]


def _head_of(manifest: Manifest) -> _Head | None:
    """The head a manifest holds; None for a record this version did not write."""
    from kvchat.turn_split import TurnMark

    record = manifest.record
    try:
        kv_text, kind, pending = record["kv_text"], record["kind"], record["pending"]
        turns = [TurnMark(**m) for m in record["turns"]]
        if not (isinstance(kv_text, str) and isinstance(record["messages"], list) and kind in ("chat", "raw")
                and isinstance(pending, list) and all(isinstance(t, int) for t in pending)):
            return None
    except (KeyError, TypeError):
        return None
    reply_at = turns[-1].reply_char if turns and turns[-1].reply_char >= 0 else len(kv_text)
    return _Head(manifest, kind, kv_text, kv_text[:reply_at], list(pending))


def _partial_suffix(text: str, tag: str) -> int:
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class StopFilter:
    """Cuts a reply at the first of its stop strings, holding back text that may be
    the start of one until the next piece decides."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hit = False
        self._held = ""

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        data = self._held + text
        found = [at for at in (data.find(s) for s in self.stops) if at >= 0]
        if found:
            self.hit, self._held = True, ""
            return data[: min(found)]
        keep = max(_partial_suffix(data, s) for s in self.stops)
        self._held = data[len(data) - keep :]
        return data[: len(data) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.hit else held


class ServedModel:
    """The model, its two conversations (chat template, and none for plain completion:
    they share the one KV cache, so using one clears the other's) and the store."""

    def __init__(self, backend: LocalBackend, s: Settings, warn: Warn) -> None:
        from kvchat.app.load import kv_fingerprint
        from kvchat.session import Session

        self.backend = backend
        self._engine = backend.engine
        self._warn = warn
        self.counters = Counters()
        sampling = sampling_of(s)
        chat = backend.conversation(replace(s, overflow="stop"), sampling, warn)
        raw = backend.conversation(replace(s, raw=True, think=None, overflow="stop"), sampling, warn)
        if not (isinstance(chat, Session) and isinstance(raw, Session)):
            raise KvchatError("internal: a model loaded here gives token-exact conversations")
        self._sessions = {"chat": chat, "raw": raw}
        self._variables = {kind: dict(x.template.variables) for kind, x in self._sessions.items()}
        self._live: Session | None = None
        self._live_head: _Head | None = None
        self.default_max_tokens = s.max_tokens
        self.default_sampling = sampling
        self._model_ref = s.model
        self._min_prefix = backend.prefix_cache.min_tokens if backend.prefix_cache is not None else None
        self._fp = kv_fingerprint(self._engine, backend.request).digest()
        self._store: KvStore | None = None
        self._heads: list[_Head] = []
        if s.prefix_cache and s.prefix_cache_size != 0:
            self._open_store(s.store_budget)

    # -- facts ---------------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        return self.backend.request.model_path.stem

    @property
    def n_ctx(self) -> int:
        return self.backend.n_ctx

    @property
    def kv_cells_in_use(self) -> int:
        return self._live.n_kv if self._live is not None else 0

    @property
    def model_names(self) -> set[str]:
        """What a client may call the model: its id, its file's name, the reference given."""
        path = self.backend.request.model_path
        return {path.stem, path.name, *([self._model_ref] if self._model_ref else [])}

    @property
    def takes_tools(self) -> bool:
        """The chat template renders a `tools` list; callers refuse tools where it does
        not (such a template would drop them without a word)."""
        template = self._sessions["chat"].template
        return template.render_fn is None and "tools" in template.source

    @property
    def stored_conversations(self) -> int:
        return len(self._heads)

    # -- a request -----------------------------------------------------------------------

    def run(self, request: Request, stop: threading.Event) -> Generator[Delta | Outcome, None, None]:
        """Answer `request`: the reply's pieces, then its Outcome; after that (as the
        caller asks for the end) the turn is saved to the store. `stop` set: the
        reply ends where it is, the cache kept exact."""
        kind = "raw" if request.raw else "chat"
        session = self._sessions[kind]
        session.template.variables = {**self._variables[kind], **request.template_kwargs,
                                      **({"tools": request.tools} if request.tools else {})}
        rendered = session.template.render(request.messages, add_generation_prompt=True)
        restored = self._place(session, kind, rendered)
        session.set_sampling(request.sampling)
        session.max_tokens = request.max_tokens if request.max_tokens is not None else self.default_max_tokens
        turn = session.answer(request.messages)
        stops = StopFilter(request.stop)
        text: list[str] = []
        reasoning: list[str] = []
        finish = ""
        try:
            for event in turn:
                piece = stops.feed(event.text)
                if piece or event.reasoning_text:
                    text.append(piece)
                    reasoning.append(event.reasoning_text)
                    yield Delta(piece, event.reasoning_text)
                if stops.hit:
                    finish = "stop"
                    break
                if stop.is_set():
                    finish = "cancelled"
                    break
        finally:
            turn.close()
        tail = stops.flush()
        if tail:
            text.append(tail)
            yield Delta(tail)
        stats = turn.stats
        finish = finish or ("length" if stats.stop_reason in ("length", "ctx") else "stop")
        cached = stats.prompt_tokens - stats.evaluated_tokens
        c = self.counters
        c.replies += 1
        c.prompt_tokens += stats.prompt_tokens
        c.cached_tokens += cached
        c.generated_tokens += stats.completion_tokens
        c.prefix_cache_hits += stats.prefix_cache_tokens > 0
        yield Outcome(finish, "".join(text), "".join(reasoning), stats.prompt_tokens, cached,
                      stats.completion_tokens, restored)
        self._save(session, kind)

    # -- where a request starts ----------------------------------------------------------

    def _place(self, session: Session, kind: str, rendered: str) -> int:
        """Make the cache the best start for `rendered`: the live history as it is, a
        head restored from the store, or an empty cache for the prefix cache to fill.
        Returns tokens restored from the store."""
        if session is not self._live:
            session.clear()  # the cells were the other conversation's
            self._live, self._live_head = session, None
        if session.tokens and rendered.startswith(session.kv_text):
            return 0  # the conversation grew: nothing can do better
        ratio = _tokens_per_char(session.tokens, session.kv_text) or 0.25
        live = common_prefix(session.kv_text, rendered) * ratio
        best, best_tokens = None, 0.0
        for head in self._heads:
            if head.kind == kind:
                tokens = common_prefix(head.kv_text, rendered) * _tokens_per_char(head.manifest.tokens,
                                                                                   head.kv_text)
                if tokens > best_tokens:
                    best, best_tokens = head, tokens
        if best is not None and (best_tokens - live) * RESTORE_SPEEDUP > best.manifest.covered:
            return self._restore(session, best)
        wanted = len(rendered) * ratio
        if self._min_prefix is not None and wanted >= self._min_prefix and live < min(self._min_prefix,
                                                                                     wanted / 2):
            # Little of it is live (another client's prompt): from an empty cache the prefix
            # cache can serve the prompt's start, a long system prompt seen before.
            session.clear()
        return 0

    def _restore(self, session: Session, head: _Head) -> int:
        assert self._store is not None
        session.clear()
        got = self._store.restore(head.manifest, self._engine, self._fp)
        if got.damage is not None:
            self._warn(f"KV store: {got.damage.reason}; the conversation's tokens from {got.damage.start} "
                       "are evaluated again")
        session.adopt(head.manifest.record, [*head.manifest.tokens, *head.pending])
        self._live_head = head
        self.counters.store_restores += 1
        self.counters.store_restored_tokens += got.n_tokens
        return got.n_tokens

    # -- the store -----------------------------------------------------------------------

    def _open_store(self, budget: int | None) -> None:
        from kvchat.kv_evict import Keeper
        from kvchat.kv_store import RECENT, KvStore

        store = KvStore()
        heads = []
        for name in store.manifest_names(RECENT):
            if not name.startswith(HEAD_PREFIX):
                continue
            try:
                manifest = store.read_manifest(RECENT, name)
            except SessionError:
                continue  # damaged: the store's eviction deals with it
            head = _head_of(manifest) if manifest.fingerprint == self._fp.hex() else None
            if head is not None:
                heads.append(head)
        heads.sort(key=lambda h: h.manifest.updated, reverse=True)
        self._store, self._heads = store, heads[:MAX_HEADS]
        for head in heads[MAX_HEADS:]:
            store.remove(RECENT, head.manifest.name)
        # The store's budget across this server's saves: a full eviction pass now, then
        # only once the server's writes have used up the headroom it left.
        self._keeper = Keeper(store, budget)
        self._keeper.wrote(0)

    def _save(self, session: Session, kind: str) -> None:
        """Write the turn's new cells and the conversation's manifest: under its head's
        name where it continues that head (it starts with the head's stem), else as a
        new head sharing the blocks it has in common."""
        from kvchat.kv_store import RECENT

        if self._store is None or not session.tokens:
            return
        head = self._live_head
        n = self._engine.n_past
        continues = head is not None and head.kind == kind and session.kv_text.startswith(head.stem)
        name = head.manifest.name if head is not None and continues else HEAD_PREFIX + uuid.uuid4().hex[:16]
        record = {**session.to_record(), "kind": kind, "pending": session.tokens[n:]}
        try:
            result = self._store.save(RECENT, name, record, session.tokens[:n], self._engine, self._fp,
                                      previous=head.manifest if head is not None and continues else None,
                                      base=head.manifest if head is not None else None)
        except (OSError, KvchatError) as exc:  # a full disk costs the stored copy, never the answer
            self.counters.store_errors += 1
            self._warn(f"KV store: could not save the conversation: {exc}")
            return
        saved = _head_of(result.manifest)
        if saved is None:
            return
        self._heads = [saved, *(h for h in self._heads if h.manifest.name != name)]
        self._live_head = saved
        if len(self._heads) > MAX_HEADS:
            for old in self._heads[MAX_HEADS:]:
                self._store.remove(RECENT, old.manifest.name)
            self._heads = self._heads[:MAX_HEADS]
        self._keeper.wrote(result.bytes_written)

    def close(self) -> None:
        self.backend.close()


def _tokens_per_char(tokens: Sequence[int], text: str) -> float:
    return len(tokens) / len(text) if text else 0.0


def open_served(s: Settings, warn: Warn, *, verbose: bool = False) -> ServedModel:
    """Load the model here (resolved settings `s`) and open what serving it needs."""
    from kvchat.app.lifecycle import load_local

    for message in s.overridden:
        warn(message)
    backend = load_local(s, warn, verbose=verbose)
    try:
        return ServedModel(backend, s, warn)
    except BaseException:
        backend.close()
        raise
