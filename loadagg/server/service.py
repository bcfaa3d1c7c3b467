"""LoadAggregator servicer: validate the request, get a round (joined, new or cached), return the caller's view."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator

import grpc

from loadagg.server.answers import check_rank, response_bytes
from loadagg.server.communicator import Communicator
from loadagg.server.errors import DeadlineTooShort, InvalidRequest, LoadAggError, abort_with
from loadagg.server.freshness import CachedAnswers
from loadagg.server.rounds import RoundResult
from loadagg.server.sections import parse_include
from loadagg.server.watch import WatchHub
from loadagg.v1 import loadagg_pb2 as pb

log = logging.getLogger(__name__)
_FRESHNESS = frozenset(pb.Freshness.values())

# Part of a caller's own deadline kept back to serialize and send the answer.
_SEND_MARGIN_S = 0.05
_MIN_BUDGET_S = 0.002


def wait_budget(context: grpc.aio.ServicerContext) -> float | None:
    """How long we may wait for a round and still answer before the caller's deadline (None: no deadline)."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    budget = remaining - min(_SEND_MARGIN_S, remaining * 0.25)
    if budget < _MIN_BUDGET_S:
        raise DeadlineTooShort(f"the call's deadline leaves {remaining * 1000:.1f} ms: too little to collect loads")
    return budget


class LoadAggregatorService:
    """Router-facing RPCs. Handlers return serialized bytes shared between callers of the same view."""

    def __init__(self, communicator: Communicator, dp_size: int, *, watch: WatchHub) -> None:
        self.communicator = communicator
        self.watch = watch  # built from the aggregator's config, its intervals written once there
        self.dp_size = dp_size
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.cached = CachedAnswers(communicator, communicator.registry)

    async def result_for(self, request: pb.GetLoadsRequest, wait: float | None, received: float) -> RoundResult:
        """The RoundResult this request's freshness asks for.

        JOIN: the round in flight (or a new one). NEW_ROUND: only a round started after `received`.
        CACHED: the last round or pushed snapshots when not older than max_staleness_ms, else JOIN.
        """
        freshness = request.freshness
        if freshness not in _FRESHNESS:
            raise InvalidRequest(f"freshness {freshness} is not one of "
                                 + ", ".join(f"{pb.Freshness.Name(v)} ({v})" for v in sorted(_FRESHNESS)))
        if request.max_staleness_ms and freshness != pb.FRESHNESS_CACHED:  # (it would be ignored: say so)
            raise InvalidRequest(f"max_staleness_ms ({request.max_staleness_ms}) applies to FRESHNESS_CACHED only; "
                                 "set freshness to FRESHNESS_CACHED, or leave max_staleness_ms out")
        if freshness == pb.FRESHNESS_CACHED:
            dp_rank = request.dp_rank if request.HasField("dp_rank") else None
            cached = self.cached.recent(request.max_staleness_ms, dp_rank)
            if cached is not None:
                return cached
        started_after = received if freshness == pb.FRESHNESS_NEW_ROUND else None
        return await self.communicator.collect(started_after=started_after, wait_timeout=wait)

    def view_of(self, request) -> tuple[int | None, frozenset[str]]:
        """The (dp_rank, sections) a GetLoads-shaped request asks for; InvalidRequest when either is bad."""
        sections = parse_include(request.include)
        dp_rank = request.dp_rank if request.HasField("dp_rank") else None
        check_rank(dp_rank, self.dp_size)
        return dp_rank, sections

    def _enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    @contextlib.contextmanager
    def tracked(self) -> Iterator[None]:
        """Count a loads call in flight (GetLoads, the engine-compat GetLoads, HTTP) for graceful drain."""
        self._enter()
        try:
            yield
        finally:
            self._leave()

    async def get_loads(self, request: pb.GetLoadsRequest, context: grpc.aio.ServicerContext) -> bytes:
        received = time.monotonic()
        self._enter()  # tracked(), without a generator per call on the hottest path
        try:
            dp_rank, sections = self.view_of(request)
            result = await self.result_for(request, wait_budget(context), received)
            return response_bytes(result, dp_rank, sections, request.allow_stale)
        except LoadAggError as error:
            await abort_with(context, error)
        except Exception as error:  # a bug: INTERNAL with what it was (gRPC would say UNKNOWN), and a traceback
            log.exception("GetLoads failed")
            await abort_with(context, LoadAggError(f"GetLoads failed inside the aggregator: {error!r}"))
        finally:
            self._leave()

    async def watch_loads(
        self, request: pb.WatchLoadsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Push the caller's view at its interval (the ticker of that interval shares one round per tick), or on
        every change of a wanted rank (coalesced to min_interval_ms, with heartbeats)."""
        try:
            dp_rank, sections = self.view_of(request)
            mode = self.watch.mode_for(request)
        except LoadAggError as error:
            await abort_with(context, error)
            return
        subscription = self.watch.subscribe(mode, dp_rank, sections, request.allow_stale)
        try:
            while (answer := await subscription.next()) is not None:
                yield answer
        finally:
            self.watch.unsubscribe(subscription)

    async def drained(self) -> None:
        """Returns once no GetLoads call is in flight (used by graceful shutdown)."""
        await self._idle.wait()
