"""The quality half of `kvchat bench`: the same tokens teacher-forced through two
contexts, each position's next-token distribution compared with the reference
run's (mean and 99th-percentile KL, top-1 agreement, perplexity), as llama.cpp's
`llama-perplexity --kl-divergence` does. The reference logits are spooled to an
unnamed temporary file so that one engine at a time is alive."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from kvchat.errors import KvchatError

if TYPE_CHECKING:
    from kvchat.engine import Engine

QUALITY_ROWS = 256  # positions decoded per teacher-forced batch; the same for every pair
_REDUCE_ROWS = 64  # rows reduced at once in float64 (64 x 49k vocab x 8 B = 25 MB)
# (steps done, what is being done): the bench's progress callback.
Progress = Callable[[int, str], None]


@dataclass(frozen=True)
class QualityResult:
    """One run's teacher-forced figures against the reference run."""

    n_positions: int
    perplexity: float
    kl_mean: float
    kl_p99: float
    top1_agreement: float

    def to_json(self) -> dict[str, Any]:
        return {
            "n_positions": self.n_positions,
            "perplexity": self.perplexity,
            "kl_mean": self.kl_mean,
            "kl_p99": self.kl_p99,
            "top1_agreement": self.top1_agreement,
        }


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


@dataclass
class QualityStats:
    """Per-position figures of one run against the reference, gathered chunk by chunk."""

    kl: list[np.ndarray] = field(default_factory=list)
    agree: list[np.ndarray] = field(default_factory=list)
    nll: list[np.ndarray] = field(default_factory=list)

    def add(self, ref_logits: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> None:
        """Compare rows of logits with the reference's; `targets` are the next tokens.

        Rows past the end of `targets` (the text's last position) are ignored.
        """
        n = len(targets)
        for start in range(0, n, _REDUCE_ROWS):
            stop = min(start + _REDUCE_ROWS, n)
            ref_lp = log_softmax(ref_logits[start:stop])
            lp = ref_lp if logits is ref_logits else log_softmax(logits[start:stop])
            # KL(P || Q) = sum_v P(v) (log P(v) - log Q(v)); identical rows give exactly 0.
            kl = (np.exp(ref_lp) * (ref_lp - lp)).sum(axis=1)
            self.kl.append(np.maximum(kl, 0.0))
            self.agree.append(ref_lp.argmax(axis=1) == lp.argmax(axis=1))
            self.nll.append(-lp[np.arange(stop - start), targets[start:stop]])

    def result(self) -> QualityResult:
        kl = np.concatenate(self.kl)
        nll = np.concatenate(self.nll)
        return QualityResult(
            n_positions=len(kl),
            perplexity=float(np.exp(nll.mean())),
            kl_mean=float(kl.mean()),
            kl_p99=float(np.percentile(kl, 99)),
            top1_agreement=float(np.concatenate(self.agree).mean()),
        )


def _teacher_forced(engine: Engine, tokens: Sequence[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (logits rows, next tokens for them) over `tokens`, from an empty cache."""
    engine.kv_clear()
    targets = np.asarray(tokens[1:], dtype=np.int64)
    start = 0
    for logits in engine.eval_logits(tokens, max_rows=QUALITY_ROWS):
        yield logits, targets[start : start + len(logits)]
        start += len(logits)


def record_reference(
    engine: Engine, tokens: Sequence[int], spool: IO[bytes], progress: Progress | None = None
) -> QualityResult:
    """Teacher-force the reference run, spooling its logits; its own figures are exact."""
    stats = QualityStats()
    spool.seek(0)
    spool.truncate()
    for logits, targets in _teacher_forced(engine, tokens):
        spool.write(logits.tobytes())
        stats.add(logits, logits, targets)
        if progress:
            progress(1, "quality")
    spool.flush()
    return stats.result()


def compare_with_reference(
    engine: Engine, tokens: Sequence[int], spool: IO[bytes], progress: Progress | None = None
) -> QualityResult:
    """Teacher-force `engine` over the same tokens and compare with the spooled reference."""
    stats = QualityStats()
    spool.seek(0)
    for logits, targets in _teacher_forced(engine, tokens):
        raw = spool.read(logits.nbytes)
        if len(raw) != logits.nbytes:
            raise KvchatError("the reference run is shorter than this run", hint="rerun kvchat bench")
        ref = np.frombuffer(raw, dtype=np.float32).reshape(logits.shape)
        stats.add(ref, logits, targets)
        if progress:
            progress(1, "quality")
    return stats.result()


def compare_engines(reference: Engine, other: Engine, tokens: Sequence[int]) -> QualityResult:
    """Quality of `other` against `reference` over `tokens` (one spool, then compare)."""
    with tempfile.TemporaryFile() as spool:
        record_reference(reference, tokens, spool)
        return compare_with_reference(other, tokens, spool)


# -- speed -------------------------------------------------------------------------
