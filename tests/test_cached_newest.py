"""FRESHNESS_CACHED gives each rank the newest figures the aggregator holds: a completed round within the bound
no longer hides a push that came after it, and a rank the round found gone stays missing until it pushes."""

from __future__ import annotations

import time
from types import MappingProxyType, SimpleNamespace

from agent_tasks import agent_config, get_loads, running
from conftest import wait_for

from loadagg.server.freshness import CachedAnswers
from loadagg.server.registry import Snapshot
from loadagg.server.rounds import RoundResult
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


def test_a_new_round_is_never_answered_with_a_freed_rounds_merged_answer():
    """The merged answer is keyed on the round itself: a new round that Python places at a freed round's address
    (same id(), as CPython does at once) with no snapshot stored in between still gets its own answer. Holding
    the round keeps its address taken, so with the fix no candidate matches and the loop runs out."""
    start = time.monotonic()
    pushed = Snapshot(pb.RankLoad(dp_rank=0, num_running_reqs=5), received=start + 0.5, taken=start + 0.5)
    registry = SimpleNamespace(dp_size=1, snapshot_version=1, snapshots=lambda: {0: pushed})
    communicator = SimpleNamespace(aggregator_id="agg", last_result=None)
    answers = CachedAnswers(communicator, registry)

    def round_of(fresh: MappingProxyType, started: float) -> RoundResult:
        return RoundResult(round_id=0, dp_size=1, timestamp_ms=0, finished=started, started=started, duration_ms=0,
                           fresh=fresh, stale=MappingProxyType({}), missing=(), callers=1)

    communicator.last_result = round_of(MappingProxyType({0: pb.RankLoad(num_running_reqs=1)}), start)
    merged = answers.recent(60_000, None)  # the push came after the round: the merged answer shows it
    assert merged.fresh[0].num_running_reqs == 5
    freed = id(communicator.last_result)
    communicator.last_result = None
    newest = MappingProxyType({0: pb.RankLoad(num_running_reqs=7)})  # after the push: the newest figure
    candidate = None
    for _ in range(1_000):  # a new round at the freed round's address, if it is free
        candidate = round_of(newest, start + 1)
        if id(candidate) == freed:
            break
        candidate = None
    communicator.last_result = candidate or round_of(newest, start + 1)
    answer = answers.recent(60_000, None)
    assert answer.fresh[0].num_running_reqs == 7
