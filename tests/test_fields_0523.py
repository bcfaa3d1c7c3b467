"""sglang 0.5.23's figures end to end: its own publisher and LoadSnapshots behind a real agent process, through
the aggregator's gRPC answer, its sglang-compatible HTTP `/v1/loads` (a body both generations' clients parse)
and the sglang / vLLM gRPC compat services."""

from __future__ import annotations

import asyncio

import aiohttp
import msgspec
import pytest
from agent_tasks import get_loads
from conftest import wait_for
from sglang_engine import LoadSnapshot, Sglang0523Engine, load_snapshot
from smg_grpc_proto import sglang_scheduler_pb2 as sg
from smg_grpc_proto import sglang_scheduler_pb2_grpc as sg_grpc
from smg_grpc_proto import vllm_engine_pb2 as vl
from smg_grpc_proto import vllm_engine_pb2_grpc as vl_grpc


def _as_sglang_snapshot(entry: dict) -> LoadSnapshot:
    """An HTTP entry read by sglang 0.5.23's own LoadSnapshot type (its sections are arrays on its wire)."""
    sections = {"memory": load_snapshot.MemoryMetrics, "queues": load_snapshot.QueueMetrics}
    entry = {key: ([value[f] for f in sections[key].__struct_fields__] if key in sections else value)
             for key, value in entry.items() if key in LoadSnapshot.__struct_fields__}
    return msgspec.convert(entry, LoadSnapshot)


@pytest.fixture
async def fed(start_aggregator, channel_to, processes):
    engine = Sglang0523Engine(2)
    await engine.start()
    agg = await start_aggregator(dp_size=2, round_timeout_ms=1000, http_port=0)
    processes.start("scheduler_agent", "--source", "sglang", "--engine-url", engine.url, "--no-gpu",
                    "--aggregator", f"127.0.0.1:{agg.port}", "--detail-interval-ms", "200",
                    env={"LOADAGG_INSTANCE_ID": "fields-0523"})
    await wait_for(lambda: agg.registry.live_ranks() == {0, 1}, timeout=30, what="agent linked")
    await wait_for(lambda: (s := agg.registry.snapshot(1)) is not None and s.load.HasField("detail_age_ms"),
                   timeout=10, what="the feed's and /v1/loads' figures")
    engine.set(1, total_prefill_uncached_tokens=16_000, total_prefill_busy_us=3_000_000)  # 6000 tokens in 1 s
    await wait_for(lambda: agg.registry.snapshot(1).load.HasField("prefill_throughput"), what="a prefill rate")
    yield engine, agg, channel_to(agg.port)
    await engine.stop_all()


async def test_through_grpc(fed):
    _, _, channel = fed
    one = (await get_loads(channel)).loads[1]
    assert (one.num_active_tokens, one.num_prealloc_ready_tokens, one.queues.prealloc_ready) == (4500, 12, 2)
    assert (one.total_prefill_uncached_tokens, one.total_prefill_busy_us) == (16_000, 3_000_000)
    assert one.prefill_throughput == pytest.approx(6000.0)
    assert (one.accelerator, one.num_accelerators) == ("NVIDIA H100 80GB HBM3", 1)
    assert one.HasField("detail_age_ms")


async def test_through_http_a_body_both_generations_parse(fed):
    _, agg, _ = fed
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{agg.http_port}/v1/loads") as response:
            body = await response.json()
    # the older clients' keys ...
    assert body["dp_rank_count"] == 2 and body["aggregate"]["total_running_reqs"] == 6
    assert [e["num_total_reqs"] for e in body["loads"]] == [4, 5]
    # ... beside 0.5.23's
    assert (body["accelerator"], body["num_accelerators"]) == ("NVIDIA H100 80GB HBM3", 1)
    one = body["loads"][1]
    assert (one["num_active_tokens"], one["num_prealloc_ready_tokens"]) == (4500, 12)
    assert one["queues"]["prealloc_ready"] == 2
    assert one["prefill_throughput"] == pytest.approx(6000.0)
    parsed = _as_sglang_snapshot(one)  # sglang 0.5.23's own type takes the entry
    assert (parsed.dp_rank, parsed.num_active_tokens, parsed.total_prefill_busy_us) == (1, 4500, 3_000_000)
    assert parsed.queues.prealloc_ready == 2 and parsed.memory.kv_cache_gb == 40.0


async def test_through_the_compat_services(fed):
    _, _, channel = fed
    theirs = await sg_grpc.SglangSchedulerStub(channel).GetLoads(sg.GetLoadsRequest(), timeout=10)
    one = theirs.loads[1]
    assert (one.num_running_reqs, one.num_waiting_reqs, one.num_total_reqs) == (3, 2, 5)
    assert (one.num_used_tokens, one.num_waiting_uncached_tokens, one.max_running_requests) == (4001, 300, 256)
    assert one.token_usage == pytest.approx(0.0153) and one.queues.waiting == 2 and one.memory.kv_cache_gb == 40.0
    vllm = await vl_grpc.VllmEngineStub(channel).GetLoads(vl.GetLoadsRequest(), timeout=10)
    assert (vllm.loads[1].num_running_reqs, vllm.loads[1].num_waiting_uncached_tokens) == (3, 300)
    await asyncio.sleep(0)
