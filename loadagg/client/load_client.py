"""Router-facing client library: AsyncLoadClient (grpc.aio) and LoadClient (blocking).

* `get_loads()` and `watch_loads()` return `Loads`: a frozen, typed view over one GetLoadsResponse
  (round id, source, per-rank loads with their timestamps and ages, missing ranks, summary). The
  RankLoad entries are the generated proto messages (`loadagg.v1`), so every figure keeps its
  set/unset state; `Loads.response` is the raw message.
* Deadlines: `timeout` (seconds) bounds a whole get_loads call, retries included.
* Retries: a call that fails UNAVAILABLE (aggregator restarting, connection refused) is retried with
  exponential backoff and jitter, at most `RetryPolicy.attempts` times in all; any other status is
  raised at once (grpc.RpcError). A watch stream that breaks, or that the aggregator ends (graceful
  shutdown), is resubscribed under the same policy, counted from its last good message; an answer the new
  stream repeats is skipped, and a watch that runs out of attempts raises (WatchEnded after a clean end).
* Watches hand out the newest answer (loadagg.client.latest): a consumer that stalls gets the current answer
  next, not the backlog the transport buffered meanwhile.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field

import grpc

from loadagg.client.channels import ChannelSecurity, aio_channel, sync_channel
from loadagg.client.latest import newest, newest_blocking
from loadagg.v1 import loadagg_pb2 as pb
from loadagg.v1 import loadagg_pb2_grpc as pb_grpc


class WatchEnded(grpc.RpcError):
    """Client side: the aggregator ended a watch cleanly (its graceful shutdown) and the retry policy allows no
    more resubscriptions. Raised, so that a consumer never mistakes a lost watch for the end of its own loop."""

    def __init__(self, attempts: int) -> None:
        super().__init__(self.details())
        self.attempts = attempts

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "the aggregator ended this watch (shutting down) and the retry policy allows no more attempts"

FRESHNESS = {
    "join": pb.FRESHNESS_JOIN,
    "new_round": pb.FRESHNESS_NEW_ROUND,
    "cached": pb.FRESHNESS_CACHED,
}
_SOURCES = {pb.ANSWER_SOURCE_ROUND: "round", pb.ANSWER_SOURCE_CACHE: "cache", pb.ANSWER_SOURCE_SNAPSHOTS: "snapshots"}
# Reconnect quickly after an aggregator restart (gRPC's default first backoff is 1 s, growing to 120 s).
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff for UNAVAILABLE: attempt n (1-based) waits initial * multiplier**(n-1), capped."""

    attempts: int = 5  # calls in all, the first included (1 = never retry)
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2  # +- this fraction, so many clients do not retry in lockstep
    retry_on: frozenset[grpc.StatusCode] = field(default_factory=lambda: frozenset({grpc.StatusCode.UNAVAILABLE}))

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be >= 1")

    def backoff(self, failures: int) -> float:
        # The exponent is capped before the power: KEEP_TRYING counts past 1024 failures in ~35 min of
        # outage, and 2.0 ** 1025 is an OverflowError, not "the cap".
        exponent = min(max(0, failures - 1), 64)
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** exponent)
        return base * (1 + random.uniform(-self.jitter, self.jitter))


DEFAULT_TIMEOUT_S = 5.0  # a whole get_loads, retries included
NO_RETRY = RetryPolicy(attempts=1)
KEEP_TRYING = RetryPolicy(attempts=2**31 - 1)  # a live view: ride out an aggregator restart, however long


class _Default:
    """The client's own timeout (None is taken: it means no deadline)."""


DEFAULT = _Default()


@dataclass(frozen=True, slots=True)
class Loads:
    """One answer of the aggregator, typed. Ages are in ms at `timestamp_ms` unless `now_ms` is given."""

    response: pb.GetLoadsResponse

    @property
    def round_id(self) -> int:
        """The collection round (0: answered from agents' pushed snapshots, no round)."""
        return self.response.round_id

    @property
    def source(self) -> str:
        """'round', 'cache' or 'snapshots'."""
        return _SOURCES.get(self.response.source, "unspecified")

    @property
    def timestamp_ms(self) -> int:
        return self.response.timestamp_ms

    @property
    def aggregator_id(self) -> str:
        """The aggregator process that answered: round ids compare only within one."""
        return self.response.aggregator_id

    @property
    def dp_size(self) -> int:
        return self.response.dp_size

    @property
    def loads(self) -> tuple[pb.RankLoad, ...]:
        return tuple(self.response.loads)

    @property
    def missing_ranks(self) -> tuple[int, ...]:
        return tuple(self.response.missing_ranks)

    @property
    def summary(self) -> pb.LoadSummary:
        return self.response.summary

    @property
    def complete(self) -> bool:
        """Every wanted rank answered this round."""
        return not self.response.missing_ranks

    @property
    def partial(self) -> bool:
        """Cut at this call's deadline before its round ended: missing ranks may still have been answering."""
        return self.response.partial

    def rank(self, dp_rank: int) -> pb.RankLoad | None:
        return next((load for load in self.response.loads if load.dp_rank == dp_rank), None)

    def age_ms(self, dp_rank: int, now_ms: int | None = None) -> int | None:
        """How old this rank's figures are, as the aggregator measured them on its own clock (the age it
        received them with, plus how long it held them) at the answer's `timestamp_ms`; with `now_ms` (Unix
        ms), at that time instead. Never from the agent's `timestamp_ms`: an agent's clock may be off by hours."""
        load = self.rank(dp_rank)
        if load is None:
            return None
        held = 0 if now_ms is None else max(0, now_ms - self.response.timestamp_ms)
        return int(load.age_ms) + held


def build_request(
    dp_rank: int | None = None,
    include: Iterable[str] = (),
    *,
    freshness: str | int | None = None,
    max_staleness_ms: int | None = None,
    allow_stale: bool = False,
) -> pb.GetLoadsRequest:
    """freshness: 'join' (default), 'new_round' or 'cached'; max_staleness_ms alone implies 'cached'."""
    if freshness is None:
        freshness = "cached" if max_staleness_ms is not None else "join"
    if isinstance(freshness, str):
        if freshness not in FRESHNESS:
            raise ValueError(f"freshness must be one of {sorted(FRESHNESS)}, got {freshness!r}")
        freshness = FRESHNESS[freshness]
    request = pb.GetLoadsRequest(
        include=list(include), freshness=freshness, max_staleness_ms=max_staleness_ms or 0, allow_stale=allow_stale
    )
    if dp_rank is not None:
        request.dp_rank = dp_rank
    return request


def watch_request(dp_rank: int | None, include: Iterable[str], interval_ms: int, allow_stale: bool,
                  on_change: bool = False, min_interval_ms: int = 0, heartbeat_ms: int = 0) -> pb.WatchLoadsRequest:
    """An interval watch (interval_ms), or with on_change an answer per change (min_interval_ms, heartbeat_ms)."""
    request = pb.WatchLoadsRequest(include=list(include), interval_ms=interval_ms, allow_stale=allow_stale,
                                   on_change=on_change, min_interval_ms=min_interval_ms, heartbeat_ms=heartbeat_ms)
    if dp_rank is not None:
        request.dp_rank = dp_rank
    return request


class _Base:
    def __init__(self, target: str, timeout: float | None, retry: RetryPolicy, metadata) -> None:
        self.target = target
        self.timeout = timeout
        self.retry = retry
        self.metadata = tuple(metadata or ())
        self.retries = 0  # calls or resubscriptions retried after UNAVAILABLE (tests, diagnostics)

    def _deadline(self, timeout: float | None | _Default) -> float | None:
        """When a call (retries included) must be over: the call's own timeout, else the client's."""
        timeout = self.timeout if isinstance(timeout, _Default) else timeout
        return None if timeout is None else time.monotonic() + timeout

    def _should_retry(self, error: grpc.RpcError, failures: int, deadline: float | None) -> float | None:
        """Seconds to wait before the next attempt, or None to give up and raise `error`."""
        if error.code() not in self.retry.retry_on or failures >= self.retry.attempts:
            return None
        delay = self.retry.backoff(failures)
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        self.retries += 1
        return delay


    def _resubscribe_delay(self, error: grpc.RpcError | None, failures: int) -> float | None:
        """A watch stream ended: cleanly (the aggregator shut down: it may come back) or with `error`."""
        if error is None:
            if failures >= self.retry.attempts:
                return None
            self.retries += 1
            return self.retry.backoff(failures)
        return self._should_retry(error, failures, None)


class _Resubscriptions:
    """What a watch keeps across the streams it resubscribes: the last answer handed out (a new stream starts
    with the current round, which the consumer may have had already) and the failures since it."""

    def __init__(self, client: _Base) -> None:
        self.client = client
        self.failures = 0
        self.last: tuple[int, int] | None = None
        self.resubscribed = False  # the next answer is a new stream's first: maybe one handed out already

    def is_new(self, response: pb.GetLoadsResponse) -> bool:
        """Within a stream every answer is new (on change, two may even share a millisecond); a new stream's
        first answer repeats the last one handed out when it is the same round (ids and stamps equal)."""
        self.failures = 0
        answer = (response.round_id, response.timestamp_ms)
        repeat = self.resubscribed and answer == self.last and response.round_id != 0
        self.resubscribed = False
        self.last = answer
        return not repeat

    def delay_after(self, error: grpc.RpcError | None) -> float:
        """Seconds before resubscribing after a stream ended (cleanly, or with `error`); raises when the
        retry policy allows no more: `error`, or WatchEnded for a clean end (never a silent return)."""
        self.failures += 1
        self.resubscribed = True
        delay = self.client._resubscribe_delay(error, self.failures)
        if delay is None:
            raise error if error is not None else WatchEnded(self.failures)
        return delay


class AsyncLoadClient(_Base):
    """`async with AsyncLoadClient("127.0.0.1:50051") as c: loads = await c.get_loads()`."""

    def __init__(self, target: str, *, timeout: float | None = DEFAULT_TIMEOUT_S, retry: RetryPolicy = RetryPolicy(),
                 metadata=None, options=(), security: ChannelSecurity | None = None) -> None:
        super().__init__(target, timeout, retry, metadata)
        # TLS / mutual TLS and the router token (on every call), when `security` configures them.
        self._channel = aio_channel(target, security, options=[*CHANNEL_OPTIONS, *options])
        self._stub = pb_grpc.LoadAggregatorStub(self._channel)

    async def get_loads(self, dp_rank: int | None = None, include: Iterable[str] = (), *,
                        timeout: float | None | _Default = DEFAULT, **options) -> Loads:
        """One answer; options: freshness, max_staleness_ms, allow_stale (see build_request)."""
        request = build_request(dp_rank, include, **options)
        deadline = self._deadline(timeout)
        failures = 0
        while True:
            remaining = None if deadline is None else max(0.001, deadline - time.monotonic())
            try:
                return Loads(await self._stub.GetLoads(request, timeout=remaining, metadata=self.metadata))
            except grpc.aio.AioRpcError as error:
                failures += 1
                delay = self._should_retry(error, failures, deadline)
                if delay is None:
                    raise
                await asyncio.sleep(delay)

    async def watch_loads(self, dp_rank: int | None = None, include: Iterable[str] = (), *, interval_ms: int = 0,
                          allow_stale: bool = False, on_change: bool = False, min_interval_ms: int = 0,
                          heartbeat_ms: int = 0) -> AsyncIterator[Loads]:
        """Pushed answers at `interval_ms` (0: the server's default), or with `on_change` whenever a wanted rank's
        figures change (at most once per `min_interval_ms`; the current figures again after `heartbeat_ms`
        without a change; 0: the server's defaults). Resubscribes after UNAVAILABLE; hands out the newest
        answer each time the consumer asks (latest wins), however long it took over the last."""
        request = watch_request(dp_rank, include, interval_ms, allow_stale, on_change, min_interval_ms, heartbeat_ms)
        watch = _Resubscriptions(self)
        while True:
            call = self._stub.WatchLoads(request, metadata=self.metadata)
            error: grpc.RpcError | None = None
            try:
                async for response in newest(call):
                    if watch.is_new(response):
                        yield Loads(response)
            except grpc.aio.AioRpcError as exc:
                error = exc
            finally:
                call.cancel()
            await asyncio.sleep(watch.delay_after(error))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncLoadClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class LoadClient(_Base):
    """Blocking twin of AsyncLoadClient, for scripts, the CLI and sync routers."""

    def __init__(self, target: str, *, timeout: float | None = DEFAULT_TIMEOUT_S, retry: RetryPolicy = RetryPolicy(),
                 metadata=None, options=(), security: ChannelSecurity | None = None) -> None:
        super().__init__(target, timeout, retry, metadata)
        self._channel = sync_channel(target, security, options=[*CHANNEL_OPTIONS, *options])
        self._stub = pb_grpc.LoadAggregatorStub(self._channel)

    def get_loads(self, dp_rank: int | None = None, include: Iterable[str] = (), *,
                  timeout: float | None | _Default = DEFAULT, **options) -> Loads:
        request = build_request(dp_rank, include, **options)
        deadline = self._deadline(timeout)
        failures = 0
        while True:
            remaining = None if deadline is None else max(0.001, deadline - time.monotonic())
            try:
                return Loads(self._stub.GetLoads(request, timeout=remaining, metadata=self.metadata))
            except grpc.RpcError as error:
                failures += 1
                delay = self._should_retry(error, failures, deadline)
                if delay is None:
                    raise
                time.sleep(delay)

    def watch_loads(self, dp_rank: int | None = None, include: Iterable[str] = (), *, interval_ms: int = 0,
                    allow_stale: bool = False, on_change: bool = False, min_interval_ms: int = 0,
                    heartbeat_ms: int = 0) -> Iterator[Loads]:
        """AsyncLoadClient.watch_loads, blocking."""
        request = watch_request(dp_rank, include, interval_ms, allow_stale, on_change, min_interval_ms, heartbeat_ms)
        watch = _Resubscriptions(self)
        while True:
            call = self._stub.WatchLoads(request, metadata=self.metadata)
            error: grpc.RpcError | None = None
            try:
                for response in newest_blocking(call):
                    if watch.is_new(response):
                        yield Loads(response)
            except grpc.RpcError as exc:
                error = exc
            finally:
                call.cancel()
            time.sleep(watch.delay_after(error))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> LoadClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
