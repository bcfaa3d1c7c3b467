"""Freshness modes of GetLoads over real gRPC: JOIN, NEW_ROUND, CACHED (last round or pushed snapshots)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import grpc
import pytest
from conftest import wait_for
from raw_agent import RawAgent

from loadagg.client.load_client import AsyncLoadClient
from loadagg.v1 import loadagg_pb2 as pb
from loadagg.v1 import loadagg_pb2_grpc as pb_grpc

SLACK_MS = 2  # unix-ms rounding between the aggregator's clocks and ours


@pytest.fixture
async def pushing_agents():
    """Hand-driven agents (real AgentLink streams) that push unsolicited snapshots every `push_interval_ms`.

    They answer collect rounds too, from the same figures, so rounds and pushes both feed the registry.
    """
    agents: list[RawAgent] = []
    tasks: list[asyncio.Task] = []

    async def drive(agent: RawAgent, ranks: list[int], push_interval_ms: int) -> None:
        writing = asyncio.Lock()  # one write at a time on the stream

        async def answer_rounds() -> None:
            while True:
                collect = await agent.next_collect(timeout=3600)
                async with writing:
                    await agent.report(collect.round_id, [_load(r) for r in ranks])

        answering = asyncio.create_task(answer_rounds())
        try:
            while True:
                async with writing:
                    await agent.report(0, [_load(r) for r in ranks])
                await asyncio.sleep(push_interval_ms / 1000)
        finally:
            answering.cancel()

    async def start(aggregator, ranks: list[list[int]], push_interval_ms: int) -> None:
        for i, group in enumerate(ranks):
            agent = RawAgent(aggregator.port, f"pusher-{i}", group, aggregator.config.dp_size)
            await agent.connect()
            agents.append(agent)
            tasks.append(asyncio.create_task(drive(agent, group, push_interval_ms)))

    yield start
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    for agent in agents:
        await agent.close()


def _load(rank: int) -> pb.RankLoad:
    return pb.RankLoad(dp_rank=rank, timestamp_ms=_unix_ms(), num_running_reqs=rank + 1, num_waiting_reqs=0)


def _unix_ms() -> int:
    return time.time_ns() // 1_000_000


async def test_cached_reuses_the_last_round_only_within_max_staleness(start_aggregator, start_agents, channel_to):
    agg = await start_aggregator(dp_size=2)
    await start_agents(agg, [[0], [1]])
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    first = await stub.GetLoads(pb.GetLoadsRequest(), timeout=10)
    assert first.source == pb.ANSWER_SOURCE_ROUND

    cached = await stub.GetLoads(pb.GetLoadsRequest(freshness=pb.FRESHNESS_CACHED, max_staleness_ms=60_000))
    assert cached.source == pb.ANSWER_SOURCE_CACHE and cached.round_id == first.round_id
    assert agg.communicator.stats.rounds_started == 1

    await asyncio.sleep(0.15)
    tight = await stub.GetLoads(pb.GetLoadsRequest(freshness=pb.FRESHNESS_CACHED, max_staleness_ms=100))
    assert tight.source == pb.ANSWER_SOURCE_ROUND and tight.round_id > first.round_id  # too old: a new round
    assert agg.communicator.stats.rounds_started == 2


async def _two_raw_agents(start_aggregator, channel_to, first: str, second: str, round_timeout_ms: int):
    """An aggregator of dp_size 2, a stub to it, and hand-driven agents for rank 0 and rank 1 (not linked yet)."""
    agg = await start_aggregator(dp_size=2, round_timeout_ms=round_timeout_ms)
    return (agg, pb_grpc.LoadAggregatorStub(channel_to(agg.port)), RawAgent(agg.port, first, [0], 2),
            RawAgent(agg.port, second, [1], 2))


async def test_cached_prefers_pushed_snapshots_over_a_round_that_missed_a_rank(start_aggregator, channel_to):
    """The last round ran before rank 1's agent linked. Once that agent has pushed, a CACHED read gets the
    pushed snapshots of both ranks rather than the round's 'rank 1 missing'; before it pushed, the cached
    round is still the answer (a rank that stays down must not turn cached reads into rounds)."""
    agg, stub, early, late = await _two_raw_agents(start_aggregator, channel_to, "early", "late", 2000)
    try:
        await early.connect()
        call = asyncio.ensure_future(stub.GetLoads(pb.GetLoadsRequest(), timeout=10))
        await early.report((await early.next_collect()).round_id, [_load(0)])
        assert list((await call).missing_ranks) == [1]
        cached = pb.GetLoadsRequest(freshness=pb.FRESHNESS_CACHED, max_staleness_ms=60_000)

        await late.connect()  # linked, nothing pushed yet: the round is all there is within the bound
        answer = await stub.GetLoads(cached, timeout=10)
        assert answer.source == pb.ANSWER_SOURCE_CACHE and list(answer.missing_ranks) == [1]

        await late.report(0, [_load(1)])
        await wait_for(lambda: agg.registry.snapshot(1) is not None, what="rank 1's push stored")
        for request in (cached, pb.GetLoadsRequest(freshness=pb.FRESHNESS_CACHED, max_staleness_ms=60_000,
                                                   dp_rank=1)):
            answer = await stub.GetLoads(request, timeout=10)
            assert answer.source == pb.ANSWER_SOURCE_SNAPSHOTS and not answer.missing_ranks
            assert 1 in [load.dp_rank for load in answer.loads]
        assert agg.communicator.stats.rounds_started == 1  # and no round for any of it
    finally:
        await early.close()
        await late.close()


async def test_cached_counts_a_rounds_age_from_its_start_not_its_end(start_aggregator, channel_to):
    """A rank that never answers holds a round open to its 1 s deadline: the other rank's figure is then ~1 s
    old though the round just ended. A CACHED read with a 500 ms bound gets a new round, not that one."""
    agg, stub, quick, silent = await _two_raw_agents(start_aggregator, channel_to, "quick", "silent", 1000)
    try:
        await quick.connect()
        await silent.connect()  # linked, never answers
        call = asyncio.ensure_future(stub.GetLoads(pb.GetLoadsRequest(), timeout=10))
        await quick.report((await quick.next_collect()).round_id, [_load(0)])
        first = await call
        assert first.round_duration_ms >= 900 and list(first.missing_ranks) == [1]
        cached = asyncio.ensure_future(stub.GetLoads(
            pb.GetLoadsRequest(freshness=pb.FRESHNESS_CACHED, max_staleness_ms=500), timeout=10))
        collect = await quick.next_collect()  # a new round: the last one's figures are past the bound
        await quick.report(collect.round_id, [_load(0)])
        answer = await cached
        assert answer.source == pb.ANSWER_SOURCE_ROUND and answer.round_id == collect.round_id > first.round_id
        relaxed = await stub.GetLoads(pb.GetLoadsRequest(freshness=pb.FRESHNESS_CACHED, max_staleness_ms=5000),
                                      timeout=10)
        assert relaxed.source == pb.ANSWER_SOURCE_CACHE and relaxed.round_id == answer.round_id
    finally:
        await quick.close()
        await silent.close()


async def test_cached_keeps_a_round_that_found_a_rank_gone_over_its_earlier_push(start_aggregator, channel_to):
    """Rank 1 pushed, then its agent left; the round after that says rank 1 is missing. A CACHED read gets that
    round, not rank 1's older pushed snapshot served as if the rank were still there."""
    agg, stub, alive, gone = await _two_raw_agents(start_aggregator, channel_to, "alive", "gone", 2000)
    try:
        await alive.connect()
        await gone.connect()
        await gone.report(0, [_load(1)])
        await wait_for(lambda: agg.registry.snapshot(1) is not None, what="rank 1's push stored")
        await gone.close()
        await wait_for(lambda: agg.registry.live_ranks() == {0}, what="rank 1's agent gone")
        call = asyncio.ensure_future(stub.GetLoads(pb.GetLoadsRequest(), timeout=10))
        await alive.report((await alive.next_collect()).round_id, [_load(0)])
        assert list((await call).missing_ranks) == [1]
        for dp_rank in (None, 1):
            request = pb.GetLoadsRequest(freshness=pb.FRESHNESS_CACHED, max_staleness_ms=60_000, dp_rank=dp_rank)
            answer = await stub.GetLoads(request, timeout=10)
            assert answer.source == pb.ANSWER_SOURCE_CACHE and list(answer.missing_ranks) == [1], dp_rank
            assert 1 not in [load.dp_rank for load in answer.loads]
        assert agg.communicator.stats.rounds_started == 1
    finally:
        await alive.close()
        await gone.close()


async def test_cached_never_answers_older_than_max_staleness(start_aggregator, pushing_agents, channel_to):
    agg = await start_aggregator(dp_size=2)
    await pushing_agents(agg, [[0], [1]], push_interval_ms=20)
    await wait_for(lambda: len(agg.registry.snapshots()) == 2, what="pushed snapshots")
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    rng = random.Random(5)
    sources: dict[int, int] = {}
    for _ in range(100):
        bound = rng.choice((5, 30, 80, 300))
        asked = _unix_ms()
        answer = await stub.GetLoads(pb.GetLoadsRequest(freshness=pb.FRESHNESS_CACHED, max_staleness_ms=bound))
        sources[answer.source] = sources.get(answer.source, 0) + 1
        # Every figure was at most `bound` ms old when the aggregator picked the answer (after `asked`).
        if answer.source == pb.ANSWER_SOURCE_SNAPSHOTS:
            assert answer.round_id == 0
            for load in answer.loads:
                assert answer.timestamp_ms - load.age_ms >= asked - bound - SLACK_MS
        elif answer.source == pb.ANSWER_SOURCE_CACHE:
            assert answer.timestamp_ms >= asked - bound - SLACK_MS
        else:
            assert answer.source == pb.ANSWER_SOURCE_ROUND and answer.timestamp_ms >= asked - SLACK_MS
        await asyncio.sleep(rng.uniform(0, 0.04))
    print("answers by source:", {pb.AnswerSource.Name(k): v for k, v in sources.items()},
          "rounds timed out:", agg.communicator.stats.rounds_timed_out)
    assert sources.get(pb.ANSWER_SOURCE_SNAPSHOTS, 0) > 0  # pushes did spare rounds


async def test_snapshots_answer_without_any_round(start_aggregator, pushing_agents, channel_to):
    agg = await start_aggregator(dp_size=3)  # rank 2 has no agent
    await pushing_agents(agg, [[0], [1]], push_interval_ms=30)
    await wait_for(lambda: len(agg.registry.snapshots()) == 2, what="pushed snapshots")
    async with AsyncLoadClient(f"127.0.0.1:{agg.port}") as client:
        one = await client.get_loads(1, max_staleness_ms=5_000)
        assert one.source == "snapshots" and one.round_id == 0
        assert [load.dp_rank for load in one.loads] == [1] and one.loads[0].age_ms <= 5_000
        assert one.age_ms(1) is not None
        assert agg.communicator.stats.rounds_started == 0  # no round at all
        # The whole cluster: rank 2 has no snapshot, so a round is needed (and reports it missing).
        whole = await client.get_loads(max_staleness_ms=5_000)
        assert whole.source == "round" and whole.missing_ranks == (2,)
        assert agg.communicator.stats.rounds_started == 1


async def test_new_round_never_returns_a_round_started_before_the_call(start_aggregator, start_agents, channel_to):
    agg = await start_aggregator(dp_size=2, round_timeout_ms=5000)
    await start_agents(agg, [[0], [1]], collect_latency_ms=300)
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    leader = asyncio.ensure_future(stub.GetLoads(pb.GetLoadsRequest(), timeout=10))
    await wait_for(lambda: agg.communicator.rounds_in_flight == 1, what="a round in flight")
    in_flight_id = next(iter(agg.communicator._rounds))
    joiner = asyncio.ensure_future(stub.GetLoads(pb.GetLoadsRequest(freshness=pb.FRESHNESS_JOIN), timeout=10))
    fresh = asyncio.ensure_future(stub.GetLoads(pb.GetLoadsRequest(freshness=pb.FRESHNESS_NEW_ROUND), timeout=10))
    first, joined, new = await asyncio.gather(leader, joiner, fresh)
    assert first.round_id == joined.round_id == in_flight_id  # JOIN shares the round in flight
    assert new.round_id > in_flight_id and len(new.loads) == 2  # NEW_ROUND waited for the next one
    assert agg.communicator.stats.rounds_started == 2


async def test_every_answer_states_round_source_and_rank_times(start_aggregator, start_agents, channel_to):
    agg = await start_aggregator(dp_size=2)
    await start_agents(agg, [[0], [1]])
    async with AsyncLoadClient(f"127.0.0.1:{agg.port}") as client:
        loads = await client.get_loads(freshness="new_round")
        assert loads.round_id >= 1 and loads.source == "round" and loads.complete
        for load in loads.loads:
            assert load.timestamp_ms > 0 and 0 <= loads.age_ms(load.dp_rank) < 60_000
        with pytest.raises(ValueError):
            await client.get_loads(freshness="soon")


async def test_real_agents_pushes_feed_snapshot_answers(start_aggregator, channel_to):
    """SchedulerAgent's own pushes (push_interval_ms) are enough for CACHED callers: no round at all."""
    from scheduler_agent.agent import SchedulerAgent
    from scheduler_agent.config import AgentConfig
    from scheduler_agent.sources.simulator import SimulatedSource

    agg = await start_aggregator(dp_size=2)
    config = AgentConfig(aggregator=f"127.0.0.1:{agg.port}", dp_ranks=(0, 1), dp_size=2, instance_id="pushing-agent",
                         seed=3, push_interval_ms=50, backoff_initial_ms=20, backoff_max_ms=200)
    task = asyncio.create_task(SchedulerAgent(config, SimulatedSource(seed=3)).run())
    try:
        await wait_for(lambda: len(agg.registry.snapshots()) == 2, what="the agent's first push")
        stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
        answers = [await stub.GetLoads(pb.GetLoadsRequest(freshness=pb.FRESHNESS_CACHED, max_staleness_ms=5_000))
                   for _ in range(5)]
        assert all(a.source == pb.ANSWER_SOURCE_SNAPSHOTS and len(a.loads) == 2 for a in answers)
        assert agg.communicator.stats.rounds_started == 0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def test_new_round_with_a_deadline_too_short_for_a_newer_round_is_refused(start_aggregator, start_agents,
                                                                                channel_to):
    """The round in flight started before the call and outlasts its deadline: the caller gets
    DEADLINE_EXCEEDED saying why, never that older round's partial answer."""
    agg = await start_aggregator(dp_size=2, round_timeout_ms=5000)
    await start_agents(agg, [[0], [1]], collect_latency_ms=1000)
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    leader = asyncio.ensure_future(stub.GetLoads(pb.GetLoadsRequest(), timeout=10))
    await wait_for(lambda: agg.communicator.rounds_in_flight == 1, what="a round in flight")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.GetLoads(pb.GetLoadsRequest(freshness=pb.FRESHNESS_NEW_ROUND), timeout=0.3)
    assert refused.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "FRESHNESS_NEW_ROUND" in refused.value.details() and "started before this call" in refused.value.details()
    assert len((await leader).loads) == 2  # the round itself went on for its own callers


async def test_every_answer_names_the_aggregator_process_that_answered(start_aggregator, start_agents, pushing_agents,
                                                                 channel_to):
    """Round ids count per process: each answer (a round, a cached one, pushed snapshots, a watch) says which
    process gave it, and another process (a restart, another replica) has another id."""
    import socket

    first, second = await start_aggregator(dp_size=1), await start_aggregator(dp_size=1)
    await pushing_agents(first, [[0]], push_interval_ms=20)
    await wait_for(lambda: first.registry.snapshot(0) is not None, what="a push")
    await start_agents(second, [[0]])
    stub = pb_grpc.LoadAggregatorStub(channel_to(first.port))
    answers = [await stub.GetLoads(pb.GetLoadsRequest(), timeout=5),
               await stub.GetLoads(pb.GetLoadsRequest(freshness=pb.FRESHNESS_CACHED, max_staleness_ms=60_000),
                                   timeout=5)]
    first.communicator.last_result = None  # no round to reuse: the pushed snapshots answer
    answers.append(await stub.GetLoads(pb.GetLoadsRequest(freshness=pb.FRESHNESS_CACHED, max_staleness_ms=60_000),
                                       timeout=5))
    watch = stub.WatchLoads(pb.WatchLoadsRequest(interval_ms=50))
    answers.append(await watch.read())
    watch.cancel()
    assert [a.source for a in answers[:3]] == [pb.ANSWER_SOURCE_ROUND, pb.ANSWER_SOURCE_CACHE,
                                              pb.ANSWER_SOURCE_SNAPSHOTS]
    assert {a.aggregator_id for a in answers} == {first.aggregator_id}
    assert first.aggregator_id.startswith(socket.gethostname() + "-")
    other = await pb_grpc.LoadAggregatorStub(channel_to(second.port)).GetLoads(pb.GetLoadsRequest(), timeout=5)
    assert other.aggregator_id == second.aggregator_id != first.aggregator_id
