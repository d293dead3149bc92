"""The common start of two sequences (texts or token lists), at C speed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

S = TypeVar("S", str, Sequence[Any])


def common_prefix(a: S, b: S) -> int:
    """Length of the longest common start of `a` and `b` (both str, or both lists):
    one slice compare when one starts the other, else a binary search of slice
    compares (a Python loop over a 16k-token history costs milliseconds per turn)."""
    lo, hi = 0, min(len(a), len(b))
    # The longer one cut to the shorter's length: one copy, not two.
    if (a if len(a) == hi else a[:hi]) == (b if len(b) == hi else b[:hi]):
        return hi
    # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo
