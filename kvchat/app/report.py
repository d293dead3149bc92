"""The record of one turn (`run --json`): typed, and the one place that defines
the JSON schema. Built from the turn's figures and the backend's facts."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kvchat.app.backends import MemoryFigures
from kvchat.app.lifecycle import Chat
from kvchat.conversation import TurnStats
from kvchat.registry import model_name_for
from kvchat.settings import keys_in


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int | None  # None: a server that renders messages sent no usage
    completion_tokens: int
    reasoning_tokens: int


@dataclass(frozen=True)
class CacheFigures:
    reused_tokens: int | None
    evaluated_tokens: int | None
    rebuilt_tokens: int
    prefix_cache_tokens: int
    prefix_cache_restore_s: float
    prefix_cache_skipped: str | None
    reevaluated_tokens: int
    server: dict[str, Any] | None  # what a server itself reported (absent for a local model)


@dataclass(frozen=True)
class Timings:
    load_s: float
    # Re-evaluating a session before the turn (--rebuild, or a session moved between
    # engines); None (left out of the record) when nothing was rebuilt.
    rebuild_s: float | None
    ttft_s: float
    prefill_tok_s: float
    decode_tok_s: float


@dataclass(frozen=True)
class Speculation:
    mode: str
    drafted_tokens: int
    accepted_tokens: int
    acceptance: float


@dataclass(frozen=True)
class TurnReport:
    text: str
    reasoning: str
    model: str
    settings: dict[str, Any]  # where the turn ran (the backend's), then sampling
    usage: Usage
    cache: CacheFigures
    memory: MemoryFigures
    timings: Timings
    speculative: Speculation
    stop_reason: str
    is_server: bool

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        del record["is_server"]
        cache = record["cache"]
        if cache["prefix_cache_skipped"] is None:
            del cache["prefix_cache_skipped"]
        if record["timings"]["rebuild_s"] is None:
            del record["timings"]["rebuild_s"]
        if not self.is_server:
            del cache["server"]
        return record


def rebuilt_cache_counts(reused: int, evaluated: int, rebuilt: int) -> tuple[int, int, int]:
    """A turn's (reused, evaluated, rebuilt) where tokens `--rebuild` re-evaluated
    before the turn count as evaluated (llama.cpp did that work in this run), not as
    reused."""
    moved = min(rebuilt, reused)
    return reused - moved, evaluated + moved, moved


def turn_report(chat: Chat, turn: TurnStats, text: str, reasoning: str = "") -> TurnReport:
    """The record of one turn; a thinking model's reasoning apart."""
    backend, session = chat.backend, chat.session
    sampling = session.sampling
    if turn.usage_reported:
        reused, evaluated, rebuilt = rebuilt_cache_counts(turn.reused_tokens, turn.evaluated_tokens,
                                                          chat.rebuilt_tokens)
        counts: tuple[int | None, int | None, int] = (reused, evaluated, rebuilt)
    else:
        counts = (None, None, 0)
    server = backend.server_counts()
    return TurnReport(
        text=text,
        reasoning=reasoning,
        model=model_name_for(backend.model_ref),
        settings={
            **backend.where(),
            **{key: getattr(sampling, key) for key in keys_in("sampling")},
            "max_tokens": session.max_tokens,
        },
        usage=Usage(turn.prompt_tokens if turn.usage_reported else None, turn.completion_tokens,
                    turn.reasoning_tokens),
        cache=CacheFigures(*counts, turn.prefix_cache_tokens, round(turn.prefix_cache_restore_s, 4),
                           turn.prefix_cache_skipped, turn.reevaluated_tokens, server),
        memory=backend.memory(session),
        timings=Timings(round(backend.load_s, 4), round(chat.rebuild_s, 4) if chat.rebuilt_tokens else None,
                        round(turn.ttft_s, 4),
                        round(turn.prefill_tok_s, 2), round(turn.decode_tok_s, 2)),
        speculative=Speculation(backend.speculative_mode, turn.drafted_tokens, turn.accepted_tokens,
                                round(turn.acceptance, 4)),
        stop_reason=turn.stop_reason,
        is_server="server" in backend.where(),
    )
