"""AggregatorFanout: one agent process linked to EVERY aggregator replica behind one DNS name.

Several aggregator replicas (a Kubernetes Deployment) can each answer any router only if every agent is linked to
every replica. A ClusterIP Service would hand the agent's one stream to one replica, so the agent resolves a name
that lists all replicas (a headless Service) and keeps one SchedulerAgent link per address, following changes:
it re-resolves every `resolve_interval_s`, adds links for new addresses and drops links for vanished ones.
A failed or empty resolution changes nothing (DNS hiccups and rollouts must not orphan every rank).

All links share one LoadSource. Reads of the same ranks that overlap in time share one read (the watching idea,
applied to the agent): N replicas collecting at the same moment cost one engine read, and no answer is older
than the read in flight. Reads that do not overlap are separate reads; there is no time-based cache.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence

from loadagg.v1 import loadagg_pb2 as pb
from scheduler_agent.agent import SchedulerAgent
from scheduler_agent.config import AgentConfig
from scheduler_agent.sources.base import LoadSource, WrappedSource

log = logging.getLogger(__name__)

Resolver = Callable[[], Awaitable[Iterable[str]] | Iterable[str]]


@dataclasses.dataclass(frozen=True, slots=True)
class FanoutConfig:
    """`--resolve-all` settings: link to every address `aggregator` resolves to, re-resolving on an interval."""

    resolve_all: bool = False
    resolve_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if self.resolve_interval_s <= 0:
            raise ValueError(f"resolve_interval_s must be > 0, got {self.resolve_interval_s}")


def split_target(target: str) -> tuple[str, int]:
    """'name:50051' / '[::1]:50051' -> (host, port). The port is required: DNS gives addresses, not ports."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"aggregator must be HOST:PORT to resolve all its addresses, got {target!r}")
    return host.strip("[]"), int(port)


def join_target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def pick_addresses(infos: Iterable[tuple], port: int) -> list[str]:
    """getaddrinfo results -> sorted HOST:PORT targets of ONE address family: IPv4 when there is any, else IPv6.

    A dual-stack name lists each replica twice (A and AAAA); linking to both would give one replica two links
    with the same instance id, each replacing the other. One family means one link per replica.
    """
    by_family: dict[int, set[str]] = {}
    for family, *_, sockaddr in infos:
        by_family.setdefault(family, set()).add(join_target(sockaddr[0], port))
    chosen = by_family.get(socket.AF_INET) or by_family.get(socket.AF_INET6) or set()
    return sorted(chosen)


async def resolve_all(host: str, port: int) -> list[str]:
    """Every address of `host` (one family, see pick_addresses), as sorted HOST:PORT targets."""
    return pick_addresses(await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM), port)


class SharedSource(WrappedSource):
    """Wraps the one real source for all links: start/close belong to the fanout; overlapping reads are joined."""

    def __init__(self, inner: LoadSource) -> None:
        self.inner = inner
        self.name = inner.name
        self.reads = 0  # reads of the real source
        self.joined = 0  # reads answered by joining a read already in flight
        self._in_flight: dict[tuple[int, ...], asyncio.Future] = {}

    async def discover(self):
        """The engine's ranks (engine sources), asked by each link before its hello."""
        return await self.inner.discover()

    def set_round_timeout(self, round_timeout_ms: int) -> None:
        self.inner.set_round_timeout(round_timeout_ms)

    async def read(self, ranks: Sequence[int]) -> dict[int, pb.RankLoad]:
        key = tuple(ranks)
        future = self._in_flight.get(key)
        if future is None:
            self.reads += 1
            future = asyncio.ensure_future(self.inner.read(ranks))
            self._in_flight[key] = future
            future.add_done_callback(lambda done: self._finished(key, done))
        else:
            self.joined += 1
        # A link cancelled mid-read (its answer is no longer wanted) must not cancel the read for the others.
        return await asyncio.shield(future)

    def _finished(self, key: tuple[int, ...], future: asyncio.Future) -> None:
        if self._in_flight.get(key) is future:
            del self._in_flight[key]
        if not future.cancelled():
            future.exception()  # retrieved: a failure nobody awaited any more is not "never retrieved"


class AggregatorFanout:
    """Keeps one SchedulerAgent link per resolved aggregator address, all sharing one source."""

    def __init__(self, config: AgentConfig, source: LoadSource, fanout: FanoutConfig | None = None, *,
                 resolver: Resolver | None = None) -> None:
        self.config = config
        self.source = source
        self.fanout = fanout or FanoutConfig(resolve_all=True)
        self.shared = SharedSource(source)
        if resolver is None:
            host, port = split_target(config.aggregator)
            resolver = lambda: resolve_all(host, port)  # noqa: E731
        self._resolver = resolver
        self.links: dict[str, SchedulerAgent] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self.resolutions = 0
        self.resolve_failures = 0

    def linked(self) -> list[str]:
        """Addresses whose link is up now."""
        return sorted(address for address, agent in self.links.items() if agent.connected.is_set())

    async def run(self) -> None:
        """Follow the name until cancelled."""
        await self.source.start()
        try:
            while True:
                await self.refresh()
                await asyncio.sleep(self.fanout.resolve_interval_s)
        finally:
            await self._drop_all()
            await self.source.close()

    async def refresh(self) -> set[str]:
        """Resolve once and reconcile the links with the answer; returns the addresses linked to now."""
        try:
            answer = self._resolver()
            if inspect.isawaitable(answer):
                answer = await answer
            addresses = set(answer)
        except (OSError, ValueError) as error:  # socket.gaierror is an OSError
            self.resolve_failures += 1
            log.warning("resolving %s failed (%s); keeping %d links", self.config.aggregator, error, len(self.links))
            return set(self.links)
        self.resolutions += 1
        if not addresses:
            self.resolve_failures += 1
            log.warning("%s resolved to no address; keeping %d links", self.config.aggregator, len(self.links))
            return set(self.links)
        for address in sorted(self.links.keys() - addresses):
            await self._drop(address)
        for address in sorted(addresses - self.links.keys()):
            self._add(address)
        return set(self.links)

    def _add(self, address: str) -> None:
        log.info("aggregator replica %s appeared: linking", address)
        agent = SchedulerAgent(dataclasses.replace(self.config, aggregator=address), self.shared)
        self.links[address] = agent
        self._tasks[address] = asyncio.create_task(agent.run(), name=f"link-{address}")

    async def _drop(self, address: str) -> None:
        log.info("aggregator replica %s vanished: dropping its link", address)
        self.links.pop(address, None)
        task = self._tasks.pop(address, None)
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise  # we are being stopped ourselves (SIGTERM) while dropping it: stop
            except Exception:  # the link's own failure: it is gone either way
                log.debug("link to %s ended with an error", address, exc_info=True)

    async def _drop_all(self) -> None:
        for address in list(self.links):
            await self._drop(address)
