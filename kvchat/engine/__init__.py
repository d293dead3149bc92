"""The one seam around llama.cpp: this package alone imports `llama_cpp`
(`runtime`: the process-wide log and build facts; `seq_state`: sequence states
whole, partial or by range; here: the model and its context).

It loads a model and a context with every setting chosen deliberately (context
length, K and V cache types, flash attention, SWA cache size, threads), evaluates
only the tokens it is given, and samples through llama.cpp's native sampler chain,
so no logits ever cross into Python. It also captures llama.cpp's log to learn
what llama.cpp allocated (model, KV, compute and output buffers).
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import llama_cpp.llama_cpp as llama
import numpy as np  # llama_cpp imports it already: free here

from kvchat import kv_state
from kvchat.cache_types import flash_attn_enabled
from kvchat.engine import seq_state
from kvchat.engine.context import EngineSettings, context_params
from kvchat.engine.runtime import (
    _LOG,
    AMX_ENV,
    amx_guard,
    apply_builtin_template,
    backend_version,
    builtin_templates,
    load_model,
    supports_gpu_offload,
    system_info,
)
from kvchat.engine.sampler import PENALTY_TOKENS, penalties_of, sampler_chain, schema_grammar
from kvchat.engine_api import Checkpoint, PerfCounters, SamplingSettings, TokenEmitter, TokenEvent
from kvchat.errors import KvchatError, ModelLoadError, SessionError, UsageError
from kvchat.gguf import read_model_header_file
from kvchat.llama_log import BufferSizes, parse_load_log
from kvchat.model_spec import check_loadable, spec_from_header
from kvchat.settings import MIN_CTX

__all__ = ["AMX_ENV", "Engine", "EngineSettings", "amx_guard", "backend_version", "builtin_templates",
           "schema_grammar", "supports_gpu_offload", "system_info"]

# A prefill chunk should take about this long, so Ctrl-C stops it promptly.
_CHUNK_S = 0.5
_MIN_CHUNK = 32
Progress = Callable[[int, int], None]


class Engine:
    """A loaded model with one context and one sequence (seq 0)."""

    def __init__(self, model_path: Path, settings: EngineSettings) -> None:
        self.model_path = model_path
        self.settings = settings
        # ctypes handles from llama.cpp (None once freed)
        self._model: Any = None
        self._ctx: Any = None
        self._sampler: Any = None
        self._greedy = False  # the chain is plain greedy: sample() takes the argmax itself
        self._constrained = False  # the chain has a grammar (set_json_schema)
        self._penalties: Any = None  # the chain's penalties sampler (start_reply primes it)
        self._grammar: str | None = None  # set_json_schema's, as GBNF
        self._sampling = SamplingSettings()
        self._batch: Any = None  # eval_batch's, kept: a verify step per few tokens reuses it
        self._batch_size = 0
        self.flash_attn = settings.flash_attn
        self.gpu_layers: tuple[int, int] | None = None
        self.n_past = 0
        self.can_save_ranges = False  # set by _load: the cache can be read and restored by ranges
        # Leading positions whose cells are all in the cache, full-attention layers
        # included (seq_pos_max reports the SWA part only on a sliding-window cache):
        # a partial checkpoint can be restored up to here.
        self._held_upto = 0
        _LOG.echo = settings.verbose
        mark = _LOG.mark()
        started = time.perf_counter()
        try:
            self._load(model_path, settings)
        except BaseException:
            self.close()
            raise
        self.load_s = time.perf_counter() - started
        self.load_log = _LOG.since(mark)
        report = parse_load_log(self.load_log)
        self.buffers: BufferSizes = report.buffers
        self.gpu_layers = report.gpu_layers
        if self.flash_attn == "auto" and report.flash_attn is not None:
            self.flash_attn = report.flash_attn  # what llama.cpp resolved auto to

    def _load(self, model_path: Path, settings: EngineSettings) -> None:
        # kvchat's own checks come first on every path (run, chat, bench, estimate
        # --exact): llama.cpp aborts the process on files and sizes it could refuse.
        header = read_model_header_file(str(model_path))
        spec_from_header(header)
        check_loadable(header)
        if settings.n_ctx < MIN_CTX:
            raise UsageError(f"a {settings.n_ctx}-token context is too small",
                             hint=f"use at least {MIN_CTX} tokens")
        model = load_model(model_path, settings.n_gpu_layers, settings.tensor_split)
        self._model = model
        self._vocab = llama.llama_model_get_vocab(model)
        # A plain KV cache gets a second, scratch sequence (seq_state.SCRATCH) so that a save
        # reads only a turn's new cells (state_range_bytes). The cache stays one unified
        # stream: with kv_unified off, llama.cpp splits the cells into n_seq_max streams of
        # n_ctx / n_seq_max each (llama_context: n_ctx_seq), halving seq 0's context.
        # Sliding-window, recurrent and hybrid memory cannot be cut by position: one sequence.
        cut = not (llama.llama_model_is_recurrent(model) or llama.llama_model_is_hybrid(model))
        self.can_save_ranges = cut and llama.llama_model_n_swa(model) == 0
        gpu = settings.n_gpu_layers != 0 and supports_gpu_offload()
        enabled = flash_attn_enabled(settings.flash_attn, settings.type_v, gpu=gpu)
        self.flash_attn = "auto" if enabled is None else ("on" if enabled else "off")
        ctx = llama.llama_init_from_model(model, context_params(settings, self.flash_attn,
                                                                  self.can_save_ranges))
        if not ctx:
            raise ModelLoadError(
                f"llama.cpp could not create a context (n_ctx {settings.n_ctx}, "
                f"K {settings.type_k.name}, V {settings.type_v.name}, "
                f"flash attention {settings.flash_attn})",
                hint="try a smaller --ctx or other cache types; --verbose shows why",
            )
        self._ctx = ctx
        self._memory = llama.llama_get_memory(ctx)
        self.n_ctx = llama.llama_n_ctx(ctx)
        self.n_ctx_train = llama.llama_model_n_ctx_train(model)
        self.n_vocab = llama.llama_vocab_n_tokens(self._vocab)
        self.n_layer = llama.llama_model_n_layer(model)
        self.n_batch = llama.llama_n_batch(ctx)
        self.n_swa = int(llama.llama_model_n_swa(model))
        self._piece_buf = ctypes.create_string_buffer(256)
        self._one_token = (llama.llama_token * 1)()
        self.set_sampling(SamplingSettings())

    # -- model facts -------------------------------------------------------

    def metadata(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = llama.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        return buf.value.decode("utf-8", errors="replace")

    def chat_template(self) -> str | None:
        raw = llama.llama_model_chat_template(self._model, None)
        return raw.decode("utf-8", errors="replace") if raw else None

    def has_special_token(self, text: str) -> bool:
        """Whether `text` is one token of the vocabulary (a control token such as
        '<start_of_turn>'): it tokenizes, special tokens parsed, to itself alone."""
        tokens = self.tokenize(text, add_special=False, parse_special=True)
        return len(tokens) == 1 and self.token_text(tokens[0]) == text

    def builtin_template_names(self) -> list[str]:
        return builtin_templates()

    def apply_builtin_template(self, name: str, messages: Sequence[dict[str, str]],
                               *, add_generation_prompt: bool) -> str:
        return apply_builtin_template(name, messages, add_generation_prompt=add_generation_prompt)

    def token_text(self, token: int) -> str:
        raw = llama.llama_vocab_get_text(self._vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    @property
    def bos_token(self) -> int:
        return int(llama.llama_vocab_bos(self._vocab))

    @property
    def eos_token(self) -> int:
        return int(llama.llama_vocab_eos(self._vocab))

    @property
    def add_bos(self) -> bool:
        return bool(llama.llama_vocab_get_add_bos(self._vocab))

    @property
    def memory_kind(self) -> str:
        """What the context's memory is: kv, swa (sliding-window layers with a window-sized
        cache), recurrent or hybrid; says what a saved prefix state can be used for."""
        if llama.llama_model_is_hybrid(self._model):
            return "hybrid"
        if llama.llama_model_is_recurrent(self._model):
            return "recurrent"
        if llama.llama_model_n_swa(self._model) > 0 and not self.settings.swa_full:
            return "swa"
        return "kv"

    def is_eog(self, token: int) -> bool:
        return bool(llama.llama_vocab_is_eog(self._vocab, token))

    # -- tokens ------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (llama.llama_token * capacity)()
        n = llama.llama_tokenize(self._vocab, data, len(data), buf, capacity, add_special, parse_special)
        if n < 0:
            capacity = -n
            buf = (llama.llama_token * capacity)()
            n = llama.llama_tokenize(self._vocab, data, len(data), buf, capacity, add_special, parse_special)
        return list(buf[:n])

    def token_piece(self, token: int, *, special: bool = False) -> bytes:
        buf = self._piece_buf
        n = llama.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = self._piece_buf = ctypes.create_string_buffer(-n)
            n = llama.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    # -- evaluation ----------------------------------------------------------

    def eval(self, tokens: Sequence[int], progress: Progress | None = None) -> None:
        """Append `tokens` to the sequence in the KV cache, in chunks.

        Chunks start at n_batch tokens and shrink so that each takes about
        `_CHUNK_S`: a Ctrl-C (raised between two chunks) then stops a long prefill
        within about that time, and `progress(done, total)` is called after each.
        """
        if self.n_past + len(tokens) > self.n_ctx:
            raise UsageError(
                f"{self.n_past + len(tokens)} tokens do not fit the {self.n_ctx}-token context",
                hint="raise --ctx or shorten the prompt",
            )
        step = self.n_batch
        done = 0
        while done < len(tokens):
            chunk = tokens[done : done + step]
            arr = (llama.llama_token * len(chunk))(*chunk)
            started = time.perf_counter()
            self._decode(llama.llama_batch_get_one(arr, len(chunk)), len(chunk))
            done += len(chunk)
            if progress is not None:
                progress(done, len(tokens))
            if done < len(tokens):
                # Backends may compute asynchronously: time what the chunk really took.
                llama.llama_synchronize(self._ctx)
                took = time.perf_counter() - started
                if took > _CHUNK_S:
                    step = max(_MIN_CHUNK, int(len(chunk) * _CHUNK_S / took))
        # Wait, so that the tokens really are in the cache (and llama.cpp's timings
        # recorded) when eval returns.
        llama.llama_synchronize(self._ctx)

    def _decode(self, batch: llama.llama_batch, n_tokens: int) -> None:
        rc = llama.llama_decode(self._ctx, batch)
        if rc != 0:
            raise KvchatError(
                f"llama_decode failed (code {rc}) after {self.n_past} tokens",
                hint="the context may be full; raise --ctx",
            )
        if self._held_upto == self.n_past:
            self._held_upto += n_tokens
        self.n_past += n_tokens

    def set_json_schema(self, schema: str | None) -> None:
        """Constrain each reply to a JSON Schema (JSON text; None: free text): a grammar
        sampler joins the chain. Not with speculative decoding: a grammar accepts each
        token it sees, and a rejected draft token cannot be taken back out of it."""
        self._grammar = schema_grammar(schema) if schema is not None else None
        try:
            self.set_sampling(self._sampling)
        except UsageError:  # llama.cpp refused the grammar: back to free text, still usable
            self._grammar = None
            self.set_sampling(self._sampling)
            raise

    def set_sampling(self, sampling: SamplingSettings) -> None:
        """Build llama.cpp's sampler chain; sampling then happens in C."""
        self._sampling = sampling
        if self._sampler is not None:
            llama.llama_sampler_free(self._sampler)
            self._sampler = None
        self._sampler, self._greedy = sampler_chain(sampling, self._vocab, self._grammar)
        self._penalties = penalties_of(self._sampler, sampling)
        self._constrained = self._grammar is not None

    def start_reply(self, context: Sequence[int]) -> None:
        """Before a reply's first `sample`: a grammar starts over, and the penalties (when
        any) look back over the last tokens of `context`, the conversation the cache
        holds (its prompt included), as llama-server's do; not over whatever this engine
        sampled last (the previous reply, another conversation): the same history gets
        the same reply, resumed from disk or not."""
        if self._constrained:  # a grammar follows each reply from its start
            llama.llama_sampler_reset(self._sampler)
        if self._penalties is not None:
            llama.llama_sampler_reset(self._penalties)
            for token in context[-PENALTY_TOKENS:]:
                llama.llama_sampler_accept(self._penalties, token)

    def sample(self, index: int = -1) -> int:
        """Sample with the native chain at batch index `index` of the last decode (-1:
        its last output). llama_sampler_sample also accepts the token into the chain's
        state, so call it once per token that is kept."""
        if self._greedy:
            return int(self._logits_row(index).argmax())
        return int(llama.llama_sampler_sample(self._sampler, self._ctx, index))

    def generate(
        self, max_tokens: int | None, *, stop_at_eog: bool = True, context: Sequence[int] = ()
    ) -> Iterator[TokenEvent]:
        """Sample after the last eval, feeding each token back, until end of turn.

        The last token yielded (an end-of-generation token, or the token that hit
        `max_tokens` or the context end) is *not* evaluated into the KV cache yet:
        the caller owns the token history and evaluates it with the next turn.
        `stop_at_eog=False` keeps going past end-of-generation tokens, as
        llama-bench's tg test does (benchmarks). `context`: the token history in the
        cache (start_reply; kvchat.speculative_engine also drafts from it).
        """
        self.start_reply(context)
        emit = TokenEmitter(self, max_tokens, self.n_ctx - self.n_past, stop_at_eog=stop_at_eog)
        while True:
            token = self.sample(-1)
            yield emit.event(token)
            if emit.done:
                return
            self._decode_one(token)

    def _decode_one(self, token: int) -> None:
        one = self._one_token
        one[0] = token
        self._decode(llama.llama_batch_get_one(one, 1), 1)

    # -- batches with logits at every position (verifying several tokens at once) ----

    def eval_batch(self, tokens: Sequence[int]) -> None:
        """Append `tokens` in one decode, keeping the logits at every position: `sample(i)`
        then samples what follows tokens[: i + 1]. At most n_batch tokens, and the
        caller checks that they fit the context (llama_decode fails otherwise)."""
        if len(tokens) == 1:
            self._decode_one(tokens[0])  # its one output is at every position there is
            return
        if self._batch is None or self._batch_size < len(tokens):
            if self._batch is not None:
                llama.llama_batch_free(self._batch)
            self._batch = llama.llama_batch_init(len(tokens), 0, 1)
            self._batch_size = len(tokens)
        self._fill_all_logits(self._batch, tokens)
        self._decode(self._batch, len(tokens))

    def _fill_all_logits(self, batch: llama.llama_batch, tokens: Sequence[int]) -> None:
        """Put `tokens` in `batch` at the next positions of seq 0, each an output."""
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = self.n_past + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        batch.n_tokens = len(tokens)

    def truncate(self, n_tokens: int) -> None:
        """Keep the first `n_tokens` positions of the sequence; drop the rest, checked:
        KvchatError where llama.cpp refuses or the cache then lacks what the token at
        `n_tokens` attends to.

        Asks llama.cpp what the cache holds rather than trusting `n_past`: an interrupt
        may land between a decode and the bookkeeping after it."""
        held = self._pos_max() + 1
        if held <= n_tokens:
            self.n_past = held
            return
        if not llama.llama_memory_seq_rm(self._memory, 0, n_tokens, -1):
            raise KvchatError(f"llama.cpp refused to remove positions {n_tokens}.. from the KV cache")
        self._held_upto = min(self._held_upto, n_tokens)
        self._sync_n_past()
        if self.n_past != n_tokens:
            raise KvchatError(f"the KV cache holds {self.n_past} positions after removing those from "
                              f"{n_tokens} on, expected {n_tokens}")
        # A sliding-window cache must still hold the window before the new end.
        if self.n_swa > 0 and not self.settings.swa_full and self._pos_min() > max(0, n_tokens - self.n_swa):
            raise KvchatError("the sliding-window cache lost cells inside the window when "
                              f"removing positions from {n_tokens} on")

    def eval_logits(
        self, tokens: Sequence[int], *, max_rows: int | None = None
    ) -> Iterator[np.ndarray]:
        """Append `tokens` like `eval`, yielding the logits of every position as it goes.

        Each decoded batch (n_batch tokens, or `max_rows` when smaller) yields a
        float32 array of shape [batch tokens, n_vocab], a copy the caller may keep:
        row i holds the next-token logits after tokens[..i]. Streaming bounds memory
        (3,000 positions of a 49k vocab would be 590 MB at once). Used for teacher
        forcing (kvchat bench); the KV cache advances as the caller iterates.
        """
        if self.n_past + len(tokens) > self.n_ctx:
            raise UsageError(
                f"{self.n_past + len(tokens)} tokens do not fit the {self.n_ctx}-token context",
                hint="raise --ctx or evaluate fewer tokens",
            )
        step = min(self.n_batch, max_rows or self.n_batch)
        batch = llama.llama_batch_init(step, 0, 1)
        try:
            for start in range(0, len(tokens), step):
                chunk = tokens[start : start + step]
                self._fill_all_logits(batch, chunk)
                self._decode(batch, len(chunk))
                # With every position an output, llama_get_logits is [n_outputs, n_vocab]
                # in batch order (llama-context.cpp reorders outputs before returning).
                logits = llama.llama_get_logits(self._ctx)
                yield np.ctypeslib.as_array(logits, shape=(len(chunk), self.n_vocab)).copy()
        finally:
            llama.llama_batch_free(batch)

    def _logits_row(self, index: int) -> np.ndarray:
        """A view (no copy) of the logits at batch index `index` of the last decode."""
        row = llama.llama_get_logits_ith(self._ctx, index)
        if not row:
            raise KvchatError(f"llama.cpp holds no logits at batch index {index}")
        return np.ctypeslib.as_array(row, shape=(self.n_vocab,))

    def last_logits(self) -> np.ndarray:
        """A copy of the next-token logits after the last token evaluated (tests
        compare them with a cold evaluation of the same history)."""
        return self._logits_row(-1).copy()

    # -- KV memory -----------------------------------------------------------

    # The one place positions are read from llama.cpp; everything else asks these.
    def _pos_max(self) -> int:
        """Newest position seq 0 holds (-1 when empty)."""
        return int(llama.llama_memory_seq_pos_max(self._memory, 0))

    def _pos_min(self) -> int:
        """Oldest position seq 0 still holds (-1 when empty); on a sliding-window cache,
        older cells are dropped as evaluation moves on."""
        return int(llama.llama_memory_seq_pos_min(self._memory, 0))

    def _sync_n_past(self) -> None:
        self.n_past = self._pos_max() + 1

    def kv_remove(self, start: int, end: int) -> bool:
        """Remove positions [start, end) of seq 0; end -1 means to the end.

        False when llama.cpp refuses (a partial removal on recurrent or hybrid
        memory); the cache is then unchanged. Even when it succeeds, a
        sliding-window cache may no longer hold the window the next token needs:
        check `covers()` after every removal.
        """
        ok = bool(llama.llama_memory_seq_rm(self._memory, 0, start, end))
        if ok:
            self._held_upto = min(self._held_upto, max(start, 0))
        self._sync_n_past()
        return ok

    def kv_span(self) -> tuple[int, int]:
        """(oldest, newest) position llama.cpp holds for seq 0; (-1, -1) when empty."""
        return self._pos_min(), self._pos_max()

    def kv_shift(self, start: int, end: int, delta: int) -> None:
        llama.llama_memory_seq_add(self._memory, 0, start, end, delta)
        self._sync_n_past()
        self._held_upto = self.n_past

    def cells_in_use(self) -> int:
        """Positions of seq 0 the cache holds, as llama.cpp counts them (pos_max + 1)."""
        return self._pos_max() + 1

    def can_shift(self) -> bool:
        return bool(llama.llama_memory_can_shift(self._memory))

    def kv_clear(self) -> None:
        llama.llama_memory_clear(self._memory, True)
        self.n_past = 0
        self._held_upto = 0

    def covers(self, n_tokens: int) -> bool:
        """Whether the cache holds exactly what the token at position `n_tokens`
        needs after a history of `n_tokens` tokens: nothing past it, and every cell
        it attends to (all of them; the last `n_swa` on a sliding-window cache).

        Recurrent and hybrid memory keep one state per sequence whose position is
        the last token evaluated; its min and max are that position.
        """
        pos_min, pos_max = self.kv_span()
        if n_tokens == 0:
            return pos_max < 0
        if pos_max != n_tokens - 1:
            return False
        if self.memory_kind in ("recurrent", "hybrid"):
            return True
        if self.memory_kind == "swa":
            # The token at position n attends to positions p with n - p < n_swa
            # (llama_hparams::is_masked_swa, standard SWA type).
            return bool(0 <= pos_min <= max(0, n_tokens - self.n_swa + 1))
        return pos_min == 0

    @property
    def needs_checkpoints(self) -> bool:
        """True when removing the tail of the sequence can lose what the history
        needs (sliding window without swa_full, recurrent or hybrid memory)."""
        return self.memory_kind != "kv"

    def checkpoint(self, n_tokens: int) -> Checkpoint:
        """Snapshot the sequence as it is now (it must hold `n_tokens` tokens).

        On memory that cannot roll back, only the part that cannot (the SWA
        window, the recurrent state) is saved (LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY):
        the full-attention cells of the older positions stay valid in the cache
        and are kept by trimming the tail on restore, as llama-server does.
        Elsewhere the whole sequence is saved.
        """
        partial = self.needs_checkpoints
        return Checkpoint(n_tokens, seq_state.read(self._ctx, 0, partial=partial), partial=partial)

    def restore_checkpoint(self, checkpoint: Checkpoint) -> bool:
        """Put the sequence back to `checkpoint`; True when the cache then covers
        exactly its tokens. A partial checkpoint needs the full-attention cells of
        its positions to be still in the cache (they are, unless cleared)."""
        if checkpoint.partial and checkpoint.n_tokens > self._held_upto:
            return False
        if not seq_state.write(self._ctx, checkpoint.data, 0, partial=checkpoint.partial):
            self.kv_clear()
            return False
        # The restored part ends at the checkpoint; trim the attention cells after it.
        self.kv_remove(checkpoint.n_tokens, -1)
        self._sync_n_past()
        if not checkpoint.partial:
            self._held_upto = checkpoint.n_tokens
        return self.covers(checkpoint.n_tokens)

    def state_bytes(self) -> bytes:
        """The sequence's KV state only (no logits), for saving to disk."""
        return seq_state.read(self._ctx, 0)

    def load_state_bytes(self, data: bytes, n_tokens: int) -> None:
        self.kv_clear()
        if not seq_state.write(self._ctx, data, 0):
            raise SessionError("llama.cpp refused the saved KV state", hint="use --rebuild")
        cells = self.cells_in_use()
        if cells != n_tokens:
            self.kv_clear()
            raise SessionError(
                f"the saved KV state holds {cells} positions but its record says {n_tokens}",
                hint="the session file is inconsistent; use --rebuild",
            )
        self.n_past = self._held_upto = n_tokens

    def state_range_bytes(self, start: int, end: int) -> bytearray:
        """The cells of positions [start, end) of seq 0, as the sequence state llama.cpp
        writes for them alone (kvchat.engine.seq_state.read_range says why it is
        exact): a turn's save costs the turn, not the history.

        Raises kv_state.StateFormatError where the memory cannot be cut by position,
        or the cells are not [start, end) in order (after a context shift): save whole.
        """
        if not self.can_save_ranges:
            raise kv_state.StateFormatError(f"a {self.memory_kind} cache cannot be read by position")
        if not 0 <= start < end <= self.n_past:
            raise kv_state.StateFormatError(f"positions {start}..{end} are not all in the cache")
        return seq_state.read_range(self._ctx, self._memory, start, end)

    def load_state_range(self, data: bytes, start: int, end: int) -> None:
        """Append cells [start, end) (state_range_bytes' bytes, or consecutive ranges
        joined by kv_state) after the `start` positions seq 0 holds
        (kvchat.engine.seq_state.load_range)."""
        if not self.can_save_ranges:
            raise SessionError(f"a {self.memory_kind} cache cannot be restored by position",
                               hint="use --rebuild")
        if self.cells_in_use() != start or (start and self._pos_min() != 0):
            raise SessionError(f"a KV range from position {start} does not follow the "
                               f"{self.cells_in_use()} positions in the cache", hint="use --rebuild")
        if not seq_state.load_range(self._ctx, self._memory, data, start, end):
            raise SessionError(f"llama.cpp refused the saved KV cells {start}..{end}", hint="use --rebuild")
        self._sync_n_past()
        if self.n_past != end:
            raise SessionError(f"the KV cache holds {self.n_past} positions after a restore, expected {end}",
                               hint="use --rebuild")
        self._held_upto = end

    # -- counters ----------------------------------------------------------------

    def perf(self) -> PerfCounters:
        llama.llama_synchronize(self._ctx)  # timings are recorded at synchronisation
        data = llama.llama_perf_context(self._ctx)
        return PerfCounters(data.t_p_eval_ms, data.n_p_eval, data.t_eval_ms, data.n_eval)

    def perf_reset(self) -> None:
        llama.llama_perf_context_reset(self._ctx)

    def close(self) -> None:
        """Free the sampler, context and model now (VRAM is released here)."""
        if self._batch is not None:
            llama.llama_batch_free(self._batch)
            self._batch = None
        if self._sampler is not None:
            llama.llama_sampler_free(self._sampler)
            self._sampler = self._penalties = None
        if self._ctx is not None:
            llama.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            llama.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
