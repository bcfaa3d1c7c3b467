"""One WatchLoads watcher's view and its one-answer slot (latest wins), whatever feeds it (interval or change)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from loadagg.server.answers import response_bytes
from loadagg.server.rounds import RoundResult


@dataclass
class WatchStats:
    """Counters tests, benchmarks and metrics read (ticks vs rounds proves sharing)."""

    ticks: int = 0  # ticks that asked for a round
    ticks_skipped: int = 0  # ticks missed because the previous round took longer than the interval
    delivered: int = 0  # answers handed to gRPC for sending
    replaced: int = 0  # undelivered answers replaced by a newer one (slow consumers)
    subscribed: int = 0
    unsubscribed: int = 0
    change_answers: int = 0  # on change: answer moments (each builds the current figures once)
    heartbeats: int = 0  # on change: answers sent to a watcher because it heard nothing for its heartbeat


@dataclass(eq=False)
class Subscription:
    """One watcher: its view, and a one-answer slot (latest wins)."""

    interval_ms: int  # 0 for an on-change watcher
    dp_rank: int | None
    sections: frozenset[str]
    allow_stale: bool
    stats: WatchStats
    slot: bytes | RoundResult | None = None  # a result where `render` makes its bytes (when delivered)
    closed: bool = False
    delivered: int = 0
    replaced: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    group: tuple[int, int] | None = None  # on change: its (min_interval_ms, heartbeat_ms)
    answered: float | None = None  # on change: when it was last handed an answer (loop clock)
    # How a result becomes this watcher's bytes (None: its GetLoadsResponse, serialized once per view and
    # shared); the HTTP stream renders sglang's JSON as a Server-Sent Event the same way, in steps (the loop
    # runs between them), when the event is taken.
    render: Callable[[RoundResult], Awaitable[bytes]] | None = None

    def offer(self, answer: bytes | RoundResult) -> None:
        if self.slot is not None:
            self.replaced += 1
            self.stats.replaced += 1
        self.slot = answer
        self.ready.set()

    def offer_result(self, result: RoundResult) -> None:
        if self.render is not None:
            self.offer(result)
        else:
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
                if isinstance(answer, RoundResult):
                    return await self.render(answer)
                return answer
            if self.closed:
                return None
