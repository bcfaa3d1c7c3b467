"""A short churn soak (issue 19): real agent processes killed and restarted while routers call GetLoads, the
HTTP gateway and WatchLoads, then everything back to where it was: descriptors, asyncio tasks and gauges
exactly, memory within a bound. Bounded: about 12 s, at most 20 kills."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import time

import aiohttp
import grpc
from conftest import ROOT, wait_for
from figures import record

from loadagg.v1 import loadagg_pb2 as pb
from loadagg.v1 import loadagg_pb2_grpc as pb_grpc

DP_SIZE = 4
CHURN_S = 12.0
MAX_KILLS = 20
RSS_GROWTH_BOUND_KB = 40_000  # allocator noise and gRPC's pools; a leak per kill or per call would pass it


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def _gauges(agg) -> dict[str, int]:
    return {"connected_agents": len(agg.registry.sessions()), "live_ranks": len(agg.registry.live_ranks()),
            "agent_links": agg.guard.agent_links, "watchers": agg.watch.watchers,
            "rounds_in_flight": agg.communicator.rounds_in_flight, "calls_in_flight": agg.loads.in_flight,
            "http_connections": agg.http.listener.open}


def _start_agent(port: int, rank: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scheduler_agent", "--aggregator", f"127.0.0.1:{port}",
                             "--dp-size", str(DP_SIZE), "--dp-rank", str(rank), "--push-interval-ms", "50"],
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


async def test_churn_returns_descriptors_tasks_gauges_and_memory(start_aggregator):
    agg = await start_aggregator(dp_size=DP_SIZE, round_timeout_ms=300, http_port=0)
    agents = {rank: _start_agent(agg.port, rank) for rank in range(DP_SIZE)}
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{agg.port}")
    stub = pb_grpc.LoadAggregatorStub(channel)
    calls = {"grpc": 0, "http": 0, "watch": 0}
    stop = asyncio.Event()

    async def router() -> None:
        while not stop.is_set():
            await stub.GetLoads(pb.GetLoadsRequest(allow_stale=True), timeout=10)
            calls["grpc"] += 1
            await asyncio.sleep(0.005)

    async def http_poller() -> None:
        while not stop.is_set():
            async with aiohttp.ClientSession() as session:  # a connection per call, closed
                async with session.get(f"http://127.0.0.1:{agg.http_port}/v1/loads?max_staleness_ms=50") as answer:
                    assert answer.status == 200
                    await answer.read()
            calls["http"] += 1
            await asyncio.sleep(0.02)

    async def watcher() -> None:
        watch = stub.WatchLoads(pb.WatchLoadsRequest(interval_ms=50, allow_stale=True))
        try:
            async for _ in watch:
                calls["watch"] += 1
                if stop.is_set():
                    return
        finally:
            watch.cancel()

    async def traffic() -> None:
        stop.clear()
        tasks = [asyncio.create_task(t()) for t in (router, router, http_poller, watcher)]
        await asyncio.sleep(1.0)
        return tasks

    try:
        await wait_for(lambda: agg.registry.live_ranks() == set(range(DP_SIZE)), 40, "agents to link")
        warm = await traffic()  # every kind of call once, so that lazily made pools count in the baseline
        stop.set()
        await asyncio.gather(*warm)
        await wait_for(lambda: _gauges(agg)["watchers"] == 0 and agg.loads.in_flight == 0, 10, "warm-up to end")
        await asyncio.sleep(0.5)
        fds, tasks, gauges, rss = _fds(), len(asyncio.all_tasks()), _gauges(agg), _rss_kb()

        running = await traffic()
        kills = 0
        rng = random.Random(19)
        started = time.monotonic()
        while time.monotonic() - started < CHURN_S and kills < MAX_KILLS:
            rank = rng.randrange(DP_SIZE)
            agents[rank].kill()
            await asyncio.to_thread(agents[rank].wait, 10)
            kills += 1
            agents[rank] = _start_agent(agg.port, rank)
            await asyncio.sleep(CHURN_S / MAX_KILLS)
        stop.set()
        await asyncio.gather(*running)
        assert kills >= 10 and min(calls.values()) > 10, (kills, calls)

        await wait_for(lambda: _gauges(agg) == gauges, 40, f"gauges back to {gauges} (now {_gauges(agg)})")
        await wait_for(lambda: _fds() == fds, 20, f"descriptors back to {fds} (now {_fds()})")
        await wait_for(lambda: len(asyncio.all_tasks()) == tasks, 10, f"tasks back to {tasks}")
        assert _rss_kb() - rss < RSS_GROWTH_BOUND_KB, (rss, _rss_kb())
        record("churn_soak", kills=kills, seconds=round(time.monotonic() - started, 1), **calls, fds=fds,
               tasks=tasks, rss_growth_kb=_rss_kb() - rss, **gauges)
    finally:
        stop.set()
        for agent in agents.values():
            with contextlib.suppress(ProcessLookupError):
                agent.kill()
            agent.wait(10)
        await channel.close()
