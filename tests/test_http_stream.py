"""GET /v1/loads/watch (Server-Sent Events) read by a real HTTP client: events are sglang bodies, on change or
at an interval; bad queries, the stream limit, the router token; a client that stops reading is dropped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

import aiohttp
import pytest
from conftest import wait_for
from driven_agent import driven_fixture  # noqa: F401 (the `driven` fixture)

from loadagg.server.limits import LimitsConfig
from loadagg.server.security import SecurityConfig
from scheduler_agent.sources.sglang_http import load_from_v1

TOP_KEYS = {"timestamp", "version", "dp_rank_count", "loads", "aggregate"}


class EventReader:
    """An aiohttp client reading one SSE stream: each `data:` event parsed as JSON into `events`."""

    def __init__(self, port: int, query: str = "", headers: dict | None = None) -> None:
        self.url = f"http://127.0.0.1:{port}/v1/loads/watch{query}"
        self.headers = headers or {}
        self.events: list[dict] = []
        self.status = 0
        self.response_headers: dict = {}
        self.error_body: dict | None = None
        self.ended = False
        self.opened = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async with aiohttp.ClientSession() as session, session.get(self.url, headers=self.headers) as response:
                self.status = response.status
                self.response_headers = dict(response.headers)
                self.opened.set()
                if response.status != 200:
                    self.error_body = await response.json()
                    return
                data: list[str] = []
                async for raw in response.content:  # one line at a time
                    line = raw.decode().rstrip("\r\n")
                    if line.startswith("data: "):
                        data.append(line[len("data: "):])
                    elif line == "" and data:
                        self.events.append(json.loads("\n".join(data)))
                        data = []
                self.ended = True
        finally:
            self.opened.set()

    def running(self, index: int = -1) -> dict[int, int]:
        """Each rank's running requests in an event, read through the agent's sglang /v1/loads parser."""
        now = time.time_ns() // 1_000_000
        return {load.dp_rank: load.num_running_reqs
                for load in (load_from_v1(entry, now) for entry in self.events[index]["loads"])}

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def test_events_are_sglang_bodies_sent_on_change(start_aggregator, driven):
    agg = await start_aggregator(dp_size=3, http_port=0)
    agent = await driven(agg, [0, 1])  # rank 2 has no agent
    stream = EventReader(agg.http_port, "?min_interval_ms=10&heartbeat_ms=60000")
    one_rank = EventReader(agg.http_port, "?dp_rank=1&include=core")
    await wait_for(lambda: stream.events and one_rank.events, what="the first events")
    assert stream.status == 200 and stream.response_headers["Content-Type"].startswith("text/event-stream")
    assert stream.response_headers["X-Loadagg-Aggregator-Id"] == agg.aggregator_id
    first = stream.events[0]
    assert set(first) == TOP_KEYS and first["dp_rank_count"] == 2  # as sglang counts: the ranks returned
    assert stream.running() == {0: 1, 1: 1} and one_rank.running() == {1: 1}
    assert set(first["aggregate"]) >= {"total_running_reqs", "total_reqs"}

    await agent.push(r0=5)
    await wait_for(lambda: len(stream.events) == 2, what="the change's event")
    assert stream.running() == {0: 5, 1: 1}
    await agent.push(r1=7)
    await wait_for(lambda: len(stream.events) == 3 and len(one_rank.events) == 2, what="rank 1's change")
    assert one_rank.running() == {1: 7} and "memory" not in one_rank.events[-1]["loads"][0]
    await asyncio.sleep(0.3)
    assert len(stream.events) == 3 and len(one_rank.events) == 2  # nothing changed: nothing sent
    assert agg.http.streams.open == 2
    await stream.close()
    await one_rank.close()
    await wait_for(lambda: agg.http.streams.open == 0 and agg.watch.watchers == 0, what="the streams to close")


async def test_interval_streams_share_rounds_and_end_cleanly_on_shutdown(start_aggregator, start_agents):
    agg = await start_aggregator(dp_size=2, http_port=0)
    await start_agents(agg, [[0], [1]])
    streams = [EventReader(agg.http_port, "?interval_ms=100") for _ in range(5)]
    await wait_for(lambda: all(len(s.events) >= 3 for s in streams), what="three events on every stream")
    assert all(set(s.events[-1]) == TOP_KEYS and s.events[-1]["dp_rank_count"] == 2 for s in streams)
    assert agg.communicator.stats.rounds_started <= agg.watch.stats.ticks + 1  # one round per tick, shared
    await agg.stop(grace=0.5)
    await wait_for(lambda: all(s.ended for s in streams), what="every stream to end")


@pytest.mark.parametrize(("query", "says"), [
    ("?format=json", "unknown query parameter(s) ['format']"),
    ("?dp_rank=9", "dp_rank 9 is out of range"),
    ("?include=bogus", "bogus"),
    ("?interval_ms=100&min_interval_ms=50", "apply to on_change watches only"),
    ("?min_interval_ms=1", "min_interval_ms 1 is outside 10.."),
    ("?min_interval_ms=x", "min_interval_ms must be an integer"),
    ("?heartbeat_ms=1&heartbeat_ms=2", "given more than once"),
])
async def test_bad_queries_get_400_with_a_clear_message(start_aggregator, query, says):
    agg = await start_aggregator(dp_size=2, http_port=0)
    stream = EventReader(agg.http_port, query)
    await stream.task
    assert stream.status == 400 and stream.error_body["code"] == "INVALID_ARGUMENT"
    assert says in stream.error_body["error"]


async def stream_metrics(port: int) -> dict[str, float]:
    """loadagg_http_streams* as /metrics shows them (Prometheus text read by its own parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name.startswith("loadagg_http_streams")}


async def test_streams_are_bounded_and_need_the_router_token(start_aggregator, driven):
    agg = await start_aggregator(dp_size=1, http_port=0, limits=LimitsConfig(max_http_streams=2),
                                 security=SecurityConfig(router_token="tok"))
    await driven(agg, [0])
    anonymous = EventReader(agg.http_port)
    await anonymous.task
    assert anonymous.status == 401
    auth = {"Authorization": "Bearer tok"}
    streams = [EventReader(agg.http_port, headers=auth) for _ in range(2)]
    await wait_for(lambda: all(s.events for s in streams), what="two streams")
    third = EventReader(agg.http_port, headers=auth)
    await third.task
    assert third.status == 429 and third.error_body["code"] == "RESOURCE_EXHAUSTED"
    assert "--max-http-streams" in third.error_body["error"] and third.response_headers["Retry-After"] == "1"
    assert await stream_metrics(agg.http_port) == {
        "loadagg_http_streams": 2, "loadagg_http_streams_refused_total": 1, "loadagg_http_streams_dropped_total": 0}
    await streams[0].close()
    await wait_for(lambda: agg.http.streams.open == 1, what="a stream to close")
    assert (await stream_metrics(agg.http_port))["loadagg_http_streams"] == 1
    again = EventReader(agg.http_port, headers=auth)
    await wait_for(lambda: again.events, what="a stream in the freed place")
    await again.close()
    await streams[1].close()


async def test_a_client_that_stops_reading_is_dropped_and_delays_nobody(start_aggregator, driven):
    agg = await start_aggregator(dp_size=64, http_port=0, limits=LimitsConfig(http_stream_send_timeout_s=0.5))
    agent = await driven(agg, list(range(64)))
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", agg.http_port))
    stalled.sendall(b"GET /v1/loads/watch?min_interval_ms=10 HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads
    active = EventReader(agg.http_port, "?min_interval_ms=10")
    try:
        await wait_for(lambda: agg.http.streams.open == 2 and active.events, what="both streams")
        value = 1
        while agg.http.streams.dropped == 0:
            value += 1
            assert value < 2000, "the stalled client was never dropped"
            await agent.push(**{f"r{rank}": value for rank in range(64)})
            await wait_for(lambda v=value: active.running().get(0) == v, what=f"the reader to see change {value}")
        print(f"stalled HTTP client dropped after {value - 1} changes")
        await wait_for(lambda: agg.http.streams.open == 1, what="the stalled stream to be gone")
        assert await stream_metrics(agg.http_port) == {
            "loadagg_http_streams": 1, "loadagg_http_streams_refused_total": 0,
            "loadagg_http_streams_dropped_total": 1}
        await agent.push(r0=value + 1)
        await wait_for(lambda: active.running().get(0) == value + 1, what="the reader to go on")
    finally:
        stalled.close()
        await active.close()
