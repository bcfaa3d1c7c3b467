"""Round ids keep rounds apart: a late reply for an old round never shows up in a newer one."""

from __future__ import annotations

import asyncio

from conftest import wait_for
from raw_agent import RawAgent

from loadagg.v1 import loadagg_pb2 as pb
from loadagg.v1 import loadagg_pb2_grpc as pb_grpc


async def test_late_reply_for_old_round_is_dropped(start_aggregator, channel_to):
    agg = await start_aggregator(dp_size=1, round_timeout_ms=500)
    agent = RawAgent(agg.port, "slow", [0], dp_size=1)
    await agent.connect()
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    try:
        # Round 1: the agent does not answer in time; the caller gets rank 0 missing.
        first_call = asyncio.ensure_future(stub.GetLoads(pb.GetLoadsRequest(), timeout=5))
        old = await agent.next_collect()
        first = await first_call
        assert first.round_id == old.round_id and first.missing_ranks == [0] and not first.loads

        # Round 2 starts; the agent now answers round 1 late (marker: 111 running), then round 2 (222).
        second_call = asyncio.ensure_future(stub.GetLoads(pb.GetLoadsRequest(), timeout=5))
        new = await agent.next_collect()
        assert new.round_id > old.round_id
        await agent.report(old.round_id, [pb.RankLoad(dp_rank=0, num_running_reqs=111)])
        await asyncio.sleep(0.02)
        await agent.report(new.round_id, [pb.RankLoad(dp_rank=0, num_running_reqs=222)])
        second = await second_call
        assert second.round_id == new.round_id
        assert [l.num_running_reqs for l in second.loads] == [222]
        assert agg.communicator.stats.reports_dropped == 1

        # A late reply arriving after its round ended is in no answer of that round, but its figures are the
        # agent's newest: they refresh the rank's last-known snapshot, as a push would.
        third_call = asyncio.ensure_future(stub.GetLoads(pb.GetLoadsRequest(allow_stale=True), timeout=5))
        third_collect = await agent.next_collect()
        third = await third_call
        assert third.missing_ranks == [0]
        assert [(l.num_running_reqs, l.stale) for l in third.loads] == [(222, True)]
        await agent.report(third_collect.round_id, [pb.RankLoad(dp_rank=0, num_running_reqs=333)])
        await wait_for(lambda: agg.communicator.stats.reports_dropped == 2, what="the late reply seen and dropped")
        assert agg.registry.snapshot(0).load.num_running_reqs == 333
        assert third.round_id == third_collect.round_id and [l.num_running_reqs for l in third.loads] == [222]
    finally:
        await agent.close()


async def test_reply_only_counts_for_the_ranks_the_agent_serves(start_aggregator, channel_to):
    agg = await start_aggregator(dp_size=2, round_timeout_ms=300)
    a0 = RawAgent(agg.port, "a0", [0])
    a1 = RawAgent(agg.port, "a1", [1])
    await a0.connect()
    await a1.connect()
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    try:
        call = asyncio.ensure_future(stub.GetLoads(pb.GetLoadsRequest(), timeout=5))
        collect = await a0.next_collect()
        await a1.next_collect()
        # a0 answers for itself and pretends to answer for rank 1 too: rank 1's entry is refused (as not served,
        # or, past the one rank a0 serves, unread).
        await a0.report(collect.round_id, [pb.RankLoad(dp_rank=0, num_running_reqs=1), pb.RankLoad(dp_rank=1,
                                                                                                   num_running_reqs=9)])
        rejection = await a0.read()
        assert rejection.WhichOneof("kind") == "rejected" and "refused unread" in rejection.rejected.reason
        await a0.report(collect.round_id, [pb.RankLoad(dp_rank=1, num_running_reqs=9)])
        rejection = await a0.read()
        assert rejection.WhichOneof("kind") == "rejected" and "not served by this agent" in rejection.rejected.reason
        response = await call
        assert [l.dp_rank for l in response.loads] == [0]
        assert response.missing_ranks == [1]
    finally:
        await a0.close()
        await a1.close()
