"""WatchLoads on change over real gRPC: one answer per coalesced change, heartbeats only when quiet, every
watcher ends on the final figures, one build per view, and a stalled watcher delays nobody."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from conftest import wait_for
from driven_agent import driven_fixture  # noqa: F401 (the `driven` fixture)

from loadagg.client import AsyncLoadClient
from loadagg.server import answers
from loadagg.v1 import loadagg_pb2 as pb
from loadagg.v1 import loadagg_pb2_grpc as pb_grpc


class Reader:
    """Reads a watch stream into a list as answers arrive."""

    def __init__(self, call) -> None:
        self.call = call
        self.answers: list[pb.GetLoadsResponse] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for response in self.call:
            self.answers.append(response)

    def running(self, index: int = -1) -> dict[int, int]:
        return {load.dp_rank: load.num_running_reqs for load in self.answers[index].loads}

    def stop(self) -> None:
        self.call.cancel()
        self.task.cancel()


def _watch(stub, **fields) -> Reader:
    return Reader(stub.WatchLoads(pb.WatchLoadsRequest(on_change=True, **fields)))


async def test_one_answer_per_coalesced_change_and_none_for_unchanged_figures(start_aggregator, driven, channel_to):
    agg = await start_aggregator(dp_size=2)
    agent = await driven(agg, [0, 1])
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    watcher = _watch(stub, min_interval_ms=800, heartbeat_ms=60_000)
    await wait_for(lambda: len(watcher.answers) == 1, what="the first answer")
    first = watcher.answers[0]
    assert first.source == pb.ANSWER_SOURCE_SNAPSHOTS and first.round_id == 0 and not first.missing_ranks
    assert watcher.running() == {0: 1, 1: 1}

    await agent.push(r0=2)  # one change: one answer (at once, or once 800 ms have passed since the first)
    await wait_for(lambda: len(watcher.answers) == 2, what="the change's answer")
    assert watcher.running() == {0: 2, 1: 1}
    for value in range(3, 8):  # five changes well within 800 ms of that answer: coalesced into one
        await agent.push(r0=value, r1=value * 10)
    await agent.push()  # the same figures again (a new timestamp alone is no change)
    await stub.GetLoads(pb.GetLoadsRequest(freshness=pb.FRESHNESS_NEW_ROUND))  # a round with unchanged figures
    await wait_for(lambda: len(watcher.answers) == 3, what="the coalesced answer")
    assert watcher.running() == {0: 7, 1: 70}
    assert all(load.age_ms < 60_000 for load in watcher.answers[-1].loads)

    await asyncio.sleep(1.2)  # past another min_interval: nothing changed, so nothing more comes
    await agent.push()
    await asyncio.sleep(0.3)
    assert len(watcher.answers) == 3, [w.loads for w in watcher.answers]
    assert agg.watch.stats.heartbeats == 0 and agent.rounds_answered == 1
    watcher.stop()
    await wait_for(lambda: agg.watch.watchers == 0 and agg.watch.changes.groups == 0, what="the watcher to leave")


async def test_a_quiet_cluster_gets_heartbeats_only(start_aggregator, driven, channel_to):
    agg = await start_aggregator(dp_size=1)
    agent = await driven(agg, [0])
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    watcher = _watch(stub, min_interval_ms=20, heartbeat_ms=200)
    await asyncio.sleep(1.1)
    watcher.stop()
    count = len(watcher.answers)
    assert count >= 3  # the first answer, then heartbeats
    assert agg.watch.stats.heartbeats == count - 1  # every answer after the first was a heartbeat
    assert {tuple(sorted(Reader.running(watcher, i).items())) for i in range(count)} == {((0, 1),)}
    stamps = [a.timestamp_ms for a in watcher.answers]
    assert stamps == sorted(stamps) and len(set(stamps)) == count  # each a new answer (clients dedupe repeats)
    # The figures were older than the heartbeat (this agent pushes nothing unasked): rounds confirmed them, and
    # their unchanged figures sent nothing more.
    assert agent.rounds_answered >= 1


async def test_every_watcher_sees_the_final_figures_and_each_view_is_built_once(
        start_aggregator, driven, channel_to, monkeypatch):
    builds: list[tuple] = []
    real_build = answers.build_response

    def counting_build(result, dp_rank, sections, allow_stale):
        builds.append((result.timestamp_ms, id(result), dp_rank, sections, allow_stale))
        return real_build(result, dp_rank, sections, allow_stale)

    monkeypatch.setattr(answers, "build_response", counting_build)
    agg = await start_aggregator(dp_size=4)
    agent = await driven(agg, [0, 1, 2, 3])
    stubs = [pb_grpc.LoadAggregatorStub(channel_to(agg.port)) for _ in range(4)]
    watchers = [_watch(stubs[i % 4], min_interval_ms=(10, 50)[i % 2], include=["core"]) for i in range(60)]
    watchers += [_watch(stubs[i % 4], min_interval_ms=10, dp_rank=i % 4) for i in range(40)]
    await wait_for(lambda: all(w.answers for w in watchers), what="every first answer")
    for value in range(2, 52):
        await agent.push(r0=value, r1=value + 1, r2=value + 2, r3=value + 3)
        await asyncio.sleep(0.002)
    final = {0: 51, 1: 52, 2: 53, 3: 54}
    await wait_for(lambda: all(w.running() == final for w in watchers[:60]), what="every watcher's final figures")
    await wait_for(lambda: all(w.running() == {i % 4: final[i % 4]} for i, w in enumerate(watchers[60:])),
                   what="every one-rank watcher's final figures")
    for w in watchers:
        w.stop()
    # One build per distinct view per result, however many watchers took it.
    assert len(builds) == len(set(builds))
    answered = sum(len(w.answers) for w in watchers)
    print(f"100 watchers: {answered} answers from {len(builds)} builds, {agg.watch.stats.change_answers} moments")
    assert len(builds) < answered / 5


async def test_a_stalled_watcher_does_not_delay_the_others(start_aggregator, driven, channel_to):
    agg = await start_aggregator(dp_size=64)
    agent = await driven(agg, list(range(64)))
    # Its HTTP/2 window stays at 64 KiB (no BDP probing growing it): ~40 of these answers fill it.
    stalled_channel = grpc.aio.insecure_channel(f"127.0.0.1:{agg.port}", options=[("grpc.http2.bdp_probe", 0)])
    stalled = pb_grpc.LoadAggregatorStub(stalled_channel).WatchLoads(
        pb.WatchLoadsRequest(on_change=True, min_interval_ms=10))
    await wait_for(lambda: agg.watch.watchers == 1, what="the stalled watcher to subscribe")
    stalled_sub = agg.watch.subscriptions()[0]
    active = _watch(pb_grpc.LoadAggregatorStub(channel_to(agg.port)), min_interval_ms=10)
    await wait_for(lambda: active.answers, what="the active watcher's first answer")
    for value in range(2, 202):
        await agent.push(**{f"r{rank}": value for rank in range(64)})
        await wait_for(lambda v=value: active.running().get(0) == v, what=f"the active watcher to see change {value}")
    print(f"stalled watcher: {stalled_sub.delivered} answers written, {stalled_sub.replaced} replaced unread")
    assert stalled_sub.replaced > 0 and stalled_sub.slot is not None  # it holds one answer, the newest
    assert pb.GetLoadsResponse.FromString(stalled_sub.slot).loads[0].num_running_reqs == 201
    stalled.cancel()
    active.stop()
    await stalled_channel.close()


@pytest.mark.parametrize(("fields", "says"), [
    ({"min_interval_ms": 50}, "on_change watches only"),
    ({"heartbeat_ms": 500}, "on_change watches only"),
    ({"on_change": True, "interval_ms": 100}, "interval_ms (100) applies to interval watches"),
    ({"on_change": True, "min_interval_ms": 1}, "min_interval_ms 1 is outside 10.."),
    ({"on_change": True, "heartbeat_ms": 5_000_000}, "heartbeat_ms 5000000 is outside"),
    ({"on_change": True, "min_interval_ms": 500, "heartbeat_ms": 100}, "heartbeat_ms (100) is below min_interval_ms"),
])
async def test_bad_on_change_requests_are_refused_clearly(start_aggregator, channel_to, fields, says):
    agg = await start_aggregator(dp_size=1)
    call = pb_grpc.LoadAggregatorStub(channel_to(agg.port)).WatchLoads(pb.WatchLoadsRequest(**fields))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call.read()
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and says in error.value.details()
    assert agg.watch.watchers == 0


async def test_client_watches_on_change(start_aggregator, driven):
    agg = await start_aggregator(dp_size=2)
    agent = await driven(agg, [0, 1])
    seen = []
    async with AsyncLoadClient(f"127.0.0.1:{agg.port}") as client:
        feed = client.watch_loads(on_change=True, min_interval_ms=10, heartbeat_ms=30_000)
        async for loads in feed:
            seen.append(loads)
            if len(seen) == 1:
                assert loads.source == "snapshots" and loads.rank(0).num_running_reqs == 1
                await agent.push(r1=9)
            elif loads.rank(1).num_running_reqs == 9:
                break
        await feed.aclose()
    assert (agg.watch.stats.heartbeats, agg.watch.stats.subscribed) == (0, 1) and 2 <= len(seen) <= 3, seen
