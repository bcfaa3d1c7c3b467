"""gRPC engines behind SMG servicers: load records on SubscribeKvEvents (stamped by smg-grpc-servicer's own
LoadRecorder), GetLoads while the stream cannot give them, TokenSpeed's GetLoads; in process and as a real agent
process in front of a real aggregator."""

from __future__ import annotations

import asyncio
import logging

import pytest
from agent_tasks import CACHED, cached_until, get_loads
from conftest import wait_for
from engines import TokenSpeedGrpcEngine, VllmGrpcEngine, serve_grpc
from smg_engine import SmgSglangEngine

from loadagg.v1 import loadagg_pb2 as pb
from scheduler_agent.sources.base import PartialRead
from scheduler_agent.sources.engine_grpc import EngineGrpcSource
from scheduler_agent.sources.smg_stream import SmgStreamSource


@pytest.fixture
async def served():
    servers = []

    async def serve(engine, port: int = 0):
        server, bound = await serve_grpc(engine, port)
        servers.append(server)
        return bound

    yield serve
    for server in servers:
        await server.stop(0)


async def _stream(port: int, flavor: str = "sglang", silence_s: float = 1.5) -> SmgStreamSource:
    source = SmgStreamSource(EngineGrpcSource(f"127.0.0.1:{port}", flavor, 2.0), silence_s=silence_s)
    await source.start()
    await source.discover()
    return source


async def _live(source: SmgStreamSource, ranks: set[int]) -> None:
    await wait_for(lambda: source.state == "live" and ranks <= source._ranks, timeout=10, what="records of every rank")


async def test_records_answer_from_memory_core_overlaid_on_kept_telemetry(served):
    engine = SmgSglangEngine(2)
    source = await _stream(await served(engine))
    try:
        await _live(source, {0, 1})
        calls = engine.calls  # the discovery's GetLoads
        first = await source.read([0, 1])
        assert first[0].cache_hit_rate == 0.5 and first[0].memory.kv_cache_gb == 40.0  # the stream's first record
        assert first[0].queues.waiting == 2 and first[0].disagg.mode == "prefill"
        engine.running[0] = 21
        changed = asyncio.Event()
        source.add_listener(changed.set)
        engine.step(0)  # an event batch: the core only
        await asyncio.wait_for(changed.wait(), 5)
        zero = (await source.read([0]))[0]
        assert (zero.num_running_reqs, zero.num_total_reqs) == (21, 23)
        assert zero.cache_hit_rate == 0.5 and zero.memory.kv_cache_gb == 40.0  # the telemetry kept
        assert zero.detail_age_ms >= zero.age_ms
        assert engine.calls == calls  # no GetLoads: the change came pushed
    finally:
        await source.close()


async def test_record_age_is_honoured_and_a_quiet_rank_ages_on_a_live_stream(served):
    engine = SmgSglangEngine(2, heartbeat_s=0.1, backoff_s=0.2)
    engine.record_age_ms = 400  # the servicer's sample is that old when it sends it
    source = await _stream(await served(engine))
    try:
        await _live(source, {0, 1})
        engine.step(0)
        await asyncio.sleep(0.6)  # heartbeats repeat rank 0 only: rank 1 stays quiet
        loads = await source.read([0, 1])
        assert loads[0].age_ms >= 400
        assert loads[1].age_ms >= 1000 and loads[1].num_running_reqs == 6  # kept, its age growing, not failed
        assert engine.calls == 1 and source.state == "live"
    finally:
        await source.close()


async def test_a_silent_stream_hands_its_ranks_to_getloads_until_records_flow_again(served, caplog):
    caplog.set_level(logging.INFO)
    engine = SmgSglangEngine(2)
    source = await _stream(await served(engine), silence_s=0.8)
    try:
        await _live(source, {0, 1})
        engine.silent = True  # the stream stays open, nothing flows
        await wait_for(lambda: source.state == "silent", timeout=5, what="silence noticed")
        assert not source.pushes
        calls = engine.calls
        engine.running[1] = 33
        assert (await source.read([0, 1]))[1].num_running_reqs == 33 and engine.calls == calls + 1
        engine.silent = False
        await _live(source, {0, 1})
        assert caplog.text.count("sent nothing for 0.8 s") == 1
    finally:
        await source.close()


@pytest.mark.parametrize("engine_kind", ["no-records", "unimplemented", "vllm-without-stream"])
async def test_servicers_without_records_are_polled_with_getloads(served, engine_kind):
    if engine_kind == "vllm-without-stream":
        engine, flavor = VllmGrpcEngine(2), "vllm"  # the proto base answers UNIMPLEMENTED
    else:
        engine, flavor = SmgSglangEngine(2, records=engine_kind != "no-records"), "sglang"
        engine.unimplemented = engine_kind == "unimplemented"
    source = await _stream(await served(engine), flavor)
    try:
        if engine_kind == "no-records":
            for rank in (0, 1, 0, 1):
                engine.step(rank)  # batches flow, none with a record
        await wait_for(lambda: source.state in ("no-records", "unimplemented"), timeout=10, what="no records noticed")
        calls = engine.calls
        loads = await source.read([0, 1])
        assert sorted(loads) == [0, 1] and engine.calls == calls + 1 and not source.pushes
    finally:
        await source.close()


async def test_tokenspeed_getloads_in_the_polling_path(served):
    engine = TokenSpeedGrpcEngine(2)
    source = EngineGrpcSource(f"127.0.0.1:{await served(engine)}", "tokenspeed")
    try:
        assert (await source.discover()).dp_ranks == (0, 1)
        one = (await source.read([0, 1]))[1]
        assert (one.num_running_reqs, one.active_token_usage, one.token_usage) == (5, 0.02, 0.03125)
        assert one.memory.kv_cache_gb == 20.0 and one.queues.waiting == 1
        assert not one.HasField("num_waiting_uncached_tokens")  # TokenSpeed's 0 is "not reported"
    finally:
        await source.close()


async def test_agent_process_carries_a_record_to_a_cached_answer_without_round_or_getloads(
        served, start_aggregator, channel_to, processes):
    engine = SmgSglangEngine(2, heartbeat_s=1.0, backoff_s=5.0)  # SMG's own pacing
    port = await served(engine)
    agg = await start_aggregator(dp_size=2, round_timeout_ms=1000)
    channel = channel_to(agg.port)
    processes.start("scheduler_agent", "--source", "sglang", "--engine-url", f"grpc://127.0.0.1:{port}", "--no-gpu",
                    "--aggregator", f"127.0.0.1:{agg.port}", env={"LOADAGG_INSTANCE_ID": "smg-agent"})
    await wait_for(lambda: agg.registry.live_ranks() == {0, 1}, timeout=30, what="agent linked")
    await wait_for(lambda: all(agg.registry.snapshot(r) is not None for r in (0, 1)), timeout=10, what="pushes")
    await wait_for(lambda: engine.subscriptions >= 1, what="subscribed")
    await get_loads(channel, **CACHED)
    rounds, calls = agg.communicator.stats.rounds_started, engine.calls

    engine.running[1] = 64
    engine.step(1)
    answer = await cached_until(channel, 1, 64)
    assert answer.loads[1].num_running_reqs == 64 and answer.source == pb.ANSWER_SOURCE_SNAPSHOTS
    assert agg.communicator.stats.rounds_started == rounds and engine.calls == calls


async def test_broken_stream_and_down_engine_fail_with_the_reason_then_recover(served):
    engine = SmgSglangEngine(2)
    server, port = await serve_grpc(engine)
    source = await _stream(port)
    try:
        await _live(source, {0, 1})
        await server.stop(0)  # the engine goes away: the stream breaks, GetLoads fails
        await wait_for(lambda: source.state == "broken", timeout=5, what="broken stream noticed")
        with pytest.raises(PartialRead, match="GetLoads: UNAVAILABLE"):
            await source.read([0, 1])
        server, _ = await serve_grpc(engine, port)  # back on the same port
        await _live(source, {0, 1})
        assert sorted(await source.read([0, 1])) == [0, 1]
    finally:
        await source.close()
        await server.stop(0)


async def test_a_record_with_an_impossible_figure_fails_its_rank_only(served, caplog):
    engine = SmgSglangEngine(2)
    source = await _stream(await served(engine))
    try:
        await _live(source, {0, 1})
        engine.set_mode("garbage")  # the servicer's figures: token_usage NaN (counts clamp to 0 in the record)
        engine.step(1)
        await wait_for(lambda: source.held.rank(1).problem != "", what="the bad record noticed")
        with pytest.raises(PartialRead, match="rank 1: a load record with token_usage is not finite") as bad:
            await source.read([0, 1])
        assert list(bad.value.loads) == [0]  # no made-up figure for rank 1; rank 0 serves on
        engine.set_mode("ok")
        engine.step(1)
        await wait_for(lambda: source.held.load(1) is not None, what="recovered")
        assert caplog.text.count("rank 1 a load record with") == 1
    finally:
        await source.close()


async def test_agent_process_through_an_engine_restart(start_aggregator, channel_to, processes):
    engine = SmgSglangEngine(2)
    server, port = await serve_grpc(engine)
    agg = await start_aggregator(dp_size=2, round_timeout_ms=1000)
    channel = channel_to(agg.port)
    processes.start("scheduler_agent", "--source", "sglang", "--engine-url", f"grpc://127.0.0.1:{port}", "--no-gpu",
                    "--aggregator", f"127.0.0.1:{agg.port}", env={"LOADAGG_INSTANCE_ID": "smg-restart"})
    try:
        await wait_for(lambda: agg.registry.live_ranks() == {0, 1}, timeout=30, what="agent linked")
        await wait_for(lambda: engine.subscriptions >= 1, what="subscribed")
        await server.stop(0)  # the engine goes down: stream broken, GetLoads unavailable
        # The agent process notices the broken stream on its own time (a loaded CI box can take a while); until then
        # a round is answered from the records it holds. Once noticed, a round fails both ranks: no made-up figure.
        for _ in range(100):
            answer = await get_loads(channel, freshness=pb.FRESHNESS_NEW_ROUND)
            if list(answer.missing_ranks) == [0, 1]:
                break
            assert not answer.missing_ranks and answer.loads[0].num_running_reqs != 17
            await asyncio.sleep(0.1)
        assert list(answer.missing_ranks) == [0, 1]
        engine.running[0] = 17
        server, _ = await serve_grpc(engine, port)  # back on its port: the agent subscribes again
        await wait_for(lambda: engine.subscriptions >= 2, timeout=15, what="subscribed again")
        engine.step(0)
        await wait_for(lambda: (s := agg.registry.snapshot(0)) is not None and s.load.num_running_reqs == 17,
                       timeout=10, what="a record after the restart")
        rounds = agg.communicator.stats.rounds_started
        answer = await get_loads(channel, **CACHED)
        assert answer.loads[0].num_running_reqs == 17 and agg.communicator.stats.rounds_started == rounds
    finally:
        await server.stop(0)


@pytest.mark.parametrize("capacity, estimate", [(0, (0, 0.0, 0.0)), (262144, (300, 850.0, 0.4))])
def test_a_vllm_record_shows_what_getloads_shows_of_the_same_figures(capacity, estimate):
    """smg-grpc-servicer's vLLM servicer builds its record and its GetLoads entry from the same figures
    (`load_record`, `scheduler_load_fields`); the record fills its hit rate, rate and tokens in use even when it
    knows none (a 0): the stream must not show a 0 that GetLoads leaves unset."""
    from smg_grpc_proto import vllm_engine_pb2
    from smg_grpc_proto.generated import common_pb2
    from smg_grpc_servicer.vllm.loads import LoadEstimate, load_record, scheduler_load_fields

    from scheduler_agent.sources.engine_grpc import load_from_scheduler_load

    figures = (3, 1, 0.25, LoadEstimate(*estimate))
    source = SmgStreamSource(EngineGrpcSource("127.0.0.1:1", "vllm"))
    source._take(common_pb2.KvEventBatch(dp_rank=0, load=load_record(*figures, max_total_num_tokens=capacity)))
    streamed = source.held.load(0)
    polled = load_from_scheduler_load(
        vllm_engine_pb2.SchedulerLoad(**scheduler_load_fields(*figures, max_total_num_tokens=capacity)), "vllm", 0)
    for field in ("num_running_reqs", "num_waiting_reqs", "num_total_reqs", "token_usage", "gen_throughput",
                  "cache_hit_rate", "num_used_tokens", "max_total_num_tokens", "max_running_requests"):
        shown = [(load.HasField(field), getattr(load, field)) for load in (streamed, polled)]
        assert shown[0] == shown[1], field


def test_a_rank_quiet_past_the_age_bound_is_failed_with_a_stable_reason():
    """A quiet rank keeps its last record, its age growing, up to the age bound the aggregator takes
    (MAX_REPORTED_AGE_MS): past it the rank is failed with one stable reason, not sent each second to be refused
    with a message that changes with every age (a warning a second in the agent's log)."""
    from smg_grpc_proto.generated import common_pb2

    from loadagg.common import MAX_REPORTED_AGE_MS
    from scheduler_agent.sources.base import PartialRead as Partial

    source = SmgStreamSource(EngineGrpcSource("127.0.0.1:1", "sglang"))
    for rank, age_ms in ((0, 1000), (1, MAX_REPORTED_AGE_MS + 5000)):
        source._take(common_pb2.KvEventBatch(dp_rank=rank, load=common_pb2.EngineLoad(running_requests=2,
                                                                                      age_ms=age_ms)))
    with pytest.raises(Partial, match=r"^rank 1: its last figures are over 3600 s old$") as quiet:
        source.held.read([0, 1])
    assert quiet.value.loads[0].num_running_reqs == 2 and list(quiet.value.loads) == [0]
