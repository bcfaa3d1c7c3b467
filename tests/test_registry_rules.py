"""Registry rules over real gRPC, driven by hand-written AgentLink peers (RawAgent)."""

from __future__ import annotations

import asyncio
import logging
import math

import grpc
import pytest
from conftest import wait_for
from raw_agent import RawAgent

from loadagg.v1 import loadagg_pb2 as pb
from loadagg.v1 import loadagg_pb2_grpc as pb_grpc


async def _refusal(agent: RawAgent) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await agent.connect()
    return refused.value


async def test_second_live_agent_for_a_held_rank_gets_already_exists(start_aggregator, channel_to):
    agg = await start_aggregator(dp_size=4, round_timeout_ms=2000)
    holder = RawAgent(agg.port, "holder", [0, 1], dp_size=4)
    intruder = RawAgent(agg.port, "intruder", [1, 2], dp_size=4)
    try:
        await holder.connect()
        error = await _refusal(intruder)
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "dp rank 1" in error.details() and "'holder'" in error.details()
        assert agg.registry.live_ranks() == {0, 1}  # all or nothing: rank 2 was not taken either
        # The holder still serves: a round reaches it alone, and ranks 2, 3 are missing at once.
        stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
        call = asyncio.ensure_future(stub.GetLoads(pb.GetLoadsRequest(), timeout=10))
        collect = await holder.next_collect()
        await holder.report(collect.round_id, [pb.RankLoad(dp_rank=0, num_running_reqs=1),
                                               pb.RankLoad(dp_rank=1, num_running_reqs=2)])
        response = await call
        assert [l.num_running_reqs for l in response.loads] == [1, 2]
        assert list(response.missing_ranks) == [2, 3]
        assert agg.communicator.stats.rounds_timed_out == 0
    finally:
        await holder.close()
        await intruder.close()


async def test_same_instance_reconnecting_replaces_its_old_stream(start_aggregator, channel_to):
    agg = await start_aggregator(dp_size=2, round_timeout_ms=2000)
    old = RawAgent(agg.port, "agent-a", [0], dp_size=2)
    new = RawAgent(agg.port, "agent-a", [0, 1], dp_size=2)  # same instance, now serving one more rank
    try:
        await old.connect()
        old_session = agg.registry.owner(0)
        welcome = await new.connect()
        assert welcome.WhichOneof("kind") == "welcome"
        with pytest.raises(grpc.aio.AioRpcError) as ended:  # ABORTED, naming what took over (agents back off)
            await old.read()
        assert ended.value.code() == grpc.StatusCode.ABORTED
        details = ended.value.details()
        assert "a newer link of instance 'agent-a'" in details and "--instance-id" in details
        assert agg.registry.owner(0) is not old_session and len(agg.registry.sessions()) == 1
        stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
        call = asyncio.ensure_future(stub.GetLoads(pb.GetLoadsRequest(), timeout=10))
        collect = await new.next_collect()
        await new.report(collect.round_id, [pb.RankLoad(dp_rank=0, num_running_reqs=7),
                                            pb.RankLoad(dp_rank=1, num_running_reqs=8)])
        response = await call
        assert [l.num_running_reqs for l in response.loads] == [7, 8] and not response.missing_ranks
    finally:
        await old.close()
        await new.close()


async def test_a_replaced_link_of_thousands_of_ranks_still_ends_aborted(start_aggregator):
    """The status that ends a replaced link quotes a bounded part of its id and ranks: all 4000 of them would
    pass gRPC's 16 KiB trailer limit and turn ABORTED (what the agent backs off on) into RESOURCE_EXHAUSTED."""
    ranks = list(range(4000))
    agg = await start_aggregator(dp_size=len(ranks))
    old = RawAgent(agg.port, "x" * 256, ranks, dp_size=len(ranks))
    new = RawAgent(agg.port, "x" * 256, ranks, dp_size=len(ranks))
    try:
        await old.connect()
        await new.connect()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while True:
                await old.read()
        assert ended.value.code() == grpc.StatusCode.ABORTED
        assert "(256 characters)" in ended.value.details() and "(+3990 more)" in ended.value.details()
    finally:
        await old.close()
        await new.close()


async def test_an_agent_relinking_during_a_round_is_asked_again_not_called_missing(start_aggregator, channel_to):
    """Agent X re-links while a round waits for its ranks 0 and 1: the round keeps waiting for them, the new
    link is sent the round's collect, and its answer counts; a rank the new link dropped is given up."""
    agg = await start_aggregator(dp_size=4, round_timeout_ms=5000)
    old = RawAgent(agg.port, "X", [0, 1, 3], dp_size=4)
    other = RawAgent(agg.port, "Y", [2], dp_size=4)
    new = RawAgent(agg.port, "X", [0, 1], dp_size=4)  # same instance; rank 3 is no longer served
    try:
        await old.connect()
        await other.connect()
        stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
        call = asyncio.ensure_future(stub.GetLoads(pb.GetLoadsRequest(), timeout=10))
        first = await old.next_collect()
        await other.report((await other.next_collect()).round_id, [pb.RankLoad(dp_rank=2, num_running_reqs=2)])
        await new.connect()
        asked = await new.next_collect()
        assert asked.round_id == first.round_id and not call.done()
        rnd = agg.communicator._rounds[first.round_id]
        assert rnd.waiting_for == {0, 1}  # rank 3 lost its agent: given up; 0 and 1 changed link: still awaited
        await new.report(asked.round_id, [pb.RankLoad(dp_rank=0, num_running_reqs=7),
                                          pb.RankLoad(dp_rank=1, num_running_reqs=8)])
        response = await call
        assert response.round_id == first.round_id and list(response.missing_ranks) == [3]
        assert [(l.dp_rank, l.num_running_reqs) for l in response.loads] == [(0, 7), (1, 8), (2, 2)]
        assert agg.communicator.stats.rounds_timed_out == 0
    finally:
        for agent in (old, other, new):
            await agent.close()


async def test_a_rank_is_free_again_once_its_agent_disconnects(start_aggregator):
    agg = await start_aggregator(dp_size=1)
    first = RawAgent(agg.port, "first", [0])
    second = RawAgent(agg.port, "second", [0])
    try:
        await first.connect()
        await first.close()
        await wait_for(lambda: not agg.registry.live_ranks(), what="rank 0 to be released")
        assert (await second.connect()).WhichOneof("kind") == "welcome"
        assert agg.registry.owner(0).instance_id == "second"
    finally:
        await second.close()


@pytest.mark.parametrize(
    ("hello", "reason"),
    [
        (pb.AgentHello(instance_id="a", dp_ranks=[4]), "outside [0, 4)"),
        (pb.AgentHello(instance_id="a", dp_ranks=[0, -1]), "outside [0, 4)"),
        (pb.AgentHello(instance_id="a", dp_ranks=[0], dp_size=8), "dp_size=8"),
        (pb.AgentHello(instance_id="a", dp_ranks=[0], dp_size=-4), "dp_size=-4"),
        (pb.AgentHello(instance_id="a"), "dp_ranks is empty"),
        (pb.AgentHello(instance_id="a", dp_ranks=[2, 2]), "repeats a rank"),
        (pb.AgentHello(instance_id="a", dp_ranks=range(3, 3003)), "outside [0, 4)"),  # 2,999 ranks: not all quoted
        (pb.AgentHello(instance_id="a", dp_ranks=[1] * 3000), "repeats a rank: [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, ... "),
        (pb.AgentHello(dp_ranks=[0]), "instance_id"),
        (pb.AgentHello(instance_id="x" * 300, dp_ranks=[0]), "instance_id"),
    ],
)
async def test_invalid_hello_gets_invalid_argument(start_aggregator, hello, reason):
    agg = await start_aggregator(dp_size=4)
    agent = RawAgent(agg.port, "", [], dp_size=4)
    agent.hello = hello
    try:
        error = await _refusal(agent)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason in error.details() and len(error.details()) < 300
        assert not agg.registry.live_ranks()
    finally:
        await agent.close()
    good = RawAgent(agg.port, "good", [3], dp_size=4)  # the server keeps serving
    try:
        assert (await good.connect()).WhichOneof("kind") == "welcome"
    finally:
        await good.close()


async def test_first_message_must_be_a_hello(start_aggregator):
    agg = await start_aggregator(dp_size=1)
    agent = RawAgent(agg.port, "a", [0])
    try:
        await agent.report(1, [pb.RankLoad(dp_rank=0)])
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await agent.read()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "first AgentMessage must be a hello" in refused.value.details()
    finally:
        await agent.close()


BAD_LOADS = [
    (pb.RankLoad(dp_rank=0, num_running_reqs=-3), "num_running_reqs is negative"),
    (pb.RankLoad(dp_rank=0, num_used_tokens=-1), "num_used_tokens is negative"),
    (pb.RankLoad(dp_rank=0, token_usage=math.nan), "token_usage is nan"),
    (pb.RankLoad(dp_rank=0, gen_throughput=math.inf), "gen_throughput is inf"),
    (pb.RankLoad(dp_rank=0, cache_hit_rate=1.2), "must be a ratio"),
    (pb.RankLoad(dp_rank=0, utilization=-0.1), "utilization is negative"),
    (pb.RankLoad(dp_rank=0, queues=pb.QueueMetrics(waiting=-1)), "queues.waiting is negative"),
    (pb.RankLoad(dp_rank=0, lora=pb.LoraMetrics(utilization=7)), "lora.utilization must be a ratio"),
    (pb.RankLoad(dp_rank=0, gpu=pb.GpuMetrics(devices=[pb.GpuDevice(index=0, temperature_c=math.nan)])),
     "gpu[0].temperature_c is nan"),
    (pb.RankLoad(dp_rank=0, stale=True, age_ms=5), "set by the aggregator"),
    (pb.RankLoad(dp_rank=0, active_token_usage=1.5), "active_token_usage must be a ratio"),
    (pb.RankLoad(dp_rank=0, prefill_throughput=-3.0), "prefill_throughput is negative"),
    (pb.RankLoad(dp_rank=0, num_active_tokens=-1), "num_active_tokens is negative"),
    (pb.RankLoad(dp_rank=0, accelerator="x" * 300), "accelerator is 300 characters"),
]


@pytest.mark.parametrize(("bad", "reason"), BAD_LOADS, ids=[r for _, r in BAD_LOADS])
async def test_impossible_reports_are_rejected_and_never_stored(start_aggregator, channel_to, bad, reason):
    agg = await start_aggregator(dp_size=2, round_timeout_ms=3000)
    agent = RawAgent(agg.port, "a", [0, 1], dp_size=2)
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    try:
        await agent.connect()
        # A good push first, so rank 0 has a known snapshot the bad report must not replace.
        await agent.report(0, [pb.RankLoad(dp_rank=0, num_running_reqs=5)])
        await wait_for(lambda: agg.registry.snapshot(0) is not None, what="the good push")
        call = asyncio.ensure_future(stub.GetLoads(pb.GetLoadsRequest(allow_stale=True), timeout=10))
        collect = await agent.next_collect()
        await agent.report(collect.round_id, [bad, pb.RankLoad(dp_rank=1, num_running_reqs=9)])
        rejected = (await agent.read()).rejected
        assert (rejected.round_id, rejected.dp_rank) == (collect.round_id, 0) and reason in rejected.reason
        response = await call
        # Rank 0 counts as failed: the round does not wait for it; its last good snapshot is offered, marked.
        assert agg.communicator.stats.rounds_timed_out == 0
        assert list(response.missing_ranks) == [0]
        assert [(l.dp_rank, l.num_running_reqs, l.stale) for l in response.loads] == [(0, 5, True), (1, 9, False)]
        assert agg.registry.snapshot(0).load.num_running_reqs == 5
        # A bad push (round 0) is refused the same way.
        await agent.report(0, [bad])
        assert reason in (await agent.read()).rejected.reason
        assert agg.registry.snapshot(0).load.num_running_reqs == 5
        assert agg.agents.reports_rejected == 2
    finally:
        await agent.close()


async def test_a_source_stuck_on_an_impossible_figure_is_warned_about_once_per_interval(start_aggregator, caplog):
    """Each refusal goes to the agent (a `rejected` message), but the aggregator's log gets one warning per
    link per interval, counting what it left out: 200 identical bad pushes used to write 200 warnings."""
    caplog.set_level(logging.DEBUG, logger="loadagg.server.agent_link")
    agg = await start_aggregator(dp_size=1)
    agent = RawAgent(agg.port, "stuck", [0], dp_size=1)
    try:
        await agent.connect()
        for _ in range(200):
            await agent.report(0, [pb.RankLoad(dp_rank=0, num_running_reqs=-1)])
        for _ in range(200):
            assert (await agent.read()).WhichOneof("kind") == "rejected"
        session = agg.registry.owner(0)
        session.rejection_warnings.warned_at -= session.rejection_warnings.every_s  # the interval has passed
        await agent.report(0, [pb.RankLoad(dp_rank=0, num_running_reqs=-1)])
        await agent.read()
    finally:
        await agent.close()
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "loadagg.server.agent_link" and r.levelno == logging.WARNING
                and "rejected report" in r.getMessage()]
    assert len(warnings) == 2 and "(and 199 more refused since the last warning)" in warnings[1]
    assert agg.agents.reports_rejected == 201


async def test_a_link_that_never_says_hello_is_closed(start_aggregator):
    """A connection that holds a link slot without a hello (slowloris) is closed at the hello deadline."""
    agg = await start_aggregator(dp_size=1, hello_timeout_ms=300)
    silent = RawAgent(agg.port, "silent", [0])
    try:
        await wait_for(lambda: agg.guard.agent_links == 1, what="the silent link to open")
        with pytest.raises(grpc.aio.AioRpcError) as closed:
            await silent.read(timeout=10)
        assert closed.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no hello within" in closed.value.details()
        await wait_for(lambda: agg.guard.agent_links == 0, what="the slot to be freed")
    finally:
        await silent.close()
