"""`scheduler-agent --source sglang --engine-url http://...` as a real process beside a real engine stand-in."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from agent_tasks import get_loads
from conftest import ROOT, wait_for
from engines import SglangHttpEngine


async def test_sglang_agent_process_serves_engine_ranks_and_survives_the_engine(start_aggregator, channel_to,
                                                                                processes):
    engine = SglangHttpEngine(dp_size=2)
    await engine.start()
    agg = await start_aggregator(dp_size=2, round_timeout_ms=1000)
    channel = channel_to(agg.port)
    proc = processes.start("scheduler_agent", "--source", "sglang", "--engine-url", engine.url,
                           "--aggregator", f"127.0.0.1:{agg.port}", "--push-interval-ms", "100",
                           env={"LOADAGG_INSTANCE_ID": "sglang-beside-engine"})
    try:
        await wait_for(lambda: agg.registry.live_ranks() == {0, 1}, timeout=30, what="agent process linked")
        response = await get_loads(channel)
        assert [l.num_running_reqs for l in response.loads] == [5, 6]  # no --dp-rank/--dp-size: the engine's
        assert response.loads[0].memory.kv_cache_gb == 40.5
        session = agg.registry.owner(0)
        assert session.source == "sglang" and session.instance_id == "sglang-beside-engine"

        await engine.stop()  # the engine goes away: ranks missing, the agent stays up and linked
        for _ in range(3):
            assert (await get_loads(channel)).missing_ranks == [0, 1]
        assert proc.poll() is None and agg.registry.live_ranks() == {0, 1}
        await engine.start()
        engine.running[1] = 30
        await wait_for(lambda: agg.registry.snapshot(1).load.num_running_reqs == 30, timeout=30,
                       what="a push with the engine's new figure")
        assert not (await get_loads(channel)).missing_ranks
    finally:
        await engine.stop()
    proc.terminate()
    output = await asyncio.to_thread(proc.communicate, timeout=20)
    log = output[0]
    assert log.count("source sglang failed") == 1, log  # logged once for the whole outage
    assert log.count("NVML is not available") == 1 and "recovered" in log


def test_cli_rejects_a_bad_engine_url():
    result = subprocess.run([sys.executable, "-m", "scheduler_agent", "--source", "vllm", "--engine-url",
                             "tcp://x:1"], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 2 and "http://HOST:PORT or grpc://HOST:PORT" in result.stderr


def test_cli_rejects_a_repeated_rank_up_front():
    """Every aggregator refuses a hello that repeats a rank: said once at start-up (usage error), not as a
    refusal retried forever."""
    result = subprocess.run([sys.executable, "-m", "scheduler_agent", "--aggregator", "127.0.0.1:1", "--dp-size",
                             "2", "--dp-rank", "0", "--dp-rank", "0"], capture_output=True, text=True, timeout=30,
                            cwd=ROOT)
    assert result.returncode == 2 and "repeat a rank: [0, 0]" in result.stderr


def test_every_new_flag_reads_its_env_var(monkeypatch):
    from scheduler_agent.cli import config_from_args, parser
    from scheduler_agent.sources import build_source

    monkeypatch.setenv("LOADAGG_SOURCE", "vllm")
    monkeypatch.setenv("LOADAGG_ENGINE_URL", "grpc://127.0.0.1:30001")
    monkeypatch.setenv("LOADAGG_ENGINE_TIMEOUT_MS", "150")
    monkeypatch.setenv("LOADAGG_GPU", "off")
    monkeypatch.setenv("LOADAGG_GPU_DEVICES", "0=1")
    monkeypatch.setenv("LOADAGG_PUSH_INTERVAL_MS", "250")
    monkeypatch.setenv("LOADAGG_PUSH_REFRESH_MS", "5000")
    config = config_from_args(parser().parse_args([]))
    assert (config.source, config.engine_url, config.engine_timeout_ms) == ("vllm", "grpc://127.0.0.1:30001", 150)
    assert (config.gpu, config.gpu_devices, config.push_interval_ms, config.push_refresh_ms) == ("off", "0=1", 250,
                                                                                                 5000)
    assert config.ranks_from_engine and config.dp_ranks == ()  # every rank the engine runs
    assert config_from_args(parser().parse_args(["--gpu", "--dp-rank", "1"])).gpu == "on"
    assert config_from_args(parser().parse_args(["--dp-rank", "1"])).dp_ranks == (1,)
    monkeypatch.setenv("LOADAGG_SOURCE", "simulator")
    assert config_from_args(parser().parse_args([])).dp_ranks == (0,)  # the simulator's default is unchanged
    monkeypatch.setenv("LOADAGG_ENGINE_API_KEY", "from-env")
    monkeypatch.setenv("LOADAGG_SOURCE", "sglang")
    monkeypatch.setenv("LOADAGG_ENGINE_URL", "http://127.0.0.1:30000")
    config = config_from_args(parser().parse_args([]))
    assert config.engine_api_key == "from-env" and "from-env" not in repr(config)
    # (LOADAGG_GPU=off: no GPU wrapper; the sglang source reads /v1/loads through its HTTP source)
    assert build_source(config).http.http.headers == {"Authorization": "Bearer from-env"}
    monkeypatch.setenv("LOADAGG_SGLANG_LOAD_ENDPOINT", "tcp://10.1.2.3:5600")
    monkeypatch.setenv("LOADAGG_PUSH_COALESCE_MS", "4")
    monkeypatch.setenv("LOADAGG_DETAIL_INTERVAL_MS", "2000")
    monkeypatch.setenv("LOADAGG_STREAM_SILENCE_MS", "9000")
    config = config_from_args(parser().parse_args([]))
    assert (config.sglang_load_endpoint, config.push_coalesce_ms, config.detail_interval_ms,
            config.stream_silence_ms) == ("tcp://10.1.2.3:5600", 4.0, 2000, 9000)
    assert build_source(config).manual == "tcp://10.1.2.3:5600"
    assert config_from_args(parser().parse_args(["--engine-api-key", "flag"])).engine_api_key == "flag"


async def test_two_engines_fill_one_cluster_with_rank_offset(start_aggregator, channel_to, processes):
    """Two DP-2 engines, each numbering its ranks 0..1, under one aggregator of dp_size 4: the second agent
    serves its engine's ranks as 2..3 in rounds, in pushes and in the failed ranks of an engine outage."""
    engine_a, engine_b = SglangHttpEngine(dp_size=2), SglangHttpEngine(dp_size=2)
    engine_b.running = {0: 40, 1: 41}
    await engine_a.start()
    await engine_b.start()
    agg = await start_aggregator(dp_size=4, round_timeout_ms=5000)
    channel = channel_to(agg.port)
    target = f"127.0.0.1:{agg.port}"
    processes.start("scheduler_agent", "--source", "sglang", "--engine-url", engine_a.url, "--aggregator", target,
                    "--dp-size", "4", "--no-gpu", env={"LOADAGG_INSTANCE_ID": "engine-a"})
    processes.start("scheduler_agent", "--source", "sglang", "--engine-url", engine_b.url, "--aggregator", target,
                    "--push-interval-ms", "100", "--no-gpu",
                    env={"LOADAGG_INSTANCE_ID": "engine-b", "LOADAGG_RANK_OFFSET": "2"})
    try:
        await wait_for(lambda: agg.registry.live_ranks() == {0, 1, 2, 3}, timeout=30, what="both agents linked")
        assert agg.registry.owner(2).instance_id == agg.registry.owner(3).instance_id == "engine-b"
        response = await get_loads(channel)
        assert [(l.dp_rank, l.num_running_reqs) for l in response.loads] == [(0, 5), (1, 6), (2, 40), (3, 41)]
        assert not response.missing_ranks

        engine_b.running[1] = 77  # a push carries the engine's rank 1 as cluster rank 3
        await wait_for(lambda: agg.registry.snapshot(3).load.num_running_reqs == 77, timeout=30,
                       what="a shifted push")
        assert agg.registry.snapshot(1).load.num_running_reqs == 6

        await engine_b.stop()  # its ranks fail as 2 and 3, so rounds end on the reports, not the 5 s deadline
        timed_out = agg.communicator.stats.rounds_timed_out
        response = await get_loads(channel)
        assert response.missing_ranks == [2, 3] and [l.dp_rank for l in response.loads] == [0, 1]
        assert agg.communicator.stats.rounds_timed_out == timed_out
    finally:
        await engine_a.stop()
        await engine_b.stop()


def test_rank_offset_must_fit_the_cluster():
    import pytest

    from scheduler_agent.cli import config_from_args, parser
    from scheduler_agent.config import AgentConfig

    assert config_from_args(parser().parse_args(["--dp-rank", "1", "--rank-offset", "4"])).rank_offset == 4
    with pytest.raises(ValueError, match=r"dp ranks \[3\] \(\+ rank_offset 2\) do not fit dp_size=4"):
        AgentConfig(dp_ranks=(3,), dp_size=4, rank_offset=2)
    with pytest.raises(ValueError, match="rank_offset must be >= 0"):
        AgentConfig(dp_ranks=(0,), rank_offset=-1)


async def test_agent_follows_an_engine_restarted_with_other_ranks(start_aggregator, channel_to, processes):
    """The engine's DP layout changes under a running agent: the agent notices at its next rank check, links
    again and claims the new ranks; an engine that is down meanwhile changes nothing."""
    engine = SglangHttpEngine(dp_size=2)
    await engine.start()
    agg = await start_aggregator(dp_size=4, round_timeout_ms=1000)
    channel = channel_to(agg.port)
    processes.start("scheduler_agent", "--source", "sglang", "--engine-url", engine.url, "--no-gpu",
                    "--aggregator", f"127.0.0.1:{agg.port}", "--dp-size", "4", "--rediscover-interval-s", "0.2",
                    env={"LOADAGG_INSTANCE_ID": "follows-engine"})
    try:
        await wait_for(lambda: agg.registry.live_ranks() == {0, 1}, timeout=30, what="agent linked")

        await engine.stop()  # down: the checks fail, the ranks stay claimed (and fail per round)
        await asyncio.sleep(1.0)
        assert agg.registry.live_ranks() == {0, 1}
        assert (await get_loads(channel)).missing_ranks == [0, 1, 2, 3]  # 2 and 3: never served

        engine.dp_size, engine.running[2] = 3, 9  # back with DP 3
        await engine.start()
        await wait_for(lambda: agg.registry.live_ranks() == {0, 1, 2}, timeout=30, what="the new rank claimed")
        response = await get_loads(channel)
        assert [(l.dp_rank, l.num_running_reqs) for l in response.loads] == [(0, 5), (1, 6), (2, 9)]
        assert response.missing_ranks == [3]

        engine.dp_size = 1  # and down to one rank: the others are released, not left failing
        await wait_for(lambda: agg.registry.live_ranks() == {0}, timeout=30, what="ranks released")
        assert agg.registry.owner(0).instance_id == "follows-engine"
    finally:
        await engine.stop()
