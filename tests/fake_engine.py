"""A deterministic fake of kvchat's ChatEngine that keeps llama.cpp's memory rules.

Session logic (overflow, resync, undo, retry, checkpoints, interrupts) runs on it in
milliseconds. What it models, from llama.cpp's current code:

- "kv": one attention cache; `seq_rm` removes any range, `seq_add` shifts positions
  (cells shifted below 0 are removed), positions come from `seq_pos_max + 1`.
- "swa" (iSWA, swa_full false, Gemma 3): full-attention cells plus a sliding-window
  cache of about n_swa + n_ubatch cells (llama.cpp pads that to 256; the fake does
  not, to keep its numbers small). A ubatch reuses the oldest cells masked for it,
  so older cells are dropped as evaluation moves on; `seq_pos_min/max` report the
  window cache. Positions cannot shift.
- "recurrent": one state per sequence at the last position evaluated; `seq_rm`
  from 0 < p0 <= pos to the end is refused (False, nothing changes), from 0 clears
  it, past the end does nothing.
- "hybrid": attention cells plus a recurrent state; the state is asked first (so a
  refused removal changes nothing); pos_min is the larger of the two, pos_max the
  smaller.
- Checkpoints as kvchat.engine.Engine takes them: on memory that cannot roll back
  only the window or the state is saved (partial); restoring one needs the older
  attention cells to be held, and trims the tail.

What the model "computes": the next token is a hash of what the next position can
see (attention cells by position, the window cells within n_swa, the recurrent
state), so a cache with holes, stale cells or a wrong state answers differently
from a cold evaluation of the same tokens (`view` vs `cold_view`). Replies can also
be scripted (`script`). The tokenizer is word-level with GPT-2 style merges (a
space joins the word after it), byte tokens for non-ASCII text, and control tokens
that render as text only with special=True.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
from array import array
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from kvchat.chat_template import CHATML, ChatTemplate, select_template
from kvchat.checkpoints import history_digest as _history_digest
from kvchat.conversation import TurnStats
from kvchat.engine_api import Checkpoint, PerfCounters, SamplingSettings, TokenEvent
from kvchat.errors import KvchatError, SessionError, UsageError
from kvchat.session import Session

Cell = tuple[int, int]  # (position, token)

# -- the vocabulary ------------------------------------------------------------------

CONTROL = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<bos>", "<eos>", "<start_of_turn>",
           "<end_of_turn>"]
USER_DEFINED = ["<think>", "</think>"]  # added tokens that render as text (Qwen3's)
_SPECIAL_IDS = {text: i + 1 for i, text in enumerate(CONTROL + USER_DEFINED)}
_SPECIAL_TEXT = {i: text for text, i in _SPECIAL_IDS.items()}
_BYTE_BASE = 16  # tokens 16..271 are the bytes 0..255
_WORD_BASE = 1024
_WORDS: dict[int, str] = {}
_SPECIAL_RE = re.compile("|".join(re.escape(s) for s in sorted(_SPECIAL_IDS, key=len, reverse=True)))
# GPT-2's pre-tokenizer, ASCII classes: a leading space joins the word after it.
_PIECE_RE = re.compile(r" ?[^\W_]+| ?[^\s\w]+| ?_+|\s+(?!\S)|\s+")


def _word_id(piece: str) -> int:
    """A stable id for an ASCII piece (the same in every engine and every run)."""
    digest = hashlib.blake2b(piece.encode(), digest_size=4).digest()
    token = _WORD_BASE + int.from_bytes(digest, "little") % (1 << 30)
    known = _WORDS.setdefault(token, piece)
    assert known == piece, f"token id collision: {known!r} and {piece!r}"
    return token


FAMILIES: dict[str, dict[str, Any]] = {
    # SmolLM2-like: ChatML, the model adds a BOS the template does not write.
    "chatml": {"bos": "<s>", "eos": "<|im_end|>", "eog": ("<|im_end|>", "</s>"), "template": CHATML,
               "arch": "llama"},
    # Gemma-like: the template writes the BOS, trims every message and merges the
    # system prompt into the first user turn (llama.cpp's built-in 'gemma' does both).
    "gemma": {"bos": "<bos>", "eos": "<end_of_turn>", "eog": ("<end_of_turn>", "<eos>"), "arch": "gemma3",
              "template": (
                  "{{ bos_token }}{% set sys = namespace(text='') %}"
                  "{% for m in messages %}"
                  "{% if m['role'] == 'system' %}{% set sys.text = m['content'] | trim %}"
                  "{% else %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
                  "<start_of_turn>{{ role }}\n"
                  "{% if sys.text and role != 'model' %}{{ sys.text }}\n\n{% set sys.text = '' %}{% endif %}"
                  "{{ m['content'] | trim }}<end_of_turn>\n"
                  "{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")},
    # Qwen3-like thinking template: the prompt opens a reasoning block, and the
    # reasoning of replies before the last message is dropped.
    "thinking": {"bos": "<s>", "eos": "<|im_end|>", "eog": ("<|im_end|>", "</s>"), "arch": "qwen3",
                 "template": (
                     "{%- for message in messages %}"
                     "{%- if message.role == 'assistant' %}"
                     "{%- set content = message.content %}"
                     "{%- if loop.index0 < messages|length - 1 and '</think>' in content %}"
                     "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
                     "{%- endif %}"
                     "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
                     "{%- else %}"
                     "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
                     "{%- endif %}"
                     "{%- endfor %}"
                     "{%- if add_generation_prompt %}"
                     "{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}")},
}

# What the model says when not scripted: words, whitespace-only pieces (a Gemma-style
# template trims them off the end of a reply), and multi-byte characters emitted one
# byte token at a time (a reply cut there ends inside a character).
REPLY_PIECES = [" the", " sea", " is", " blue", " cat", ".", ",", " 42", "\n", " ", " ok", "!", "é", "日"]
_CONTINUATIONS = {c.encode()[:i]: c.encode()[i] for c in ("é", "日") for i in range(1, len(c.encode()))}


def _digest(*parts: bytes) -> bytes:
    return hashlib.blake2b(b"|".join(parts), digest_size=16).digest()


def _ints(values: Sequence[int]) -> bytes:
    return array("q", values).tobytes()


class FakeEngine:
    """One fake model with one context and one sequence (see the module docstring)."""

    def __init__(self, kind: str = "kv", *, family: str = "chatml", n_ctx: int = 256, n_swa: int = 24,
                 n_batch: int = 16, n_ubatch: int = 8, shift: bool | None = None, eog_every: int = 7,
                 state_size: int = 2048, cell_bytes: int = 64) -> None:
        assert kind in ("kv", "swa", "recurrent", "hybrid")
        self.config: dict[str, Any] = dict(
            kind=kind, family=family, n_ctx=n_ctx, n_swa=n_swa, n_batch=n_batch, n_ubatch=n_ubatch,
            shift=shift, eog_every=eog_every, state_size=state_size, cell_bytes=cell_bytes)
        self.kind = kind
        self.family = FAMILIES[family]
        self.n_ctx = n_ctx
        self.n_ctx_train = 4 * n_ctx
        self.n_swa = n_swa if kind == "swa" else 0
        self.n_batch = n_batch
        self.n_ubatch = n_ubatch
        # llama.cpp keeps PAD(n_swa + n_ubatch, 256) window cells; unpadded here.
        self.window_cells = min(n_ctx, n_swa + n_ubatch)
        self._shift = kind == "kv" if shift is None else shift
        assert not (self._shift and kind in ("recurrent", "hybrid")), "a recurrent state cannot shift"
        self.eog_every = eog_every
        self.state_size = state_size
        self.cell_bytes = cell_bytes
        self.flash_attn = "off"
        self.load_s = 0.0
        self._attn: list[Cell] = []  # attention cells (the full-attention layers on swa)
        self._window: list[Cell] = []  # the sliding-window layers' cells (swa)
        self._state: tuple[int, bytes, tuple[int, ...]] | None = None  # recurrent: (pos, digest, last tokens)
        self._held_upto = 0  # kvchat.engine.Engine's own bookkeeping, mirrored
        self._sampling = SamplingSettings()
        self._draws = 0
        self._scripts: list[list[int]] = []
        # Counters tests assert on.
        self.prompt_tokens = 0  # tokens evaluated by eval()
        self.generated_tokens = 0  # tokens evaluated while generating
        self.restores: list[int] = []  # n_tokens of each checkpoint restored successfully

    # -- facts ------------------------------------------------------------------------

    @property
    def memory_kind(self) -> str:
        return self.kind

    @property
    def needs_checkpoints(self) -> bool:
        return self.kind != "kv"

    @property
    def bos_token(self) -> int:
        return _SPECIAL_IDS[self.family["bos"]]

    @property
    def eos_token(self) -> int:
        return _SPECIAL_IDS[self.family["eos"]]

    @property
    def add_bos(self) -> bool:
        return True

    @property
    def n_past(self) -> int:
        return self.seq_pos_max() + 1

    def chat_template(self) -> str | None:
        return str(self.family["template"])

    def metadata(self, key: str) -> str | None:
        return str(self.family["arch"]) if key == "general.architecture" else None

    def is_eog(self, token: int) -> bool:
        return token in {_SPECIAL_IDS[t] for t in self.family["eog"]}

    def has_special_token(self, text: str) -> bool:
        return text in _SPECIAL_IDS

    def builtin_template_names(self) -> list[str]:
        return []

    def apply_builtin_template(self, name: str, messages: Sequence[dict[str, str]], *,
                               add_generation_prompt: bool) -> str:
        raise UsageError(f"the fake engine has no built-in chat template '{name}'")

    def template(self) -> ChatTemplate:
        """The family's chat template, chosen as kvchat chooses a model's own."""
        return select_template(self)[0]

    # -- tokens -------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        tokens = [self.bos_token] if add_special and self.add_bos else []
        at = 0
        matches = list(_SPECIAL_RE.finditer(text)) if parse_special else []
        for match in [*matches, None]:
            end = match.start() if match else len(text)
            for piece in _PIECE_RE.findall(text[at:end]):
                if piece.isascii():
                    tokens.append(_word_id(piece))
                else:
                    tokens.extend(_BYTE_BASE + b for b in piece.encode())
            if match:
                tokens.append(_SPECIAL_IDS[match.group()])
                at = match.end()
        return tokens

    def token_text(self, token: int) -> str:
        if token in _SPECIAL_TEXT:
            return _SPECIAL_TEXT[token]
        if _BYTE_BASE <= token < _BYTE_BASE + 256:
            return f"<0x{token - _BYTE_BASE:02X}>"
        return _WORDS.get(token, "")

    def token_piece(self, token: int, *, special: bool = False) -> bytes:
        text = self.token_text(token)
        if text in CONTROL:
            return text.encode() if special else b""
        if _BYTE_BASE <= token < _BYTE_BASE + 256:
            return bytes([token - _BYTE_BASE])
        return text.encode()

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_piece(t, special=True) for t in tokens).decode("utf-8", errors="replace")

    # -- the memory, as llama.cpp reports it --------------------------------------------

    # Cells are kept sorted by position: the oldest first, the newest last.
    def seq_pos_max(self) -> int:
        attn = self._attn[-1][0] if self._attn else -1
        state = self._state[0] if self._state else -1
        if self.kind == "swa":
            return self._window[-1][0] if self._window else -1
        if self.kind == "recurrent":
            return state
        if self.kind == "hybrid":
            return min(attn, state)
        return attn

    def seq_pos_min(self) -> int:
        attn = self._attn[0][0] if self._attn else -1
        state = self._state[0] if self._state else -1
        if self.kind == "swa":
            return self._window[0][0] if self._window else -1
        if self.kind == "recurrent":
            return state
        if self.kind == "hybrid":
            return max(attn, state)
        return attn

    def cells_in_use(self) -> int:
        return self.seq_pos_max() + 1

    def cells(self) -> list[int | None]:
        """The tokens the cache holds by position (None: a hole): the attention cells,
        or on pure recurrent memory the tokens folded into the state."""
        if self.kind == "recurrent":
            return list(_unfold(self._state[1])) if self._state else []
        by_pos: dict[int, int] = {}
        for pos, token in self._attn:
            assert pos not in by_pos, f"two cells at position {pos}"
            by_pos[pos] = token
        return [by_pos.get(p) for p in range(max(by_pos, default=-1) + 1)]

    def view(self) -> bytes:
        """A digest of everything the next position can see; the next token is a
        function of it (and of the sampler's state)."""
        n = self.n_past
        parts = [self.kind.encode(), _ints([n])]
        if self.kind != "recurrent":
            parts.append(_ints([x for cell in self._attn for x in cell]))
        if self.kind == "swa":
            parts.append(_ints([x for cell in self._window if cell[0] > n - self.n_swa for x in cell]))
        if self.kind in ("recurrent", "hybrid"):
            parts.append(self._state[1] + _ints([self._state[0]]) if self._state else b"")
        return _digest(*parts)

    def clone(self) -> FakeEngine:
        """Another engine whose memory is a copy of this one's (cells are immutable)."""
        other = FakeEngine(**self.config)
        other._attn, other._window, other._state = list(self._attn), list(self._window), self._state
        other._held_upto = self._held_upto
        return other

    def cold_view(self, tokens: Sequence[int]) -> bytes:
        """What `view` would be after evaluating `tokens` on an empty cache."""
        return self.cold_views(tokens, [len(tokens)])[len(tokens)]

    def cold_views(self, tokens: Sequence[int], lengths: Sequence[int]) -> dict[int, bytes]:
        """`cold_view(tokens[:n])` for each n in `lengths`, in one cold evaluation (how
        the tokens are split into batches changes nothing the next token sees)."""
        cold = FakeEngine(**self.config)
        views = {}
        for n in sorted(set(lengths)):
            cold.eval(tokens[cold.n_past : n])
            views[n] = cold.view()
        return views

    def _tail(self) -> list[int]:
        if self.kind == "recurrent":
            return list(self._state[2]) if self._state else []
        return [t for _, t in self._attn[-3:]]

    # -- evaluation -----------------------------------------------------------------------

    def eval(self, tokens: Sequence[int], progress: Callable[[int, int], None] | None = None) -> None:
        if self.n_past + len(tokens) > self.n_ctx:
            raise UsageError(f"{self.n_past + len(tokens)} tokens do not fit the {self.n_ctx}-token context",
                             hint="raise --ctx or shorten the prompt")
        done = 0
        while done < len(tokens):
            chunk = list(tokens[done : done + self.n_batch])
            for at in range(0, len(chunk), self.n_ubatch):
                self._decode(chunk[at : at + self.n_ubatch])
            self.prompt_tokens += len(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, len(tokens))  # a KeyboardInterrupt may come from here

    def _decode(self, ubatch: list[int]) -> None:
        """One ubatch at the next positions (llama_batch_allocr: seq_pos_max + 1)."""
        start = self.n_past
        if self._held_upto == start:
            self._held_upto += len(ubatch)
        cells = [(start + i, t) for i, t in enumerate(ubatch)]
        if self.kind != "recurrent":
            if len(self._attn) + len(ubatch) > self.n_ctx:
                raise KvchatError(f"llama_decode failed (code 1) after {start} tokens")
            stale = bool(self._attn) and self._attn[-1][0] >= start  # a state cleared under its cells
            self._attn.extend(cells)
            if stale:
                self._attn.sort()
        if self.kind == "swa":
            # find_slot: cells masked for the ubatch (at least n_swa behind its first
            # position) are reused, oldest first, once the window cache is full.
            excess = len(self._window) + len(ubatch) - self.window_cells
            while excess > 0:
                assert self._window[0][0] <= start - self.n_swa, "the window cache cannot take the ubatch"
                self._window.pop(0)
                excess -= 1
            self._window.extend(cells)
        if self.kind in ("recurrent", "hybrid"):
            digest, tail = (self._state[1], self._state[2]) if self._state else (b"", ())
            for token in ubatch:
                digest = _fold(digest, token)
                tail = (*tail, token)[-3:]
            self._state = (start + len(ubatch) - 1, digest, tail)

    def set_sampling(self, sampling: SamplingSettings) -> None:
        self._sampling = sampling

    def script(self, *replies: str | list[str]) -> None:
        """The next generations say these replies (each followed by end of turn),
        whatever the cache holds: a text as the tokenizer splits it, or a list of
        pieces, one token each (a model may well write '.' '.' where the tokenizer
        makes '..')."""
        for reply in replies:
            if isinstance(reply, str):
                tokens = self.tokenize(reply, add_special=False)
            else:
                tokens = [self.tokenize(piece, add_special=False, parse_special=False)[0] for piece in reply]
            self._scripts.append([*tokens, self.eos_token])

    def _sample(self, scripted: list[int] | None, produced: int) -> int:
        if scripted is not None:
            return scripted[produced] if produced < len(scripted) else self.eos_token
        tail = bytes(t - _BYTE_BASE for t in self._tail() if _BYTE_BASE <= t < _BYTE_BASE + 256)
        for n in (3, 2, 1):  # inside a multi-byte character: its next byte
            if len(tail) >= n and tail[-n:] in _CONTINUATIONS:
                return _BYTE_BASE + _CONTINUATIONS[tail[-n:]]
        seed = b""
        if self._sampling.temperature > 0:  # the sampler's RNG moves on with every draw
            self._draws += 1
            seed = _ints([self._sampling.seed or 0, self._draws])
        r = int.from_bytes(_digest(self.view(), seed)[:4], "little")
        if r % self.eog_every == 0:
            return self.eos_token
        piece = REPLY_PIECES[(r // self.eog_every) % len(REPLY_PIECES)]
        return self.tokenize(piece, add_special=False)[0]

    def generate(self, max_tokens: int | None, *, stop_at_eog: bool = True,
                 context: Sequence[int] = ()) -> Iterator[TokenEvent]:
        """As kvchat.engine.Engine.generate: the last token yielded is not evaluated."""
        scripted = self._scripts.pop(0) if self._scripts else None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        produced = 0
        while True:
            token = self._sample(scripted, produced)
            produced += 1
            eog = self.is_eog(token)
            text = "" if eog else decoder.decode(self.token_piece(token))
            at_limit = max_tokens is not None and produced >= max_tokens
            last = (eog and stop_at_eog) or at_limit or self.n_past + 1 >= self.n_ctx
            if last:
                text += decoder.decode(b"", final=True)
            yield TokenEvent(token, text, eog)
            if last:
                return
            self._decode([token])
            self.generated_tokens += 1

    # -- the cache --------------------------------------------------------------------------

    def kv_remove(self, start: int, end: int) -> bool:
        p0 = max(start, 0)
        p1 = end if end >= 0 else 1 << 62
        if self.kind in ("recurrent", "hybrid") and self._state:
            pos = self._state[0]
            if 0 < p0 <= pos < p1:  # llama_memory_recurrent::seq_rm: no partial rollback
                return False
            if p0 <= pos < p1:
                self._state = None
        self._attn = [c for c in self._attn if not p0 <= c[0] < p1]
        self._window = [c for c in self._window if not p0 <= c[0] < p1]
        self._held_upto = min(self._held_upto, p0)
        return True

    def kv_shift(self, start: int, end: int, delta: int) -> None:
        # llama.cpp aborts at the next decode when the cache cannot shift (K-shift).
        assert self._shift, "llama_memory_seq_add on memory that cannot shift"
        p1 = end if end >= 0 else 1 << 62

        def moved(cells: list[Cell]) -> list[Cell]:
            out = [(p + delta, t) if start <= p < p1 else (p, t) for p, t in cells]
            return sorted(c for c in out if c[0] >= 0)

        self._attn, self._window = moved(self._attn), moved(self._window)
        self._held_upto = self.n_past

    def can_shift(self) -> bool:
        return self._shift

    def kv_clear(self) -> None:
        self._attn, self._window, self._state = [], [], None
        self._held_upto = 0

    def covers(self, n_tokens: int) -> bool:
        """kvchat.engine.Engine.covers, on the fake's positions."""
        pos_min, pos_max = self.seq_pos_min(), self.seq_pos_max()
        if n_tokens == 0:
            return pos_max < 0
        if pos_max != n_tokens - 1:
            return False
        if self.kind in ("recurrent", "hybrid"):
            return True
        if self.kind == "swa":
            return 0 <= pos_min <= max(0, n_tokens - self.n_swa + 1)
        return pos_min == 0

    def _dump(self, *, partial: bool) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "partial": partial}
        if not partial:
            data["attn"] = self._attn
        if self.kind == "swa":
            data["window"] = self._window
        if self._state and self.kind in ("recurrent", "hybrid"):
            data["state"] = [self._state[0], self._state[1].hex(), list(self._state[2])]
        return data

    def _load(self, data: dict[str, Any]) -> None:
        if "attn" in data:
            self._attn = sorted((p, t) for p, t in data["attn"])
        if self.kind == "swa":
            self._window = sorted((p, t) for p, t in data["window"])
        if self.kind in ("recurrent", "hybrid"):
            state = data.get("state")
            self._state = (state[0], bytes.fromhex(state[1]), tuple(state[2])) if state else None

    def checkpoint(self, n_tokens: int) -> Checkpoint:
        assert n_tokens == self.n_past, f"a checkpoint labelled {n_tokens} of a cache at {self.n_past}"
        partial = self.needs_checkpoints
        raw = json.dumps(self._dump(partial=partial)).encode()
        # Sizes as llama.cpp's: a recurrent state is fixed, a window grows with its cells.
        recurrent = self.kind in ("recurrent", "hybrid")
        size = self.state_size if recurrent else len(self._window) * self.cell_bytes
        return Checkpoint(n_tokens, raw + b"\0" * max(0, size - len(raw)), partial)

    def restore_checkpoint(self, checkpoint: Checkpoint) -> bool:
        """kvchat.engine.Engine.restore_checkpoint on the fake's memory."""
        if checkpoint.partial and checkpoint.n_tokens > self._held_upto:
            return False
        data = json.loads(checkpoint.data.rstrip(b"\0"))
        if data["kind"] != self.kind:
            self.kv_clear()
            return False
        if not checkpoint.partial:
            self.kv_clear()
        self._load(data)
        self.kv_remove(checkpoint.n_tokens, -1)
        if not checkpoint.partial:
            self._held_upto = checkpoint.n_tokens
        ok = self.covers(checkpoint.n_tokens)
        if ok:
            self.restores.append(checkpoint.n_tokens)
        return ok

    def state_bytes(self) -> bytes:
        return json.dumps(self._dump(partial=False)).encode()

    def load_state_bytes(self, data: bytes, n_tokens: int) -> None:
        self.kv_clear()
        try:
            self._load(json.loads(data))
        except (ValueError, KeyError, TypeError) as exc:
            raise SessionError("llama.cpp refused the saved KV state", hint="use --rebuild") from exc
        if self.n_past != n_tokens:
            cells = self.n_past
            self.kv_clear()
            raise SessionError(f"the saved KV state holds {cells} positions but its record says {n_tokens}",
                               hint="the session file is inconsistent; use --rebuild")
        self._held_upto = n_tokens

    # -- counters and lifetime --------------------------------------------------------------

    @property
    def evaluated(self) -> int:
        return self.prompt_tokens + self.generated_tokens

    def perf(self) -> PerfCounters:
        return PerfCounters(0.0, self.prompt_tokens, 0.0, self.generated_tokens)

    def perf_reset(self) -> None:
        self.prompt_tokens = self.generated_tokens = 0

    def close(self) -> None:
        self.kv_clear()


# A recurrent state is a digest folded over the tokens; this table (shared by every
# engine in the process) unfolds one for `cells()`. The model never reads it.
_FOLDS: dict[bytes, tuple[bytes, int]] = {}


def _fold(digest: bytes, token: int) -> bytes:
    out = _digest(digest, _ints([token]))
    _FOLDS[out] = (digest, token)
    return out


def _unfold(digest: bytes) -> list[int]:
    tokens = []
    while digest:
        digest, token = _FOLDS[digest]
        tokens.append(token)
    return tokens[::-1]


# -- driving a Session ---------------------------------------------------------------


def turn(session: Session, text: str | None, *, stop_after: int | None = None) -> tuple[str, TurnStats]:
    """Send `text` (None: retry the last reply) and read the reply to the end, or close
    the stream after `stop_after` tokens as Ctrl-C does; the reply's text and the
    turn's figures. The one place that knows how a turn is driven."""
    stream = session.retry() if text is None else session.send(text)
    pieces = []
    for i, event in enumerate(stream):
        pieces.append(event.text)
        if stop_after is not None and i + 1 >= stop_after:
            stream.close()
            break
    stream.close()
    return "".join(pieces), stream.stats


def check_session(session: Session, engine: FakeEngine, *, after_reply: bool = False) -> None:
    """The history is the truth of the cache: the cells are its first n_past tokens,
    the model sees what a cold evaluation of them would show, the cached text is the
    tokens' text, turn marks point where their turns start, and every checkpoint that
    stands for a prefix of the history restores exactly that prefix."""
    n = engine.n_past
    tokens = session.tokens
    assert n <= len(tokens)
    if after_reply:
        assert n in (len(tokens), len(tokens) - 1)
    assert engine.cells() == tokens[:n], "the cache holds other tokens than the history says"
    assert engine.covers(n)
    live = [c for c in session.checkpoints
            if c.n_tokens <= len(tokens) and c.digest == _history_digest(tokens[: c.n_tokens])]
    cold = engine.cold_views(tokens, [n, *(c.n_tokens for c in live)])
    assert engine.view() == cold[n], "the model sees another context than a cold one"
    # A BOS token the model adds is not in the cached text; one the template writes is.
    bos_text = engine.token_text(engine.bos_token)
    bos = bos_text if tokens[:1] == [engine.bos_token] and not session.kv_text.startswith(bos_text) else ""
    pieces = [engine.token_piece(t, special=True) for t in tokens]

    def text_of(k: int) -> str:
        return b"".join(pieces[:k]).decode("utf-8", errors="replace")

    assert bos + session.kv_text == text_of(len(tokens))
    for mark in session.turns:
        assert session.messages[mark.message]["role"] == "user"
        assert text_of(mark.token) == bos + session.kv_text[: mark.char]
        if mark.reply_token >= 0 and mark.reply_char >= 0:
            assert text_of(mark.reply_token) == bos + session.kv_text[: mark.reply_char]
    assert [m.token for m in session.turns] == sorted(m.token for m in session.turns)
    assert len(session.checkpoints) <= max(session.checkpoint_max, 0)
    assert session.checkpoint_bytes <= session.checkpoint_mib * 1024 * 1024
    # Checkpoints of a history that is gone are never restored (their digest differs);
    # the others must restore exactly their prefix.
    for saved in live:
        probe = engine.clone()
        if probe.restore_checkpoint(saved.checkpoint):
            assert probe.view() == cold[saved.n_tokens], "a checkpoint restores another state"
