"""A collection round: what it asked, who answered, and the immutable RoundResult it ends with."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from loadagg.server.registry import AgentRegistry, Snapshot
from loadagg.v1 import loadagg_pb2 as pb


def unix_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, eq=False)
class RoundResult:
    """What one round (or a cache read) produced. Shared by every caller, never mutated.

    `fresh` holds the loads answered in this round, each with its `age_ms` at `finished` (on the aggregator's
    clock); `stale` the last known snapshot of ranks that did not answer (only shown to callers that allow
    stale data). `cache` memoises per-request answers
    (serialized once, however many callers want the same view).
    """

    round_id: int
    dp_size: int
    timestamp_ms: int
    finished: float  # monotonic
    started: float  # monotonic: its ranks' figures were read from here on (a slow rank holds a round open)
    duration_ms: int
    fresh: Mapping[int, pb.RankLoad]
    stale: Mapping[int, Snapshot]
    missing: tuple[int, ...]
    callers: int
    source: int = pb.ANSWER_SOURCE_ROUND
    partial: bool = False
    aggregator_id: str = ""  # the process that collected it (round ids count per process)
    cache: dict = field(default_factory=dict, repr=False)

    def age_ms(self, now: float | None = None) -> int:
        return max(0, int(((time.monotonic() if now is None else now) - self.finished) * 1000))

    def figures_age_ms(self, now: float | None = None) -> int:
        """How old its oldest figure may be: the time since the round started (CACHED's bound)."""
        return max(0, int(((time.monotonic() if now is None else now) - self.started) * 1000))


class Round:
    """A round in flight. Ends (once) when every expected rank answered, or at its deadline."""

    def __init__(self, round_id: int, dp_size: int, expected: frozenset[int], timeout: float,
                 aggregator_id: str = "") -> None:
        loop = asyncio.get_running_loop()
        self.id = round_id
        self.aggregator_id = aggregator_id
        self.dp_size = dp_size
        self.waiting_for = set(expected)  # expected ranks not answered yet: `complete` is O(1)
        self.started = time.monotonic()
        self.deadline = loop.time() + timeout  # on the loop's clock, like its timers
        self.answers: dict[int, Snapshot] = {}
        self.callers = 0
        self.outcome: RoundResult | None = None  # set once, when the round ends
        # One future per waiting caller: a caller that is cancelled cancels its own, never the round's.
        self.waiters: list[asyncio.Future[RoundResult]] = []
        self.timer: asyncio.TimerHandle | None = None

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def end(self, result: RoundResult) -> None:
        """Keep `result` as the round's outcome and hand it to every caller still waiting."""
        self.outcome = result
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(result)

    @property
    def complete(self) -> bool:
        return not self.waiting_for

    def answer(self, snap: Snapshot) -> bool:
        """Record one rank's answer; False if the rank was not expected (or already answered)."""
        rank = snap.load.dp_rank
        if rank not in self.waiting_for:
            return False
        self.waiting_for.discard(rank)
        self.answers[rank] = snap
        return True

    def give_up(self, ranks) -> None:
        """Stop waiting for ranks whose agent left or whose source failed."""
        self.waiting_for.difference_update(ranks)

    def result(self, registry: AgentRegistry, *, partial: bool = False) -> RoundResult:
        now = time.monotonic()
        missing = tuple(r for r in range(self.dp_size) if r not in self.answers)
        stale = {r: s for r in missing if (s := registry.snapshot(r)) is not None}
        return RoundResult(
            round_id=self.id,
            dp_size=self.dp_size,
            timestamp_ms=unix_ms(),
            finished=now,
            started=self.started,
            duration_ms=int((now - self.started) * 1000),
            fresh=MappingProxyType({r: snap.aged(now) for r, snap in self.answers.items()}),
            stale=MappingProxyType(stale),
            missing=missing,
            callers=self.callers,
            partial=partial,
            aggregator_id=self.aggregator_id,
        )
