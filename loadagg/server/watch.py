"""WatchLoads: pushed loads at an interval (one collection round per tick however many watchers), or on change.

* One ticker per distinct interval. At each tick it asks the communicator for one round and hands
  every subscriber its view of the result (answers.response_bytes: one serialization per distinct view
  per round, shared). Tick times are multiples of the interval on the loop clock, so tickers of
  different intervals that fall due together also share one round (the watching communicator joins them).
* A subscriber holds at most one undelivered answer (latest wins): a newer one replaces it. A slow
  consumer only ever blocks its own stream; the ticker never waits for anyone.
* A ticker lives while it has subscribers; the last one leaving (cancel, disconnect, error) ends it,
  so nothing is left behind.
* On-change watchers (`on_change`) are fed by watch_changes.ChangeFeeds; this hub validates their request
  and counts them with the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from loadagg.server.communicator import Communicator
from loadagg.server.errors import InvalidRequest
from loadagg.server.rounds import RoundResult
from loadagg.server.subscription import Subscription, WatchStats
from loadagg.server.watch_changes import ChangeFeeds
from loadagg.v1 import loadagg_pb2 as pb

log = logging.getLogger(__name__)


class _Ticker:
    def __init__(self, hub: WatchHub, interval_ms: int) -> None:
        self.hub = hub
        self.interval_ms = interval_ms
        self.subscribers: set[Subscription] = set()
        self.last: RoundResult | None = None
        self.ticks = 0
        self.task = asyncio.create_task(self._run(), name=f"watch-ticker-{interval_ms}ms")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.interval_ms / 1000
        due = loop.time()  # the first watcher of this interval is answered at once, then ticks follow the grid
        while self.subscribers:
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not self.subscribers:
                return
            self.ticks += 1
            self.hub.stats.ticks += 1
            try:
                result = await self.hub.communicator.collect()
            except Exception:  # never let one bad round end every watcher's feed
                log.exception("watch tick (%d ms) failed to collect", self.interval_ms)
            else:
                self.last = result
                for subscriber in list(self.subscribers):
                    try:
                        subscriber.offer_result(result)
                    except Exception:  # a bug building one view must not stop this interval's feed
                        log.exception("watch tick (%d ms): building a watcher's answer failed", self.interval_ms)
            if self.ticks == 1:  # onto the grid (shared by every interval), at least half an interval on
                due = (math.floor((loop.time() + interval / 2) / interval) + 1) * interval
                continue
            due += interval
            now = loop.time()
            if due <= now:  # the round outlasted the interval: skip the ticks already missed
                missed = math.floor((now - due) / interval) + 1
                self.hub.stats.ticks_skipped += missed
                due += missed * interval


class WatchHub:
    """Every WatchLoads subscriber of one aggregator, grouped by interval into shared tickers."""

    def __init__(self, communicator: Communicator, *, default_interval_ms: int, min_interval_ms: int,
                 max_interval_ms: int = 3_600_000) -> None:
        self.communicator = communicator
        self.default_interval_ms = default_interval_ms
        self.min_interval_ms = min_interval_ms
        self.max_interval_ms = max_interval_ms
        self.stats = WatchStats()
        self._tickers: dict[int, _Ticker] = {}
        self.changes = ChangeFeeds(communicator, self.stats)
        self._closed = False

    @property
    def watchers(self) -> int:
        return sum(len(t.subscribers) for t in self._tickers.values()) + self.changes.watchers

    @property
    def tickers(self) -> int:
        return len(self._tickers)

    def subscriptions(self) -> list[Subscription]:
        return [sub for ticker in self._tickers.values() for sub in ticker.subscribers] + self.changes.subscriptions()

    def mode_for(self, request: pb.WatchLoadsRequest) -> WatchMode:
        """How a request wants to be fed; InvalidRequest for a field its mode would ignore, or a bad bound."""
        if not request.on_change:
            ignored = [name for name in ("min_interval_ms", "heartbeat_ms") if getattr(request, name)]
            if ignored:
                raise InvalidRequest(f"{' and '.join(ignored)} apply to on_change watches only; set on_change "
                                     "to be answered on every change, or leave them out (interval_ms sets an "
                                     "interval watch's period)")
            return WatchMode(self.interval_for(request.interval_ms))
        if request.interval_ms:
            raise InvalidRequest(f"interval_ms ({request.interval_ms}) applies to interval watches; an on_change "
                                 "watch takes min_interval_ms (the most often it wants an answer) and heartbeat_ms")
        min_interval_ms = self._bounded("min_interval_ms", request.min_interval_ms, self.min_interval_ms)
        # (the default heartbeat is the default interval, or min_interval_ms when the watcher asks for more)
        heartbeat_ms = self._bounded("heartbeat_ms", request.heartbeat_ms,
                                     max(self.default_interval_ms, min_interval_ms))
        if heartbeat_ms < min_interval_ms:
            raise InvalidRequest(f"heartbeat_ms ({heartbeat_ms}) is below min_interval_ms ({min_interval_ms}): a "
                                 "heartbeat is an answer too, and answers come at most once per min_interval_ms")
        return WatchMode(0, on_change=True, min_interval_ms=min_interval_ms, heartbeat_ms=heartbeat_ms)

    def _bounded(self, name: str, requested_ms: int, default_ms: int) -> int:
        """A requested period: 0 = `default_ms`; below the server's minimum or above its maximum refused."""
        if requested_ms == 0:
            return default_ms
        if not self.min_interval_ms <= requested_ms <= self.max_interval_ms:
            raise InvalidRequest(f"{name} {requested_ms} is outside {self.min_interval_ms}..{self.max_interval_ms} ms "
                                 "(this aggregator's minimum watch interval to the maximum; 0 asks for the default)")
        return requested_ms

    def interval_for(self, requested_ms: int) -> int:
        """The interval a request gets: 0 = the server's default; out of bounds = InvalidRequest."""
        return self._bounded("interval_ms", requested_ms, self.default_interval_ms)

    def subscribe(self, mode: WatchMode | int, dp_rank: int | None, sections: frozenset[str],
                  allow_stale: bool, render: Callable[[RoundResult], Awaitable[bytes]] | None = None) -> Subscription:
        """A new watcher (mode: from mode_for, or an interval in ms), answered at once if anything is held;
        `render` turns a result into its bytes (default: its GetLoadsResponse)."""
        mode = mode if isinstance(mode, WatchMode) else WatchMode(mode)
        interval_ms = mode.interval_ms
        sub = Subscription(interval_ms, dp_rank, sections, allow_stale, self.stats, render=render)
        if self._closed:
            sub.close()
            return sub
        self.stats.subscribed += 1
        if mode.on_change:
            self.changes.subscribe(sub, mode.min_interval_ms, mode.heartbeat_ms)
            return sub
        ticker = self._tickers.get(interval_ms)
        if ticker is None:
            ticker = self._tickers[interval_ms] = _Ticker(self, interval_ms)
        ticker.subscribers.add(sub)
        # A newcomer gets the ticker's latest answer at once if it is younger than one interval.
        if ticker.last is not None and ticker.last.age_ms() < interval_ms:
            sub.offer_result(ticker.last)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub.group is not None:
            if self.changes.unsubscribe(sub):
                sub.slot = None
                self.stats.unsubscribed += 1
            return
        ticker = self._tickers.get(sub.interval_ms)
        if ticker is None or sub not in ticker.subscribers:
            return
        ticker.subscribers.discard(sub)
        sub.slot = None
        self.stats.unsubscribed += 1
        if not ticker.subscribers:
            del self._tickers[sub.interval_ms]
            ticker.task.cancel()

    async def close(self) -> None:
        """End every watch stream (graceful shutdown) and stop the tickers."""
        self._closed = True
        tickers = list(self._tickers.values())
        for ticker in tickers:
            for sub in ticker.subscribers:
                sub.close()
            ticker.task.cancel()
        for ticker in tickers:
            with contextlib.suppress(asyncio.CancelledError):
                await ticker.task
        await self.changes.close()


@dataclass(frozen=True, slots=True)
class WatchMode:
    """What feeds a watcher: a ticker at `interval_ms`, or changes (coalesced to `min_interval_ms`, heartbeat)."""

    interval_ms: int
    on_change: bool = False
    min_interval_ms: int = 0
    heartbeat_ms: int = 0
