"""The in-process API (an embedded agent fed by its scheduler) and unsolicited pushes, against a real aggregator."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from agent_tasks import agent_config, get_loads, running
from conftest import wait_for

import scheduler_agent
from loadagg.v1 import loadagg_pb2 as pb
from scheduler_agent import AgentConfig, CallbackSource, RankLoad, SchedulerAgent
from scheduler_agent.push import PushTracker, next_push_at


async def test_embedded_scheduler_publishes_its_own_figures(start_aggregator, channel_to):
    agg = await start_aggregator(dp_size=3, round_timeout_ms=300)
    agent = scheduler_agent.SchedulerAgent(AgentConfig(aggregator=f"127.0.0.1:{agg.port}", dp_ranks=(0, 1, 2),
                                                       dp_size=3, instance_id="embedded"))
    agent.publish(RankLoad(dp_rank=0, num_running_reqs=12, num_waiting_reqs=3, token_usage=0.5),
                  RankLoad(dp_rank=1, num_running_reqs=1))
    async with running(agent):
        await wait_for(agent.connected.is_set, what="embedded agent linked")
        response = await get_loads(channel_to(agg.port))
        assert [(l.dp_rank, l.num_running_reqs) for l in response.loads] == [(0, 12), (1, 1)]
        assert response.missing_ranks == [2]  # never published: missing, not zero
        assert response.loads[0].token_usage == 0.5 and not response.loads[1].HasField("token_usage")
        assert response.loads[0].timestamp_ms > 0

        mine = RankLoad(dp_rank=2, num_running_reqs=7)
        agent.publish(mine)
        mine.num_running_reqs = 99  # the agent kept a copy
        response = await get_loads(channel_to(agg.port), dp_rank=2)
        assert [l.num_running_reqs for l in response.loads] == [7]
    with pytest.raises(TypeError):
        SchedulerAgent(agent_config(agg.port, dp_ranks=(0,)), CallbackSource(lambda r: {})).publish(RankLoad())


async def test_callback_source_is_called_per_round(start_aggregator, channel_to):
    agg = await start_aggregator(dp_size=2, round_timeout_ms=300)
    calls = []

    async def figures(ranks):
        calls.append(ranks)
        return [RankLoad(dp_rank=r, num_waiting_reqs=len(calls)) for r in ranks]

    agent = SchedulerAgent(agent_config(agg.port, dp_ranks=(0, 1), dp_size=2), CallbackSource(figures))
    async with running(agent):
        await wait_for(agent.connected.is_set, what="agent linked")
        first = await get_loads(channel_to(agg.port))
        second = await get_loads(channel_to(agg.port))
        assert [l.num_waiting_reqs for l in second.loads] == [l.num_waiting_reqs + 1 for l in first.loads]
        assert calls[-1] == (0, 1)


async def test_background_agent_for_a_blocking_scheduler(start_aggregator, channel_to):
    agg = await start_aggregator(dp_size=1, round_timeout_ms=300)
    config = agent_config(agg.port, dp_ranks=(0,), dp_size=1, push_interval_ms=20)

    def scheduler_thread_body(agent: scheduler_agent.BackgroundAgent) -> None:
        for running_now in range(1, 6):  # a blocking scheduler loop publishing as it goes
            agent.publish(RankLoad(dp_rank=0, num_running_reqs=running_now))
            time.sleep(0.02)

    with scheduler_agent.BackgroundAgent(config) as agent:
        await wait_for(lambda: agent.connected, what="background agent linked")
        await asyncio.to_thread(scheduler_thread_body, agent)
        await wait_for(lambda: agg.registry.snapshot(0) is not None
                       and agg.registry.snapshot(0).load.num_running_reqs == 5, what="last published figure pushed")
        response = await get_loads(channel_to(agg.port))
        assert [l.num_running_reqs for l in response.loads] == [5]
    assert agent._thread is None  # stopped and joined
    await wait_for(lambda: not agg.registry.live_ranks(), what="link closed")


def test_push_tracker_ignores_timestamp_only_changes():
    tracker = PushTracker()
    load = RankLoad(dp_rank=0, num_running_reqs=1, timestamp_ms=1)
    assert tracker.changed([load]) == [load]
    tracker.sent([load])
    assert tracker.changed([RankLoad(dp_rank=0, num_running_reqs=1, timestamp_ms=999)]) == []
    assert len(tracker.changed([RankLoad(dp_rank=0, num_running_reqs=2, timestamp_ms=999)])) == 1
    tracker.reset()
    assert len(tracker.changed([load])) == 1


def test_pushes_keep_to_the_interval_and_skip_the_ticks_a_slow_push_ran_past():
    assert next_push_at(0.0, 0.03, 0.05) == 0.05  # a 30 ms push does not stretch the 50 ms period
    assert next_push_at(0.05, 0.07, 0.05) == 0.10
    assert next_push_at(0.0, 0.05, 0.05) == pytest.approx(0.10)  # due right now: the next tick, not at once
    assert next_push_at(0.0, 0.12, 0.05) == pytest.approx(0.15)  # ran past two ticks: skip them, no burst


async def test_a_slow_source_does_not_stretch_the_push_period(start_aggregator):
    agg = await start_aggregator(dp_size=1, round_timeout_ms=300)
    reads: list[float] = []

    async def slow_figures(ranks):  # an engine that takes 30 ms to answer, its figures changing every read
        reads.append(time.monotonic())
        await asyncio.sleep(0.03)
        return [RankLoad(dp_rank=r, num_waiting_reqs=len(reads)) for r in ranks]

    agent = SchedulerAgent(agent_config(agg.port, dp_ranks=(0,), dp_size=1, push_interval_ms=50),
                           CallbackSource(slow_figures))
    async with running(agent):
        await wait_for(lambda: len(reads) >= 2, what="pushes under way")
        first = len(reads)
        await asyncio.sleep(1.0)
        pushed = len(reads) - first
    # Every 50 ms: ~20 reads a second. Sleeping 50 ms after each 30 ms push would give ~12.
    assert pushed >= 16, f"{pushed} pushes in 1 s at a 50 ms interval"


async def test_pushes_arrive_only_on_change(start_aggregator):
    agg = await start_aggregator(dp_size=2, round_timeout_ms=300)
    agent = SchedulerAgent(agent_config(agg.port, dp_ranks=(0, 1), dp_size=2, push_interval_ms=20))
    agent.publish(RankLoad(dp_rank=0, num_running_reqs=4), RankLoad(dp_rank=1, num_running_reqs=5))
    async with running(agent):
        await wait_for(lambda: agg.registry.snapshot(1) is not None, what="first push stored")
        assert agg.registry.snapshot(0).load.num_running_reqs == 4
        assert agg.communicator.stats.rounds_started == 0  # no router asked: these came unsolicited
        await wait_for(lambda: agent.pushes_sent >= 1, what="push counted")
        sent = agent.pushes_sent
        assert sent == 1  # both ranks in one push

        skipped = agent.pushes_skipped
        await wait_for(lambda: agent.pushes_skipped >= skipped + 5, what="quiet push ticks")
        agent.publish(RankLoad(dp_rank=0, num_running_reqs=4, timestamp_ms=int(time.time() * 1000) + 5))
        await wait_for(lambda: agent.pushes_skipped >= skipped + 10, what="more quiet push ticks")
        assert agent.pushes_sent == sent  # unchanged (or only re-timestamped) loads are not re-sent

        agent.publish(RankLoad(dp_rank=1, num_running_reqs=6))
        await wait_for(lambda: agg.registry.snapshot(1).load.num_running_reqs == 6, what="change pushed")
        assert agent.pushes_sent == sent + 1
        assert agg.agents.reports_rejected == 0


async def test_a_published_change_is_pushed_at_once_and_changes_within_the_interval_coalesce(start_aggregator):
    """The push interval bounds how often a publishing scheduler's changes are pushed, not how late: with a 2 s
    interval, a change is pushed as it comes (the last push being that old) and the changes of the next
    interval go out together, once."""
    agg = await start_aggregator(dp_size=1)
    agent = SchedulerAgent(agent_config(agg.port, dp_ranks=(0,), dp_size=1, push_interval_ms=2000))
    agent.publish(RankLoad(dp_rank=0, num_running_reqs=1))
    async with running(agent):
        await wait_for(lambda: agg.registry.snapshot(0) is not None, what="first push stored")
        await asyncio.sleep(2.1)  # an interval since that push: the next change goes out at once
        pushes = agent.pushes_sent
        published = time.monotonic()
        agent.publish(RankLoad(dp_rank=0, num_running_reqs=2))
        await wait_for(lambda: agg.registry.snapshot(0).load.num_running_reqs == 2, what="the change pushed")
        assert time.monotonic() - published < 1.5 and agent.pushes_sent == pushes + 1  # well before the interval
        for value in range(3, 8):  # within the interval that push started: coalesced into one push
            agent.publish(RankLoad(dp_rank=0, num_running_reqs=value))
        await wait_for(lambda: agg.registry.snapshot(0).load.num_running_reqs == 7, what="the coalesced push")
        assert agent.pushes_sent == pushes + 2


async def test_a_change_first_sent_in_a_late_round_answer_still_reaches_the_aggregator(start_aggregator, channel_to):
    """The engine turns slow as its load changes (5 -> 50 running): the round's answer carries 50 but comes
    after the round's deadline. The agent counts 50 as sent and does not push it again, so that late answer
    must refresh the rank's snapshot (it was dropped, and the aggregator held 5, marked stale, for good)."""
    agg = await start_aggregator(dp_size=1, round_timeout_ms=300)
    engine = {"running": 5, "delay": 0.0}

    async def figures(ranks):
        await asyncio.sleep(engine["delay"])
        return [RankLoad(dp_rank=r, num_running_reqs=engine["running"]) for r in ranks]

    agent = SchedulerAgent(agent_config(agg.port, dp_ranks=(0,), dp_size=1, push_interval_ms=1000),
                           CallbackSource(figures))
    async with running(agent):
        await wait_for(lambda: agg.registry.snapshot(0) is not None, what="the first push")
        engine.update(running=50, delay=0.6)
        answer = await get_loads(channel_to(agg.port), freshness=pb.FRESHNESS_NEW_ROUND)
        assert list(answer.missing_ranks) == [0]  # the engine answered after the round's deadline
        await wait_for(lambda: agg.registry.snapshot(0).load.num_running_reqs == 50, timeout=5,
                       what="the late answer's figures stored")


async def test_aggregator_snapshots_stay_recent_without_any_round(start_aggregator, processes):
    agg = await start_aggregator(dp_size=2, round_timeout_ms=300)
    processes.agent(agg.port, [0, 1], 2, "--push-interval-ms", "50", "--seed", "3")  # simulator: always changing
    await wait_for(lambda: agg.registry.snapshot(0) is not None and agg.registry.snapshot(1) is not None,
                   timeout=30, what="pushed snapshots")
    versions = agg.registry.snapshot_version
    await wait_for(lambda: agg.registry.snapshot_version >= versions + 10, timeout=30, what="ten more pushes")
    now = time.monotonic()
    ages = [agg.registry.snapshot(r).age_ms(now) for r in (0, 1)]
    assert max(ages) < 5_000, ages  # generous on a loaded machine; pushes come every 50 ms
    assert agg.communicator.stats.rounds_started == 0


async def test_push_refresh_resends_quiet_ranks(start_aggregator):
    agg = await start_aggregator(dp_size=1, round_timeout_ms=300)
    agent = SchedulerAgent(agent_config(agg.port, dp_ranks=(0,), dp_size=1, push_interval_ms=20, push_refresh_ms=100))
    agent.publish(RankLoad(dp_rank=0, num_running_reqs=1))
    async with running(agent):
        await wait_for(lambda: agent.pushes_sent >= 3, what="refresh pushes of an unchanged rank")
        assert agent.pushes_skipped >= 2  # between refreshes, unchanged ticks are skipped
    await asyncio.sleep(0)


async def test_an_impossible_figure_is_refused_every_round_but_logged_once(start_aggregator, channel_to, caplog):
    caplog.set_level(logging.WARNING, logger="scheduler_agent.rejections")
    agg = await start_aggregator(dp_size=1, round_timeout_ms=300)
    agent = SchedulerAgent(agent_config(agg.port, dp_ranks=(0,), dp_size=1))
    agent.publish(RankLoad(dp_rank=0, num_running_reqs=1, token_usage=1.5))  # a ratio above 1
    async with running(agent):
        await wait_for(agent.connected.is_set, what="agent linked")
        for _ in range(3):
            assert (await get_loads(channel_to(agg.port))).missing_ranks == [0]
        await wait_for(lambda: agent.rejections >= 3, what="three rejections")
    mine = [r for r in caplog.records if r.name == "scheduler_agent.rejections" and "rejected" in r.getMessage()]
    assert len(mine) == 1, [r.getMessage() for r in mine]
