"""Speculative decoding for a model loaded here: the mode and draft model resolved
before anything loads, then the speculator given to the engine."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from kvchat.app.load import LoadRequest, Warn, load_engine
from kvchat.engine_api import SamplingSettings
from kvchat.settings import Settings

if TYPE_CHECKING:
    from kvchat.engine import Engine
    from kvchat.speculative import SpecCounters
    from kvchat.speculative_engine import SpeculativeEngine


@dataclass(frozen=True)
class SpeculationRequest:
    """--speculative / --draft after resolution: the mode to run and the draft model."""

    mode: str  # ngram, draft or off
    draft_path: Path | None
    asked: bool  # named by a flag, variable, config file or session (not the built-in auto)


def resolve_speculation(s: Settings) -> SpeculationRequest:
    """The speculative mode and draft model, checked before anything loads."""
    from kvchat.registry import resolve_model
    from kvchat.speculative import parse_mode

    mode = parse_mode(s.speculative, has_draft_model=s.draft is not None)
    draft_path = resolve_model(s.draft) if mode == "draft" else None
    asked = s.sources.get("speculative", "default") != "default" or s.draft is not None
    return SpeculationRequest(mode, draft_path, asked)


def start_speculation(engine: Engine, request: LoadRequest, spec: SpeculationRequest, warn: Warn,
                      *, verbose: bool = False) -> Engine | SpeculativeEngine:
    """The engine to chat with: `engine` wrapped for speculative decoding (the wrapper
    owns and closes it, its speculator and a draft model), or `engine` itself where
    speculation is off; say once why it stays off where the model rules it out."""
    from kvchat.errors import UsageError
    from kvchat.speculative import ModelDrafter, NgramDrafter, Speculator, vocab_mismatch
    from kvchat.speculative_engine import SpeculativeEngine, speculation_blocker

    if spec.mode == "off":
        return engine
    blocker = speculation_blocker(engine)
    if blocker is not None:
        if spec.asked:
            warn(f"speculative decoding stays off: {blocker}")
        return engine
    if spec.draft_path is None:
        return SpeculativeEngine(engine, Speculator(NgramDrafter()))
    draft_engine = load_engine(replace(request, model_path=spec.draft_path), warn, verbose=verbose)
    try:
        mismatch = vocab_mismatch(engine, draft_engine)
        if mismatch is not None:
            raise UsageError(
                f"draft model {spec.draft_path.name} cannot draft for {request.model_path.name}: "
                f"{mismatch}",
                hint="pick a smaller model of the same family (same tokenizer), or --speculative ngram",
            )
        draft_engine.set_sampling(SamplingSettings(temperature=0))
        return SpeculativeEngine(engine, Speculator(ModelDrafter(draft_engine, engine.n_vocab)))
    except BaseException:
        draft_engine.close()
        raise


def speculative_mode(engine: object) -> str:
    """ngram, draft, or off (any other engine: plain decoding, a server)."""
    from kvchat.speculative_engine import SpeculativeEngine

    return engine.mode if isinstance(engine, SpeculativeEngine) else "off"


def speculation_counters(engine: object) -> SpecCounters | None:
    """What speculative decoding did in `engine`'s lifetime; None where it is off."""
    from kvchat.speculative_engine import SpeculativeEngine

    return engine.counters if isinstance(engine, SpeculativeEngine) else None
