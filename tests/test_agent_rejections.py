"""The agent's log of the aggregator's refusals: a refusal whose reason holds a changing figure (an age, a size)
is one kind, warned about once and then at most once a period with a count, never a line a round."""

from __future__ import annotations

import logging

from agent_tasks import agent_config

from loadagg.v1 import loadagg_pb2 as pb
from scheduler_agent.agent import SchedulerAgent
from scheduler_agent.sources.inprocess import CallbackSource


def _rejected(rank: int, round_id: int, reason: str) -> pb.AggregatorMessage:
    return pb.AggregatorMessage(rejected=pb.ReportRejected(round_id=round_id, dp_rank=rank, reason=reason))


def too_old(age_ms: int) -> str:
    return f"age_ms / detail_age_ms is {age_ms}: figures older than 3600000 ms are no load"  # the aggregator's


def test_refusals_with_changing_figures_warn_once_per_kind_then_once_a_period(caplog):
    agent = SchedulerAgent(agent_config(1, dp_ranks=(0, 1, 2, 3), dp_size=4), CallbackSource(lambda ranks: {}))
    caplog.set_level(logging.DEBUG, logger="scheduler_agent")

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "rejected" in r.getMessage()]

    for round_id in range(1, 51):  # 50 rounds of 4 ranks, each refused with its age of the moment
        for rank in range(4):
            age = 3_600_000 + 37 * round_id + rank
            agent._handle(None, _rejected(rank, round_id, too_old(age)))
    assert agent.rejections == 200
    assert len(warnings()) == 1, warnings()
    assert "rank 0 of round 1" in warnings()[0]

    agent._handle(None, _rejected(2, 51, "gpu lists 33 devices; at most 32 per rank"))  # another kind: at once
    assert len(warnings()) == 2 and "gpu lists 33 devices" in warnings()[1]

    now = agent.rejection_log.clock()
    agent.rejection_log.clock = lambda: now + agent.rejection_log.every_s + 1  # a period later, still refused
    agent._handle(None, _rejected(3, 52, too_old(3_609_999)))
    agent._handle(None, _rejected(1, 52, too_old(3_609_998)))
    assert len(warnings()) == 3, warnings()
    assert "rank 3 of round 52" in warnings()[2] and "199 more like it" in warnings()[2]
    assert "ranks 0-3" in warnings()[2]
