"""Hostile and careless input over real gRPC and HTTP on loopback: no agent message holds the event loop, no
string or rank bloats an answer, a rank nobody serves is forgotten, huge HTTP integers are a 400, two agents
sharing an instance id are warned about, and totals past int64 agree between HTTP and gRPC (issue 19)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time

import aiohttp
import grpc
import pytest
from conftest import wait_for
from figures import record
from grpc_health.v1 import health_pb2, health_pb2_grpc
from loop_lag import LoopLag
from raw_agent import RawAgent

from loadagg.server.guard import MAX_ROUTER_REQUEST_BYTES
from loadagg.server.limits import LimitsConfig
from loadagg.server.sglang_shape import INT64_MAX
from loadagg.server.validation import MAX_GPU_DEVICES_PER_RANK, MAX_STRING_CHARS
from loadagg.v1 import loadagg_pb2 as pb
from loadagg.v1 import loadagg_pb2_grpc as pb_grpc

CONNECT = "/loadagg.v1.AgentLink/Connect"
PROBE_DEADLINE_S = 0.5  # generous: a loop held by one message for seconds (7.5 s before the fix) misses it


def _report_bytes(entries: bytes) -> bytes:
    """An AgentMessage{report: LoadReport{loads: ...}} around already-encoded load entries (built as bytes:
    a million RankLoad objects would take the test itself seconds to make)."""
    report = entries
    return b"\x12" + _varint(len(report)) + report


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class RawBytesAgent:
    """An AgentLink peer that writes pre-serialized messages."""

    def __init__(self, port: int, instance_id: str, ranks: list[int]) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.call = self.channel.stream_stream(CONNECT, request_serializer=None,
                                               response_deserializer=pb.AggregatorMessage.FromString)()
        self.hello = pb.AgentMessage(hello=pb.AgentHello(instance_id=instance_id, dp_ranks=ranks)).SerializeToString()

    async def connect(self) -> None:
        await self.call.write(self.hello)
        assert (await asyncio.wait_for(self.call.read(), 5)).WhichOneof("kind") == "welcome"

    async def rejection(self) -> pb.ReportRejected:
        while True:
            message = await asyncio.wait_for(self.call.read(), 5)
            if message.WhichOneof("kind") == "rejected":
                return message.rejected

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


async def test_hostile_agent_messages_are_refused_without_holding_the_loop(start_aggregator, start_agents,
                                                                         channel_to):
    """30,000 GPU devices, a report of thousands of loads, 1,000,000 empty loads in 4 MB: each is refused
    (with what was wrong) while Health/Check and GetLoads keep answering within PROBE_DEADLINE_S each."""
    agg = await start_aggregator(dp_size=2, round_timeout_ms=100)
    await start_agents(agg, [[1]])
    health = health_pb2_grpc.HealthStub(channel_to(agg.port))
    loads = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    answered: list[float] = []
    stop = asyncio.Event()

    async def probe() -> None:
        while not stop.is_set():
            started = time.monotonic()
            check = await health.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_DEADLINE_S)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            answer = await loads.GetLoads(pb.GetLoadsRequest(dp_rank=1), timeout=PROBE_DEADLINE_S)
            assert [load.dp_rank for load in answer.loads] == [1]
            answered.append(time.monotonic() - started)
            await asyncio.sleep(0.01)

    lags: list[float] = []

    async def lag() -> None:  # how late a 1 ms sleep wakes: how long something held the loop
        while not stop.is_set():
            started = time.monotonic()
            await asyncio.sleep(0.001)
            lags.append(time.monotonic() - started - 0.001)

    prober = asyncio.create_task(probe())
    lagger = asyncio.create_task(lag())
    many_devices = pb.AgentMessage(report=pb.LoadReport(loads=[pb.RankLoad(
        dp_rank=0, gpu=pb.GpuMetrics(devices=[pb.GpuDevice() for _ in range(30_000)]))])).SerializeToString()
    many_loads = _report_bytes(b"\x12\x02\x08\x05" * 2_000)  # 2,000 loads of rank 5 from an agent serving rank 0
    million = _report_bytes(b"\x12\x02\x08\x00" * 1_000_000)  # 1,000,000 RankLoad{dp_rank: 0}, 4 MB
    assert 3_900_000 < len(million) < agg.config.limits.max_message_bytes
    try:
        for attempt in range(3):
            hostile = RawBytesAgent(agg.port, f"hostile-{attempt}", [0])
            try:
                await hostile.connect()
                await hostile.call.write(many_devices)
                rejected = await hostile.rejection()
                assert rejected.dp_rank == 0 and "30000 devices" in rejected.reason
                assert f"at most {MAX_GPU_DEVICES_PER_RANK}" in rejected.reason
                await hostile.call.write(many_loads)
                rejected = [await hostile.rejection(), await hostile.rejection()]  # the excess, then the first
                assert [r.dp_rank for r in rejected] == [-1, 5], rejected
                assert "a report of 2000 loads" in rejected[0].reason
                assert "not served" in rejected[1].reason
                await hostile.call.write(million)
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    await hostile.rejection()
                assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "an AgentMessage of 4000005 bytes" in ended.value.details()
            finally:
                await hostile.close()
        assert agg.registry.snapshot(0) is None  # nothing of it was stored
        await asyncio.sleep(0.2)
    finally:
        stop.set()
        await prober  # raises what a probe met (DEADLINE_EXCEEDED when the loop was held)
        await lagger
    assert len(answered) >= 5, answered
    assert agg.guard.agent_link_messages_refused == 3
    record("hostile_agent_messages", probes=len(answered), slowest_probe_ms=round(max(answered) * 1000, 1),
           longest_loop_hold_ms=round(max(lags) * 1000, 1))


async def test_a_large_report_is_walked_not_parsed_whole(start_aggregator, channel_to):
    """An agent serving 64 ranks may send 4 MB: filled with 2,000,000 empty loads (or one load of empty GPU
    devices) its parse held the loop 0.1-0.3 s. It is refused RESOURCE_EXHAUSTED before any parse, while a valid
    report of that size class (64 loads of 32 GPUs) is parsed a load at a time and stored whole."""
    dp_size = 64
    agg = await start_aggregator(dp_size=dp_size)
    device = pb.GpuMetrics.DESCRIPTOR.fields_by_name["devices"].number << 3 | 2
    gpu = pb.RankLoad.DESCRIPTOR.fields_by_name["gpu"].number << 3 | 2
    devices = (_varint(device) + b"\x00") * 1_000_000
    one_load = _varint(gpu) + _varint(len(devices)) + devices
    hostile = [_report_bytes(b"\x12\x00" * 2_000_000), _report_bytes(b"\x12" + _varint(len(one_load)) + one_load),
               b"\x78\x00" * 2_000_000, _report_bytes(b"\x78\x00" * 2_000_000)]  # unknown fields, each walked
    async with LoopLag() as loop_lag:
        for attempt, message in enumerate(hostile):
            agent = RawBytesAgent(agg.port, f"many-{attempt}", list(range(dp_size)))
            try:
                await agent.connect()
                assert len(message) < agg.agents.message_limit(next(iter(agg.agents._links)))
                await agent.call.write(message)
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    await agent.rejection()
                assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, ended.value.details()
                assert re.search("more than 64 loads|a load of|more than [0-9]+ fields", ended.value.details())
            finally:
                await agent.close()
        agent = RawAgent(agg.port, "valid", list(range(dp_size)))
        await agent.connect()
        loads = [pb.RankLoad(dp_rank=rank, num_running_reqs=rank, timestamp_ms=1, gpu=pb.GpuMetrics(devices=[
            pb.GpuDevice(index=i, name="NVIDIA H100 80GB HBM3", uuid=f"GPU-{rank:04d}-{i:02d}", utilization=0.5)
            for i in range(MAX_GPU_DEVICES_PER_RANK)])) for rank in range(dp_size)]
        report = pb.AgentMessage(report=pb.LoadReport(loads=loads, failed_ranks=[])).SerializeToString()
        assert len(report) > 64 * 1024
        await agent.call.write(pb.AgentMessage.FromString(report))
        await wait_for(lambda: len(agg.registry.snapshots()) == dp_size, 10, "every rank's load")
        assert [agg.registry.snapshot(rank).load for rank in range(dp_size)] == loads
        # Every rank failed, with the source's long error (a line a rank): large, and valid.
        await agent.call.write(pb.AgentMessage(report=pb.LoadReport(failed_ranks=range(dp_size), error="e" * 200_000)))
        await agent.report(0, [pb.RankLoad(dp_rank=0, num_running_reqs=99, timestamp_ms=1)])
        await wait_for(lambda: agg.registry.snapshot(0).load.num_running_reqs == 99, 10, "the link to live on")
        await agent.close()
    assert agg.guard.agent_link_messages_refused == 4
    record("large_agent_reports", longest_loop_hold_ms=loop_lag.longest_ms)


async def test_oversized_router_requests_are_refused_unparsed(start_aggregator, channel_to):
    """A GetLoads, WatchLoads or sglang GetLoads of --max-message-bytes packed with empty `include` entries
    (2,000,000 of them) is refused RESOURCE_EXHAUSTED before it is parsed (parsed, each held the loop ~0.1 s and
    was then refused INVALID_ARGUMENT), while one at the limit is still parsed and answered."""
    agg = await start_aggregator(dp_size=1)
    channel = channel_to(agg.port)
    hostile = b"\x12\x00" * ((agg.config.limits.max_message_bytes - 64) // 2)
    largest = pb.GetLoadsRequest(include=["x" * 12] * (MAX_ROUTER_REQUEST_BYTES // 14)).SerializeToString()
    assert len(largest) <= MAX_ROUTER_REQUEST_BYTES < len(largest) + 14
    async with LoopLag() as loop_lag:
        for method in ("/loadagg.v1.LoadAggregator/GetLoads", "/sglang.grpc.scheduler.SglangScheduler/GetLoads",
                       "/loadagg.v1.LoadAggregator/WatchLoads"):
            streaming = "Watch" in method
            call = (channel.unary_stream if streaming else channel.unary_unary)(method, request_serializer=None,
                                                                                 response_deserializer=None)
            for request, code, words in ((hostile, grpc.StatusCode.RESOURCE_EXHAUSTED, "refused unparsed"),
                                         (largest, grpc.StatusCode.INVALID_ARGUMENT, "include is too long")):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    if streaming:
                        async for _ in call(request, timeout=10):
                            pass
                    else:
                        await call(request, timeout=10)
                assert refused.value.code() == code and words in refused.value.details(), refused.value.details()
    assert agg.guard.refused["RESOURCE_EXHAUSTED"] == 3
    record("oversized_router_requests", longest_loop_hold_ms=loop_lag.longest_ms)


async def test_strings_past_the_limit_are_refused_per_rank(start_aggregator, channel_to):
    agg = await start_aggregator(dp_size=1)
    agent = RawAgent(agg.port, "strings", [0])
    try:
        await agent.connect()
        longest = "x" * MAX_STRING_CHARS
        for load, reason in [
            (pb.RankLoad(dp_rank=0, disagg=pb.DisaggMetrics(mode="p" * 300)), "disagg.mode is 300 characters"),
            (pb.RankLoad(dp_rank=0, gpu=pb.GpuMetrics(devices=[pb.GpuDevice(name=longest + "x")])), "name is 257"),
            (pb.RankLoad(dp_rank=0, gpu=pb.GpuMetrics(devices=[pb.GpuDevice(uuid="é" * 999)])), "uuid is 999"),
        ]:
            await agent.report(0, [load])
            message = await agent.read()
            assert message.WhichOneof("kind") == "rejected" and reason in message.rejected.reason, message
            assert f"at most {MAX_STRING_CHARS}" in message.rejected.reason
        assert agg.registry.snapshot(0) is None
        fine = pb.RankLoad(dp_rank=0, disagg=pb.DisaggMetrics(mode=longest),
                           gpu=pb.GpuMetrics(devices=[pb.GpuDevice(name=longest, uuid=longest)]))
        await agent.report(0, [fine])
        await asyncio.sleep(0.2)
        assert agg.registry.snapshot(0) is not None
    finally:
        await agent.close()


async def test_control_characters_in_agent_strings_are_refused(start_aggregator, channel_to):
    """JSON writes a control character as a 6-byte escape: strings of them made an HTTP body 4.5 times the
    answer bound. A load holding one is refused for its rank, a hello holding one ends the link, naming it."""
    agg = await start_aggregator(dp_size=1)
    agent = RawAgent(agg.port, "controls", [0])
    try:
        await agent.connect()
        for load, reason in [
            (pb.RankLoad(dp_rank=0, disagg=pb.DisaggMetrics(mode="decode\x01")), "disagg.mode holds control"),
            (pb.RankLoad(dp_rank=0, accelerator="\x00" * 200), "accelerator holds control character U+0000"),
            (pb.RankLoad(dp_rank=0, gpu=pb.GpuMetrics(devices=[pb.GpuDevice(name="H100\n")])), "name holds"),
            (pb.RankLoad(dp_rank=0, gpu=pb.GpuMetrics(devices=[pb.GpuDevice(uuid="GPU-\x1b[2J")])), "U+001B"),
        ]:
            await agent.report(0, [load])
            message = await agent.read()
            assert message.WhichOneof("kind") == "rejected" and reason in message.rejected.reason, message
        assert agg.registry.snapshot(0) is None
        await agent.report(0, [pb.RankLoad(dp_rank=0, accelerator="NVIDIA H100 80GB HBM3 \u00a0\U0001f600",
                                           disagg=pb.DisaggMetrics(mode="décode"))])
        await wait_for(lambda: agg.registry.snapshot(0) is not None, what="a printable load stored")
    finally:
        await agent.close()
    bell = RawAgent(agg.port, "bell\x07", [0])
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await bell.connect()
    await bell.close()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hello.instance_id holds control character U+0007" in refused.value.details()


async def test_megabyte_strings_never_reach_an_answer(start_aggregator, channel_to):
    """The issue's case: two agents each report a 2.1 MB disagg.mode and leave. Their links end (the message
    is larger than any valid report), and a full allow_stale GetLoads still fits a client's 4 MiB."""
    agg = await start_aggregator(dp_size=2)
    for rank in (0, 1):
        agent = RawAgent(agg.port, f"bloat-{rank}", [rank])
        await agent.connect()
        await agent.report(0, [pb.RankLoad(dp_rank=rank, disagg=pb.DisaggMetrics(mode="m" * 2_100_000))])
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await agent.read()
        assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await agent.close()
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    answer = await stub.GetLoads(pb.GetLoadsRequest(allow_stale=True), timeout=10)  # the default 4 MiB limit
    assert list(answer.missing_ranks) == [0, 1] and not answer.loads


async def test_every_answer_fits_max_answer_bytes(start_aggregator, channel_to):
    """A rank's load above its share of --max-answer-bytes is refused; the largest accepted loads of every
    rank together still make an answer within the limit."""
    limit = 64 * 1024
    agg = await start_aggregator(dp_size=8, limits=LimitsConfig(max_answer_bytes=limit))
    share = agg.agents.rank_share
    agent = RawAgent(agg.port, "wide", list(range(8)))
    try:
        await agent.connect()
        name = "n" * MAX_STRING_CHARS

        def load(rank: int, devices: int) -> pb.RankLoad:
            return pb.RankLoad(dp_rank=rank, num_running_reqs=1, disagg=pb.DisaggMetrics(mode=name),
                               gpu=pb.GpuMetrics(devices=[pb.GpuDevice(index=i, name=name, uuid=name,
                                                                       memory_used_bytes=2**63)
                                                          for i in range(devices)]))

        fitting = max(n for n in range(MAX_GPU_DEVICES_PER_RANK + 1) if load(0, n).ByteSize() <= share)
        assert fitting < MAX_GPU_DEVICES_PER_RANK  # the share, not the device cap, is what limits here
        await agent.report(0, [load(0, fitting + 1)])
        message = await agent.read()
        assert message.WhichOneof("kind") == "rejected" and "above its share of an answer" in message.rejected.reason
        await agent.report(0, [load(rank, fitting) for rank in range(8)])
        stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
        for _ in range(100):
            answer = await stub.GetLoads(pb.GetLoadsRequest(freshness=pb.FRESHNESS_CACHED, max_staleness_ms=60_000),
                                         timeout=10)
            if len(answer.loads) == 8:
                break
            await asyncio.sleep(0.02)
        assert len(answer.loads) == 8 and answer.ByteSize() <= limit
        await agent.close()
        stale = await stub.GetLoads(pb.GetLoadsRequest(allow_stale=True), timeout=10)  # stale entries, ages added
        assert len(stale.loads) == 8 and list(stale.missing_ranks) == list(range(8)) and stale.ByteSize() <= limit
    finally:
        await agent.close()


async def test_http_json_answers_carry_strings_as_utf8(start_aggregator, channel_to):
    """Non-ASCII strings travel in the JSON body as UTF-8, as in the gRPC answer: escaped (\\ud83d\\ude00 for one
    4-byte character) the HTTP answer of the same loads was 3 times larger than the gRPC one."""
    agg = await start_aggregator(dp_size=8, http_port=0)
    agent = RawAgent(agg.port, "emoji", list(range(8)))
    smiles = "\U0001f600" * MAX_STRING_CHARS
    try:
        await agent.connect()
        await agent.report(0, [pb.RankLoad(dp_rank=rank, num_running_reqs=rank, disagg=pb.DisaggMetrics(mode=smiles),
                                           accelerator=f"{rank}{smiles[1:]}") for rank in range(8)])
        await asyncio.sleep(0.2)
        stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
        answer = await stub.GetLoads(pb.GetLoadsRequest(freshness=pb.FRESHNESS_CACHED, max_staleness_ms=60_000),
                                     timeout=10)
        assert len(answer.loads) == 8
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{agg.http_port}/v1/loads?max_staleness_ms=60000") as response:
                body = await response.read()
        assert json.loads(body)["loads"][3]["disaggregation"]["mode"] == smiles
        assert smiles.encode() in body
        assert len(body) < 1.2 * answer.ByteSize(), (len(body), answer.ByteSize())
    finally:
        await agent.close()


async def test_a_rank_without_an_agent_is_forgotten(start_aggregator, channel_to):
    agg = await start_aggregator(dp_size=1, forget_rank_after_s=0.3)
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    agent = RawAgent(agg.port, "leaving", [0])
    await agent.connect()
    await agent.report(0, [pb.RankLoad(dp_rank=0, num_running_reqs=3)])
    await asyncio.sleep(0.1)
    await agent.close()
    answer = await stub.GetLoads(pb.GetLoadsRequest(allow_stale=True), timeout=10)
    assert [(load.dp_rank, load.stale) for load in answer.loads] == [(0, True)]
    await asyncio.sleep(0.4)
    answer = await stub.GetLoads(pb.GetLoadsRequest(allow_stale=True), timeout=10)
    assert not answer.loads and list(answer.missing_ranks) == [0]
    assert agg.registry.known_ranks() == {}


@pytest.mark.parametrize("name", ["dp_rank", "max_staleness_ms"])
async def test_huge_integers_on_the_http_gateway_are_a_400_that_does_not_echo_them(start_aggregator, name):
    agg = await start_aggregator(dp_size=2, http_port=0)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{agg.http_port}/v1/loads?{name}={'9' * 4400}") as response:
            status, body = response.status, await response.read()
    assert status == 400, body[:300]
    doc = json.loads(body)
    assert doc["code"] == "INVALID_ARGUMENT" and "at most 20 digits" in doc["error"] and len(body) < 400


async def test_a_healthy_link_taken_over_by_its_instance_id_is_warned_about(start_aggregator, caplog):
    """Two agents sharing an instance id: each takeover of a healthy link is counted, and a warning (at most one
    per interval) names both peers."""
    caplog.set_level(logging.INFO, logger="loadagg.server.registry")
    agg = await start_aggregator(dp_size=1)
    agents = []
    try:
        for _ in range(3):
            agent = RawAgent(agg.port, "twin", [0], own_connection=True)
            agents.append(agent)
            await agent.connect()
            await agent.report(0, [pb.RankLoad(dp_rank=0, num_running_reqs=len(agents))])
            await asyncio.sleep(0.05)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                    and r.name == "loadagg.server.registry"]
        assert len(warnings) == 1, warnings  # rate-limited
        assert agg.registry.healthy_takeovers == 2
        peers = set(re.findall(r"ipv4:127\.0\.0\.1:\d+", warnings[0]))
        assert len(peers) == 2 and "--instance-id" in warnings[0], warnings[0]  # both links' peers
        metrics = agg.metrics.exposition().decode()
        assert "loadagg_healthy_link_takeovers_total 2.0" in metrics
    finally:
        for agent in agents:
            await agent.close()


async def test_http_aggregate_totals_saturate_like_the_grpc_summary(start_aggregator, channel_to):
    agg = await start_aggregator(dp_size=2, http_port=0)
    agent = RawAgent(agg.port, "huge", [0, 1])
    try:
        await agent.connect()
        stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
        call = asyncio.ensure_future(stub.GetLoads(pb.GetLoadsRequest(), timeout=10))
        collect = await agent.next_collect()
        huge = dict(num_used_tokens=INT64_MAX, num_total_tokens=INT64_MAX, max_total_num_tokens=INT64_MAX)
        await agent.report(collect.round_id, [pb.RankLoad(dp_rank=r, **huge) for r in (0, 1)])
        summary = (await call).summary
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{agg.http_port}/v1/loads?max_staleness_ms=60000"
            async with session.get(url) as response:
                aggregate = (await response.json())["aggregate"]
        assert summary.total_used_tokens == aggregate["total_used_tokens"] == INT64_MAX
        assert aggregate["total_tokens"] == INT64_MAX
    finally:
        await agent.close()
