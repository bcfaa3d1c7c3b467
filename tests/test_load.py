"""10,000 concurrent callers, every other one cancelling early: the rest are all answered, nothing leaks
(no waiters, tasks, rounds or memory left behind), and agents never see more than one round in flight."""

from __future__ import annotations

import asyncio
import gc
import random
import resource
import sys

import grpc
from conftest import wait_for
from figures import record
from raw_agent import RawAgent

from loadagg.server.rounds import Round, RoundResult
from loadagg.v1 import loadagg_pb2 as pb
from loadagg.v1 import loadagg_pb2_grpc as pb_grpc

CALLERS = 10_000
CHANNELS = 8
DP_SIZE = 4


class CountingAgent:
    """A hand-driven agent that answers every collect after a short delay and counts what it sees."""

    def __init__(self, port: int, rank: int) -> None:
        self.raw = RawAgent(port, f"counting-{rank}", [rank], dp_size=DP_SIZE)
        self.rank = rank
        self.collects = 0
        self.unanswered = 0  # collects received and not yet answered
        self.max_unanswered = 0
        self.round_ids: list[int] = []
        self.rng = random.Random(rank)

    async def run(self) -> None:
        await self.raw.connect()
        while True:
            collect = await self.raw.next_collect(timeout=600)
            self.collects += 1
            self.unanswered += 1
            self.max_unanswered = max(self.max_unanswered, self.unanswered)
            self.round_ids.append(collect.round_id)
            await asyncio.sleep(self.rng.uniform(0.005, 0.4))  # rounds of varied length; callers cancel in some
            await self.raw.report(collect.round_id, [pb.RankLoad(dp_rank=self.rank, num_running_reqs=self.rank)])
            self.unanswered -= 1


async def _wave(stubs, count: int, rng: random.Random, cancel_within: float = 8.0) -> tuple[int, int, int, int]:
    """`count` concurrent callers; odd ones cancel within `cancel_within` s (before reaching the server, or
    while waiting on a round). Returns (answered, cancelled, complete, answered before their cancel)."""

    async def patient(stub) -> pb.GetLoadsResponse:
        return await stub.GetLoads(pb.GetLoadsRequest(), timeout=120)

    async def impatient(stub, delay: float) -> str:
        call = stub.GetLoads(pb.GetLoadsRequest(), timeout=120)
        await asyncio.sleep(delay)
        call.cancel()
        try:
            await call
            return "answered first"
        except asyncio.CancelledError:
            return "cancelled"
        except grpc.aio.AioRpcError as error:  # how a cancelled call may also end
            if error.code() != grpc.StatusCode.CANCELLED:
                raise
            return "cancelled"

    jobs = [patient(stubs[i % len(stubs)]) if i % 2 == 0 else impatient(stubs[i % len(stubs)], rng.uniform(0,
                                                                                                           cancel_within))
            for i in range(count)]
    results = await asyncio.gather(*jobs)
    answers = [r for r in results if isinstance(r, pb.GetLoadsResponse)]
    complete = sum(1 for r in answers if len(r.loads) == DP_SIZE and not r.missing_ranks)
    early = sum(1 for r in results if r == "answered first")
    return len(answers) + early, sum(1 for r in results if r == "cancelled"), complete, early


async def _settled_count() -> int:
    """Live objects once the last calls' done-callbacks have run (two counts in a row agree)."""
    gc.collect()
    previous = len(gc.get_objects())
    for _ in range(50):
        await asyncio.sleep(0.1)
        gc.collect()
        count = len(gc.get_objects())
        if abs(count - previous) < 100:
            return count
        previous = count
    return previous


async def _settled_growth(objects_before: int, timeout: float = 30.0) -> int:
    """Live objects beyond the baseline once finished calls are released (done-callbacks run a few loop
    iterations after the last answer, so poll instead of measuring once)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        gc.collect()
        growth = len(gc.get_objects()) - objects_before
        if growth < 1_000 or loop.time() > deadline:
            return growth
        await asyncio.sleep(0.2)


def _alive(kind) -> int:
    return sum(1 for o in gc.get_objects() if type(o) is kind)


async def test_ten_thousand_callers_half_cancelling(start_aggregator):
    agg = await start_aggregator(dp_size=DP_SIZE, round_timeout_ms=10_000)
    agents = [CountingAgent(agg.port, rank) for rank in range(DP_SIZE)]
    agent_tasks = [asyncio.create_task(a.run()) for a in agents]
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{agg.port}", options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(CHANNELS)]
    stubs = [pb_grpc.LoadAggregatorStub(c) for c in channels]
    rng = random.Random(3)
    try:
        await wait_for(lambda: agg.registry.live_ranks() == set(range(DP_SIZE)), what="agents linked")
        await _wave(stubs, 1000, rng, cancel_within=0.5)  # warm-up: channels, caches, lazily built state
        await wait_for(lambda: agg.loads.in_flight == 0 and agg.communicator.rounds_in_flight == 0, 60, "idle")
        gc.collect()
        tasks_before = len(asyncio.all_tasks())
        # tracemalloc would slow 10,000 calls several-fold: count live Python objects and allocated blocks.
        objects_before = await _settled_count()
        blocks_before = sys.getallocatedblocks()
        # Earlier tests' aggregators may still be alive in this process (aiohttp's module-wide middleware cache
        # keeps its apps' handlers): count this wave's results against what was alive before it.
        results_before = _alive(RoundResult)
        stats = agg.communicator.stats
        rounds_before, callers_before = stats.rounds_started, stats.callers

        started = asyncio.get_running_loop().time()
        answered, cancelled, complete, early = await _wave(stubs, CALLERS, rng)
        wave_s = asyncio.get_running_loop().time() - started

        await wait_for(lambda: agg.loads.in_flight == 0 and agg.communicator.rounds_in_flight == 0, 60, "idle")
        object_growth = await _settled_growth(objects_before)
        block_growth = sys.getallocatedblocks() - blocks_before

        # Every caller that did not cancel was answered, with every rank.
        patient = CALLERS // 2
        assert answered - early == patient and complete == patient
        assert answered + cancelled == CALLERS
        # Some cancelled while waiting on a round: the server-side cancellation path was exercised.
        cancelled_in_round = stats.callers - callers_before - answered
        assert cancelled_in_round > 0
        # No waiter, round, task or memory left behind.
        assert agg.communicator._rounds == {}
        assert _alive(Round) == 0
        assert _alive(RoundResult) <= results_before + 2  # the last result (and its cached twin)
        assert len(asyncio.all_tasks()) <= tasks_before
        # One leaked waiter (future, task, call, closure) per caller would leave >= 5,000 objects behind.
        assert object_growth < 1_000, f"{object_growth} more live objects after the wave"
        assert block_growth < 20_000, f"{block_growth} more allocated blocks after the wave"
        # Coalescing held: at most one round in flight, and each agent saw one collect at a time.
        rounds = stats.rounds_started - rounds_before
        assert stats.max_rounds_in_flight == 1
        assert all(a.max_unanswered == 1 for a in agents)
        assert all(a.round_ids == sorted(a.round_ids) for a in agents)
        assert stats.reports_dropped == 0
        record("load_10k_callers", callers=CALLERS, answered=answered, cancelled=cancelled,
               answered_before_cancel=early, cancelled_while_in_a_round=cancelled_in_round,
               rounds=rounds, joined_callers=stats.callers - callers_before,
               max_rounds_in_flight=stats.max_rounds_in_flight,
               max_collects_unanswered_per_agent=max(a.max_unanswered for a in agents),
               wave_s=round(wave_s, 2), live_object_growth=object_growth, allocated_block_growth=block_growth,
               max_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
    finally:
        for task in agent_tasks:
            task.cancel()
        await asyncio.gather(*agent_tasks, return_exceptions=True)
        for agent in agents:
            await agent.raw.close()
        for channel in channels:
            await channel.close()
