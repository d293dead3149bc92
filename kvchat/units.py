"""Units shown to people: byte sizes in MiB/GiB (one wording everywhere)."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    """MiB below 1 GiB, GiB above, two decimals."""
    mib = n / (1024 * 1024)
    if mib >= 1024:
        return f"{mib / 1024:.2f} GiB"
    return f"{mib:.2f} MiB"
