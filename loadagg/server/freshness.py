"""Answers that need no new round: the last completed round (CACHE) or agents' pushed snapshots (SNAPSHOTS).

Both are RoundResults like a round's, so the per-view serialization cache (answers.response_bytes) works
the same: every caller that accepts the same cached answer shares the same bytes.
"""

from __future__ import annotations

import dataclasses
import time
from types import MappingProxyType

from loadagg.server.communicator import Communicator
from loadagg.server.registry import AgentRegistry
from loadagg.server.rounds import RoundResult, unix_ms
from loadagg.v1 import loadagg_pb2 as pb


class CachedAnswers:
    """Finds an answer not older than a caller's `max_staleness_ms`, or None when a round is needed."""

    def __init__(self, communicator: Communicator, registry: AgentRegistry) -> None:
        self.communicator = communicator
        self.registry = registry
        self._cached: tuple[RoundResult, RoundResult] | None = None  # (last round, its CACHE-sourced twin)
        self._snapshots: tuple[int, RoundResult] | None = None  # (registry.snapshot_version, SNAPSHOTS result)

    def recent(self, max_staleness_ms: int, dp_rank: int | None) -> RoundResult | None:
        """The last round if young enough, else pushed snapshots if every wanted rank has a young one.

        A young round that missed a wanted rank (an agent linking, or re-linking, as it ran) gives way to
        pushed snapshots when they cover every wanted rank and that rank pushed after the round ended;
        otherwise it is still the answer, as a rank that stays down must not turn every cached read into a
        round (nor a snapshot taken before it went down overrule the round that found it gone).
        """
        last = self.last_round(max_staleness_ms)
        if last is not None and self._misses(last, max_staleness_ms, dp_rank):
            return self.from_snapshots(max_staleness_ms, dp_rank) or last
        return last or self.from_snapshots(max_staleness_ms, dp_rank)

    def _misses(self, result: RoundResult, max_staleness_ms: int, dp_rank: int | None) -> bool:
        """Whether `result` missed a wanted rank that has pushed since, within the bound."""
        if dp_rank is not None:
            return dp_rank not in result.fresh and self._pushed_since(result, dp_rank, max_staleness_ms)
        return any(self._pushed_since(result, rank, max_staleness_ms) for rank in result.missing)

    def _pushed_since(self, result: RoundResult, rank: int, max_staleness_ms: int) -> bool:
        snap = self.registry.snapshot(rank)
        return (snap is not None and snap.received > result.finished
                and snap.age_ms(time.monotonic()) <= max_staleness_ms)

    def last_round(self, max_staleness_ms: int) -> RoundResult | None:
        last = self.communicator.last_result
        if last is None or last.figures_age_ms() > max_staleness_ms:  # from its start: figures are that old
            return None
        if self._cached is None or self._cached[0] is not last:
            self._cached = (last, dataclasses.replace(last, source=pb.ANSWER_SOURCE_CACHE, cache={}))
        return self._cached[1]

    def from_snapshots(self, max_staleness_ms: int, dp_rank: int | None) -> RoundResult | None:
        """Pushed snapshots, no round at all; None unless every wanted rank has one within the bound.

        Each load carries `age_ms` (its age when the answer was built, at the answer's timestamp_ms);
        the answer is rebuilt whenever an agent stores a newer snapshot.
        """
        now = time.monotonic()
        snapshots = self.registry.snapshots()
        wanted = range(self.registry.dp_size) if dp_rank is None else (dp_rank,)
        for rank in wanted:
            snap = snapshots.get(rank)
            if snap is None or snap.age_ms(now) > max_staleness_ms:
                return None
        version = self.registry.snapshot_version
        if self._snapshots is not None and self._snapshots[0] == version:
            return self._snapshots[1]
        fresh: dict[int, pb.RankLoad] = {}
        for rank, snap in snapshots.items():
            load = pb.RankLoad()
            load.CopyFrom(snap.load)
            load.age_ms = snap.age_ms(now)
            fresh[rank] = load
        result = RoundResult(
            round_id=0,
            dp_size=self.registry.dp_size,
            timestamp_ms=unix_ms(),
            finished=now,
            started=now,
            duration_ms=0,
            fresh=MappingProxyType(fresh),
            stale=MappingProxyType({}),
            missing=tuple(r for r in range(self.registry.dp_size) if r not in fresh),
            callers=0,
            source=pb.ANSWER_SOURCE_SNAPSHOTS,
            aggregator_id=self.communicator.aggregator_id,
        )
        self._snapshots = (version, result)
        return result
