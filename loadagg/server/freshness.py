"""Answers that need no new round: the last completed round (CACHE) or agents' pushed snapshots (SNAPSHOTS).

Both are RoundResults like a round's, so the per-view serialization cache (answers.response_bytes) works
the same: every caller that accepts the same cached answer shares the same bytes.
"""

from __future__ import annotations

import dataclasses
import time
from types import MappingProxyType

from loadagg.server.communicator import Communicator
from loadagg.server.registry import AgentRegistry, Snapshot
from loadagg.server.rounds import RoundResult, unix_ms
from loadagg.v1 import loadagg_pb2 as pb


def _older(load: pb.RankLoad, seconds: float) -> pb.RankLoad:
    """A copy of a round's `load` aged `seconds` past the round's end (its snapshot is gone: no receive time left
    to age it from, but it grew that much older all the same)."""
    out = pb.RankLoad()
    out.CopyFrom(load)
    more_ms = max(0, int(seconds * 1000))
    out.age_ms += more_ms
    if out.HasField("detail_age_ms"):
        out.detail_age_ms += more_ms
    return out


def held_figures(dp_size: int, aggregator_id: str, fresh: dict[int, pb.RankLoad], stale: dict[int, Snapshot],
                 now: float) -> RoundResult:
    """Figures held, no round (ANSWER_SOURCE_SNAPSHOTS, round 0): the ranks of `fresh` (aged as of `now`),
    the rest missing (with `stale`'s last-known loads for callers that allow them)."""
    return RoundResult(
        round_id=0,
        dp_size=dp_size,
        timestamp_ms=unix_ms(),
        finished=now,
        started=now,
        duration_ms=0,
        fresh=MappingProxyType(fresh),
        stale=MappingProxyType(stale),
        missing=tuple(r for r in range(dp_size) if r not in fresh),
        callers=0,
        source=pb.ANSWER_SOURCE_SNAPSHOTS,
        aggregator_id=aggregator_id,
    )


def newest_figures(registry: AgentRegistry, aggregator_id: str, now: float) -> RoundResult:
    """The newest figures held of every rank an agent serves now (WatchLoads on change); a rank whose agent is
    gone is missing, its last snapshot stale."""
    live = registry.live_ranks()
    fresh: dict[int, pb.RankLoad] = {}
    stale: dict[int, Snapshot] = {}
    for rank, snap in registry.snapshots().items():
        if rank in live:
            fresh[rank] = snap.aged_copy(now)
        else:
            stale[rank] = snap
    return held_figures(registry.dp_size, aggregator_id, fresh, stale, now)


class CachedAnswers:
    """Finds an answer not older than a caller's `max_staleness_ms`, or None when a round is needed."""

    def __init__(self, communicator: Communicator, registry: AgentRegistry) -> None:
        self.communicator = communicator
        self.registry = registry
        self._cached: tuple[RoundResult, RoundResult] | None = None  # (last round, its CACHE-sourced twin)
        self._snapshots: tuple[int, RoundResult] | None = None  # (registry.snapshot_version, SNAPSHOTS result)
        # (the last round itself, snapshot_version, that round with newer pushes or None when none is newer): the
        # round is held, not its id(), which Python may give a new round once the old one is freed
        self._merged_answer: tuple[RoundResult, int, RoundResult | None] | None = None

    def recent(self, max_staleness_ms: int, dp_rank: int | None) -> RoundResult | None:
        """The newest figures held for each wanted rank, if recent enough; None when a round is needed.

        A young round is the base; a rank whose agent pushed after its answer (or, for a rank the round
        missed, after the round ended) shows the pushed figures instead, so a completed round never hides a
        newer push. A rank the round found gone stays missing until it pushes again (a snapshot taken before
        it went down never overrules the round). Without a young round: the pushed snapshots, when every
        wanted rank has one within the bound.
        """
        last = self.communicator.last_result
        if last is None or last.figures_age_ms() > max_staleness_ms:
            return self.from_snapshots(max_staleness_ms, dp_rank)
        version = self.registry.snapshot_version  # decided once per round and snapshot change
        held = self._merged_answer
        if held is None or held[0] is not last or held[1] != version:
            newer = self._pushed_since(last)
            held = self._merged_answer = (last, version, self._merged(last, newer) if newer else None)
        return held[2] or self.last_round(max_staleness_ms)

    def _pushed_since(self, result: RoundResult) -> dict[int, Snapshot]:
        """Ranks whose held snapshot is newer than what `result` has of them."""
        newer: dict[int, Snapshot] = {}
        for rank, snap in self.registry.snapshots().items():
            answered = result.fresh.get(rank)
            if answered is not None:
                if snap.load is not answered and snap.received >= result.started:
                    newer[rank] = snap
            elif snap.received > result.finished:
                newer[rank] = snap
        return newer

    def _merged(self, last: RoundResult, newer: dict[int, Snapshot]) -> RoundResult:
        """`last` with the newer pushed figures of `newer`'s ranks, every rank aged as of now (this answer's
        time, not the round's end)."""
        now = time.monotonic()
        held = self.registry.snapshots()
        fresh = {rank: snap.aged_copy(now) if (snap := held.get(rank)) is not None and snap.load is load
                 else _older(load, now - last.finished) for rank, load in last.fresh.items()}
        for rank, snap in newer.items():
            fresh[rank] = snap.aged_copy(now)
        return self._from(fresh, {r: s for r, s in last.stale.items() if r not in fresh}, now)

    def _from(self, fresh: dict[int, pb.RankLoad], stale: dict[int, Snapshot], now: float) -> RoundResult:
        return held_figures(self.registry.dp_size, self.communicator.aggregator_id, fresh, stale, now)

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
        result = self._from({rank: snap.aged_copy(now) for rank, snap in snapshots.items()}, {}, now)
        self._snapshots = (version, result)
        return result
