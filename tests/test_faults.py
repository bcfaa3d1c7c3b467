"""Agent and aggregator faults with REAL processes: SIGKILL mid-round, SIGSTOP/SIGCONT, keepalive drop of a
hung agent, aggregator restarts. Callers must always get an answer in time, and never mixed data."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest
from conftest import free_port, wait_for
from figures import record

from loadagg.v1 import loadagg_pb2 as pb
from loadagg.v1 import loadagg_pb2_grpc as pb_grpc

LINK_TIMEOUT = 40.0  # agent processes import grpc first: slow on a loaded 2-core machine


def _figures(loads: list[pb.RankLoad]) -> dict[int, bytes]:
    """Per rank, the load without the fields the aggregator sets (to compare a stale entry with its origin)."""
    out = {}
    for load in loads:
        copy = pb.RankLoad()
        copy.CopyFrom(load)
        copy.ClearField("stale")
        copy.ClearField("age_ms")
        out[load.dp_rank] = copy.SerializeToString(deterministic=True)
    return out


def _round_in_flight(agg):
    rounds = list(agg.communicator._rounds.values())
    return rounds[0] if rounds else None


async def _linked(agg, ranks: set[int]) -> None:
    await wait_for(lambda: ranks <= agg.registry.live_ranks(), LINK_TIMEOUT, f"ranks {sorted(ranks)} to link")


async def test_agent_killed_mid_round(start_aggregator, processes, channel_to):
    """SIGKILL during a round: the rank is missing at once (no deadline wait), stale data on request."""
    agg = await start_aggregator(dp_size=3, round_timeout_ms=5000)  # long: the round must NOT end by deadline
    processes.agent(agg.port, [0], 3, "--instance-id", "steady-0")
    processes.agent(agg.port, [1], 3, "--instance-id", "steady-1")
    victim = processes.agent(agg.port, [2], 3, "--instance-id", "victim", "--collect-latency-ms", "2500")
    await _linked(agg, {0, 1, 2})
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    warm = await stub.GetLoads(pb.GetLoadsRequest(), timeout=20)
    assert not warm.missing_ranks and [l.dp_rank for l in warm.loads] == [0, 1, 2]
    known = _figures(warm.loads)
    stats = agg.communicator.stats
    timed_out = stats.rounds_timed_out

    calls = [asyncio.ensure_future(stub.GetLoads(pb.GetLoadsRequest(allow_stale=i % 2 == 0), timeout=20))
             for i in range(40)]
    # Wait until the round in flight has everything but the slow victim's answer, then kill the victim.
    await wait_for(lambda: (r := _round_in_flight(agg)) is not None and {0, 1} <= r.answers.keys()
                   and r.callers == 40, 20, "a round held up only by rank 2")
    held_round = _round_in_flight(agg).id
    victim.kill()
    responses = await asyncio.gather(*calls)

    assert stats.rounds_timed_out == timed_out, "the round waited for its deadline instead of ending at the kill"
    for i, response in enumerate(responses):
        assert response.round_id == held_round
        assert list(response.missing_ranks) == [2]
        fresh = [l for l in response.loads if not l.stale]
        assert [l.dp_rank for l in fresh] == [0, 1]
        stale = [l for l in response.loads if l.stale]
        if i % 2 == 0:  # allow_stale: rank 2's last known snapshot, marked, with its age
            assert [l.dp_rank for l in stale] == [2]
            assert _figures(stale)[2] == known[2]
            assert stale[0].age_ms > 0
            assert response.summary.num_ranks == 3
        else:
            assert stale == [] and response.summary.num_ranks == 2

    # Later rounds do not wait for the dead rank at all, and the rank is free for a new agent.
    after = await stub.GetLoads(pb.GetLoadsRequest(), timeout=20)
    assert list(after.missing_ranks) == [2] and stats.rounds_timed_out == timed_out
    assert agg.registry.known_ranks()[2] == ("victim", False)
    processes.agent(agg.port, [2], 3, "--instance-id", "replacement")
    await _linked(agg, {2})
    whole = await stub.GetLoads(pb.GetLoadsRequest(), timeout=20)
    assert not whole.missing_ranks and len(whole.loads) == 3
    record("agent_sigkill_mid_round", faults_survived=1, callers=len(responses) + 2,
           answered_in_time=len(responses) + 2, rounds_timed_out=stats.rounds_timed_out - timed_out)


async def test_agent_stopped_then_continued(start_aggregator, processes, channel_to):
    """SIGSTOP (hung, connection open): callers answered at the round deadline with the rank missing, or
    earlier when their own deadline is shorter; after SIGCONT its late replies are dropped by round id."""
    agg = await start_aggregator(dp_size=2, round_timeout_ms=600)
    processes.agent(agg.port, [0], 2, "--instance-id", "steady")
    hung = processes.agent(agg.port, [1], 2, "--instance-id", "hung")
    await _linked(agg, {0, 1})
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    warm = await stub.GetLoads(pb.GetLoadsRequest(), timeout=20)
    assert not warm.missing_ranks
    known = _figures(warm.loads)
    session = agg.registry.owner(1)
    stats = agg.communicator.stats
    timed_out, dropped, partial = stats.rounds_timed_out, stats.reports_dropped, stats.partial_answers

    hung.send_signal(signal.SIGSTOP)
    answered = 0
    rounds_while_stopped = 3  # at most 4: the agent answers up to 4 backlogged collects, none cancelled
    last_round = warm.round_id
    for _ in range(rounds_while_stopped):
        patient = [stub.GetLoads(pb.GetLoadsRequest(allow_stale=j % 2 == 0), timeout=20) for j in range(10)]
        impatient = [stub.GetLoads(pb.GetLoadsRequest(), timeout=0.3) for _ in range(5)]  # < round deadline
        results = await asyncio.gather(*patient, *impatient)  # raises if any caller got an error
        answered += len(results)
        round_ids = {r.round_id for r in results}
        assert len(round_ids) == 1 and round_ids.pop() > last_round  # all joined one new round
        last_round = results[0].round_id
        for j, response in enumerate(results):
            assert 1 in response.missing_ranks
            stale = [l for l in response.loads if l.stale]
            if j < 10 and j % 2 == 0:
                assert [l.dp_rank for l in stale] == [1] and _figures(stale)[1] == known[1]
            else:
                assert stale == []
        for response in results[:10]:  # the patient ones waited for the round's end: rank 0 answered
            assert [l.dp_rank for l in response.loads if not l.stale] == [0] and not response.partial
        assert all(response.partial for response in results[10:])  # cut at their own deadline, and told so
    assert stats.rounds_timed_out - timed_out == rounds_while_stopped
    assert stats.partial_answers > partial  # the impatient callers were answered before the round ended
    assert agg.registry.owner(1) is session  # hung, but its connection is still open

    hung.send_signal(signal.SIGCONT)
    await wait_for(lambda: stats.reports_dropped - dropped >= rounds_while_stopped, 20,
                   "the continued agent's late replies to be dropped")
    late_replies = stats.reports_dropped - dropped
    after = await stub.GetLoads(pb.GetLoadsRequest(), timeout=20)
    assert not after.missing_ranks and not any(l.stale for l in after.loads)
    assert after.round_id > last_round
    assert agg.registry.owner(1) is session  # the same stream answers again: no reconnect needed
    record("agent_sigstop_sigcont", faults_survived=1, callers=answered + 1, answered_in_time=answered + 1,
           rounds_timed_out=stats.rounds_timed_out - timed_out, partial_answers=stats.partial_answers - partial,
           late_replies_dropped=late_replies)


async def test_hung_agent_is_dropped_by_keepalive_then_relinks(start_aggregator, processes, channel_to):
    """A hung agent whose connection stays open is disconnected once keepalive pings go unanswered: its
    ranks are then missing at once instead of costing every round its full deadline."""
    from loadagg.server.limits import LimitsConfig

    agg = await start_aggregator(dp_size=2, round_timeout_ms=800,
                                 limits=LimitsConfig(keepalive_s=0.5, keepalive_timeout_s=1.0))
    processes.agent(agg.port, [0], 2, "--instance-id", "steady")
    hung = processes.agent(agg.port, [1], 2, "--instance-id", "hung", "--backoff-max-ms", "300")
    await _linked(agg, {0, 1})
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    hung.send_signal(signal.SIGSTOP)
    await wait_for(lambda: 1 not in agg.registry.live_ranks(), 20, "keepalive to drop the hung agent")
    timed_out = agg.communicator.stats.rounds_timed_out
    response = await stub.GetLoads(pb.GetLoadsRequest(), timeout=20)
    assert list(response.missing_ranks) == [1] and agg.communicator.stats.rounds_timed_out == timed_out
    hung.send_signal(signal.SIGCONT)
    await _linked(agg, {1})  # it finds its link dead and reconnects by itself
    response = await stub.GetLoads(pb.GetLoadsRequest(), timeout=20)
    assert not response.missing_ranks
    record("agent_hung_keepalive_drop", faults_survived=1, callers=2, answered_in_time=2)


async def _complete_answer(port: int, dp_size: int, timeout: float = LINK_TIMEOUT) -> pb.GetLoadsResponse:
    """Poll GetLoads (a fresh channel each time: no channel-level reconnect backoff) until every rank answers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                response = await pb_grpc.LoadAggregatorStub(channel).GetLoads(pb.GetLoadsRequest(), timeout=5)
                if len(response.loads) == dp_size and not response.missing_ranks:
                    return response
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
        if loop.time() > deadline:
            raise AssertionError("the registry never became whole again")
        await asyncio.sleep(0.1)


async def test_aggregator_restarted_while_agents_run(processes):
    """Kill (SIGKILL) and stop (SIGTERM) the aggregator process; the agent processes reconnect by themselves
    (exponential backoff, full jitter) and the new aggregator's registry is whole again."""
    port = free_port()

    def serve():
        return processes.start("loadagg", "serve", "--host", "127.0.0.1", "--port", str(port), "--dp-size", "3",
                               "--grace-s", "2")

    server = serve()
    agents = [processes.agent(port, [0, 1], 3, "--instance-id", "pair", "--backoff-max-ms", "400"),
              processes.agent(port, [2], 3, "--instance-id", "single", "--backoff-max-ms", "400")]
    first = await _complete_answer(port, 3)
    refused_while_down = 0
    for fault in (signal.SIGKILL, signal.SIGTERM):
        server.send_signal(fault)
        await asyncio.to_thread(server.wait, 20)
        # While no aggregator runs, callers are told so at once (UNAVAILABLE), never left hanging.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.LoadAggregatorStub(channel).GetLoads(pb.GetLoadsRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        refused_while_down += 1
        server = serve()
        again = await _complete_answer(port, 3)
        assert [l.dp_rank for l in again.loads] == [0, 1, 2]
        assert all(agent.poll() is None for agent in agents)
    assert first.round_id >= 1 and again.round_id >= 1

    for agent in agents:
        agent.terminate()
    logs = [(await asyncio.to_thread(agent.communicate, timeout=20))[0] for agent in agents]
    for log in logs:
        assert log.count("linked to aggregator") == 3, log  # first start + two restarts
        assert "link to" in log and "lost" in log  # the SIGKILL: the stream broke
        assert "aggregator closed the link" in log  # the SIGTERM: closed cleanly by the draining server
    record("aggregator_restart", faults_survived=2, agent_processes=2, reconnects=2 * len(agents),
           refused_while_down=refused_while_down)


def test_reconnect_backoff_is_exponential_with_full_jitter():
    """Delays are drawn from [0, min(max, initial * 2**failures)]: spread from ~0 to the ceiling."""
    import random

    from scheduler_agent.agent import SchedulerAgent
    from scheduler_agent.config import AgentConfig
    from scheduler_agent.sources.simulator import SimulatedSource

    agent = SchedulerAgent(AgentConfig(backoff_initial_ms=100, backoff_max_ms=5000), SimulatedSource(seed=1))
    random.seed(7)
    for failures, ceiling in [(0, 0.1), (1, 0.2), (3, 0.8), (5, 3.2), (6, 5.0), (64, 5.0)]:
        delays = [agent.backoff_s(failures) for _ in range(400)]
        assert all(0 <= d <= ceiling for d in delays)
        assert min(delays) < ceiling * 0.05 and max(delays) > ceiling * 0.95  # full jitter, not equal jitter
