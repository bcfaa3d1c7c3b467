"""Small numeric helpers shared by the client and the scenarios."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def median_by(items: Sequence[T], key: Callable[[T], object] = lambda item: item) -> T:
    """The item in the middle when sorted by `key` (the upper middle one for an even count): the repetition
    that counts when a run is repeated on a noisy box."""
    return sorted(items, key=key)[len(items) // 2]


def summary_ms(seconds: Sequence[float]) -> dict:
    """p50/p90/p99/max/mean of durations given in seconds, in milliseconds."""
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 2),
        "p90_ms": round(percentile(ms, 90), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(max(ms), 2) if ms else 0.0,
        "mean_ms": round(sum(ms) / len(ms), 2) if ms else 0.0,
    }


def ratio(a: float, b: float) -> float:
    """a / b, inf when b is 0 and a is not."""
    if b == 0:
        return math.inf if a else 1.0
    return a / b
