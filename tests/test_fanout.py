"""Agents linked to EVERY aggregator replica (--resolve-all): both answer all ranks, links follow resolution."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket

import pytest
from conftest import wait_for

from loadagg.client.load_client import AsyncLoadClient
from loadagg.v1 import loadagg_pb2 as pb
from scheduler_agent.config import AgentConfig
from scheduler_agent.fanout import (
    AggregatorFanout,
    FanoutConfig,
    SharedSource,
    pick_addresses,
    resolve_all,
    split_target,
)
from scheduler_agent.sources.base import LoadSource, SourceError
from scheduler_agent.sources.simulator import SimulatedSource

RANKS = [[0, 1], [2, 3]]


def _target(aggregator) -> str:
    return f"127.0.0.1:{aggregator.port}"


@pytest.fixture
async def run_fanouts():
    """`fanouts = await run_fanouts(resolver, ranks)`: one AggregatorFanout per rank group, all run until the test
    ends."""
    tasks: list[asyncio.Task] = []

    async def start(resolver, ranks=RANKS, aggregator="replicas.invalid:1", interval_s=3600.0):
        fanouts = []
        for i, group in enumerate(ranks):
            config = AgentConfig(aggregator=aggregator, dp_ranks=tuple(group), dp_size=4, instance_id=f"fan-{i}",
                                 backoff_initial_ms=20, backoff_max_ms=200)
            fanout = AggregatorFanout(config, SimulatedSource(seed=i), FanoutConfig(True, interval_s),
                                      resolver=resolver)
            tasks.append(asyncio.create_task(fanout.run()))
            fanouts.append(fanout)
        return fanouts

    yield start
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _answers_all(aggregator) -> pb.GetLoadsResponse:
    async with AsyncLoadClient(_target(aggregator)) as client:
        return await client.get_loads()


async def test_two_replicas_both_answer_every_rank_and_links_follow_resolution(start_aggregator, run_fanouts):
    first, second = await start_aggregator(dp_size=4), await start_aggregator(dp_size=4)
    addresses = [_target(first), _target(second)]
    fanouts = await run_fanouts(lambda: list(addresses))
    everything = frozenset(range(4))
    for aggregator in (first, second):
        await wait_for(lambda a=aggregator: a.registry.live_ranks() == everything, what="all ranks on each replica")
        answer = await _answers_all(aggregator)
        assert [load.dp_rank for load in answer.loads] == [0, 1, 2, 3]
        assert list(answer.missing_ranks) == []
    assert all(f.linked() == sorted(addresses) for f in fanouts)

    # A third replica appears in resolution: every agent links to it, and it answers every rank.
    third = await start_aggregator(dp_size=4)
    addresses.append(_target(third))
    for fanout in fanouts:
        assert await fanout.refresh() == set(addresses)
    await wait_for(lambda: third.registry.live_ranks() == everything, what="ranks on the third replica")
    assert [load.dp_rank for load in (await _answers_all(third)).loads] == [0, 1, 2, 3]

    # The first vanishes from resolution: its links are dropped (it loses every rank), the others keep theirs.
    addresses.remove(_target(first))
    for fanout in fanouts:
        assert await fanout.refresh() == set(addresses)
        assert _target(first) not in fanout.links
    await wait_for(lambda: first.registry.live_ranks() == frozenset(), what="links to the vanished replica dropped")
    for aggregator in (second, third):
        assert aggregator.registry.live_ranks() == everything
        assert list((await _answers_all(aggregator)).missing_ranks) == []


async def test_failed_or_empty_resolution_keeps_the_links(start_aggregator, run_fanouts):
    aggregator = await start_aggregator(dp_size=4)
    answers: list = [[_target(aggregator)]]

    def resolver():
        answer = answers[-1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    (fanout,) = await run_fanouts(resolver, ranks=[[0, 1, 2, 3]])
    # The aggregator registers the ranks before the agent has read its welcome: wait for both ends.
    await wait_for(
        lambda: aggregator.registry.live_ranks() == frozenset(range(4)) and fanout.linked() == [_target(aggregator)],
        what="ranks linked",
    )
    for bad in (OSError("temporary failure in name resolution"), []):
        answers.append(bad)
        assert await fanout.refresh() == {_target(aggregator)}
    assert fanout.resolve_failures == 2
    assert fanout.linked() == [_target(aggregator)]
    assert len((await _answers_all(aggregator)).loads) == 4


async def test_real_dns_resolution_of_localhost(start_aggregator, run_fanouts):
    aggregator = await start_aggregator(dp_size=4)
    # localhost resolves to loopback only (127.0.0.1, and ::1 where the host has it).
    resolved = await resolve_all("localhost", aggregator.port)
    assert f"127.0.0.1:{aggregator.port}" in resolved
    assert all(a.startswith(("127.", "[::1]")) for a in resolved)

    fanouts = await run_fanouts(None, aggregator=f"localhost:{aggregator.port}")
    await wait_for(lambda: aggregator.registry.live_ranks() == frozenset(range(4)), what="ranks via localhost")
    assert f"127.0.0.1:{aggregator.port}" in fanouts[0].links
    assert [load.dp_rank for load in (await _answers_all(aggregator)).loads] == [0, 1, 2, 3]


async def test_agent_process_with_resolve_all_env(start_aggregator, processes):
    """The CLI path, configured by env as in a container: LOADAGG_RESOLVE_ALL=true, a name (localhost) to resolve."""
    aggregator = await start_aggregator(dp_size=4)
    agent = processes.start("scheduler_agent", env={
        "LOADAGG_AGGREGATOR": f"localhost:{aggregator.port}", "LOADAGG_RESOLVE_ALL": "true",
        "LOADAGG_RESOLVE_INTERVAL_S": "1", "LOADAGG_DP_RANKS": "0,1,2,3", "LOADAGG_DP_SIZE": "4"})
    await wait_for(lambda: aggregator.registry.live_ranks() == frozenset(range(4)), timeout=30,
                   what="the agent process to link through resolution")
    assert len((await _answers_all(aggregator)).loads) == 4

    agent.send_signal(signal.SIGTERM)  # graceful: every link closed, the process exits 0
    assert await asyncio.to_thread(agent.wait, 15) == 0
    await wait_for(lambda: aggregator.registry.live_ranks() == frozenset(), what="the agent's links to close")


def test_one_address_family_so_a_dual_stack_replica_gets_one_link():
    tcp = (socket.SOCK_STREAM, 6, "")
    dual = [(socket.AF_INET6, *tcp, ("fd00::2", 50051, 0, 0)), (socket.AF_INET, *tcp, ("10.0.0.2", 50051)),
            (socket.AF_INET6, *tcp, ("fd00::1", 50051, 0, 0)), (socket.AF_INET, *tcp, ("10.0.0.1", 50051)),
            (socket.AF_INET, *tcp, ("10.0.0.1", 50051))]
    assert pick_addresses(dual, 50051) == ["10.0.0.1:50051", "10.0.0.2:50051"]
    assert pick_addresses(dual[:1] + dual[2:3], 7) == ["[fd00::1]:7", "[fd00::2]:7"]
    assert pick_addresses([], 7) == []


def test_targets_must_name_a_port():
    assert split_target("aggregator-headless.loadagg.svc:50051") == ("aggregator-headless.loadagg.svc", 50051)
    assert split_target("[::1]:7") == ("::1", 7)
    for bad in ("aggregator", "aggregator:", ":50051", "host:http"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            split_target(bad)
    with pytest.raises(ValueError):
        FanoutConfig(True, 0)


class _GatedSource(LoadSource):
    name = "gated"

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.reads = 0
        self.fail = False

    async def read(self, ranks):
        self.reads += 1
        await self.gate.wait()
        if self.fail:
            raise SourceError("engine down")
        return {r: pb.RankLoad(dp_rank=r, num_running_reqs=self.reads) for r in ranks}


async def test_shared_source_joins_overlapping_reads_and_survives_a_cancelled_reader():
    inner = _GatedSource()
    shared = SharedSource(inner)
    first = asyncio.create_task(shared.read([0, 1]))
    second = asyncio.create_task(shared.read([0, 1]))
    third = asyncio.create_task(shared.read([0, 1]))
    await asyncio.sleep(0)
    third.cancel()  # one link's answer no longer wanted
    await asyncio.sleep(0)
    inner.gate.set()
    a, b = await first, await second
    assert inner.reads == 1 and shared.reads == 1 and shared.joined == 2
    assert a is b and sorted(a) == [0, 1]
    assert third.cancelled()

    # A read that starts after the last one finished reads again (no time-based cache).
    assert (await shared.read([0, 1]))[0].num_running_reqs == 2
    # Failures reach every joiner as the SourceError the agent already reports as failed ranks.
    inner.gate.clear()
    inner.fail = True
    readers = [asyncio.create_task(shared.read([0, 1])) for _ in range(2)]
    await asyncio.sleep(0)
    inner.gate.set()
    for reader in readers:
        with pytest.raises(SourceError, match="engine down"):
            await reader
    assert inner.reads == 3


async def test_a_fanout_stopped_while_it_drops_a_link_stops(monkeypatch):
    """SIGTERM cancels the fanout; if that comes while it waits for a vanished replica's link to wind down,
    the cancellation must end the fanout, not be taken for the link's own (it went on resolving)."""
    from scheduler_agent import agent as agent_module

    async def slow_to_end(self):
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.5)  # a link that takes a while to close

    monkeypatch.setattr(agent_module.SchedulerAgent, "run", slow_to_end)
    answers = [["127.0.0.1:1", "127.0.0.1:2"], ["127.0.0.1:2"]]
    fanout = AggregatorFanout(AgentConfig(aggregator="replicas.invalid:1", dp_ranks=(0,)), SimulatedSource(seed=1),
                              FanoutConfig(True, 0.2),
                              resolver=lambda: answers.pop(0) if len(answers) > 1 else answers[0])
    task = asyncio.create_task(fanout.run())
    await wait_for(lambda: fanout.resolutions >= 2, what="the second resolution, dropping 127.0.0.1:1")
    await asyncio.sleep(0.1)  # inside _drop, waiting for that link's task (0.5 s)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=3)
    assert done and task.cancelled()
