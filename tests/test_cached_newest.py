"""FRESHNESS_CACHED gives each rank the newest figures the aggregator holds: a completed round within the bound
no longer hides a push that came after it, and a rank the round found gone stays missing until it pushes."""

from __future__ import annotations

from agent_tasks import agent_config, get_loads, running
from conftest import wait_for

from loadagg.v1 import loadagg_pb2 as pb
from scheduler_agent.agent import SchedulerAgent
from scheduler_agent.sources.inprocess import CallbackSource

CACHED = dict(freshness=pb.FRESHNESS_CACHED, max_staleness_ms=60_000)


async def test_a_push_after_a_young_round_wins_for_its_rank(start_aggregator, channel_to):
    agg = await start_aggregator(dp_size=2, round_timeout_ms=1000)
    channel = channel_to(agg.port)
    figures = {0: 1, 1: 1}
    failing: set[int] = set()

    def read(ranks):
        return {r: pb.RankLoad(dp_rank=r, num_running_reqs=figures[r], age_ms=7) for r in ranks if r not in failing}

    agent = SchedulerAgent(agent_config(agg.port, dp_ranks=(0, 1), dp_size=2, push_interval_ms=10),
                           CallbackSource(read))
    async with running(agent):
        await wait_for(lambda: agg.registry.live_ranks() == {0, 1}, what="agent linked")
        await get_loads(channel, freshness=pb.FRESHNESS_NEW_ROUND)  # a round, young for a minute
        rounds = agg.communicator.stats.rounds_started
        cached = await get_loads(channel, **CACHED)
        assert cached.source == pb.ANSWER_SOURCE_CACHE and [x.num_running_reqs for x in cached.loads] == [1, 1]

        figures[1] = 9  # pushed within 10 ms
        await wait_for(lambda: agg.registry.snapshot(1).load.num_running_reqs == 9, what="the push")
        answer = await get_loads(channel, **CACHED)
        assert [x.num_running_reqs for x in answer.loads] == [1, 9] and answer.source == pb.ANSWER_SOURCE_SNAPSHOTS
        assert answer.loads[1].age_ms >= 7  # the agent's age, plus the aggregator's holding time
        assert answer.loads[0].age_ms >= 7  # the round's rank, aged as of this answer
        assert agg.communicator.stats.rounds_started == rounds

        failing.add(0)  # a round finds rank 0 gone: the pushed figure from before does not overrule it
        await get_loads(channel, freshness=pb.FRESHNESS_NEW_ROUND)
        answer = await get_loads(channel, **CACHED)
        assert list(answer.missing_ranks) == [0] and [x.dp_rank for x in answer.loads] == [1]
        failing.clear()
        figures[0] = 4  # it comes back and pushes: its newest figures show, still no round
        rounds = agg.communicator.stats.rounds_started
        await wait_for(lambda: agg.registry.snapshot(0).load.num_running_reqs == 4, what="the comeback push")
        answer = await get_loads(channel, **CACHED)
        assert [x.num_running_reqs for x in answer.loads] == [4, 9] and not answer.missing_ranks
        assert agg.communicator.stats.rounds_started == rounds
