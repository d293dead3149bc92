"""llama-server as a `ChatEngine`: kvchat's exact token history, evaluated remotely.

kvchat renders and tokenizes each turn as it does locally (the template from
`/props`, tokens from `/tokenize`), and sends the whole token history as the
prompt of `/completion` with `cache_prompt`: the server keeps the longest common
prefix of its slot's cache and evaluates only the rest, so a turn costs its new
tokens. The final event's `timings` (`cache_n`, `prompt_n`) prove it; they are
kept in `last_timings`.

`eval` only appends to the history: the server evaluates it with the next
`generate`, in the same request (one round trip per turn, and the prefill is
timed where it happens). Generated tokens come back as ids (`return_tokens`), so
the history holds exactly what the server's cache holds: the prompt and every
generated token but the last.

The server is never allowed to shift its context on its own (which would make
its cache differ from the history): each request asks for at most the tokens that
still fit, and kvchat's `--overflow` policy drops old turns client-side.

Named sessions: `state_bytes` saves the slot's KV to a file on the server
(`POST /slots/{id}?action=save`, servers started with `--slot-save-path`), one
file per session, and returns a small record (server file, tokens);
`load_state_bytes` restores it. Whatever the slot holds, the server keeps only
the prefix it shares with the tokens sent, so a stale file costs time, never
exactness. Without the slot file the history is still
exact: the first turn after resuming re-evaluates it on the server.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import json
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kvchat.engine_api import PerfCounters, SamplingSettings, TokenEvent
from kvchat.errors import NetworkError, SessionError
from kvchat.remote.client import (
    MAX_BODY_BYTES,
    MAX_TOKEN_ID,
    BadReply,
    ServerClient,
    ServerHTTPError,
    StreamDropped,
    excerpt,
    reply_dict,
    reply_int,
    reply_list,
    reply_number,
    reply_object,
    reply_str,
)
from kvchat.settings import MAX_CTX

STATE_FORMAT = "kvchat-llama-server-slot/1"


@dataclass
class ServerTimings:
    """One reply's figures as llama-server reported them (its `timings` object)."""

    cache_n: int = 0  # prompt tokens the slot's cache already held
    prompt_n: int = 0  # prompt tokens evaluated for this reply
    prompt_ms: float = 0.0
    predicted_n: int = 0
    predicted_ms: float = 0.0
    predicted_per_second: float = 0.0
    prompt_per_second: float = 0.0

    @classmethod
    def from_json(cls, raw: dict[str, Any], where: str) -> ServerTimings:
        def count(key: str) -> int:
            return reply_int(raw, key, where, default=0)

        def num(key: str) -> float:
            return reply_number(raw, key, where)

        return cls(count("cache_n"), count("prompt_n"), num("prompt_ms"), count("predicted_n"),
                   num("predicted_ms"), num("predicted_per_second"), num("prompt_per_second"))


@dataclass
class SlotSave:
    """What the last slot save or restore did (None where the server has no slot files)."""

    action: str
    ok: bool
    n_tokens: int = 0
    seconds: float = 0.0
    reason: str = ""


def looks_like_llama_server(props: object) -> bool:
    """Whether a /props reply is llama-server's (it has the slot settings and template)."""
    return isinstance(props, dict) and isinstance(props.get("default_generation_settings"), dict) \
        and "chat_template" in props


def vocab_size(client: ServerClient, props: dict[str, Any]) -> int:
    """How many token ids the server's model has (every id it sends is below): /props
    where it says, else llama-server's model metadata in /v1/models (meta.n_vocab);
    MAX_TOKEN_ID + 1 (what a session file can store) where neither does."""
    n = reply_int(props, "n_vocab", client.url + "/props", default=0)
    if n:
        return n
    where = client.url + "/v1/models"
    try:
        listing = reply_object(client.get_json("/v1/models"), where)
        metas = [reply_dict(reply_object(m, where, "model"), "meta", where)
                 for m in reply_list(listing, "data", where)]
        sizes = {reply_int(meta, "n_vocab", where, default=0, low=1) for meta in metas} - {0}
    except (ServerHTTPError, BadReply):
        return MAX_TOKEN_ID + 1  # an older server without it: ids are still bounded
    return sizes.pop() if len(sizes) == 1 else MAX_TOKEN_ID + 1


def _tokenize_limit(text: str) -> int:
    # A /tokenize reply with pieces grows with the text: tens of bytes per token
    # (its id, its piece escaped), at most one token per byte.
    return MAX_BODY_BYTES + 64 * len(text.encode("utf-8", errors="replace"))


def _piece_bytes(piece: Any, where: str) -> bytes | None:
    """A token's piece as /tokenize gives it: text, or its bytes as numbers where they
    are not whole UTF-8."""
    if piece is None:
        return None
    if isinstance(piece, str):
        return piece.encode("utf-8", errors="replace")
    if isinstance(piece, list) and all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256
                                       for b in piece):
        return bytes(piece)
    raise BadReply(f"{where} sent the token piece {excerpt(piece)}, neither text nor bytes",
                   hint="see the server's log")


def _digest(tokens: Sequence[int]) -> str:
    return hashlib.blake2b(array("i", tokens).tobytes(), digest_size=12).hexdigest()


@dataclass
class _Totals:
    prompt_ms: float = 0.0
    prompt_tokens: int = 0
    eval_ms: float = 0.0
    eval_tokens: int = 0


class LlamaServerEngine:
    """One conversation on one llama-server slot (see the module docstring)."""

    kind = "llama-server"

    def __init__(self, client: ServerClient, props: dict[str, Any]) -> None:
        """`props`: the server's /props (see looks_like_llama_server)."""
        started = time.perf_counter()
        self.client = client
        self.props = props
        where = client.url + "/props"
        self._n_ctx = reply_int(reply_dict(props, "default_generation_settings", where), "n_ctx", where,
                                default=0, high=MAX_CTX)
        if self._n_ctx <= 0:
            raise NetworkError(f"{client.url} reports no context size in /props", hint="see the server's log")
        self.model_path = reply_str(props, "model_path", where, default="")
        alias = reply_str(props, "model_alias", where, default="")
        basename = self.model_path.replace("\\", "/").rsplit("/", 1)[-1]
        self.model_name = (alias if alias and alias != self.model_path else basename) or "model"
        self.total_slots = reply_int(props, "total_slots", where, default=1, low=1, high=MAX_CTX)
        self._template = reply_str(props, "chat_template", where, default="") or None
        self.n_vocab = vocab_size(client, props)
        self._pieces: dict[int, bytes] = {}
        self._bos = self._special_id(reply_str(props, "bos_token", where, default=""))
        self._eos = self._special_id(reply_str(props, "eos_token", where, default=""))
        with_bos = self.tokenize("a", add_special=True)
        self._add_bos = bool(with_bos) and self._bos >= 0 and with_bos[0] == self._bos
        self._history: list[int] = []
        self._sampling = SamplingSettings()
        self._json_schema: Any = None  # set_json_schema's, parsed
        self._progress: Callable[[int, int], None] | None = None
        self._eog: set[int] = {self._eos} if self._eos >= 0 else set()
        self.id_slot = -1
        # The server file a named session saves its slot to (one per session, rewritten
        # by each save; see kvchat.app), else one named by the tokens' digest.
        self.slot_file: str | None = None
        self.cache_prompt = True  # off only to measure prefill (kvchat bench --server)
        # Generated tokens the stream did not name (see generate): the history misses
        # them, so the server re-evaluates from there next turn; counted per reply.
        self.unstreamed_tokens = 0
        self.last_timings: ServerTimings | None = None
        self.last_slot_action: SlotSave | None = None
        self._totals = _Totals()
        self._load_s = time.perf_counter() - started

    # -- facts ----------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def n_ctx_train(self) -> int:
        return self._n_ctx  # /props does not say; the server's context is what counts here

    @property
    def n_past(self) -> int:
        return len(self._history)

    @property
    def bos_token(self) -> int:
        return self._bos

    @property
    def eos_token(self) -> int:
        return self._eos

    @property
    def add_bos(self) -> bool:
        return self._add_bos

    @property
    def flash_attn(self) -> str:
        return "auto"  # the server decides; /props does not say what it chose

    @property
    def load_s(self) -> float:
        return self._load_s

    @property
    def memory_kind(self) -> str:
        return "kv"  # the server keeps its own checkpoints for SWA and recurrent memory

    @property
    def needs_checkpoints(self) -> bool:
        return False

    def chat_template(self) -> str | None:
        return self._template

    def is_eog(self, token: int) -> bool:
        return token in self._eog

    def has_special_token(self, text: str) -> bool:
        tokens = self.tokenize(text, add_special=False, parse_special=True)
        return len(tokens) == 1 and self.token_text(tokens[0]) == text

    def apply_template_remotely(self, messages: Sequence[dict[str, str]]) -> str:
        """The server's own rendering (`/apply-template`), to compare with kvchat's."""
        where = self.client.url + "/apply-template"
        asked = [{"role": m["role"], "content": m["content"]} for m in messages]
        reply = self.client.post_json("/apply-template", {"messages": asked})
        return reply_str(reply_object(reply, where), "prompt", where)

    # -- tokens -------------------------------------------------------------------

    def _special_id(self, text: str) -> int:
        if not text:
            return -1
        tokens = self.tokenize(text, add_special=False, parse_special=True)
        return tokens[0] if len(tokens) == 1 else -1

    def token_id(self, value: Any, where: str) -> int:
        """A token id from the server, checked against its model's vocabulary before it
        enters the history (and a session file)."""
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.n_vocab:
            raise BadReply(f"{where} sent token id {excerpt(value)}, outside the model's vocabulary "
                           f"(0 to {self.n_vocab - 1})", hint="kvchat kept none of it; see the server's log")
        return value

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        where = self.client.url + "/tokenize"
        reply = self.client.post_json("/tokenize", {"content": text, "add_special": add_special,
                                                    "parse_special": parse_special, "with_pieces": True},
                                      limit=_tokenize_limit(text))
        items = reply_list(reply_object(reply, where), "tokens", where)
        tokens, pieces = [], []
        for item in items:
            if not isinstance(item, dict):  # a server that does not give pieces sends bare ids
                tokens.append(self.token_id(item, where))
                continue
            tokens.append(self.token_id(item.get("id"), where))
            pieces.append((tokens[-1], _piece_bytes(item.get("piece"), where)))
        for token, piece in pieces:  # only once the whole reply is known good
            if piece is not None:
                self._pieces.setdefault(token, piece)
        return tokens

    def token_piece(self, token: int, *, special: bool = False) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            where = self.client.url + "/detokenize"
            reply = reply_object(self.client.post_json("/detokenize", {"tokens": [token]}), where)
            piece = self._pieces[token] = reply_str(reply, "content", where).encode("utf-8")
        if not special and token in self._eog | {self._bos}:
            return b""
        return piece

    def token_text(self, token: int) -> str:
        return self.token_piece(token, special=True).decode("utf-8", errors="replace") if token >= 0 else ""

    # -- evaluation and sampling ----------------------------------------------------

    def eval(self, tokens: Sequence[int], progress: Callable[[int, int], None] | None = None) -> None:
        # Evaluated by the server with the next request (see the module docstring).
        self._history.extend(tokens)
        self._progress = progress

    def set_sampling(self, sampling: SamplingSettings) -> None:
        self._sampling = sampling

    def set_json_schema(self, schema: str | None) -> None:
        """Constrain replies to a JSON Schema (JSON text): llama-server turns it into a
        grammar with the converter kvchat.engine uses."""
        self._json_schema = json.loads(schema) if schema is not None else None

    def _request(self, max_tokens: int | None, stop_at_eog: bool) -> dict[str, Any]:
        s = self._sampling
        room = self._n_ctx - len(self._history)
        n_predict = room if max_tokens is None else min(max_tokens, room)
        return {
            "prompt": list(self._history),
            "n_predict": max(n_predict, 0),
            "cache_prompt": self.cache_prompt,
            "stream": True,
            "return_tokens": True,
            "return_progress": True,
            "id_slot": self.id_slot,
            "temperature": s.temperature,
            "top_k": s.top_k,
            "top_p": s.top_p,
            "min_p": s.min_p,
            "repeat_penalty": s.repeat_penalty,
            "presence_penalty": s.presence_penalty,
            "frequency_penalty": s.frequency_penalty,
            "seed": -1 if s.seed is None else s.seed,
            "ignore_eos": not stop_at_eog,
            # llama-server turns it into a grammar with the same converter as kvchat.engine.
            **({"json_schema": self._json_schema} if self._json_schema is not None else {}),
        }

    def generate(self, max_tokens: int | None, *, stop_at_eog: bool = True,
                 context: Sequence[int] = ()) -> Iterator[TokenEvent]:
        """Stream the reply; an empty-text token (a control token) waits for the next
        event, which says whether it ended the turn.

        Every event is checked before its tokens enter the history. The reply must end
        with the server's final event (`stop`) within the tokens asked for: a stream
        that ends before it, or a server that goes past `n_predict`, is a
        StreamDropped/BadReply with the reply so far kept."""
        body = self._request(max_tokens, stop_at_eog)
        n_predict = body["n_predict"]
        if n_predict <= 0:
            return
        where = self.client.url + "/completion"
        progress, self._progress = self._progress, None
        self.unstreamed_tokens = 0
        generated: list[int] = []
        held: TokenEvent | None = None
        progress_events = 0
        stopped = False
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            for event in self.client.stream("/completion", body):
                if "prompt_progress" in event:  # its "tokens" is a placeholder, not a token
                    progress_events += 1
                    self._progress_event(event, where, len(body["prompt"]), progress_events, progress)
                    continue
                slot = reply_int(event, "id_slot", where, default=-1, low=-1)
                if slot >= 0:
                    self.id_slot = slot
                stop = event.get("stop")
                if stop is not None and not isinstance(stop, bool):
                    raise BadReply(f"{where} sent 'stop' = {excerpt(stop)}, not true or false",
                                   hint="see the server's log")
                if stop:
                    stop_type = reply_str(event, "stop_type", where, default="")
                    timings = reply_dict(event, "timings", where)
                    if held is not None:
                        if stop_type == "eos":
                            self._eog.add(held.token)
                        yield TokenEvent(held.token, held.text, stop_type == "eos")
                        held = None
                    if timings:
                        self._record_timings(ServerTimings.from_json(timings, where))
                    stopped = True
                    break
                tokens = [self.token_id(t, where) for t in reply_list(event, "tokens", where)]
                content = reply_str(event, "content", where, default="")
                predicted = reply_int(event, "tokens_predicted", where, default=0)
                if len(generated) + len(tokens) > n_predict or predicted > n_predict:
                    raise BadReply(f"{where} sent more than the {n_predict} tokens asked for (it ignores "
                                   "n_predict); kvchat stopped reading there",
                                   hint="the reply so far is kept; check the server")
                for token in tokens:
                    if held is not None:
                        yield held
                        held = None
                    generated.append(token)
                    # Tokens that end inside a UTF-8 character are not streamed on their
                    # own: their ids are lost, their bytes come with this event's text.
                    if predicted > len(generated) + self.unstreamed_tokens:
                        self.unstreamed_tokens = predicted - len(generated)
                    elif content:
                        self._pieces.setdefault(token, content.encode("utf-8"))
                    if content:
                        yield TokenEvent(token, decoder.decode(content.encode("utf-8")), token in self._eog)
                    else:
                        held = TokenEvent(token, "", token in self._eog)
            if held is not None:
                yield held
            if not stopped:
                raise StreamDropped(f"{where} ended the stream before the reply's final event (stop)",
                                    hint="the partial reply is kept; check the server, then send again")
        finally:
            # The server's cache holds the prompt and every generated token but the last.
            self._history.extend(generated[:-1])

    def _progress_event(self, event: dict[str, Any], where: str, n_prompt: int, seen: int,
                        progress: Callable[[int, int], None] | None) -> None:
        """A prefill progress event: counts within the prompt, at most one per prompt
        token (a server that streams progress forever would beat the deadline)."""
        p = reply_dict(event, "prompt_progress", where)
        cached = reply_int(p, "cache", where, default=0, high=self._n_ctx)
        processed = reply_int(p, "processed", where, default=0, high=self._n_ctx)
        total = reply_int(p, "total", where, default=0, high=self._n_ctx)
        if not cached <= processed <= total or seen > n_prompt + 1:
            raise BadReply(f"{where} sent prompt progress that does not add up (event {seen}: {cached} "
                           f"cached, {processed} of {total} processed, for a {n_prompt}-token prompt)",
                           hint="see the server's log")
        if progress is not None:
            progress(processed - cached, total - cached)

    def _record_timings(self, timings: ServerTimings) -> None:
        self.last_timings = timings
        t = self._totals
        t.prompt_ms += timings.prompt_ms
        t.prompt_tokens += timings.prompt_n
        t.eval_ms += timings.predicted_ms
        t.eval_tokens += timings.predicted_n

    # -- the cache ---------------------------------------------------------------------

    def kv_remove(self, start: int, end: int) -> bool:
        if end < 0 or end >= len(self._history):
            del self._history[start:]
            return True
        return False  # a hole in the middle: the server would re-evaluate after it anyway

    def kv_clear(self) -> None:
        self._history = []

    def covers(self, n_tokens: int) -> bool:
        return n_tokens <= len(self._history)

    def state_bytes(self) -> bytes:
        """Save the slot on the server (where it has slot files) and return the record
        that restores it: the server file's name and the tokens it holds."""
        tokens = list(self._history)
        filename = (self.slot_file or f"kvchat-{_digest(tokens)}.bin") if tokens else None
        if filename is not None and self.id_slot >= 0:
            self.last_slot_action = self._slot_action("save", filename)
            if not self.last_slot_action.ok:
                filename = None
        else:
            filename = None
        record = {"format": STATE_FORMAT, "server": self.client.url, "model": self.model_path,
                  "slot_file": filename, "tokens": base64.b64encode(array("i", tokens).tobytes()).decode()}
        return json.dumps(record).encode()

    def load_state_bytes(self, data: bytes, n_tokens: int) -> None:
        try:
            record = json.loads(data)
            raw = base64.b64decode(record["tokens"])
            tokens = array("i")
            tokens.frombytes(raw)
        except (ValueError, KeyError, TypeError) as exc:
            raise SessionError("the saved server state is not readable",
                               hint="resume with --rebuild to re-evaluate the transcript") from exc
        if record.get("format") != STATE_FORMAT:
            raise SessionError("the saved state is not a llama-server slot record",
                               hint="resume with --rebuild to re-evaluate the transcript")
        if any(not 0 <= t < self.n_vocab for t in tokens):
            raise SessionError("the saved server state holds token ids outside the server model's vocabulary",
                               hint="resume with --rebuild to re-evaluate the transcript")
        self._history = list(tokens)[:n_tokens]
        filename = record.get("slot_file")
        if filename and len(tokens) == n_tokens:
            self.last_slot_action = self._slot_action("restore", str(filename),
                                                      slot=self.id_slot if self.id_slot >= 0 else 0)
        else:
            self.last_slot_action = SlotSave("restore", False, reason="the session was saved without a "
                                             "slot file (start llama-server with --slot-save-path)")

    def _slot_action(self, action: str, filename: str, slot: int | None = None) -> SlotSave:
        slot = self.id_slot if slot is None else slot
        started = time.perf_counter()
        try:
            reply = self.client.post_json(f"/slots/{slot}?action={action}", {"filename": filename})
        except ServerHTTPError as exc:
            reason = exc.server_message
            if "--slot-save-path" in reason:
                reason = "the server was started without --slot-save-path"
            return SlotSave(action, False, reason=reason)
        where = f"{self.client.url}/slots/{slot}"
        n = reply_int(reply_object(reply, where), "n_restored" if action == "restore" else "n_saved", where,
                      default=0)
        if action == "restore":
            self.id_slot = slot
        return SlotSave(action, True, n, time.perf_counter() - started)

    # -- counters and lifetime -------------------------------------------------------------

    def perf(self) -> PerfCounters:
        t = self._totals
        return PerfCounters(t.prompt_ms, t.prompt_tokens, t.eval_ms, t.eval_tokens)

    def close(self) -> None:
        self.client.close()

