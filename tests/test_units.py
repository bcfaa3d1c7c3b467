"""Pure functions: include parsing, trimming, report validation, summary."""

from __future__ import annotations

import math

import pytest

from loadagg.server.answers import summarize
from loadagg.server.errors import InvalidRequest
from loadagg.server.sections import ALL_SECTIONS, parse_include, trim
from loadagg.server.validation import load_problem, validate_hello
from loadagg.v1 import loadagg_pb2 as pb
from scheduler_agent.sources.simulator import SimulatedSource


def test_parse_include():
    assert parse_include([]) == ALL_SECTIONS
    assert parse_include(["all"]) == ALL_SECTIONS
    assert parse_include(["core"]) == frozenset()
    assert parse_include(["core, memory", "GPU"]) == {"memory", "gpu"}
    with pytest.raises(InvalidRequest, match="unknown section 'x'"):
        parse_include(["memory", "x"])
    with pytest.raises(InvalidRequest, match="unknown section 'bogus'"):  # found by tests/test_fuzz.py
        parse_include(["all", "bogus"])
    assert parse_include(["core"] * 64) == frozenset() and parse_include([",memory" * 146]) == {"memory"}
    with pytest.raises(InvalidRequest, match=r"too long \(65 items"):
        parse_include(["core"] * 65)
    with pytest.raises(InvalidRequest, match=r"too long \(1025 characters"):
        parse_include(["memory", "," * 1019])


def test_trim_never_mutates_the_shared_load():
    load = SimulatedSource(seed=1).snapshot(0)
    before = load.SerializeToString()
    trimmed = trim(load, frozenset({"memory"}))
    assert trimmed.HasField("memory") and not trimmed.HasField("gpu")
    assert load.SerializeToString() == before
    assert trim(load, ALL_SECTIONS) is load


def test_simulator_is_seeded_and_valid():
    a, b = SimulatedSource(seed=7), SimulatedSource(seed=7)
    for _ in range(50):
        la, lb = a.snapshot(3), b.snapshot(3)
        la.timestamp_ms = lb.timestamp_ms = 0
        assert la == lb
        assert load_problem(la) is None


@pytest.mark.parametrize(
    ("load", "problem"),
    [
        (pb.RankLoad(num_running_reqs=-1), "num_running_reqs is negative"),
        (pb.RankLoad(token_usage=math.nan), "token_usage is nan"),
        (pb.RankLoad(cache_hit_rate=1.5), "must be a ratio"),
        (pb.RankLoad(gen_throughput=math.inf), "gen_throughput is inf"),
        (pb.RankLoad(memory=pb.MemoryMetrics(kv_cache_gb=-2)), "memory.kv_cache_gb is negative"),
        (pb.RankLoad(spec=pb.SpeculativeMetrics(accept_rate=2)), "spec.accept_rate must be a ratio"),
        (pb.RankLoad(gpu=pb.GpuMetrics(devices=[pb.GpuDevice(index=1, utilization=3)])), "gpu[1].utilization"),
        (pb.RankLoad(stale=True), "set by the aggregator"),
    ],
)
def test_impossible_loads_are_refused(load, problem):
    assert problem in load_problem(load)


def test_validate_hello():
    hello = pb.AgentHello(instance_id="a", dp_ranks=[2, 0], dp_size=4)
    assert validate_hello(hello, 4) == (0, 2)
    with pytest.raises(InvalidRequest, match="outside"):
        validate_hello(pb.AgentHello(instance_id="a", dp_ranks=[4]), 4)
    with pytest.raises(InvalidRequest, match="dp_size=8"):
        validate_hello(pb.AgentHello(instance_id="a", dp_ranks=[0], dp_size=8), 4)
    with pytest.raises(InvalidRequest, match="repeats"):
        validate_hello(pb.AgentHello(instance_id="a", dp_ranks=[1, 1]), 4)
    with pytest.raises(InvalidRequest, match="instance_id"):
        validate_hello(pb.AgentHello(dp_ranks=[1]), 4)


def test_summary_means_only_count_ranks_that_report():
    s = summarize([pb.RankLoad(num_running_reqs=2, token_usage=0.5), pb.RankLoad(num_running_reqs=3)])
    assert s.num_ranks == 2 and s.total_running_reqs == 5
    assert s.avg_token_usage == 0.5
    assert s.total_reqs == 5


async def test_session_backlog_stays_bounded_when_the_agent_stops_reading():
    from loadagg.server.registry import MAX_PENDING_NOTICES, AgentSession

    session = AgentSession("a", (0,))
    for round_id in range(1, 1001):
        session.send(pb.AggregatorMessage(collect=pb.CollectRequest(round_id=round_id)))
        session.send(pb.AggregatorMessage(rejected=pb.ReportRejected(round_id=round_id)))
    assert session.pending == MAX_PENDING_NOTICES + 1
    notices = [await session.next_message() for _ in range(MAX_PENDING_NOTICES)]
    assert [n.rejected.round_id for n in notices] == list(range(1001 - MAX_PENDING_NOTICES, 1001))
    newest = await session.next_message()
    assert newest.collect.round_id == 1000  # only the newest collect is still worth answering
    session.close()
    assert await session.next_message() is None


async def test_callers_wait_on_their_own_futures_and_never_end_the_round():
    """A cancelled caller and an impatient one (partial answer) leave the round running for the patient one."""
    import asyncio
    import time

    from loadagg.server.communicator import WatchingCommunicator
    from loadagg.server.registry import AgentRegistry, AgentSession, Snapshot

    registry = AgentRegistry(dp_size=2)
    session = AgentSession("a", (0, 1))
    registry.register(session)
    communicator = WatchingCommunicator(registry, round_timeout=5.0)
    patient = asyncio.ensure_future(communicator.collect())
    cancelled = asyncio.ensure_future(communicator.collect())
    await asyncio.sleep(0)
    impatient = await communicator.collect(wait_timeout=0.05)  # the round is still waiting for both ranks
    assert impatient.partial and impatient.missing == (0, 1)
    cancelled.cancel()
    await asyncio.sleep(0)
    (round_id,) = {(await session.next_message()).collect.round_id}
    assert communicator.rounds_in_flight == 1 and not patient.done()
    sim = SimulatedSource(seed=3)
    now = time.monotonic()
    communicator.accept(session, round_id, [Snapshot(sim.snapshot(r), now, now) for r in (0, 1)], [])
    result = await patient
    assert not result.partial and sorted(result.fresh) == [0, 1] and result.round_id == round_id
    assert result.callers == 3 and communicator.stats.rounds_started == 1 and communicator.stats.partial_answers == 1
    assert cancelled.cancelled()


def test_tune_gc_freezes_start_up_objects():
    import gc

    from loadagg.server.aggregator import tune_gc

    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_freeze_count() > 10_000
        assert gc.get_threshold() == before  # CPython's thresholds are kept (a higher one hurt watch latency)
    finally:
        gc.unfreeze()


def test_call_latency_histogram_is_cumulative_with_inclusive_bounds():
    from prometheus_client import CollectorRegistry, generate_latest

    from loadagg.server.metrics import _CallLatency

    latency = _CallLatency()
    registry = CollectorRegistry()
    registry.register(latency)
    for seconds in (0.001, 0.0011, 0.3, 99.0):  # on a bound, just above one, mid-range, past the last
        latency.observe("loadagg", "OK", seconds)
    latency.observe("http", "400", 0.0001)
    text = generate_latest(registry).decode()
    name = "loadagg_getloads_duration_seconds"
    assert f'{name}_bucket{{api="loadagg",code="OK",le="0.0005"}} 0.0' in text
    assert f'{name}_bucket{{api="loadagg",code="OK",le="0.001"}} 1.0' in text
    assert f'{name}_bucket{{api="loadagg",code="OK",le="0.0025"}} 2.0' in text
    assert f'{name}_bucket{{api="loadagg",code="OK",le="0.5"}} 3.0' in text
    assert f'{name}_bucket{{api="loadagg",code="OK",le="+Inf"}} 4.0' in text
    assert f'{name}_count{{api="loadagg",code="OK"}} 4.0' in text
    assert f'{name}_sum{{api="loadagg",code="OK"}} 99.3021' in text
    assert f'{name}_count{{api="http",code="400"}} 1.0' in text


@pytest.mark.parametrize("value, on", [("true", True), ("1", True), ("On", True), ("false", False), ("no", False),
                                       ("off", False), ("0", False), ("", False)])
def test_loadagg_tls_env_reads_like_every_other_switch(monkeypatch, value, on):
    import argparse

    from loadagg.cli.flags import add_client_flags
    from scheduler_agent.cli import add_link_flags

    monkeypatch.setenv("LOADAGG_TLS", value)
    for add in (add_client_flags, add_link_flags):
        parser = argparse.ArgumentParser()
        add(parser)
        assert parser.parse_args([]).tls is on, (add.__module__, value)


def test_a_mean_over_ranks_without_the_figure_stays_unset():
    from loadagg.cli.render import mean_usage
    from loadagg.server.answers import summarize

    summary = summarize([pb.RankLoad(dp_rank=0, num_running_reqs=3), pb.RankLoad(dp_rank=1, num_running_reqs=4)])
    assert summary.total_running_reqs == 7 and summary.num_ranks == 2
    assert not summary.HasField("avg_token_usage") and not summary.HasField("avg_throughput")
    assert not summary.HasField("avg_utilization") and mean_usage(summary) == "-"


def test_settings_that_could_never_work_are_refused_up_front():
    from loadagg.server.security import SecurityConfig
    from scheduler_agent.channel import LinkSecurity
    from scheduler_agent.config import AgentConfig

    with pytest.raises(ValueError, match="whitespace"):
        SecurityConfig(router_token="secret ")  # presented tokens are trimmed: it could never match
    with pytest.raises(ValueError, match="at least 5"):
        LinkSecurity(keepalive_s=1)  # the aggregator would drop the link for pinging too often
    assert LinkSecurity(keepalive_s=0).keepalive_s == 0 and LinkSecurity(keepalive_s=5).keepalive_s == 5
    with pytest.raises(ValueError, match="at least 10"):
        AgentConfig(push_interval_ms=1)


def test_the_table_says_when_an_answer_was_cut_at_the_callers_deadline():
    from loadagg.cli.render import to_table

    response = pb.GetLoadsResponse(round_id=7, dp_size=2, loads=[pb.RankLoad(dp_rank=0, num_running_reqs=1)],
                                   missing_ranks=[1])
    assert "missing ranks: 1\n" in to_table(response) + "\n" and "deadline" not in to_table(response)
    response.partial = True
    assert "missing ranks: 1 (answered at this call's deadline" in to_table(response)


def test_the_table_says_where_the_answer_came_from():
    from loadagg.cli.render import to_table

    response = pb.GetLoadsResponse(round_id=7, dp_size=2, round_duration_ms=21, round_callers=3)
    assert to_table(response).startswith("round 7  dp_size 2  21 ms  shared by 3 caller(s)\n")
    response.source = pb.ANSWER_SOURCE_CACHE
    assert to_table(response).startswith("round 7 (cached)  dp_size 2")
    response.source = pb.ANSWER_SOURCE_SNAPSHOTS
    assert to_table(response).startswith("pushed snapshots (no round)  dp_size 2\n")


def test_env_choice_takes_any_case_and_names_the_variable_otherwise(monkeypatch):
    from loadagg.common import LOG_LEVELS, env_choice

    monkeypatch.setenv("LOADAGG_SOURCE", " SGLang ")
    assert env_choice("SOURCE", "simulator", ("simulator", "sglang", "vllm")) == "sglang"
    monkeypatch.setenv("LOADAGG_LOG_LEVEL", "warning")
    assert env_choice("LOG_LEVEL", "INFO", LOG_LEVELS) == "WARNING"
    monkeypatch.setenv("LOADAGG_LOG_LEVEL", "")
    assert env_choice("LOG_LEVEL", "INFO", LOG_LEVELS) == "INFO"
    monkeypatch.setenv("LOADAGG_LOG_LEVEL", "loud")
    with pytest.raises(ValueError, match="LOADAGG_LOG_LEVEL must be one of DEBUG, INFO"):
        env_choice("LOG_LEVEL", "INFO", LOG_LEVELS)


def test_retry_backoff_stays_capped_however_long_an_outage_lasts():
    from loadagg.client.load_client import KEEP_TRYING

    # a live `loadagg top` counts a failure every ~2 s: 1025 of them is ~35 minutes of outage
    for failures in (1, 10, 1025, 10_000, 2**31 - 1):
        assert 0 < KEEP_TRYING.backoff(failures) <= KEEP_TRYING.max_backoff_s * (1 + KEEP_TRYING.jitter)


def test_top_marks_stale_after_three_intervals_and_interval_0_is_the_servers_default():
    from loadagg.cli.top import TopConfig

    assert TopConfig("t", interval_ms=200, on_change=False).stale_after_ms == 600
    assert TopConfig("t", interval_ms=0, on_change=False).stale_after_ms == 3000  # not 3 ms: all would be STALE
    # On change a quiet rank is confirmed once per heartbeat (the server's default interval, 1 s) at least.
    assert TopConfig("t", interval_ms=200).stale_after_ms == 3000
    assert TopConfig("t", interval_ms=2000).stale_after_ms == 6000
    assert TopConfig("t", interval_ms=0, stale_ms=50).stale_after_ms == 50


def test_same_figures_sets_aside_stamps_and_ages_and_leaves_both_loads_as_they_were():
    from loadagg.common import same_figures

    old = pb.RankLoad(dp_rank=1, timestamp_ms=5, age_ms=2, num_running_reqs=3)
    new = pb.RankLoad(dp_rank=1, timestamp_ms=9, age_ms=7, detail_age_ms=40, num_running_reqs=3)
    before_new, before_old = new.SerializeToString(), old.SerializeToString()
    assert same_figures(new, old)
    assert new.SerializeToString() == before_new and old.SerializeToString() == before_old
    assert new.HasField("detail_age_ms") and not old.HasField("detail_age_ms")
    new.num_running_reqs = 4
    assert not same_figures(new, old)
