"""WatchLoads on change: an answer whenever a wanted rank's figures change, coalesced, shared, never queued.

* The registry says which ranks changed (a push, a late reply or a round brought other figures; an agent
  linked or left). Watchers with the same (min_interval_ms, heartbeat_ms) form one group, which answers a
  change at once if its last answer is at least min_interval_ms old, else when it is: every change within
  the interval is coalesced into that one answer (leading edge, then at most one per interval).
* Each answer moment builds one result from the newest snapshots (freshness.newest_figures), and every
  watcher of the same view gets the same serialized bytes (answers.response_bytes); groups answering in
  the same instant share the result too.
* A watcher is answered when a rank it wants changed, or when it heard nothing for heartbeat_ms (the
  current figures again: a quiet cluster is told apart from a dead stream). A wanted rank whose figures
  are older than the heartbeat (an agent that only answers rounds, or an idle engine that pushes nothing)
  gets a round then, so on change over polling sources degrades to polling at the heartbeat.
* Watchers hold one undelivered answer (watch.Subscription: latest wins); a group never waits for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Iterable

from loadagg.server.communicator import Communicator
from loadagg.server.freshness import newest_figures
from loadagg.server.rounds import RoundResult
from loadagg.server.subscription import Subscription, WatchStats

log = logging.getLogger(__name__)

# Groups answering within this long of each other share one result (one build per distinct view).
_SHARE_RESULT_S = 0.001


class _ChangeGroup:
    """Watchers of one (min_interval_ms, heartbeat_ms): one task, one answer moment for all of them."""

    def __init__(self, feeds: ChangeFeeds, min_interval_ms: int, heartbeat_ms: int) -> None:
        self.feeds = feeds
        self.key = (min_interval_ms, heartbeat_ms)
        self.gap = min_interval_ms / 1000
        self.heartbeat = heartbeat_ms / 1000
        self.subscribers: set[Subscription] = set()
        self.changed: set[int] = set()
        self.last_answer = -math.inf
        self.next_heartbeat = math.inf
        self._waiter: asyncio.Future[None] | None = None
        self.task = asyncio.create_task(self._run(), name=f"watch-changes-{min_interval_ms}ms")

    def mark(self, ranks: Iterable[int]) -> None:
        self.changed.update(ranks)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _sleep(self, until: float) -> None:
        """Until `until` (loop clock) or the next change, whichever comes first."""
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = loop.call_at(until, self._wake) if until < math.inf else None
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self.subscribers:
            if not self.changed and loop.time() < self.next_heartbeat:
                await self._sleep(self.next_heartbeat)
                continue
            wait = self.last_answer + self.gap - loop.time()
            if wait > 0:  # answered less than min_interval ago: what changes meanwhile goes in one answer
                await asyncio.sleep(wait)
            if not self.subscribers:
                return
            try:
                self.answer(loop.time())
            except Exception:  # a bug building one answer must not end every watcher's feed
                log.exception("watch on change (%d ms): answering failed", self.key[0])
                self.changed.clear()
                self.last_answer = loop.time()
                self.next_heartbeat = self.last_answer + self.heartbeat

    def answer(self, now: float) -> None:
        """Hand the current figures to every watcher a change concerns, or whose heartbeat is due."""
        changed, self.changed = self.changed, set()
        result = self.feeds.current(time.monotonic())  # (ages are on the monotonic clock, `now` the loop's)
        stats = self.feeds.stats
        stats.change_answers += 1
        heartbeat, due_again = self.heartbeat, math.inf
        quiet_since = now - heartbeat + _SHARE_RESULT_S  # (a timer may wake a hair early)
        stale_wanted = False
        for sub in self.subscribers:
            if sub.answered is None:  # its first answer waits for the round that fills it (first_answer)
                continue
            if changed and (sub.dp_rank is None or sub.dp_rank in changed):
                sub.offer_result(result)
                sub.answered = now
            elif sub.answered <= quiet_since:
                stats.heartbeats += 1
                stale_wanted = stale_wanted or self.feeds.outdated(result, sub.dp_rank, heartbeat)
                sub.offer_result(result)
                sub.answered = now
            due_again = min(due_again, sub.answered + heartbeat)
        self.last_answer = now
        self.next_heartbeat = due_again
        if stale_wanted:  # figures older than the heartbeat: ask the agents (a round's news is a change)
            self.feeds.refresh()

    def first_answer(self, sub: Subscription) -> None:
        """A newcomer gets the current figures at once; when a wanted live rank has none (or only older than
        the heartbeat), after a round (joined or led) has brought them."""
        if self.feeds.outdated(self.feeds.current(time.monotonic()), sub.dp_rank, self.heartbeat):
            self.feeds.refresh().add_done_callback(lambda _: self._first(sub))
        else:
            self._first(sub)

    def _first(self, sub: Subscription) -> None:
        if sub in self.subscribers and sub.answered is None:  # (a change may have answered it meanwhile)
            now = asyncio.get_running_loop().time()
            sub.offer_result(self.feeds.current(time.monotonic()))
            sub.answered = now
            self.next_heartbeat = min(self.next_heartbeat, now + self.heartbeat)
            self._wake()


class ChangeFeeds:
    """Every on-change watcher of one aggregator, grouped by (min_interval_ms, heartbeat_ms)."""

    def __init__(self, communicator: Communicator, stats: WatchStats) -> None:
        self.communicator = communicator
        self.registry = communicator.registry
        self.stats = stats
        self._groups: dict[tuple[int, int], _ChangeGroup] = {}
        self._current: tuple[tuple[int, int], RoundResult] | None = None
        self._refreshing: asyncio.Task | None = None
        self._listening = False

    @property
    def watchers(self) -> int:
        return sum(len(g.subscribers) for g in self._groups.values())

    @property
    def groups(self) -> int:
        return len(self._groups)

    def subscriptions(self) -> list[Subscription]:
        return [sub for group in self._groups.values() for sub in group.subscribers]

    def _changed(self, ranks: list[int]) -> None:
        for group in self._groups.values():
            group.mark(ranks)

    def current(self, now: float) -> RoundResult:
        """The newest figures of every rank, built once per instant and shared by every group and view."""
        version = (self.registry.snapshot_version, self.registry.links_version)
        held = self._current
        if held is not None and held[0] == version and now - held[1].finished < _SHARE_RESULT_S:
            return held[1]
        result = newest_figures(self.registry, self.communicator.aggregator_id, now)
        self._current = (version, result)
        return result

    def outdated(self, result: RoundResult, dp_rank: int | None, max_age_s: float) -> bool:
        """Whether a wanted rank that an agent serves has no figures, or none younger than `max_age_s`."""
        live = self.registry.live_ranks()
        ranks = live if dp_rank is None else live & {dp_rank}
        limit_ms = max_age_s * 1000
        return any((load := result.fresh.get(rank)) is None or load.age_ms > limit_ms for rank in ranks)

    def refresh(self) -> asyncio.Task:
        """Join (or lead) a round in the background; its new figures reach watchers as changes."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._collect(), name="watch-changes-refresh")
        return self._refreshing

    async def _collect(self) -> None:
        try:
            await self.communicator.collect()
        except Exception:
            log.exception("watch on change: the refresh round failed")

    def subscribe(self, sub: Subscription, min_interval_ms: int, heartbeat_ms: int) -> None:
        if not self._listening:
            self.registry.on_change(self._changed)
            self._listening = True
        key = (min_interval_ms, heartbeat_ms)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _ChangeGroup(self, min_interval_ms, heartbeat_ms)
        group.subscribers.add(sub)
        sub.group = key
        group.first_answer(sub)

    def unsubscribe(self, sub: Subscription) -> bool:
        group = self._groups.get(sub.group)
        if group is None or sub not in group.subscribers:
            return False
        group.subscribers.discard(sub)
        if not group.subscribers:
            del self._groups[sub.group]
            group.task.cancel()
        if not self._groups and self._listening:  # nobody watches: stores stop comparing figures
            self.registry.remove_change_listener(self._changed)
            self._listening = False
        return True

    async def close(self) -> None:
        groups = list(self._groups.values())
        for group in groups:
            for sub in group.subscribers:
                sub.close()
            group.task.cancel()
        if self._refreshing is not None:
            self._refreshing.cancel()
        for task in [g.task for g in groups] + ([self._refreshing] if self._refreshing else []):
            with contextlib.suppress(asyncio.CancelledError):
                await task
