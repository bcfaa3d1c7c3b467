"""Watching mode: concurrent GetLoads share rounds. Queueing mode: one round per caller."""

from __future__ import annotations

import asyncio
import time

import grpc

from loadagg.v1 import loadagg_pb2 as pb
from loadagg.v1 import loadagg_pb2_grpc as pb_grpc

COLLECT_MS = 20


async def test_1000_concurrent_callers_share_a_handful_of_rounds(start_aggregator, start_agents, channel_to):
    agg = await start_aggregator(dp_size=4, mode="watching", round_timeout_ms=2000)
    agents = await start_agents(agg, [[0], [1], [2], [3]], collect_latency_ms=COLLECT_MS)
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    await stub.GetLoads(pb.GetLoadsRequest(), timeout=10)  # warm the channel
    before = [a.collects_received for a in agents]
    rounds_before = agg.communicator.stats.rounds_started

    started = time.monotonic()
    responses = await asyncio.gather(*(stub.GetLoads(pb.GetLoadsRequest(), timeout=30) for _ in range(1000)))
    wall = time.monotonic() - started

    assert len(responses) == 1000
    assert all(len(r.loads) == 4 and not r.missing_ranks for r in responses)
    rounds = agg.communicator.stats.rounds_started - rounds_before
    collects = [a.collects_received - b for a, b in zip(agents, before, strict=False)]
    round_ids = {r.round_id for r in responses}
    print(f"watching: 1000 callers, {rounds} rounds, collects per agent {collects}, wall {wall:.3f}s")
    # Never two rounds at once, however fast the callers arrived; each agent saw one collect per round.
    assert rounds == len(round_ids)
    assert agg.communicator.stats.max_rounds_in_flight == 1
    assert all(c == rounds for c in collects)
    assert 1000 / rounds >= 10, f"only {1000 / rounds:.1f} callers per round"
    # The callers that shared a round got the very same answer.
    by_round: dict[int, set[bytes]] = {}
    for r in responses:
        by_round.setdefault(r.round_id, set()).add(r.SerializeToString())
    assert all(len(answers) == 1 for answers in by_round.values())


async def test_queueing_mode_sends_one_round_per_caller(start_aggregator, start_agents, channel_to):
    agg = await start_aggregator(dp_size=4, mode="queueing", round_timeout_ms=2000)
    agents = await start_agents(agg, [[0], [1], [2], [3]], collect_latency_ms=COLLECT_MS)
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    callers = 30
    responses = await asyncio.gather(*(stub.GetLoads(pb.GetLoadsRequest(), timeout=30) for _ in range(callers)))
    assert all(len(r.loads) == 4 for r in responses)
    assert len({r.round_id for r in responses}) == callers
    assert agg.communicator.stats.rounds_started == callers
    assert [a.collects_received for a in agents] == [callers] * 4
    print(f"queueing: {callers} callers, {agg.communicator.stats.rounds_started} rounds")


async def test_caller_cancelling_does_not_cancel_the_round(start_aggregator, start_agents, channel_to):
    agg = await start_aggregator(dp_size=2, round_timeout_ms=2000)
    await start_agents(agg, [[0], [1]], collect_latency_ms=200)
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    leader = stub.GetLoads(pb.GetLoadsRequest(), timeout=10)
    await asyncio.sleep(0.05)
    joiner = asyncio.ensure_future(stub.GetLoads(pb.GetLoadsRequest(), timeout=10))
    await asyncio.sleep(0.05)
    leader.cancel()  # the round's leader gives up...
    response = await joiner  # ...the joiner still gets the full round
    assert len(response.loads) == 2 and not response.missing_ranks
    assert agg.communicator.stats.rounds_started == 1
    assert agg.communicator.stats.rounds_timed_out == 0


async def test_queueing_callers_waiting_for_their_turn_keep_their_deadline(start_aggregator, start_agents,
                                                                         channel_to):
    """Queueing mode: the time spent waiting for a turn counts against each caller's deadline. A caller whose
    turn comes in time gets its own round; the others get DEADLINE_EXCEEDED from the server, in time."""
    agg = await start_aggregator(dp_size=1, mode="queueing", round_timeout_ms=2000)
    await start_agents(agg, [[0]], collect_latency_ms=300)
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    calls = [stub.GetLoads(pb.GetLoadsRequest(), timeout=0.5) for _ in range(4)]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    answered = [o for o in outcomes if isinstance(o, pb.GetLoadsResponse)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(answered) + len(refused) == 4 and any(len(a.loads) == 1 for a in answered)  # the first turn fits
    assert all(e.code() == grpc.StatusCode.DEADLINE_EXCEEDED for e in refused) and len(refused) >= 2
    assert any("turn did not come" in e.details() for e in refused)  # the server said why, in time
    assert agg.communicator.stats.rounds_started <= 2  # no round for a caller whose time was up


async def test_a_round_that_ends_at_once_counts_its_leader(start_aggregator, channel_to):
    agg = await start_aggregator(dp_size=2)  # no agent linked: nothing to wait for
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    response = await stub.GetLoads(pb.GetLoadsRequest(), timeout=5)
    assert response.missing_ranks == [0, 1] and response.round_callers == 1
