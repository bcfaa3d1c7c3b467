"""vLLM over Prometheus text: a realistic 2-engine /metrics page on loopback, parsed by prometheus_client."""

from __future__ import annotations

import asyncio
import logging

import pytest
from agent_tasks import engine_agent, get_loads, running
from conftest import wait_for
from engines import VLLM_PAGE, VllmHttpEngine

from scheduler_agent.sources.base import SourceError
from scheduler_agent.sources.vllm_metrics import VllmMetricsSource, parse_page


def test_page_parses_per_engine_rank():
    engine = VllmHttpEngine()
    figures = parse_page(engine.page())
    assert set(figures) == {0, 1}
    assert figures[0]["running"] == 7 and figures[0]["waiting"] == 4 and figures[0]["kv_usage"] == 0.25
    # each engine's own 16384 blocks, though both labels carry the front end's sum (32768)
    assert figures[0]["capacity"] == figures[1]["capacity"] == 16384 * 16 and figures[0]["generated"] == 1000.0
    assert figures[1]["queries"] == 0.0

    older = "\n".join(line.replace("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc").replace('engine="1"',
                                                                                                    'engine="0"')
                      for line in VLLM_PAGE.splitlines() if 'engine="1"' not in line) + "\n"
    single = parse_page(older.replace("{running0}", "1.0").replace("{generated0}", "5.0")
                        .replace("{queries0}", "4.0").replace("{hits0}", "1.0"))
    assert set(single) == {0} and single[0]["kv_usage_v0"] == 0.25
    assert single[0]["capacity"] == 32768 * 16  # one engine: its blocks are the whole sum
    v1_before_0_10 = older.replace("vllm:prefix_cache_", "vllm:gpu_prefix_cache_")  # the counters' older names
    renamed = parse_page(v1_before_0_10.replace("{running0}", "1.0").replace("{generated0}", "5.0")
                         .replace("{queries0}", "4.0").replace("{hits0}", "1.0"))
    assert (renamed[0]["hits"], renamed[0]["queries"]) == (1.0, 4.0) and "hits_gpu" not in renamed[0]

    noisy = engine.page() + "".join(
        f'vllm:e2e_request_latency_seconds_bucket{{engine="0",le="{b}.0",model_name="m"}} 1.0\n' for b in range(500))
    assert parse_page(noisy) == figures  # histograms are skipped before parsing, figures unchanged
    broken = engine.page().replace('vllm:num_requests_waiting{engine="1",model_name="Qwen/Qwen3-8B"} 0.0',
                                   'vllm:num_requests_waiting{engine="1",model_name="Qwen/Qwen3-8B"} zero')
    with pytest.raises(SourceError):
        parse_page(broken)  # a malformed line we read still fails the page

    no_label = parse_page("# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 2\n")
    assert no_label == {0: {"running": 2.0}}  # no DP: everything is rank 0
    for garbage in ("<html>502</html>{{{", "# TYPE x gauge\nx 1\n", 'vllm:num_requests_running{engine="a"} 1\n'):
        with pytest.raises(SourceError):
            parse_page(garbage)


async def test_rates_come_from_counter_deltas_over_time():
    engine = VllmHttpEngine()
    await engine.start()
    source = VllmMetricsSource(engine.url, window_s=0.2)
    try:
        first = await source.read([0, 1])
        load = first[0]
        assert (load.num_running_reqs, load.num_waiting_reqs, load.token_usage) == (7, 4, 0.25)
        assert load.max_total_num_tokens == 262144 and load.num_used_tokens == 65536
        assert not load.HasField("gen_throughput")  # one sample is no rate
        assert load.cache_hit_rate == 0.25  # lifetime ratio until a window completes
        assert not first[1].HasField("cache_hit_rate")  # engine 1 saw no query: no ratio at all
        for absent in ("memory", "spec", "lora", "disagg", "queues", "gpu", "max_running_requests"):
            assert not load.HasField(absent), absent

        engine.generated0 += 600
        engine.queries0 += 100
        engine.hits0 += 90
        await asyncio.sleep(0.3)
        load = (await source.read([0]))[0]
        assert 0 < load.gen_throughput <= 600 / 0.2  # 600 tokens over a window of at least 0.2 s
        assert load.cache_hit_rate == pytest.approx(0.9)  # this window's hits / queries

        engine.generated0 = 10.0  # the engine restarted: counters start over, no negative rate
        await asyncio.sleep(0.3)
        load = (await source.read([0]))[0]
        assert load.gen_throughput >= 0
    finally:
        await source.close()
        await engine.stop()


async def test_vllm_engine_through_the_aggregator_with_faults(start_aggregator, channel_to, caplog):
    caplog.set_level(logging.WARNING, logger="scheduler_agent.source")
    engine = VllmHttpEngine()
    await engine.start()
    agg = await start_aggregator(dp_size=2, round_timeout_ms=1000)
    agent = engine_agent(agg.port, VllmMetricsSource(engine.url))
    channel = channel_to(agg.port)
    try:
        async with running(agent):
            await wait_for(lambda: agg.registry.live_ranks() == {0, 1}, what="engine ranks registered")
            assert agent.engine.dp_size == 2 and agent.dp_size == 0  # the hello takes the aggregator's size
            response = await get_loads(channel)
            assert [(l.dp_rank, l.num_running_reqs) for l in response.loads] == [(0, 7), (1, 3)]
            for mode in ("error", "garbage", "hang"):
                engine.set_mode(mode)
                assert (await get_loads(channel)).missing_ranks == [0, 1], mode
                assert (await get_loads(channel)).missing_ranks == [0, 1], mode
                engine.set_mode("ok")
                assert not (await get_loads(channel)).missing_ranks, mode
            # one warning per failure state, however many rounds (the source's own: another logger, such as
            # asyncio reporting gRPC's poller of an earlier test's closed loop, is not this test's business)
            assert len([r for r in caplog.records if r.name == "scheduler_agent.source"]) == 3, caplog.text
    finally:
        await engine.stop()


async def test_a_figure_that_cannot_be_true_fails_its_rank_never_clamped_or_zeroed(monkeypatch):
    """NaN or 2.5 KV usage, NaN or 3e9 running requests: that rank fails (missing, with the reason), the other is
    read; a NaN counter gives no rate at all (it gave 0 tokens/s and a cache hit rate of 1.0); a series with a
    malformed engine label is skipped without failing any rank."""
    from scheduler_agent.sources.base import PartialRead

    engine = VllmHttpEngine()
    page = engine.page()
    usage0 = 'vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen3-8B"} 0.25'
    running0 = 'vllm:num_requests_running{engine="0",model_name="Qwen/Qwen3-8B"} 7.0'
    source = VllmMetricsSource("http://127.0.0.1:1", window_s=0.0)

    async def serve(text):
        async def get_text(path):
            return text
        monkeypatch.setattr(source.http, "get_text", get_text)
        return await source.read([0, 1])

    for broken, said in ((page.replace(usage0, usage0.replace("0.25", "NaN")), "kv cache usage is nan"),
                         (page.replace(usage0, usage0.replace("0.25", "2.5")), "kv cache usage is 2.5"),
                         (page.replace(running0, running0.replace("7.0", "NaN")), "running is nan"),
                         (page.replace(running0, running0.replace("7.0", "3e9")), "does not fit")):
        with pytest.raises(PartialRead) as partial:
            await serve(broken)
        assert said in str(partial.value) and list(partial.value.loads) == [1], said

    nan_hits = page.replace('vllm:prefix_cache_hits_total{engine="0",model_name="Qwen/Qwen3-8B"} 250.0',
                            'vllm:prefix_cache_hits_total{engine="0",model_name="Qwen/Qwen3-8B"} NaN')
    fresh = VllmMetricsSource("http://127.0.0.1:1", window_s=0.0)
    source = fresh
    loads = await serve(nan_hits)
    assert not loads[0].HasField("cache_hit_rate") and loads[0].num_running_reqs == 7
    loads = await serve(nan_hits.replace("} 1000.0\n", "} 2000.0\n"))  # a window later: still no made-up rate
    assert not loads[0].HasField("cache_hit_rate") and loads[0].gen_throughput > 0

    odd_label = page + 'vllm:num_requests_running{engine="x1",model_name="Qwen/Qwen3-8B"} 9.0\n'
    assert sorted(parse_page(odd_label)) == [0, 1]
