"""The agent's log of the aggregator's refusals of its ranks' loads, said once per kind and then rarely.

A source that keeps sending an impossible figure is refused every round, and the reason often holds a figure that
changes each time (an age, a size): compared as whole strings, every refusal was new and logged a warning a rank a
round. A refusal's kind is its reason with the numbers masked; the first of a kind is a warning, later ones are
counted and said at most once per `every_s`, with how many were kept quiet and for which ranks.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?")
DEFAULT_WARN_EVERY_S = 60.0
_MAX_KINDS = 64  # kinds remembered (the oldest said is forgotten): the reasons are the aggregator's, few


def refusal_kind(reason: str) -> str:
    """`reason` with every number masked: the same refusal whatever age or size it names."""
    return _NUMBER.sub("#", reason)


def rank_spans(ranks: set[int]) -> str:
    """Sorted ranks as spans: {0, 1, 2, 3, 7} -> '0-3, 7'."""
    spans: list[str] = []
    ordered = sorted(ranks)
    start = prev = ordered[0]
    for rank in [*ordered[1:], None]:
        if rank is not None and rank == prev + 1:
            prev = rank
            continue
        spans.append(str(start) if start == prev else f"{start}-{prev}")
        if rank is not None:
            start = prev = rank
    return ", ".join(spans)


@dataclass
class _Kind:
    warned_at: float
    quiet: int = 0  # refusals of this kind not warned about since warned_at
    ranks: set[int] = field(default_factory=set)  # their ranks


class RejectionLog:
    """Warns of the first refusal of each kind, then at most once per `every_s` per kind, with a count."""

    def __init__(self, every_s: float = DEFAULT_WARN_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self.clock = clock
        self._kinds: dict[str, _Kind] = {}

    def note(self, dp_rank: int, round_id: int, reason: str) -> None:
        now = self.clock()
        kind = refusal_kind(reason)
        held = self._kinds.get(kind)
        if held is not None and now - held.warned_at < self.every_s:
            held.quiet += 1
            held.ranks.add(dp_rank)
            log.debug("aggregator rejected rank %d of round %d: %s", dp_rank, round_id, reason)
            return
        since = ""
        if held is not None and held.quiet:
            since = f" ({held.quiet} more like it since the last warning, ranks {rank_spans(held.ranks)})"
        log.warning("aggregator rejected rank %d of round %d: %s%s", dp_rank, round_id, reason, since)
        self._kinds.pop(kind, None)
        self._kinds[kind] = _Kind(warned_at=now)  # (last in order: the oldest warned kind goes first)
        if len(self._kinds) > _MAX_KINDS:
            del self._kinds[next(iter(self._kinds))]
