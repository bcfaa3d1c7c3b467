"""sglang's (and vLLM's) gRPC GetLoads contract served by the aggregator, read with smg-grpc-proto's stubs."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from conftest import wait_for
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from smg_grpc_proto import sglang_scheduler_pb2 as sg
from smg_grpc_proto import sglang_scheduler_pb2_grpc as sg_grpc
from smg_grpc_proto import vllm_engine_pb2 as vl
from smg_grpc_proto import vllm_engine_pb2_grpc as vl_grpc

from loadagg.v1 import loadagg_pb2 as pb
from loadagg.v1 import loadagg_pb2_grpc as pb_grpc

SGLANG = "sglang.grpc.scheduler.SglangScheduler"
VLLM = "vllm.grpc.engine.VllmEngine"


async def _services(channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    async for response in call:
        return {s.name for s in response.list_services_response.service}
    return set()


async def test_sglang_stub_reads_the_whole_cluster_in_one_call(start_aggregator, start_agents, channel_to):
    agg = await start_aggregator(dp_size=3)
    await start_agents(agg, [[0], [1]])  # rank 2 has no agent
    channel = channel_to(agg.port)
    response = await sg_grpc.SglangSchedulerStub(channel).GetLoads(sg.GetLoadsRequest(), timeout=10)
    assert response.dp_rank_count == 3  # the cluster's dp_size
    assert response.version.startswith("loadagg-") and "T" in response.timestamp
    assert [load.dp_rank for load in response.loads] == [0, 1]
    result = agg.communicator.last_result
    for load in response.loads:
        ours = result.fresh[load.dp_rank]
        assert load.num_running_reqs == ours.num_running_reqs
        assert load.num_waiting_reqs == ours.num_waiting_reqs
        assert load.num_total_reqs == ours.num_running_reqs + ours.num_waiting_reqs
        assert load.max_total_num_tokens == ours.max_total_num_tokens
        assert load.token_usage == pytest.approx(ours.token_usage)
        assert load.HasField("memory") and load.memory.kv_cache_gb == pytest.approx(ours.memory.kv_cache_gb)
        assert load.HasField("speculative") == ours.HasField("spec")
        assert load.HasField("disaggregation") == ours.HasField("disagg")
    aggregate = response.aggregate
    assert aggregate.total_running_reqs == sum(load.num_running_reqs for load in response.loads)
    assert aggregate.total_reqs == sum(load.num_total_reqs for load in response.loads)
    assert aggregate.avg_token_usage == pytest.approx(sum(x.token_usage for x in response.loads) / 2, abs=1e-4)


async def test_sglang_stub_filtered_by_rank_and_sections(start_aggregator, start_agents, channel_to):
    agg = await start_aggregator(dp_size=2)
    await start_agents(agg, [[0, 1]])
    stub = sg_grpc.SglangSchedulerStub(channel_to(agg.port))
    response = await stub.GetLoads(sg.GetLoadsRequest(dp_rank=1, include=["core"]), timeout=10)
    (load,) = response.loads
    assert load.dp_rank == 1 and response.dp_rank_count == 2
    assert not any(load.HasField(s) for s in ("memory", "speculative", "lora", "disaggregation", "queues"))
    assert response.aggregate.total_running_reqs == load.num_running_reqs
    response = await stub.GetLoads(sg.GetLoadsRequest(include=["memory", "queues"]), timeout=10)
    assert all(x.HasField("memory") and x.HasField("queues") and not x.HasField("lora") for x in response.loads)
    for request, words in ((sg.GetLoadsRequest(dp_rank=2), "out of range"),
                           (sg.GetLoadsRequest(include=["everything"]), "unknown section")):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetLoads(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in info.value.details()


async def test_sglang_get_loads_is_coalesced_with_loadagg_callers(start_aggregator, start_agents, channel_to):
    agg = await start_aggregator(dp_size=2, round_timeout_ms=5000)
    await start_agents(agg, [[0], [1]], collect_latency_ms=300)
    channel = channel_to(agg.port)
    ours = asyncio.ensure_future(pb_grpc.LoadAggregatorStub(channel).GetLoads(pb.GetLoadsRequest(), timeout=10))
    await wait_for(lambda: agg.communicator.rounds_in_flight == 1, what="a round in flight")
    theirs = await asyncio.gather(*(sg_grpc.SglangSchedulerStub(channel).GetLoads(sg.GetLoadsRequest(), timeout=10)
                                    for _ in range(20)))
    assert len((await ours).loads) == 2 and all(len(r.loads) == 2 for r in theirs)
    assert agg.communicator.stats.rounds_started == 1
    assert len({r.SerializeToString() for r in theirs}) == 1  # one serialization shared by all 20


async def test_other_sglang_rpcs_are_unimplemented_naming_loadagg(start_aggregator, channel_to):
    agg = await start_aggregator(dp_size=1)
    stub = sg_grpc.SglangSchedulerStub(channel_to(agg.port))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Abort(sg.AbortRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED and "loadagg" in info.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.Generate(sg.GenerateRequest(), timeout=10):
            pass
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED and "Generate" in info.value.details()


async def test_vllm_stub_reads_the_cluster_too(start_aggregator, start_agents, channel_to):
    agg = await start_aggregator(dp_size=2)
    await start_agents(agg, [[0], [1]])
    response = await vl_grpc.VllmEngineStub(channel_to(agg.port)).GetLoads(vl.GetLoadsRequest(dp_rank=0), timeout=10)
    assert response.dp_rank_count == 2 and [x.dp_rank for x in response.loads] == [0]
    assert response.loads[0].num_running_reqs == agg.communicator.last_result.fresh[0].num_running_reqs


async def test_reflection_lists_the_compat_services_and_the_flag_turns_them_off(start_aggregator, channel_to):
    on = await start_aggregator(dp_size=1)
    assert {SGLANG, VLLM, "loadagg.v1.LoadAggregator"} <= await _services(channel_to(on.port))
    off = await start_aggregator(dp_size=1, sglang_compat=False, vllm_compat=False)
    channel = channel_to(off.port)
    assert not {SGLANG, VLLM} & await _services(channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await sg_grpc.SglangSchedulerStub(channel).GetLoads(sg.GetLoadsRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
