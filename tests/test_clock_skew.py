"""Ages are measured on the aggregator's clock (issue 19): agents whose wall clocks are an hour ahead or behind
give routers and `loadagg top` the same ages as a synchronized one, a clock ahead is noted and never makes a
snapshot look fresh, and CallbackSource stamps every read (on a copy, never the scheduler's own message)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from types import MappingProxyType

from conftest import ROOT, wait_for
from raw_agent import RawAgent

from loadagg.client import Loads
from loadagg.common import MAX_REPORTED_AGE_MS
from loadagg.server.answers import build_response
from loadagg.server.registry import Snapshot
from loadagg.server.rounds import RoundResult
from loadagg.server.validation import load_problem
from loadagg.v1 import loadagg_pb2 as pb
from loadagg.v1 import loadagg_pb2_grpc as pb_grpc
from scheduler_agent.agent import SchedulerAgent
from scheduler_agent.config import AgentConfig
from scheduler_agent.sources.held import HeldLoads
from scheduler_agent.sources.inprocess import CallbackSource, PublishedSource

HOUR_S = 3600
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
FRESH_MS = 2_000  # a figure read for this round (generous: a loaded 2-core box)


def _skewed_agent(processes, port: int, rank: int, shift_s: int):
    return processes.start(
        "skewed_agent", str(shift_s), "--aggregator", f"127.0.0.1:{port}", "--dp-size", "3", "--dp-rank", str(rank),
        "--instance-id", f"skewed-{rank}", "--push-interval-ms", "100",
        env={"PYTHONPATH": os.pathsep.join(filter(None, [TESTS_DIR, os.environ.get("PYTHONPATH")]))},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)


async def test_agents_an_hour_ahead_or_behind_show_the_aggregators_ages(start_aggregator, processes, channel_to,
                                                                       caplog):
    caplog.set_level(logging.WARNING, logger="loadagg.server.agent_link")
    agg = await start_aggregator(dp_size=3, round_timeout_ms=1000)
    fast = _skewed_agent(processes, agg.port, 0, +HOUR_S)
    _skewed_agent(processes, agg.port, 1, -HOUR_S)
    _skewed_agent(processes, agg.port, 2, 0)
    await wait_for(lambda: agg.registry.live_ranks() == {0, 1, 2}, 40, "three agents to link")
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    for _ in range(3):
        loads = Loads(await stub.GetLoads(pb.GetLoadsRequest(freshness=pb.FRESHNESS_NEW_ROUND), timeout=10))
        assert not loads.missing_ranks
        ages = {rank: loads.age_ms(rank) for rank in (0, 1, 2)}
        assert all(age < FRESH_MS for age in ages.values()), ages  # 3,600,001 ms for the slow clock before
        stamps = {load.dp_rank: load.timestamp_ms for load in loads.loads}
        skew_ms = (HOUR_S - 60) * 1000
        assert stamps[0] - stamps[2] > skew_ms and stamps[2] - stamps[1] > skew_ms  # the clocks are skewed
    # `loadagg top` reads the same ages: no rank is STALE.
    top = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadagg", "top", "--target", f"127.0.0.1:{agg.port}", "--once", "--width", "160",
        "--interval-ms", "200", cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(top.communicate(), 60)
    rows = [line for line in out.decode().splitlines() if line.count("│") > 5 and line.split("│")[1].strip().isdigit()]
    assert len(rows) == 3 and all(" ok " in row and "STALE" not in row for row in rows), out.decode() + err.decode()
    # The clock ahead is noted, once per link, and counted.
    noted = [r.getMessage() for r in caplog.records if "ahead of this aggregator's clock" in r.getMessage()]
    assert len(noted) == 1 and "skewed-0" in noted[0], noted
    assert agg.agents.clock_ahead_loads >= 3
    assert "loadagg_agent_clock_ahead_loads_total" in agg.metrics.exposition().decode()
    # The fast agent dies: its last-known load ages on the aggregator's clock (it showed 0 ms, for an hour, before).
    fast.send_signal(signal.SIGKILL)
    await wait_for(lambda: 0 not in agg.registry.live_ranks(), 10, "the fast agent's link to end")
    await asyncio.sleep(1.2)
    loads = Loads(await stub.GetLoads(pb.GetLoadsRequest(allow_stale=True), timeout=10))
    assert loads.rank(0).stale and loads.age_ms(0) >= 1_000, loads.response
    assert loads.age_ms(2) < FRESH_MS


def test_loads_age_is_the_servers_plus_the_time_since_the_answer():
    response = pb.GetLoadsResponse(timestamp_ms=1_000, loads=[pb.RankLoad(dp_rank=0, age_ms=50, timestamp_ms=9**15)])
    loads = Loads(response)
    assert loads.age_ms(0) == 50  # at the answer's time; the agent's timestamp plays no part
    assert loads.age_ms(0, now_ms=1_300) == 350 and loads.age_ms(1) is None


async def test_callback_source_stamps_each_read_on_a_copy():
    """A scheduler updating one RankLoad in place: each read is stamped anew, its own message never."""
    live = pb.RankLoad(dp_rank=0, num_running_reqs=1)
    source = CallbackSource(lambda ranks: [live])
    first = (await source.read([0]))[0]
    live.num_running_reqs = 2
    await asyncio.sleep(0.05)
    second = (await source.read([0]))[0]
    assert live.timestamp_ms == 0  # the scheduler's message is untouched
    assert (first.num_running_reqs, second.num_running_reqs) == (1, 2)
    assert second.timestamp_ms >= first.timestamp_ms + 40  # stamped at each read (frozen at the first before)


async def test_a_callback_rank_updated_in_place_keeps_a_fresh_age(start_aggregator, channel_to):
    agg = await start_aggregator(dp_size=1)
    live = pb.RankLoad(dp_rank=0, num_running_reqs=0)

    def callback(ranks):
        live.num_running_reqs += 1  # the scheduler's own object, updated in place
        return [live]

    agent = SchedulerAgent(AgentConfig(aggregator=f"127.0.0.1:{agg.port}", dp_ranks=(0,), dp_size=1,
                                       instance_id="callback", backoff_initial_ms=20, backoff_max_ms=200),
                           CallbackSource(callback))
    task = asyncio.create_task(agent.run())
    try:
        await wait_for(lambda: agg.registry.live_ranks() == {0}, what="the agent to link")
        stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
        answers = []
        for _ in range(3):
            answers.append(Loads(await stub.GetLoads(pb.GetLoadsRequest(freshness=pb.FRESHNESS_NEW_ROUND),
                                                     timeout=10)))
            await asyncio.sleep(0.3)
        assert all(loads.age_ms(0) < FRESH_MS for loads in answers)
        stamps = [loads.rank(0).timestamp_ms for loads in answers]
        assert stamps[2] - stamps[0] >= 500, stamps  # a new stamp each read, not the first one for ever
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_load_published_once_ages_while_it_is_held(start_aggregator, channel_to):
    """A scheduler that published once and went quiet: each read reports how long the agent has held the figures,
    so routers see them age (they were reported as just read, age 0, for as long as the agent kept them)."""
    source = PublishedSource()
    source.publish(pb.RankLoad(dp_rank=0, num_running_reqs=4, age_ms=100))
    await asyncio.sleep(0.3)
    assert (await source.read([0]))[0].age_ms >= 400
    agg = await start_aggregator(dp_size=1)
    agent = SchedulerAgent(AgentConfig(aggregator=f"127.0.0.1:{agg.port}", dp_ranks=(0,), dp_size=1,
                                       instance_id="published", backoff_initial_ms=20, backoff_max_ms=200), source)
    task = asyncio.create_task(agent.run())
    try:
        await wait_for(lambda: agg.registry.live_ranks() == {0}, what="the agent to link")
        await asyncio.sleep(0.7)
        stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
        loads = Loads(await stub.GetLoads(pb.GetLoadsRequest(freshness=pb.FRESHNESS_NEW_ROUND), timeout=10))
        assert loads.rank(0).num_running_reqs == 4 and loads.age_ms(0) >= 1_000, loads.response
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_detail_figures_past_the_age_bound_are_left_out_not_the_rank():
    """A push source whose detail read has failed for over an hour still reports its rank's fresh core: with the
    old detail in, the whole load was refused (detail_age_ms past the bound) and the rank went missing."""
    held = HeldLoads("feed", core_fields=("num_running_reqs",))
    now = 10_000.0
    held.set_detail(0, pb.RankLoad(token_usage=0.5), taken_at=now - MAX_REPORTED_AGE_MS / 1000 - 1)
    held.set_core(0, pb.RankLoad(num_running_reqs=3), taken_at=now - 0.2)
    load = held.load(0, now)
    assert load.num_running_reqs == 3 and load.age_ms == 200
    assert not load.HasField("token_usage") and not load.HasField("detail_age_ms")
    assert load_problem(load) is None
    held.set_detail(0, pb.RankLoad(token_usage=0.5), taken_at=now - 5)
    assert held.load(0, now).detail_age_ms == 5_000 and held.load(0, now).token_usage == 0.5


def test_a_later_answer_never_re_ages_an_earlier_rounds_figures():
    """A round's answer, built for a new view after a later answer (a stale entry, pushed snapshots) aged the
    same snapshot, still shows each rank's age at that round's end: the later answers age copies of their own."""
    def result(finished: float, fresh: dict, stale: dict) -> RoundResult:
        return RoundResult(round_id=1, dp_size=1, timestamp_ms=0, finished=finished, started=finished, duration_ms=0,
                           fresh=MappingProxyType(fresh), stale=MappingProxyType(stale),
                           missing=() if fresh else (0,), callers=1)

    snap = Snapshot(pb.RankLoad(dp_rank=0, num_running_reqs=1), received=100.0, taken=100.0)
    first = result(100.5, {0: snap.aged(100.5)}, {})  # what Round.result does at the round's end
    later = result(103.0, {}, {0: snap})
    assert build_response(later, None, frozenset(), allow_stale=True).loads[0].age_ms == 3_000
    assert build_response(first, 0, frozenset(), allow_stale=False).loads[0].age_ms == 500


async def test_a_cached_answer_ages_a_rank_whose_snapshot_is_gone(start_aggregator, channel_to):
    """A young round laid under a newer push: a rank the round answered whose agent has left since (and whose
    snapshot was dropped) keeps aging in the answer, stamped now (it showed its age at the round's end)."""
    agg = await start_aggregator(dp_size=2, forget_rank_after_s=0.2)
    leaving, staying = RawAgent(agg.port, "leaving", [0]), RawAgent(agg.port, "staying", [1])
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    try:
        await leaving.connect()
        await staying.connect()
        call = asyncio.ensure_future(stub.GetLoads(pb.GetLoadsRequest(freshness=pb.FRESHNESS_NEW_ROUND), timeout=10))
        for agent, rank in ((leaving, 0), (staying, 1)):
            collect = await agent.next_collect()
            await agent.report(collect.round_id, [pb.RankLoad(dp_rank=rank, num_running_reqs=rank + 1)])
        assert not (await call).missing_ranks
        await leaving.close()
        await asyncio.sleep(0.6)
        await staying.report(0, [pb.RankLoad(dp_rank=1, num_running_reqs=7)])  # a push: newer than the round
        await wait_for(lambda: agg.registry.snapshot(1).load.num_running_reqs == 7, what="the push")
        assert agg.registry.snapshot(0) is None  # forgotten
        loads = Loads(await stub.GetLoads(pb.GetLoadsRequest(freshness=pb.FRESHNESS_CACHED, max_staleness_ms=60_000),
                                          timeout=10))
        assert loads.source == "snapshots" and loads.rank(1).num_running_reqs == 7
        assert loads.rank(0).num_running_reqs == 1 and loads.age_ms(0) >= 600, loads.response
    finally:
        await leaving.close()
        await staying.close()
