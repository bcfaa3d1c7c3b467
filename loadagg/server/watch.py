"""WatchLoads: pushed loads at an interval, one collection round per tick however many watchers.

* One ticker per distinct interval. At each tick it asks the communicator for one round and hands
  every subscriber its view of the result (answers.response_bytes: one serialization per distinct view
  per round, shared). Tick times are multiples of the interval on the loop clock, so tickers of
  different intervals that fall due together also share one round (the watching communicator joins them).
* A subscriber holds at most one undelivered answer (latest wins): a newer one replaces it. A slow
  consumer only ever blocks its own stream; the ticker never waits for anyone.
* A ticker lives while it has subscribers; the last one leaving (cancel, disconnect, error) ends it,
  so nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from dataclasses import dataclass, field

from loadagg.server.answers import response_bytes
from loadagg.server.communicator import Communicator
from loadagg.server.errors import InvalidRequest
from loadagg.server.rounds import RoundResult

log = logging.getLogger(__name__)


@dataclass
class WatchStats:
    """Counters tests, benchmarks and metrics read (ticks vs rounds proves sharing)."""

    ticks: int = 0  # ticks that asked for a round
    ticks_skipped: int = 0  # ticks missed because the previous round took longer than the interval
    delivered: int = 0  # answers handed to gRPC for sending
    replaced: int = 0  # undelivered answers replaced by a newer one (slow consumers)
    subscribed: int = 0
    unsubscribed: int = 0


@dataclass(eq=False)
class Subscription:
    """One watcher: its view, and a one-answer slot (latest wins)."""

    interval_ms: int
    dp_rank: int | None
    sections: frozenset[str]
    allow_stale: bool
    stats: WatchStats
    slot: bytes | None = None
    closed: bool = False
    delivered: int = 0
    replaced: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, answer: bytes) -> None:
        if self.slot is not None:
            self.replaced += 1
            self.stats.replaced += 1
        self.slot = answer
        self.ready.set()

    def offer_result(self, result: RoundResult) -> None:
        self.offer(response_bytes(result, self.dp_rank, self.sections, self.allow_stale))

    def close(self) -> None:
        self.closed = True
        self.ready.set()

    async def next(self) -> bytes | None:
        """The newest undelivered answer; None once the subscription is closed (server shutting down)."""
        while True:
            await self.ready.wait()
            self.ready.clear()
            if self.slot is not None:
                answer, self.slot = self.slot, None
                self.delivered += 1
                self.stats.delivered += 1
                return answer
            if self.closed:
                return None


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
        self._closed = False

    @property
    def watchers(self) -> int:
        return sum(len(t.subscribers) for t in self._tickers.values())

    @property
    def tickers(self) -> int:
        return len(self._tickers)

    def subscriptions(self) -> list[Subscription]:
        return [sub for ticker in self._tickers.values() for sub in ticker.subscribers]

    def interval_for(self, requested_ms: int) -> int:
        """The interval a request gets: 0 = the server's default; out of bounds = InvalidRequest."""
        if requested_ms == 0:
            return self.default_interval_ms
        if requested_ms < self.min_interval_ms:
            raise InvalidRequest(
                f"interval_ms {requested_ms} is below this aggregator's minimum of {self.min_interval_ms} ms "
                "(0 asks for the default)"
            )
        if requested_ms > self.max_interval_ms:
            raise InvalidRequest(f"interval_ms {requested_ms} is above the maximum of {self.max_interval_ms} ms")
        return requested_ms

    def subscribe(self, interval_ms: int, dp_rank: int | None, sections: frozenset[str],
                  allow_stale: bool) -> Subscription:
        sub = Subscription(interval_ms, dp_rank, sections, allow_stale, self.stats)
        if self._closed:
            sub.close()
            return sub
        ticker = self._tickers.get(interval_ms)
        if ticker is None:
            ticker = self._tickers[interval_ms] = _Ticker(self, interval_ms)
        ticker.subscribers.add(sub)
        self.stats.subscribed += 1
        # A newcomer gets the ticker's latest answer at once if it is younger than one interval.
        if ticker.last is not None and ticker.last.age_ms() < interval_ms:
            sub.offer_result(ticker.last)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
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
