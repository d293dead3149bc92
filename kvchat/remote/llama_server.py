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
from kvchat.remote.client import ServerClient, ServerHTTPError

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
    def from_json(cls, raw: dict[str, Any]) -> ServerTimings:
        def num(key: str) -> float:
            value = raw.get(key, 0)
            return float(value) if isinstance(value, (int, float)) else 0.0

        return cls(int(num("cache_n")), int(num("prompt_n")), num("prompt_ms"), int(num("predicted_n")),
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
        self._n_ctx = int(props["default_generation_settings"].get("n_ctx") or 0)
        if self._n_ctx <= 0:
            raise NetworkError(f"{client.url} reports no context size in /props", hint="see the server's log")
        self.model_path = str(props.get("model_path") or "")
        alias = str(props.get("model_alias") or "")
        basename = self.model_path.replace("\\", "/").rsplit("/", 1)[-1]
        self.model_name = (alias if alias and alias != self.model_path else basename) or "model"
        self.total_slots = int(props.get("total_slots") or 1)
        self._template = str(props.get("chat_template") or "") or None
        self._pieces: dict[int, bytes] = {}
        self._bos = self._special_id(str(props.get("bos_token") or ""))
        self._eos = self._special_id(str(props.get("eos_token") or ""))
        with_bos = self.tokenize("a", add_special=True)
        self._add_bos = bool(with_bos) and self._bos >= 0 and with_bos[0] == self._bos
        self._history: list[int] = []
        self._sampling = SamplingSettings()
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
        return str(self.client.post_json("/apply-template", {"messages": list(messages)})["prompt"])

    # -- tokens -------------------------------------------------------------------

    def _special_id(self, text: str) -> int:
        if not text:
            return -1
        tokens = self.tokenize(text, add_special=False, parse_special=True)
        return tokens[0] if len(tokens) == 1 else -1

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        reply = self.client.post_json("/tokenize", {"content": text, "add_special": add_special,
                                                    "parse_special": parse_special, "with_pieces": True})
        tokens = []
        for item in reply["tokens"]:
            token = int(item["id"])
            piece = item["piece"]
            self._pieces.setdefault(token, piece.encode("utf-8") if isinstance(piece, str) else bytes(piece))
            tokens.append(token)
        return tokens

    def token_piece(self, token: int, *, special: bool = False) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            text = str(self.client.post_json("/detokenize", {"tokens": [token]})["content"])
            piece = self._pieces[token] = text.encode("utf-8")
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
            "seed": -1 if s.seed is None else s.seed,
            "ignore_eos": not stop_at_eog,
        }

    def generate(self, max_tokens: int | None, *, stop_at_eog: bool = True,
                 context: Sequence[int] = ()) -> Iterator[TokenEvent]:
        """Stream the reply; an empty-text token (a control token) waits for the next
        event, which says whether it ended the turn."""
        body = self._request(max_tokens, stop_at_eog)
        if body["n_predict"] <= 0:
            return
        progress, self._progress = self._progress, None
        self.unstreamed_tokens = 0
        generated: list[int] = []
        held: TokenEvent | None = None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            for event in self.client.stream("/completion", body):
                if "prompt_progress" in event:  # its "tokens" is a placeholder, not a token
                    if progress is not None:
                        p = event["prompt_progress"]
                        cached = int(p.get("cache", 0))
                        progress(int(p.get("processed", 0)) - cached, int(p.get("total", 0)) - cached)
                    continue
                if isinstance(event.get("id_slot"), int) and event["id_slot"] >= 0:
                    self.id_slot = event["id_slot"]
                if event.get("stop"):
                    stop_type = str(event.get("stop_type", ""))
                    if held is not None:
                        if stop_type == "eos":
                            self._eog.add(held.token)
                        yield TokenEvent(held.token, held.text, stop_type == "eos")
                        held = None
                    if isinstance(event.get("timings"), dict):
                        self._record_timings(ServerTimings.from_json(event["timings"]))
                    break
                for token in event.get("tokens") or []:
                    content = str(event.get("content", ""))
                    if held is not None:
                        yield held
                        held = None
                    generated.append(int(token))
                    # Tokens that end inside a UTF-8 character are not streamed on their
                    # own: their ids are lost, their bytes come with this event's text.
                    predicted = event.get("tokens_predicted")
                    if isinstance(predicted, int) and predicted > len(generated) + self.unstreamed_tokens:
                        self.unstreamed_tokens = predicted - len(generated)
                    elif content:
                        self._pieces.setdefault(int(token), content.encode("utf-8"))
                    if content:
                        yield TokenEvent(int(token), decoder.decode(content.encode("utf-8")),
                                         int(token) in self._eog)
                    else:
                        held = TokenEvent(int(token), "", int(token) in self._eog)
            if held is not None:
                yield held
        finally:
            # The server's cache holds the prompt and every generated token but the last.
            self._history.extend(generated[:-1])

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
        if action == "restore":
            self.id_slot = slot
        n = int(reply.get("n_restored" if action == "restore" else "n_saved", 0) or 0)
        return SlotSave(action, True, n, time.perf_counter() - started)

    # -- counters and lifetime -------------------------------------------------------------

    def perf(self) -> PerfCounters:
        t = self._totals
        return PerfCounters(t.prompt_ms, t.prompt_tokens, t.eval_ms, t.eval_tokens)

    def close(self) -> None:
        self.client.close()

