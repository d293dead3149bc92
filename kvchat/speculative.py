"""Speculative decoding, the drafting side: who proposes tokens, and how many.

kvchat.speculative_engine verifies a draft in one batch with the target model's
logits at every position and keeps a draft token only where the target's own
sampler picks it, so the output is the target's. This module decides what to
draft and is pure bookkeeping: no llama_cpp import, no printing.

- `NgramDrafter` (prompt lookup): an earlier occurrence of the context's last few
  tokens (prompt, reply so far, earlier turns) proposes what followed it.
  Pays off where a reply copies its input (rewrites, edits, conversions).
- `ModelDrafter`: a small model with the same vocabulary drafts greedily; its own
  context follows the target's token history.
- `DraftPolicy`: the draft length follows what drafting has paid (tokens per
  second of verify steps against one-token steps, timed as they run); while
  drafting does not pay it switches itself off and probes again later.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from kvchat.errors import UsageError
from kvchat.settings import SPECULATIVE_MODES

if TYPE_CHECKING:
    from kvchat.engine_api import VerifyingEngine
    from kvchat.model_spec import ModelSpec

# llama.cpp's own rule for draft models (common/speculative.cpp): vocabularies may
# differ by a few padding tokens at the end, never in the tokens both have.
VOCAB_MAX_SIZE_DIFFERENCE = 128


@dataclass
class SpecCounters:
    """What speculative decoding did, summed over a reply or a process."""

    steps: int = 0  # verify batches
    drafted: int = 0  # draft tokens sent for verification
    accepted: int = 0  # draft tokens the target sampled too (kept)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def add(self, drafted: int, accepted: int) -> None:
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted


class Drafter(Protocol):
    """Proposes up to `n_max` tokens that may follow `context` (the whole token history)."""

    name: str

    def sync(self, context: Sequence[int]) -> None:
        """Catch up with `context` ahead of time (a new turn's prompt), untimed."""

    def draft(self, context: Sequence[int], n_max: int) -> list[int]: ...

    def feedback(self, paid: float) -> None:
        """The verify step of the last draft emitted `paid` times the tokens a plain
        step would have in its time."""

    def close(self) -> None: ...


class NgramDrafter:
    """Prompt lookup: match the context's last `n` tokens, for each n in `lengths`
    longest first, against an index of every earlier n-gram, and propose the tokens
    that followed an earlier occurrence: the first one after the place the last
    draft was copied from (copies run in order), else the latest.

    Long matches matter in the text drafting pays for: code and tables repeat short
    runs everywhere ("return result\n\ndef"), and the latest place a 4-gram occurred
    is often the wrong one to copy from; a 16-token match pins the place being copied.
    The index keeps one entry per length and position, keyed by the n-gram's hash (a
    collision is caught by comparing the tokens before proposing anything).

    A match of n tokens proposes at most n - 1: the evidence that the text is being
    copied is as long as the match, so a short match risks a short draft, and drafts
    grow as a copied run goes on (1, 3, 7, 15 tokens for the default lengths, which
    fill the verify batches of `policy_for('ngram')` exactly).

    What a match is worth depends on its length and the text: in a rewrite a 16-token
    match is nearly always copied on, while in free text a 2-token match rarely is.
    So each length keeps what its drafts paid (`feedback`, an exponential average
    of the verify step's tokens per plain-step time); matches of a length that does
    not pay propose nothing, except every `PROBE_EVERY`-th, which keeps measuring.

    The index grows with the context; a context that is not an extension of the
    indexed one (a new conversation, dropped turns) rebuilds it.
    """

    name = "ngram"
    PROBE_EVERY = 8
    PAID_ALPHA = 0.3

    def __init__(self, lengths: Sequence[int] = (2, 4, 8, 16)) -> None:
        if not lengths or min(lengths) < 1:
            raise ValueError("n-gram lengths must be at least 1")
        self.lengths = sorted(set(lengths), reverse=True)
        self.paid = dict.fromkeys(self.lengths, 1.2)  # optimistic: every length is tried
        self._skipped = dict.fromkeys(self.lengths, 0)
        self._last: int | None = None  # the match length of the last draft proposed
        self._seq: list[int] = []
        # per length: hash of an n-gram -> the index just after each of its occurrences
        # whose continuation is known, in order
        self._index: dict[int, dict[int, list[int]]] = {n: {} for n in self.lengths}
        self._indexed_end = 0
        self._ref: Sequence[int] | None = None
        self._source: int | None = None  # where the last draft was copied from

    def _reset(self) -> None:
        self._seq, self._indexed_end, self._ref, self._source = [], 0, None, None
        self._index = {n: {} for n in self.lengths}

    def _sync(self, context: Sequence[int]) -> None:
        n = len(self._seq)
        # SpeculativeEngine appends to one list during a reply: then the indexed part is
        # known to be unchanged and the O(n) comparison is skipped.
        same = context is self._ref and len(context) >= n
        if not same and (len(context) < n or list(context[:n]) != self._seq):
            self._reset()
        self._ref = context
        self._seq.extend(context[len(self._seq):])

    def sync(self, context: Sequence[int]) -> None:
        self._sync(context)
        self._index_until(len(self._seq) - 1)

    def _index_until(self, end: int) -> None:
        """Index the n-grams ending at positions (indexed_end, end]."""
        seq = self._seq
        tables = [(n, self._index[n]) for n in self.lengths]
        for stop in range(self._indexed_end + 1, end + 1):
            for n, table in tables:
                if n <= stop:
                    table.setdefault(hash(tuple(seq[stop - n : stop])), []).append(stop)
        self._indexed_end = max(self._indexed_end, end)

    def draft(self, context: Sequence[int], n_max: int) -> list[int]:
        if n_max <= 0:
            return []
        self._sync(context)
        seq, length = self._seq, len(self._seq)
        # Every n-gram that ends before the current end has a continuation to offer.
        self._index_until(length - 1)
        self._last = None
        for n in self.lengths:
            if n >= length:
                continue
            suffix = seq[length - n :]
            start = self._pick(self._index[n].get(hash(tuple(suffix)), ()), suffix)
            if start is not None:
                if self.paid[n] < 1.0:
                    self._skipped[n] += 1
                    if self._skipped[n] % self.PROBE_EVERY:
                        return []
                self._last, self._source = n, start
                return seq[start : start + min(n_max, max(1, n - 1))]
        return []

    def _pick(self, starts: Sequence[int], suffix: list[int]) -> int | None:
        """Of the places an n-gram occurred, the one to copy from: the first after the
        last draft's source (a rewrite copies its source in order, so after a line of
        its own the next "def" to copy is the next one in the file, not the latest
        one), else the latest. Hash collisions are skipped."""
        seq, n = self._seq, len(suffix)
        after = bisect.bisect_right(starts, self._source) if self._source is not None else len(starts)
        for i in itertools.chain(range(after, len(starts)), range(after - 1, -1, -1)):
            start = starts[i]
            if seq[start - n : start] == suffix:
                return start
        return None

    def feedback(self, paid: float) -> None:
        if self._last is not None:
            self.paid[self._last] += self.PAID_ALPHA * (paid - self.paid[self._last])
            self._last = None

    def close(self) -> None:
        self._reset()


class Vocabulary(Protocol):
    """What vocab_mismatch compares: a loaded model (kvchat.engine.Engine), or a GGUF
    header's statement of it (kvchat.model_spec.HeaderVocabulary), where None means
    the header leaves the value to the tokenizer's default and is not compared."""

    @property
    def n_vocab(self) -> int: ...
    @property
    def add_bos(self) -> bool | None: ...
    @property
    def bos_token(self) -> int | None: ...
    @property
    def eos_token(self) -> int | None: ...
    def token_text(self, token: int) -> str: ...


def vocab_mismatch(target: Vocabulary, draft: Vocabulary) -> str | None:
    """Why `draft` cannot draft for `target`, or None when their vocabularies agree
    (llama.cpp's test: special tokens, BOS handling and the text of every shared token)."""
    if abs(target.n_vocab - draft.n_vocab) > VOCAB_MAX_SIZE_DIFFERENCE:
        return f"vocabulary sizes differ ({target.n_vocab} vs {draft.n_vocab} tokens)"
    if None not in (target.add_bos, draft.add_bos) and target.add_bos != draft.add_bos:
        return "one model adds a BOS token and the other does not"
    specials = (("BOS", target.bos_token, draft.bos_token), ("EOS", target.eos_token, draft.eos_token))
    for what, a, b in specials:
        if a is not None and b is not None and a != b:
            return f"{what} tokens differ ({a} vs {b})"
    for token in range(min(target.n_vocab, draft.n_vocab)):
        if target.token_text(token) != draft.token_text(token):
            return (f"token {token} is {target.token_text(token)!r} in one model and "
                    f"{draft.token_text(token)!r} in the other")
    return None


def check_draft_vocabulary(target: ModelSpec, draft: ModelSpec, target_name: str, draft_name: str) -> None:
    """`estimate --draft`: refuse, from the two GGUF headers, a draft model that
    `run --draft` would refuse once loaded (the same rule, vocab_mismatch)."""
    if target.vocabulary is None or draft.vocabulary is None:
        return  # no vocabulary in a header: `run` refuses that model for other reasons
    mismatch = vocab_mismatch(target.vocabulary, draft.vocabulary)
    if mismatch is not None:
        raise UsageError(f"draft model {draft_name} cannot draft for {target_name}: {mismatch}",
                         hint="pick a smaller model of the same family (same tokenizer)")


class ModelDrafter:
    """Greedy drafts from a second, smaller model sharing the target's vocabulary.

    Its KV cache mirrors the target's token history: before each draft the part
    that differs (rejected drafts, a new turn) is removed and the new tokens are
    evaluated. `engine` is owned (closed) by this drafter.
    """

    name = "draft"

    def __init__(self, engine: VerifyingEngine, n_vocab_target: int) -> None:
        self.engine = engine
        self._n_vocab_target = n_vocab_target
        self._tokens: list[int] = []  # exactly what the draft engine's cache holds
        self._ref: Sequence[int] | None = None  # the context list last seen ...
        self._known = 0  # ... and how much of it `_tokens` is known to start with

    def _common_prefix(self, context: Sequence[int]) -> int:
        """Length of the longest common prefix of the cached tokens and `context`
        (slice comparisons run in C; a binary search keeps them few)."""
        have = self._tokens
        n = min(len(have), len(context))
        lo = min(self._known, n) if context is self._ref else 0
        if list(context[lo:n]) == have[lo:n]:
            return n
        hi = n  # have[:lo] == context[:lo]; have[:hi] != context[:hi]
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if list(context[:mid]) == have[:mid]:
                lo = mid
            else:
                hi = mid
        return lo

    def _catch_up(self, context: Sequence[int], end: int) -> None:
        """Make the draft cache hold context[:end]: drop what differs, evaluate the rest."""
        engine = self.engine
        keep = min(self._common_prefix(context), end)
        if keep < len(self._tokens):
            if not engine.kv_remove(keep, -1):
                engine.kv_clear()
                keep = 0
            del self._tokens[keep:]
        new = list(context[keep:end])
        if new:
            engine.eval(new)
            self._tokens.extend(new)
        self._ref, self._known = context, end

    def sync(self, context: Sequence[int]) -> None:
        if 1 < len(context) <= self.engine.n_ctx:
            self._catch_up(context, len(context) - 1)

    def draft(self, context: Sequence[int], n_max: int) -> list[int]:
        if n_max <= 0 or not context:
            return []
        engine = self.engine
        if len(context) + n_max > engine.n_ctx:
            return []
        # The last context token is (re-)evaluated here: its logits give the first draft.
        self._catch_up(context, len(context) - 1)
        engine.eval([context[-1]])
        self._tokens.append(context[-1])
        drafts: list[int] = []
        while True:
            token = engine.sample(-1)
            if token >= self._n_vocab_target or engine.is_eog(token):
                break
            drafts.append(token)
            if len(drafts) >= n_max:
                break
            engine.eval([token])
            self._tokens.append(token)
        return drafts

    def feedback(self, paid: float) -> None:
        pass  # DraftPolicy's pause covers a draft model: every draft costs its passes

    def close(self) -> None:
        self.engine.close()


@dataclass
class DraftPolicy:
    """How many tokens to draft next, from what drafting has paid so far.

    Pay is measured, not assumed: `gain` is the emitted tokens per second of
    verify steps over one-token steps, an exponential average. Drafting pauses
    for `cooldown` tokens while `gain` is below 1 (it costs more than it saves),
    then probes again; each failed probe doubles the pause, up to `max_backoff`.
    The draft length doubles after a fully accepted draft and falls to one past
    the accepted part after a rejection. With `batch_multiple` m > 1, lengths above
    one are rounded up so that the verify batch (the pending token and the draft) is
    a multiple of m tokens: 1, 3, 7, 15 for m = 4.
    """

    n_max: int = 16
    batch_multiple: int = 1
    alpha: float = 0.3
    min_gain: float = 1.0
    first_backoff: int = 16
    max_backoff: int = 512
    n_draft: int = 4
    gain: float = 1.2
    t_plain_s: float | None = None
    cooldown: int = 0
    backoff: int = 0  # set from first_backoff
    counters: SpecCounters = field(default_factory=SpecCounters)

    def __post_init__(self) -> None:
        self.backoff = self.first_backoff
        self.n_draft = self._length(self.n_draft)

    def _length(self, n: int) -> int:
        """`n` rounded up to a draft length whose verify batch fills whole multiples, at
        most n_max."""
        m = self.batch_multiple
        if n > 1 and m > 1:
            n = -(-(n + 1) // m) * m - 1
        return max(1, min(self.n_max, n))

    def budget(self) -> int:
        """Draft tokens to ask for now; 0 means decode one token plainly."""
        if self.t_plain_s is None or self.cooldown > 0:
            return 0
        return self.n_draft

    def observe_plain(self, seconds: float) -> None:
        """A one-token decode step took `seconds`."""
        if self.cooldown > 0:
            self.cooldown -= 1
            if self.cooldown == 0:
                self.gain = 1.2  # probe with a clean slate
        if seconds > 0:
            t = self.t_plain_s
            self.t_plain_s = seconds if t is None else t + self.alpha * (seconds - t)

    def observe_draft(self, drafted: int, accepted: int, emitted: int, seconds: float) -> float | None:
        """A verify step of `drafted` tokens kept `accepted` of them, produced `emitted`
        tokens (accepted + the target's own next token, fewer at a stop) in `seconds`.
        Returns what it paid: emitted tokens per plain-step time (None before a plain
        step was timed)."""
        self.counters.add(drafted, accepted)
        if accepted >= drafted:
            if drafted >= self.n_draft:
                self.n_draft = self._length(self.n_draft * 2)
        else:
            self.n_draft = self._length(accepted + 1)
        if self.t_plain_s is None or seconds <= 0:
            return None
        ratio = emitted * self.t_plain_s / seconds
        self.gain += self.alpha * (ratio - self.gain)
        if self.gain < self.min_gain:
            self.cooldown = self.backoff
            self.backoff = min(self.max_backoff, self.backoff * 2)
            self.n_draft = 1
        elif ratio > self.min_gain:
            self.backoff = self.first_backoff
        return ratio


def policy_for(drafter: str) -> DraftPolicy:
    """The default policy per drafter.

    An n-gram draft costs nothing to propose, only its verify step: its gain is
    averaged over about ten steps (alpha 0.1) and a pause lasts at most 64 tokens, so
    that a few rejected drafts in copy-heavy text do not switch it off for the rest of
    the reply. Its verify batches are whole multiples of 4 tokens, at most 16 (drafts
    of 1, 3, 7, 15): llama.cpp's CPU matrix kernels for repacked weights work on
    4 rows at a time (Gemma 3 270M at depth 2300, 2 threads: batches of 4, 5 and 6
    tokens took 61, 77 and 78 ms). With every draft kept, drafts of up to 16 ran
    2.05-2.29x plain and these 2.56-2.60x.

    A draft model pays a forward pass per proposed token: it keeps the quicker,
    longer back-off and unrounded lengths."""
    if drafter == "ngram":
        return DraftPolicy(alpha=0.1, max_backoff=64, batch_multiple=4, n_max=15, n_draft=3)
    return DraftPolicy()


class Speculator:
    """A drafter and its policy, as SpeculativeEngine.generate uses them."""

    def __init__(self, drafter: Drafter, policy: DraftPolicy | None = None) -> None:
        self.drafter = drafter
        self.policy = policy or policy_for(drafter.name)

    @property
    def mode(self) -> str:
        return self.drafter.name

    @property
    def counters(self) -> SpecCounters:
        return self.policy.counters

    def sync(self, context: Sequence[int]) -> None:
        self.drafter.sync(context)

    def propose(self, context: Sequence[int], room: int) -> list[int]:
        """Draft tokens for the next verify step, at most `room` (what the context and
        the token limit leave); [] to decode one token plainly."""
        n = min(self.policy.budget(), room)
        if n <= 0:
            return []
        return self.drafter.draft(context, n)[:n]

    def observe_plain(self, seconds: float) -> None:
        self.policy.observe_plain(seconds)

    def observe_draft(self, drafted: int, accepted: int, emitted: int, seconds: float) -> None:
        paid = self.policy.observe_draft(drafted, accepted, emitted, seconds)
        if paid is not None:
            self.drafter.feedback(paid)

    def close(self) -> None:
        self.drafter.close()


def parse_mode(value: str | None, *, has_draft_model: bool) -> str:
    """`--speculative auto|ngram|draft|off` -> the mode to run ('ngram', 'draft' or 'off')."""
    mode = (value or "auto").strip().lower()
    if mode not in SPECULATIVE_MODES:
        raise UsageError(f"unknown --speculative '{value}'", hint="use auto, ngram, draft or off")
    if mode == "auto":
        return "draft" if has_draft_model else "ngram"
    if mode == "draft" and not has_draft_model:
        raise UsageError("--speculative draft needs a draft model",
                         hint="add --draft MODEL (a small model with the same vocabulary)")
    return mode
