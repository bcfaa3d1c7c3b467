"""SglangFeedSource: sglang's ZMQ load feed (`--load-publish-endpoint`), with `/v1/loads` for what it lacks.

Since 0.5.23 each scheduler can publish a `LoadStat` on a PUB socket of its own; `/server_info` advertises
the range under `kv_events` (`endpoint_host`, `load_endpoint_port_base`, `load_topic`): rank r publishes at
`tcp://<host>:<base + r>`, a wildcard host meaning the engine URL's. Frames are `[topic, 8-byte big-endian
sequence, msgpack LoadStat]` (see sglang_wire). `--sglang-load-endpoint tcp://HOST:BASE` names the range when
`/server_info` cannot, subscribing to every topic.

* A frame updates the rank's core figures at once and the agent pushes the change (no engine request).
* The rest (token usage, throughputs, cache hit rate, sections, accelerator) comes from `/v1/loads` every
  detail interval; a rank then says `age_ms` for its core and `detail_age_ms` for the rest.
* sglang re-sends an unchanged stat every second: a rank silent for the silence bound (3 s) is read through
  `/v1/loads` like a plain sglang source until its frames resume.
* A sequence that goes backwards is the scheduler restarting: its older figures are dropped, nothing failed.
* A frame that is not a LoadStat fails its rank with the reason until a good frame comes; other ranks go on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

import zmq
import zmq.asyncio

from loadagg.common import field_default
from loadagg.v1 import loadagg_pb2 as pb
from scheduler_agent.config import AgentConfig
from scheduler_agent.sources.base import EngineRanks, PartialRead, SourceError
from scheduler_agent.sources.held import HeldLoads, HeldSource, now_s, read_held_or_polled, stop_task
from scheduler_agent.sources.sglang_http import SglangHttpSource
from scheduler_agent.sources.sglang_wire import FEED_CORE_FIELDS, PrefillRate, decode_stat, load_from_stat

log = logging.getLogger(__name__)

_WILDCARDS = frozenset({"*", "0.0.0.0", "::", "[::]"})
# Frames a slow agent may queue per rank: a gauge, so old ones are worth nothing (sglang's own PUB keeps 8).
_RCVHWM = 64
_DETAIL_CHECK_S = 0.05  # how soon a rank that starts publishing gets its first detail read


def parse_endpoint(text: str) -> tuple[str, int]:
    """`tcp://HOST:BASEPORT` -> (host, base port); ValueError saying what is wrong."""
    parts = urlsplit(text)
    if parts.scheme != "tcp" or not parts.hostname or parts.port is None or parts.path not in ("", "/"):
        raise ValueError(f"sglang load endpoint {text!r} must look like tcp://HOST:BASEPORT (rank r at BASEPORT + r)")
    return parts.hostname, parts.port


def _tcp(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


class SglangFeedSource(HeldSource):
    """sglang through its load feed where it publishes one, through `/v1/loads` where (or while) it does not."""

    name = "sglang"

    def __init__(self, http: SglangHttpSource, endpoint: str = "", *,
                 silence_s: float = field_default(AgentConfig, "feed_silence_ms") / 1000,
                 detail_interval_s: float = field_default(AgentConfig, "detail_interval_ms") / 1000) -> None:
        self.http = http
        self.manual = endpoint  # "": what /server_info advertises; "off": never; tcp://HOST:BASE: this range
        self.silence_s = silence_s
        self.detail_interval_s = detail_interval_s
        self.held = HeldLoads(self.name, FEED_CORE_FIELDS)
        self.rates = PrefillRate()
        self.feed: tuple[str, int, str] | None = None  # (host, base port, topic)
        self.restarts = 0
        self._context: zmq.asyncio.Context | None = None
        self._listeners: dict[int, asyncio.Task] = {}
        self._last_seq: dict[int, int] = {}
        self._silent: set[int] = set()
        self._detail_asked: set[int] = set()  # ranks a detail read asked for since they began feeding
        self._detail: asyncio.Task | None = None
        self._said_no_feed = False

    @property
    def pushes(self) -> bool:  # type: ignore[override]
        return self.feed is not None

    def set_round_timeout(self, round_timeout_ms: int) -> None:
        self.http.set_round_timeout(round_timeout_ms)

    async def discover(self) -> EngineRanks:
        """The engine's ranks; the feed found (or, every rank silent, asked again: a restarted engine may
        publish elsewhere) and subscribed to for each rank."""
        engine = await self.http.discover()
        if self.feed is None and self.manual != "off":
            self.feed = await self._find_feed()
        elif self.feed is not None and not self.manual and self._listeners and self._silent >= set(self._listeners):
            found = await self._find_feed()
            if found != self.feed:
                log.info("sglang load feed: every rank silent and the engine advertises %s now: following it",
                         "no feed" if found is None else _tcp(found[0], found[1]))
                for rank, task in self._listeners.items():
                    task.cancel()
                    self._forget(rank)  # the old engine's: polled until the new range's first frame
                self._listeners.clear()
                self._silent.clear()
                self._last_seq.clear()
                self._detail_asked.clear()
                self.feed = found
        if self.feed is not None:
            self._listen_to(engine.dp_ranks)
        return engine

    async def _find_feed(self) -> tuple[str, int, str] | None:
        if self.manual:
            host, base = parse_endpoint(self.manual)
            log.info("sglang load feed (given): %s, rank r at port %d + r", _tcp(host, base), base)
            return host, base, ""
        try:
            info = await self.http.http.get_json("/server_info")
        except SourceError as error:
            if not self._said_no_feed:
                log.warning("sglang: %s: polling /v1/loads (asked again at each rank check); give "
                            "--sglang-load-endpoint to read the load feed without /server_info", error)
                self._said_no_feed = True
            return None
        events = info.get("kv_events") if isinstance(info, dict) else None
        base = events.get("load_endpoint_port_base") if isinstance(events, dict) else None
        if not isinstance(base, int) or isinstance(base, bool) or not 0 < base < 65536:
            if not self._said_no_feed:
                log.info("sglang advertises no load feed (start it with --load-publish-endpoint): polling /v1/loads")
                self._said_no_feed = True
            return None
        host = events.get("endpoint_host")
        if not isinstance(host, str) or not host or host in _WILDCARDS:
            host = urlsplit(self.http.http.base_url).hostname or "127.0.0.1"
        topic = events.get("load_topic")
        topic = topic if isinstance(topic, str) else ""
        log.info("sglang load feed (advertised): %s topic %r, rank r at port %d + r", _tcp(host.strip("[]"), base),
                 topic, base)
        return host.strip("[]"), base, topic

    def _listen_to(self, ranks: Sequence[int]) -> None:
        if self._context is None:
            self._context = zmq.asyncio.Context()
        for rank in ranks:
            if rank not in self._listeners:
                self._listeners[rank] = asyncio.create_task(self._listen(rank), name=f"sglang-feed-{rank}")
        for rank in set(self._listeners) - set(ranks):
            self._listeners.pop(rank).cancel()
        if self._detail is None:
            self._detail = asyncio.create_task(self._read_details(), name="sglang-feed-details")

    async def _listen(self, rank: int) -> None:
        """Take rank `rank`'s frames until cancelled; a silence past the bound hands the rank to polling."""
        assert self.feed is not None and self._context is not None
        host, base, topic = self.feed
        socket = self._context.socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVHWM, _RCVHWM)
        if ":" in host:
            socket.setsockopt(zmq.IPV6, 1)
        socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        socket.connect(_tcp(host, base + rank))
        try:
            while True:
                # poll() before recv: cancelling a zmq.asyncio recv can drop a frame it already took.
                if not await socket.poll(timeout=int(self.silence_s * 1000)):
                    self._went_silent(rank)
                    continue
                self._take(rank, await socket.recv_multipart())
        finally:
            socket.close(linger=0)

    def _went_silent(self, rank: int) -> None:
        if rank not in self._silent:
            self._silent.add(rank)
            log.warning("sglang load feed: rank %d sent nothing for %.1f s: reading it through /v1/loads until "
                        "its frames resume", rank, self.silence_s)
            self.held.notify()

    def _take(self, rank: int, frames: list[bytes]) -> None:
        """One frame: the rank's new core figures, or its failure with the reason."""
        received = now_s()
        if rank in self._silent:
            self._silent.discard(rank)
            log.info("sglang load feed: rank %d publishes again", rank)
        if len(frames) != 3 or len(frames[1]) != 8:
            self.held.fail(rank, f"sent a load frame of {len(frames)} parts, not [topic, 8-byte sequence, LoadStat]")
            return
        sequence = int.from_bytes(frames[1], "big")
        last = self._last_seq.get(rank)
        self._last_seq[rank] = sequence
        if last is not None and sequence < last:  # a restarted scheduler numbers its frames from 0 again
            self.restarts += 1
            log.info("sglang load feed: rank %d restarted (sequence %d after %d): its older figures dropped",
                     rank, sequence, last)
            self._forget(rank)
        self.held.take(rank, lambda: (load_from_stat(decode_stat(frames[2]), rank, time.time_ns() // 1_000_000,
                                                     self.rates), received), "sent a LoadStat")

    def _forget(self, rank: int) -> None:
        """Drop what is held of `rank` from before its engine restarted: figures, rate and first detail read."""
        self.held.forget(rank)
        self.rates.reset(rank)
        self._detail_asked.discard(rank)

    def _feeding(self, rank: int) -> bool:
        """Whether `rank` is answered from its feed now (else it is polled)."""
        held = self.held.ranks.get(rank)
        return (rank in self._listeners and rank not in self._silent and held is not None
                and (held.core is not None or bool(held.problem)))

    async def _read_details(self) -> None:
        """Every detail interval: `/v1/loads` for the figures a LoadStat lacks (a failure only ages them). A rank
        that begins feeding is read at once, once: a read that gives it nothing waits for the interval."""
        last_read = -self.detail_interval_s
        while True:
            ranks = [r for r in self._listeners if self._feeding(r)]
            new = any(r not in self._detail_asked for r in ranks)
            if ranks and (new or now_s() - last_read >= self.detail_interval_s):
                last_read = now_s()
                self._detail_asked.update(ranks)
                try:
                    loads = await self.http.read(ranks)
                except PartialRead as partial:
                    loads = partial.loads
                except SourceError as error:
                    log.debug("sglang detail read failed: %s", error)
                    loads = {}
                for rank, load in loads.items():  # aged from the ask: the engine read them during the request
                    self.held.set_detail(rank, load, last_read)
            await asyncio.sleep(min(self.detail_interval_s, _DETAIL_CHECK_S))

    def held_ranks(self, ranks: Sequence[int]) -> list[int]:
        return [r for r in ranks if self._feeding(r)]

    async def read(self, ranks: Sequence[int]) -> dict[int, pb.RankLoad]:
        """Feed ranks from memory; the others (no feed, silent, no frame yet) with one `/v1/loads` request."""
        return await read_held_or_polled(self.held, ranks, self._feeding, self.http.read)

    async def close(self) -> None:
        for task in [*self._listeners.values(), self._detail]:
            await stop_task(task)
        self._listeners.clear()
        self._detail = None
        if self._context is not None:
            self._context.term()
            self._context = None
        await self.http.close()
