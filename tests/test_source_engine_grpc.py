"""Engines in gRPC mode: real grpc.aio stand-ins on smg-grpc-proto's servicer base classes."""

from __future__ import annotations

import asyncio
import logging
import math

import pytest
from agent_tasks import engine_agent, get_loads, running
from conftest import wait_for
from engines import SglangGrpcEngine, VllmGrpcEngine, serve_grpc

from scheduler_agent.config import AgentConfig
from scheduler_agent.sources import build_source
from scheduler_agent.sources.engine_grpc import EngineGrpcSource, load_from_scheduler_load
from scheduler_agent.sources.gpu import WithGpuTelemetry
from scheduler_agent.sources.smg_stream import SmgStreamSource


def test_presence_rules_for_protos_without_presence():
    sglang = SglangGrpcEngine(dp_size=1).response().loads[0]
    load = load_from_scheduler_load(sglang, "sglang", now_ms=5)
    assert load.num_running_reqs == 5 and load.max_total_num_tokens == 262144
    assert load.HasField("gen_throughput") and load.gen_throughput == 0.0  # sglang fills every core figure
    # 0 uncached tokens beside 2 waiting requests: some sglang servicers never fill the field, so not a 0
    assert not load.HasField("num_waiting_uncached_tokens")
    sglang.num_waiting_uncached_tokens = 640
    assert load_from_scheduler_load(sglang, "sglang", now_ms=5).num_waiting_uncached_tokens == 640
    sglang.num_waiting_uncached_tokens, sglang.num_waiting_reqs = 0, 0
    idle = load_from_scheduler_load(sglang, "sglang", now_ms=5)
    assert idle.HasField("num_waiting_uncached_tokens") and idle.num_waiting_uncached_tokens == 0  # nothing waits
    sglang.utilization = -1.0  # a PD prefill server: "does not apply"
    prefill = load_from_scheduler_load(sglang, "sglang", now_ms=5)
    assert not prefill.HasField("utilization") and prefill.num_running_reqs == 5
    assert load.memory.weight_gb == 15.3 and load.disagg.mode == "prefill" and load.queues.waiting == 2
    assert not load.HasField("spec") and not load.HasField("lora")  # sections the engine left out

    vllm = VllmGrpcEngine(dp_size=1).response().loads[0]
    load = load_from_scheduler_load(vllm, "vllm", now_ms=5)
    assert (load.num_running_reqs, load.num_waiting_reqs, load.num_total_reqs) == (3, 0, 3)
    assert load.HasField("num_waiting_reqs")  # request counts: 0 means 0
    assert load.token_usage == 0.25
    for unknown in ("max_total_num_tokens", "num_used_tokens", "gen_throughput", "cache_hit_rate", "utilization",
                    "max_running_requests", "num_waiting_uncached_tokens"):
        assert not load.HasField(unknown), unknown  # vLLM's "0 = not filled in" stays unset


def test_cli_engine_urls_pick_the_grpc_source():
    source = build_source(AgentConfig(source="vllm", engine_url="grpc://127.0.0.1:30001", ranks_from_engine=True,
                                      dp_ranks=(), gpu="off", engine_stream="off"))
    assert isinstance(source, EngineGrpcSource) and source.flavor == "vllm" and source.target == "127.0.0.1:30001"
    wrapped = build_source(AgentConfig(source="sglang", engine_url="grpc://127.0.0.1:30001", dp_ranks=(),
                                       ranks_from_engine=True))
    assert isinstance(wrapped, WithGpuTelemetry) and isinstance(wrapped.inner, SmgStreamSource)
    assert wrapped.inner.polling.flavor == "sglang"  # the load stream, GetLoads beside it
    tokenspeed = build_source(AgentConfig(source="tokenspeed", dp_ranks=(), ranks_from_engine=True, gpu="off"))
    assert tokenspeed.polling.flavor == "tokenspeed" and tokenspeed.polling.target == "127.0.0.1:30000"
    with pytest.raises(ValueError, match="TokenSpeed is read over gRPC"):
        build_source(AgentConfig(source="tokenspeed", engine_url="http://x:1", dp_ranks=(), ranks_from_engine=True))


async def test_sglang_grpc_engine_one_call_per_round_faults_and_recovery(start_aggregator, channel_to, caplog):
    caplog.set_level(logging.INFO, logger="scheduler_agent.source")
    engine = SglangGrpcEngine(dp_size=3)
    server, port = await serve_grpc(engine)
    agg = await start_aggregator(dp_size=3, round_timeout_ms=1000)
    agent = engine_agent(agg.port, EngineGrpcSource(f"127.0.0.1:{port}", "sglang"))
    channel = channel_to(agg.port)
    try:
        async with running(agent):
            await wait_for(lambda: agg.registry.live_ranks() == {0, 1, 2}, what="engine ranks registered")
            assert agent.engine.dp_size == 3 and agent.dp_size == 0  # the hello takes the aggregator's size
            calls = engine.calls
            response = await get_loads(channel)
            assert [l.num_running_reqs for l in response.loads] == [5, 6, 7]
            assert engine.calls - calls == 1 and list(engine.requests[-1].include) == ["all"]
            assert response.loads[0].memory.kv_cache_gb == 40.0 and not response.loads[1].HasField("memory")

            for mode in ("error", "hang", "garbage"):
                engine.set_mode(mode)
                caplog.clear()
                answers = [await get_loads(channel) for _ in range(3)]
                assert all(r.missing_ranks == [0, 1, 2] for r in answers), mode
                assert len([r for r in caplog.records if r.name == "scheduler_agent.source"
                            and r.levelno == logging.WARNING]) == 1, caplog.text
                engine.set_mode("ok")
                response = await get_loads(channel)
                assert not response.missing_ranks, mode
                assert all(l.num_running_reqs >= 0 and not math.isnan(l.token_usage) for l in response.loads)

            await server.stop(0)  # engine down
            assert (await get_loads(channel)).missing_ranks == [0, 1, 2]
            server, _ = await serve_grpc(engine, port)  # back on the same port
            for _ in range(100):  # the engine channel reconnects within its (short) backoff
                if not (await get_loads(channel)).missing_ranks:
                    break
                await asyncio.sleep(0.1)
            assert not (await get_loads(channel)).missing_ranks
            assert agent.connects == 1
    finally:
        await server.stop(0)


async def test_vllm_grpc_engine_garbage_on_one_rank_fails_only_that_rank(start_aggregator, channel_to, caplog):
    caplog.set_level(logging.WARNING, logger="scheduler_agent.source")
    engine = VllmGrpcEngine(dp_size=2)
    server, port = await serve_grpc(engine)
    agg = await start_aggregator(dp_size=2, round_timeout_ms=1000)
    agent = engine_agent(agg.port, EngineGrpcSource(f"127.0.0.1:{port}", "vllm"))
    try:
        async with running(agent):
            await wait_for(lambda: agg.registry.live_ranks() == {0, 1}, what="ranks registered")
            response = await get_loads(channel_to(agg.port))
            assert [l.dp_rank for l in response.loads] == [0, 1] and response.loads[1].token_usage == 0.25
            assert not response.loads[0].HasField("gen_throughput")
            engine.set_mode("garbage")  # rank 0's waiting count turns negative
            for _ in range(2):
                response = await get_loads(channel_to(agg.port))
                assert response.missing_ranks == [0] and [l.dp_rank for l in response.loads] == [1]
            assert "rank 0 num_waiting_reqs is negative" in caplog.text
            assert len([r for r in caplog.records if r.name == "scheduler_agent.source"]) == 1, caplog.text
            for mode in ("error", "hang"):
                engine.set_mode(mode)
                assert (await get_loads(channel_to(agg.port))).missing_ranks == [0, 1], mode
                engine.set_mode("ok")
                assert not (await get_loads(channel_to(agg.port))).missing_ranks, mode
    finally:
        await server.stop(0)


async def test_a_rank_listed_twice_by_the_engine_fails_alone():
    """Two SchedulerLoads claim rank 0 (a gateway in front of several servers): which is it? Neither: rank 0
    fails with the reason, rank 1 is read (the last entry used to win silently)."""
    from scheduler_agent.sources.base import PartialRead

    engine = SglangGrpcEngine(dp_size=2)
    twice = engine.response()
    twice.loads.append(twice.loads[0])  # rank 0 again, from "another server"
    twice.loads[-1].num_running_reqs = 40
    engine.response = lambda garbage=False: twice
    server, port = await serve_grpc(engine)
    source = EngineGrpcSource(f"127.0.0.1:{port}", "sglang")
    try:
        with pytest.raises(PartialRead) as partial:
            await source.read([0, 1])
        assert list(partial.value.loads) == [1] and "dp rank 0 appears more than once" in str(partial.value)
    finally:
        await source.close()
        await server.stop(0)
