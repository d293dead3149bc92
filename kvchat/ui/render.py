"""Plain-text renderings of figures, shared by the commands."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from kvchat.units import format_bytes

if TYPE_CHECKING:
    from kvchat.app import MemoryFigures
    from kvchat.conversation import TurnStats


def prefix_cache_text(turn: TurnStats) -> str:
    """'N tokens from the prefix cache' when the turn restored any, else ''."""
    n = turn.prefix_cache_tokens
    return f"{n} tokens from the prefix cache ({turn.prefix_cache_restore_s:.3f}s)" if n else ""


def prompt_parts(turn: TurnStats, rebuilt_tokens: int = 0, rebuild_s: float = 0.0) -> list[str]:
    """Where a prompt's tokens came from: the KV cache in memory, the prefix cache on
    disk, a --rebuild before the turn (`rebuilt_tokens`, `rebuild_s`: work done in this
    run, so never "cached"), evaluated by the turn."""
    from kvchat.app import rebuilt_cache_counts

    reused, _, rebuilt = rebuilt_cache_counts(turn.reused_tokens, turn.evaluated_tokens, rebuilt_tokens)
    from_disk = prefix_cache_text(turn)
    parts = [f"{reused} cached"] if reused or not (from_disk or rebuilt) else []
    parts += [from_disk] if from_disk else []
    parts += [f"{rebuilt} rebuilt in {rebuild_s:.2f}s"] if rebuilt else []
    return [*parts, f"{turn.evaluated_tokens} evaluated"]


def stats_line(turn: TurnStats, load_s: float, memory: MemoryFigures | None = None, *,
               rebuilt_tokens: int = 0, rebuild_s: float = 0.0) -> str:
    line = (
        f"load {load_s:.2f}s · prompt {turn.prompt_tokens} tok "
        f"({', '.join(prompt_parts(turn, rebuilt_tokens, rebuild_s))}) · "
        f"prefill {turn.prefill_tok_s:.1f} tok/s · ttft {turn.ttft_s:.3f}s · "
        f"decode {turn.completion_tokens} tok at {turn.decode_tok_s:.1f} tok/s"
        f"{' effective' if turn.drafted_tokens else ''} · "
        f"{draft_text(turn.drafted_tokens, turn.accepted_tokens)}"
        f"stop: {turn.stop_reason}"
    )
    if memory is not None:
        line += (f" · context {memory.kv_cells_used}/{memory.n_ctx} · KV "
                 f"{'unknown' if memory.kv_bytes is None else format_bytes(memory.kv_bytes)}")
        if memory.rss_bytes is not None:  # None on a server: this process's RSS is not the model's
            line += f" · RSS {format_bytes(memory.rss_bytes)}"
        if memory.vram_used_bytes is not None:
            line += f" · VRAM {format_bytes(memory.vram_used_bytes)}"
    return line


def plural(n: int, word: str) -> str:
    """'1 turn', '2 turns', '0 turns'."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# C0 and C1 controls (ESC starts ANSI/OSC sequences), DEL, and the invisible
# bidirectional overrides that make text read differently from what it is.
_UNSAFE_RE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_UNSAFE_MULTILINE_RE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
TEXT_LIMIT = 200


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_text(value: object, limit: int | None = TEXT_LIMIT, *, multiline: bool = False) -> str:
    """Text from a file (GGUF metadata, a template, a session, a name), made safe to
    print: control characters and escape sequences shown as \\xNN instead of reaching
    the terminal, and cut to `limit` characters (None: no cut) with a count of the rest.
    `multiline` keeps newlines and tabs (transcripts)."""
    text = value if isinstance(value, str) else str(value)
    extra = 0
    if limit is not None and len(text) > limit:
        extra = len(text) - limit
        text = text[:limit]
    text = (_UNSAFE_MULTILINE_RE if multiline else _UNSAFE_RE).sub(_escape_char, text)
    if extra:
        text += f"… ({extra} more characters)"
    return text


def reevaluated_notice(turn: TurnStats) -> str:
    """One line saying what the cache had lost and what it cost this turn."""
    noun = "token" if turn.reevaluated_tokens == 1 else "tokens"
    why = f" ({turn.reevaluated_reason})" if turn.reevaluated_reason else ""
    return f"re-evaluated {turn.reevaluated_tokens} {noun} of history{why}"


def draft_text(drafted: int, accepted: int) -> str:
    """Speculative decoding's share of a reply, as a ' · '-ended segment ('' without drafts)."""
    if not drafted:
        return ""
    return f"drafts {accepted}/{drafted} accepted ({accepted / drafted:.0%}) · "
