"""sglang over HTTP: a real multi-rank sglang stand-in on loopback, a real aggregator, the agent between."""

from __future__ import annotations

import asyncio
import logging

import pytest
from agent_tasks import engine_agent, get_loads, running
from conftest import free_port, wait_for
from engines import SglangHttpEngine, sglang_entry

from scheduler_agent.sources.base import PartialRead, SourceError
from scheduler_agent.sources.sglang_http import SglangHttpSource, load_from_v1


def test_v1_entry_maps_every_documented_field_and_leaves_absent_ones_unset():
    load = load_from_v1(sglang_entry(1, running=9), now_ms=123)
    assert (load.dp_rank, load.timestamp_ms, load.num_running_reqs, load.num_waiting_reqs) == (1, 123, 9, 3)
    assert load.max_total_num_tokens == 262144 and load.num_used_tokens == 6000 and load.max_running_requests == 256
    assert load.gen_throughput == 121.5 and load.cache_hit_rate == 0.42 and load.utilization == 0.75
    assert load.memory.kv_cache_gb == 40.5 and load.memory.token_capacity == 262144
    assert load.spec.accept_length == 2.8 and load.lora.slots_total == 8
    assert load.disagg.mode == "decode" and load.disagg.decode_prealloc_queue_reqs == 3
    assert load.disagg.kv_transfer_speed_gb_s == 12.5 and load.queues.retracted == 1

    bare = load_from_v1({"dp_rank": 0, "num_running_reqs": 0, "token_usage": None}, now_ms=1)
    assert bare.HasField("num_running_reqs") and bare.num_running_reqs == 0  # a real 0 stays a 0
    for absent in ("num_waiting_reqs", "token_usage", "gen_throughput", "max_total_num_tokens", "memory", "spec"):
        assert not bare.HasField(absent), absent  # never a made-up 0

    import time
    now_ms = int(time.time() * 1000)
    assert load_from_v1({"dp_rank": 0, "timestamp": now_ms / 1000 - 2}, now_ms).timestamp_ms == now_ms - 2000
    assert load_from_v1({"dp_rank": 0, "timestamp": 12.5}, now_ms).timestamp_ms == now_ms  # not a unix time

    newer = load_from_v1({"dp_rank": 0, "disaggregation": {"mode": "prefill", "prefill_bootstrap_queue_reqs": 4}}, 1)
    assert newer.disagg.prefill_prealloc_queue_reqs == 4 and not newer.disagg.HasField("decode_transfer_queue_reqs")

    for bad in ({"dp_rank": 0, "num_running_reqs": "many"}, {"dp_rank": 0, "token_usage": -0.1},
                {"dp_rank": "x"}, {"dp_rank": 0, "memory": [1, 2]}, {"dp_rank": 0, "num_used_tokens": 1.5}):
        with pytest.raises(SourceError):
            load_from_v1(bad, 1)


async def test_multi_rank_server_feeds_every_rank_with_one_request_per_round(start_aggregator, channel_to):
    engine = SglangHttpEngine(dp_size=4, bare_ranks=(3,))
    await engine.start()
    agg = await start_aggregator(dp_size=4, round_timeout_ms=2000)
    agent = engine_agent(agg.port, SglangHttpSource(engine.url))
    try:
        async with running(agent):
            await wait_for(lambda: agg.registry.live_ranks() == {0, 1, 2, 3}, what="engine ranks registered")
            assert agent.dp_ranks == (0, 1, 2,
                                      3) and agent.engine.dp_size == 4 and agent.dp_size == 0  # ranks from the engine
            before = engine.hits["/v1/loads"]
            response = await get_loads(channel_to(agg.port))
            assert [l.dp_rank for l in response.loads] == [0, 1, 2, 3] and not response.missing_ranks
            assert [l.num_running_reqs for l in response.loads] == [5, 6, 7, 8]
            assert engine.hits["/v1/loads"] - before == 1  # one HTTP request for all four ranks
            rank0, rank3 = response.loads[0], response.loads[3]
            assert rank0.memory.weight_gb == 15.26 and rank0.spec.accept_rate == 0.6 and rank0.disagg.mode == "decode"
            assert not rank3.HasField("memory") and not rank3.HasField("spec")  # the engine sent none
            assert not rank0.HasField("gpu")  # no NVML here, and nothing invented

            engine.running[2] = 42
            response = await get_loads(channel_to(agg.port), dp_rank=2)
            assert [l.num_running_reqs for l in response.loads] == [42]
    finally:
        await engine.stop()


async def test_dp_rank_restricts_and_dp_size_can_be_given(start_aggregator, channel_to):
    engine = SglangHttpEngine(dp_size=4)
    await engine.start()
    agg = await start_aggregator(dp_size=8, round_timeout_ms=300)
    agent = engine_agent(agg.port, SglangHttpSource(engine.url), dp_ranks=(1, 3, 6), dp_size=8)
    try:
        async with running(agent):
            await wait_for(lambda: agg.registry.live_ranks() == {1, 3}, what="ranks 1 and 3 registered")
            assert agent.dp_ranks == (1, 3) and agent.dp_size == 8  # rank 6 is not on this engine
            response = await get_loads(channel_to(agg.port))
            assert [l.dp_rank for l in response.loads] == [1, 3]
    finally:
        await engine.stop()


async def test_legacy_get_load_when_v1_loads_is_absent(start_aggregator, channel_to):
    engine = SglangHttpEngine(dp_size=2, legacy_only=True)
    await engine.start()
    agg = await start_aggregator(dp_size=2, round_timeout_ms=2000)
    source = SglangHttpSource(engine.url)
    try:
        async with running(engine_agent(agg.port, source)):
            await wait_for(lambda: agg.registry.live_ranks() == {0, 1}, what="legacy ranks registered")
            response = await get_loads(channel_to(agg.port))
            assert source.legacy
            load = response.loads[1]
            assert (load.num_total_reqs, load.num_waiting_reqs, load.num_running_reqs) == (8, 2, 6)
            assert load.num_total_tokens == 4096  # num_tokens: in use plus queued, /v1/loads' num_total_tokens
            for absent in ("num_used_tokens", "token_usage", "max_total_num_tokens", "gen_throughput"):
                assert not load.HasField(absent), absent
    finally:
        await engine.stop()


async def test_an_engine_started_with_an_api_key(start_aggregator, channel_to, caplog):
    """sglang --api-key guards /v1/loads: without the key the agent says what to give it; with it, it reads."""
    caplog.set_level(logging.WARNING)
    engine = SglangHttpEngine(dp_size=2)
    engine.api_key = "engine-secret"
    await engine.start()
    try:
        keyless = SglangHttpSource(engine.url)
        with pytest.raises(SourceError, match="HTTP 401: the engine wants an API key .*--engine-api-key"):
            await keyless.read([0, 1])
        await keyless.close()
        wrong = SglangHttpSource(engine.url, api_key="not-it")
        with pytest.raises(SourceError, match="HTTP 401: the engine refused this agent's API key"):
            await wrong.read([0])
        await wrong.close()
        agg = await start_aggregator(dp_size=2, round_timeout_ms=2000)
        async with running(engine_agent(agg.port, SglangHttpSource(engine.url, api_key="engine-secret"))):
            await wait_for(lambda: agg.registry.live_ranks() == {0, 1}, what="ranks read with the key")
            response = await get_loads(channel_to(agg.port))
            assert [load.num_running_reqs for load in response.loads] == [5, 6]
    finally:
        await engine.stop()


async def test_engine_failures_report_ranks_missing_log_once_and_recover(start_aggregator, channel_to, caplog):
    caplog.set_level(logging.INFO, logger="scheduler_agent.source")
    engine = SglangHttpEngine(dp_size=2)
    await engine.start()
    agg = await start_aggregator(dp_size=2, round_timeout_ms=2000)
    agent = engine_agent(agg.port, SglangHttpSource(engine.url))
    channel = channel_to(agg.port)

    async def rounds(n: int):
        return [await get_loads(channel) for _ in range(n)]

    try:
        async with running(agent):
            await wait_for(lambda: agg.registry.live_ranks() == {0, 1}, what="ranks registered")
            assert all(not r.missing_ranks for r in await rounds(2))
            for mode in ("error", "garbage", "hang"):
                engine.set_mode(mode)
                caplog.clear()
                timed_out = agg.communicator.stats.rounds_timed_out
                answers = await rounds(3)
                assert all(r.missing_ranks == [0, 1] and not r.loads for r in answers), mode
                warnings = [r for r in caplog.records if r.name == "scheduler_agent.source"
                            and r.levelno == logging.WARNING]
                assert len(warnings) == 1, [r.getMessage() for r in warnings]  # once per state, not per round
                # The agent gave up on the engine before the aggregator's deadline (1.2 s of the 2 s it
                # learned from Welcome) and said so: the rounds ended on its report, not on the deadline.
                assert agg.communicator.stats.rounds_timed_out == timed_out, mode
                engine.set_mode("ok")
                assert not (await rounds(1))[0].missing_ranks
            assert agent.health.healthy

            await engine.stop()  # engine down: connection refused
            answers = await rounds(3)
            assert all(r.missing_ranks == [0, 1] for r in answers)
            await engine.start()  # same port
            response = await get_loads(channel)
            assert not response.missing_ranks and len(response.loads) == 2
            assert agent.connects == 1  # the agent never dropped its aggregator link
            assert "recovered" in caplog.text
    finally:
        await engine.stop()


async def test_agent_waits_for_the_engine_before_hello(start_aggregator):
    port = free_port()
    agg = await start_aggregator(dp_size=2, round_timeout_ms=300)
    engine = SglangHttpEngine(dp_size=2)
    engine.port = port
    agent = engine_agent(agg.port, SglangHttpSource(f"http://127.0.0.1:{port}"))
    try:
        async with running(agent):
            await asyncio.sleep(0.5)
            assert not agg.registry.sessions() and agent.connects == 0  # no hello without the engine's ranks
            await engine.start()
            await wait_for(lambda: agg.registry.live_ranks() == {0, 1}, what="ranks registered after engine start")
    finally:
        await engine.stop()


async def test_engine_ranks_through_a_fanout_to_several_aggregators(start_aggregator, channel_to):
    from agent_tasks import agent_config

    from scheduler_agent.fanout import AggregatorFanout, FanoutConfig

    engine = SglangHttpEngine(dp_size=2)
    await engine.start()
    aggs = [await start_aggregator(dp_size=2, round_timeout_ms=1000) for _ in range(2)]
    config = agent_config(0, dp_ranks=(), ranks_from_engine=True)
    fanout = AggregatorFanout(config, SglangHttpSource(engine.url), FanoutConfig(resolve_all=True),
                              resolver=lambda: [f"127.0.0.1:{agg.port}" for agg in aggs])
    task = asyncio.create_task(fanout.run())
    try:
        for agg in aggs:  # every link asked the engine for its ranks before its hello
            await wait_for(lambda agg=agg: agg.registry.live_ranks() == {0, 1}, what="engine ranks on each replica")
            response = await get_loads(channel_to(agg.port))
            assert [l.num_running_reqs for l in response.loads] == [5, 6]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await engine.stop()


async def test_a_server_without_dp_rank_in_its_only_entry_is_rank_0_and_a_bad_rank_fails_alone():
    class NoRankEngine(SglangHttpEngine):
        """sglang without data parallelism may leave dp_rank out of its single entry."""

        def v1_body(self, request):
            body = super().v1_body(request)
            for entry in body["loads"]:
                entry.pop("dp_rank")
            return body

    class OneBadRank(SglangHttpEngine):
        def v1_body(self, request):
            body = super().v1_body(request)
            body["loads"][1]["dp_rank"] = "one"
            return body

    single, broken = NoRankEngine(dp_size=1), OneBadRank(dp_size=2)
    await single.start()
    await broken.start()
    sources = [SglangHttpSource(single.url), SglangHttpSource(broken.url)]
    try:
        assert (await sources[0].discover()).dp_ranks == (0,)
        loads = await sources[0].read([0])
        assert loads[0].dp_rank == 0 and loads[0].num_running_reqs == 5
        with pytest.raises(PartialRead) as partial:
            await sources[1].read([0, 1])
        assert list(partial.value.loads) == [0] and "dp_rank" in str(partial.value)  # rank 0 is still read
    finally:
        for source in sources:
            await source.close()
        await single.stop()
        await broken.stop()


async def test_prefill_and_overloaded_utilization_keep_their_ranks(start_aggregator, channel_to):
    """sglang's utilization is -1 on a PD prefill server ("does not apply") and passes 1 past its SLO
    (max(running / max_running_requests_under_SLO, token_usage / 0.9)): neither may cost a rank."""
    entry = sglang_entry(0)
    entry["utilization"] = -1
    prefill = load_from_v1(entry, now_ms=1)
    assert not prefill.HasField("utilization") and prefill.num_running_reqs == 5  # unset, the rest read
    entry["utilization"] = -0.0
    assert load_from_v1(entry, now_ms=1).utilization == 0.0

    engine = SglangHttpEngine(dp_size=2)
    engine.utilization = {0: -1.0, 1: 1.37}
    await engine.start()
    agg = await start_aggregator(dp_size=2, round_timeout_ms=2000)
    agent = engine_agent(agg.port, SglangHttpSource(engine.url))
    try:
        async with running(agent):
            await wait_for(lambda: agg.registry.live_ranks() == {0, 1}, what="engine ranks registered")
            response = await get_loads(channel_to(agg.port))
            assert not response.missing_ranks and [l.dp_rank for l in response.loads] == [0, 1]
            assert not response.loads[0].HasField("utilization") and response.loads[1].utilization == 1.37
            assert response.summary.avg_utilization == 1.37  # the mean counts only the rank that reports it
            assert agent.rejections == 0
    finally:
        await engine.stop()


async def test_an_impossible_or_ambiguous_rank_fails_alone_and_a_404_is_not_forever(monkeypatch):
    """3e9 running requests (no int32 holds them) or a rank listed twice (a gateway in front of several
    servers, each saying dp_rank 0): that rank fails, with the reason, and the others are read (an
    out-of-range figure used to fail every rank with a traceback). A 404 on /v1/loads during a restart switches
    to /get_load, and /v1/loads is tried again later rather than never."""
    import scheduler_agent.sources.sglang_http as sglang_http

    source = SglangHttpSource("http://127.0.0.1:1")
    bodies = []

    async def get_json(path):
        return bodies[-1](path)

    monkeypatch.setattr(source.http, "get_json", get_json)
    too_many = sglang_entry(1, running=5)
    too_many["num_running_reqs"] = 3e9
    bodies.append(lambda path: {"loads": [sglang_entry(0), too_many]})
    with pytest.raises(PartialRead) as partial:
        await source.read([0, 1])
    assert list(partial.value.loads) == [0]
    assert "rank 1 num_running_reqs = 3000000000 does not fit" in str(partial.value)
    bodies.append(lambda path: {"loads": [sglang_entry(0, running=40), sglang_entry(0, running=2), sglang_entry(1)]})
    with pytest.raises(PartialRead) as partial:
        await source.read([0, 1])
    assert list(partial.value.loads) == [1] and "dp rank 0 appears more than once" in str(partial.value)

    from scheduler_agent.sources.http_client import NotFound

    def restarting(path):
        if path.startswith("/v1/loads"):
            raise NotFound(f"GET {path}: HTTP 404")
        return [{"dp_rank": 0, "num_reqs": 3, "num_waiting_reqs": 1}]

    bodies.append(restarting)
    await source.read([0])
    assert source.legacy
    legacy_body = [{"dp_rank": 0, "num_reqs": 3, "num_waiting_reqs": 1}]
    bodies.append(lambda path: {"loads": [sglang_entry(0, running=9)]} if path.startswith("/v1/loads") else legacy_body)
    assert (await source.read([0]))[0].num_running_reqs == 2 and source.legacy  # within the recheck interval
    monkeypatch.setattr(sglang_http, "V1_RECHECK_S", 0.0)
    assert (await source.read([0]))[0].num_running_reqs == 9 and not source.legacy


async def test_a_body_past_the_cap_is_a_source_error_not_hundreds_of_mib(monkeypatch):
    """An answer far past any engine's (a wrong URL, a misbehaving proxy) is refused, whether its size is
    announced or streamed, instead of being read whole into the agent beside the scheduler."""
    from aiohttp import web

    import scheduler_agent.sources.http_client as http_client

    monkeypatch.setattr(http_client, "MAX_BODY_BYTES", 1024)

    async def announced(request):
        return web.json_response({"loads": [sglang_entry(0)], "padding": "x" * 4096})

    async def streamed(request):
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(8):
            await response.write(b"x" * 512)
        await response.write_eof()
        return response

    app = web.Application()
    app.add_routes([web.get("/announced", announced), web.get("/streamed", streamed)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    http = http_client.EngineHttp(f"http://127.0.0.1:{runner.addresses[0][1]}")
    try:
        with pytest.raises(SourceError, match="-byte body, past the"):
            await http.get_text("/announced")
        with pytest.raises(SourceError, match="the body passed"):
            await http.get_text("/streamed")
    finally:
        await http.close()
        await runner.cleanup()
