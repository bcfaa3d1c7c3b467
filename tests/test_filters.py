"""Per-caller views: dp_rank filter, include sections, and clear INVALID_ARGUMENT on bad input."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from raw_agent import RawAgent

from loadagg.v1 import loadagg_pb2 as pb
from loadagg.v1 import loadagg_pb2_grpc as pb_grpc

SECTION_FIELDS = ("memory", "gpu", "spec", "lora", "disagg", "queues")


@pytest.fixture
async def stub(start_aggregator, start_agents, channel_to):
    agg = await start_aggregator(dp_size=4)
    await start_agents(agg, [[0, 1], [2], [3]])
    return pb_grpc.LoadAggregatorStub(channel_to(agg.port))


async def test_dp_rank_filter_returns_exactly_that_rank(stub):
    for rank in range(4):
        response = await stub.GetLoads(pb.GetLoadsRequest(dp_rank=rank), timeout=5)
        assert [load.dp_rank for load in response.loads] == [rank]
        assert response.summary.num_ranks == 1
        assert response.summary.total_running_reqs == response.loads[0].num_running_reqs
        assert response.dp_size == 4


async def test_whole_answer_sorted_with_summary(stub):
    response = await stub.GetLoads(pb.GetLoadsRequest(), timeout=5)
    assert [load.dp_rank for load in response.loads] == [0, 1, 2, 3]
    assert not response.missing_ranks
    assert response.round_id > 0 and response.timestamp_ms > 0
    assert response.source == pb.ANSWER_SOURCE_ROUND
    s = response.summary
    assert s.num_ranks == 4
    assert s.total_running_reqs == sum(l.num_running_reqs for l in response.loads)
    assert s.total_waiting_reqs == sum(l.num_waiting_reqs for l in response.loads)
    assert s.avg_token_usage == pytest.approx(sum(l.token_usage for l in response.loads) / 4)
    assert s.total_gen_throughput == pytest.approx(sum(l.gen_throughput for l in response.loads))


@pytest.mark.parametrize("include", [[], ["all"], ["core", "all"]])
async def test_empty_or_all_include_returns_every_section(stub, include):
    response = await stub.GetLoads(pb.GetLoadsRequest(include=include), timeout=5)
    for load in response.loads:
        assert all(load.HasField(f) for f in SECTION_FIELDS), load
        assert load.HasField("num_running_reqs")


@pytest.mark.parametrize("include", [["core"], ["memory"], ["gpu", "queues"], ["core,spec"], ["LoRA", "disagg"]])
async def test_include_trims_sections(stub, include):
    wanted = {s.strip().lower() for item in include for s in item.split(",")} - {"core"}
    response = await stub.GetLoads(pb.GetLoadsRequest(include=include, dp_rank=2), timeout=5)
    (load,) = response.loads
    assert {f for f in SECTION_FIELDS if load.HasField(f)} == wanted
    assert load.HasField("num_running_reqs") and load.HasField("token_usage")  # core always comes


async def test_filters_do_not_leak_between_callers_of_one_round(stub):
    """One caller trimming its view must not trim the shared result another caller reads."""
    import asyncio

    trimmed, whole = await asyncio.gather(
        stub.GetLoads(pb.GetLoadsRequest(include=["core"]), timeout=5),
        stub.GetLoads(pb.GetLoadsRequest(), timeout=5),
    )
    assert trimmed.round_id == whole.round_id
    assert not any(l.HasField("memory") for l in trimmed.loads)
    assert all(l.HasField("memory") for l in whole.loads)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pb.GetLoadsRequest(dp_rank=4), "dp_rank 4 is out of range"),
        (pb.GetLoadsRequest(dp_rank=-1), "dp_rank -1 is out of range"),
        (pb.GetLoadsRequest(include=["memroy"]), "unknown section 'memroy'"),
        (pb.GetLoadsRequest(include=["core", "bogus"]), "valid sections are"),
        # quoted in part (64 characters): a caller's input never makes a status message long
        (pb.GetLoadsRequest(include=["x" * 200]), "unknown section 'xxxx"),
        # bounded before it is parsed: megabytes of commas (or of "core") held the event loop for everyone
        (pb.GetLoadsRequest(include=["," * 20_000]), "include is too long (20000 characters"),
        (pb.GetLoadsRequest(include=["core"] * 5_000), "include is too long (5000 items"),
        # a bound without FRESHNESS_CACHED would be ignored: the caller meant a cached answer and would not get one
        (pb.GetLoadsRequest(max_staleness_ms=200), "max_staleness_ms (200) applies to FRESHNESS_CACHED only"),
        (pb.GetLoadsRequest(max_staleness_ms=5, freshness=pb.FRESHNESS_NEW_ROUND), "set freshness to FRESHNESS_CACHED"),
    ],
)
async def test_bad_requests_get_invalid_argument(stub, request_, message):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetLoads(request_, timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.details() and len(raised.value.details()) < 300
    # and the server keeps serving
    assert len((await stub.GetLoads(pb.GetLoadsRequest(), timeout=5)).loads) == 4


async def test_totals_too_big_for_the_summary_saturate_instead_of_failing_the_call(start_aggregator, channel_to):
    """Each rank's figure is valid on its own; their sum overflows int64. GetLoads and WatchLoads answer
    with the total saturated (they used to fail with UNKNOWN, and the watch ticker died)."""
    agg = await start_aggregator(dp_size=2, round_timeout_ms=2000)
    agent = RawAgent(agg.port, "huge", [0, 1], dp_size=2)
    await agent.connect()
    huge = [pb.RankLoad(dp_rank=r, num_used_tokens=2**62, max_total_num_tokens=2**62, num_running_reqs=1)
            for r in (0, 1)]
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    try:
        call = asyncio.ensure_future(stub.GetLoads(pb.GetLoadsRequest(), timeout=10))
        await agent.report((await agent.next_collect()).round_id, huge)
        summary = (await call).summary
        assert summary.total_used_tokens == summary.total_max_tokens == 2**63 - 1
        assert summary.total_running_reqs == 2
        watch = stub.WatchLoads(pb.WatchLoadsRequest(interval_ms=50), timeout=10)
        for _ in range(2):  # two ticks in a row: the ticker survives the overflowing sums
            await agent.report((await agent.next_collect()).round_id, huge)
            assert (await watch.read()).summary.total_used_tokens == 2**63 - 1
        watch.cancel()
    finally:
        await agent.close()


@pytest.mark.parametrize(
    "request_", [pb.GetLoadsRequest(include=["," * 2_000_000]), pb.GetLoadsRequest(include=["core"] * 100_000)]
)
async def test_oversized_requests_are_refused_unparsed(stub, request_):
    """Megabytes of `include` are refused by size before parsing: parsing them held the event loop for everyone."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetLoads(request_, timeout=5)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "refused unparsed" in raised.value.details() and len(raised.value.details()) < 300
    assert len((await stub.GetLoads(pb.GetLoadsRequest(), timeout=5)).loads) == 4
