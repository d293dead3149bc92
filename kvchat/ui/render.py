"""Plain-text renderings of figures, shared by the commands."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvchat.session import TurnStats


def stats_line(turn: TurnStats, load_s: float) -> str:
    return (
        f"load {load_s:.2f}s · prompt {turn.prompt_tokens} tok "
        f"({turn.reused_tokens} cached, {turn.evaluated_tokens} evaluated) · "
        f"prefill {turn.prefill_tok_s:.1f} tok/s · ttft {turn.ttft_s:.3f}s · "
        f"decode {turn.completion_tokens} tok at {turn.decode_tok_s:.1f} tok/s · "
        f"stop: {turn.stop_reason}"
    )


def format_bytes(n: float) -> str:
    """MiB below 1 GiB, GiB above, two decimals."""
    mib = n / (1024 * 1024)
    if mib >= 1024:
        return f"{mib / 1024:.2f} GiB"
    return f"{mib:.2f} MiB"
