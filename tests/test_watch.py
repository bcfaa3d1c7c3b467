"""WatchLoads over real gRPC: watchers share one round per tick, slow ones never hold others back, nothing leaks."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from conftest import wait_for

from loadagg.client.load_client import AsyncLoadClient, LoadClient
from loadagg.v1 import loadagg_pb2 as pb
from loadagg.v1 import loadagg_pb2_grpc as pb_grpc


async def _take(call, n: int, timeout: float = 60.0) -> list[pb.GetLoadsResponse]:
    out: list[pb.GetLoadsResponse] = []

    async def read() -> None:
        while len(out) < n:
            response = await call.read()
            if response is grpc.aio.EOF:
                await call  # raises the stream's status when it is an error
                return
            out.append(response)

    await asyncio.wait_for(read(), timeout)
    return out


async def test_1000_watchers_share_one_round_per_tick(start_aggregator, start_agents, channel_to):
    agg = await start_aggregator(dp_size=4, round_timeout_ms=2000)
    agents = await start_agents(agg, [[0], [1], [2], [3]], collect_latency_ms=5)
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    watchers = 1000
    calls = [stub.WatchLoads(pb.WatchLoadsRequest(interval_ms=100, include=["core"])) for _ in range(watchers)]

    results = await asyncio.gather(*(_take(call, 3) for call in calls))
    for call in calls:
        call.cancel()
    await wait_for(lambda: agg.watch.watchers == 0 and agg.watch.tickers == 0, what="watchers to leave")
    await wait_for(lambda: agg.communicator.rounds_in_flight == 0, what="the last round to end")

    rounds = agg.communicator.stats.rounds_started
    ticks = agg.watch.stats.ticks
    print(f"{watchers} watchers at 100 ms: {ticks} ticks, {rounds} rounds, "
          f"{agg.watch.stats.delivered} answers delivered, {agg.watch.stats.replaced} replaced")
    # The only collector here is the 100 ms ticker: never more rounds than ticks, whatever the watcher count.
    assert ticks >= 3
    assert rounds <= ticks
    await wait_for(lambda: all(a.collects_received == rounds for a in agents), what="agents to see each round")
    by_round: dict[int, set[bytes]] = {}
    for answers in results:
        ids = [r.round_id for r in answers]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)  # newer rounds only, never a repeat
        for r in answers:
            assert len(r.loads) == 4 and r.source == pb.ANSWER_SOURCE_ROUND
            assert not any(load.HasField("memory") for load in r.loads)  # the view asked for core only
            by_round.setdefault(r.round_id, set()).add(r.SerializeToString())
    assert all(len(answers) == 1 for answers in by_round.values())  # one shared answer per round and view


async def test_watchers_of_different_intervals_share_rounds_when_due_together(start_aggregator, start_agents,
                                                                             channel_to):
    agg = await start_aggregator(dp_size=2, round_timeout_ms=2000)
    await start_agents(agg, [[0], [1]], collect_latency_ms=5)
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    fast = [stub.WatchLoads(pb.WatchLoadsRequest(interval_ms=100)) for _ in range(20)]
    slow = [stub.WatchLoads(pb.WatchLoadsRequest(interval_ms=200)) for _ in range(20)]
    got = await asyncio.gather(*(_take(c, 6) for c in fast), *(_take(c, 3) for c in slow))
    ticks, rounds = agg.watch.stats.ticks, agg.communicator.stats.rounds_started
    print(f"100 ms + 200 ms tickers: {ticks} ticks, {rounds} rounds")
    assert agg.watch.tickers == 2
    # Every 200 ms tick falls on a 100 ms tick (one grid for every interval): after the answer each watcher
    # gets on subscribing, the slow watchers' rounds are rounds the fast watchers got too.
    fast_rounds = {r.round_id for answers in got[:20] for r in answers}
    slow_rounds = {r.round_id for answers in got[20:] for r in answers[1:]}  # (the first: at subscription)
    assert slow_rounds <= fast_rounds and rounds < ticks
    for call in fast + slow:
        call.cancel()


async def test_slow_watcher_does_not_delay_the_others(start_aggregator, start_agents, channel_to):
    agg = await start_aggregator(dp_size=8, round_timeout_ms=2000)
    await start_agents(agg, [[0, 1, 2, 3], [4, 5, 6, 7]], collect_latency_ms=1)
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    # The slow router's connection keeps HTTP/2's initial 64 KiB window (no BDP growth), as a router on a
    # slow link would: its stream soon stops taking data, which is when latest-wins has to hold.
    slow_channel = grpc.aio.insecure_channel(f"127.0.0.1:{agg.port}", options=[("grpc.http2.bdp_probe", 0)])
    slow = pb_grpc.LoadAggregatorStub(slow_channel).WatchLoads(pb.WatchLoadsRequest(interval_ms=10))
    fast = stub.WatchLoads(pb.WatchLoadsRequest(interval_ms=10))
    await _take(slow, 1)
    await _take(fast, 1)
    subs = agg.watch.subscriptions()
    assert len(subs) == 2

    # The slow watcher stops reading; the fast one keeps reading while the ticker keeps ticking.
    ticks_before = agg.watch.stats.ticks
    fast_ids: list[int] = []
    while True:
        response = await asyncio.wait_for(fast.read(), 30)
        fast_ids.append(response.round_id)
        if agg.watch.stats.replaced >= 20 and len(fast_ids) >= 50:
            break
        assert len(fast_ids) < 20_000, "the slow watcher's answers were never replaced"
    ticks = agg.watch.stats.ticks - ticks_before
    slow_sub = max(subs, key=lambda s: s.replaced)
    fast_sub = min(subs, key=lambda s: s.replaced)
    print(f"{ticks} ticks while stalled: fast watcher got {len(fast_ids)} answers, "
          f"slow watcher had {slow_sub.replaced} answers replaced (latest wins)")
    assert fast_ids == sorted(fast_ids) and len(set(fast_ids)) == len(fast_ids)
    assert len(fast_ids) >= ticks // 2  # the fast one kept up with the ticks
    assert slow_sub.replaced >= 20 and fast_sub.replaced < slow_sub.replaced

    # When it reads again it soon sees the newest round, not everything it missed.
    newest = agg.communicator.last_result.round_id
    caught_up = False
    for _ in range(5000):
        response = await asyncio.wait_for(slow.read(), 30)
        if response.round_id >= newest:
            caught_up = True
            break
    assert caught_up
    slow.cancel()
    fast.cancel()
    await slow_channel.close()
    await wait_for(lambda: agg.watch.watchers == 0 and agg.watch.tickers == 0, what="watchers to leave")


async def test_the_client_hands_a_watcher_that_looked_away_the_newest_answer(start_aggregator, start_agents):
    """The server keeps one undelivered answer per watcher, but what it wrote already waits in the transport
    (hundreds of small answers). The client library reads on while its consumer stalls, so the consumer's
    next answer is the newest round, not the one after the answer it stalled over (async and blocking)."""
    agg = await start_aggregator(dp_size=2, round_timeout_ms=2000)
    await start_agents(agg, [[0, 1]], collect_latency_ms=1)
    target = f"127.0.0.1:{agg.port}"

    async with AsyncLoadClient(target) as client:
        feed = client.watch_loads(include=["core"], interval_ms=10)
        first = await anext(feed)
        await wait_for(lambda: agg.communicator.last_result.round_id >= first.round_id + 20, timeout=60,
                       what="20 more rounds while the consumer looks away")
        await asyncio.sleep(0.2)
        newest = agg.communicator.last_result.round_id
        after = await anext(feed)
        await feed.aclose()
    assert after.round_id >= newest - 2, (first.round_id, newest, after.round_id)

    def blocking() -> tuple[int, int, int]:
        with LoadClient(target) as client:
            feed = client.watch_loads(include=["core"], interval_ms=10)
            first = next(feed)
            for _ in range(600):  # bounded: at most a minute for 20 rounds
                if agg.communicator.last_result.round_id >= first.round_id + 20:
                    break
                time.sleep(0.1)
            time.sleep(0.2)
            newest = agg.communicator.last_result.round_id
            after = next(feed)
            feed.close()
            return first.round_id, newest, after.round_id

    first_id, newest, after_id = await asyncio.to_thread(blocking)
    assert newest >= first_id + 20 and after_id >= newest - 2, (first_id, newest, after_id)
    await wait_for(lambda: agg.watch.watchers == 0, what="both watchers to leave")


async def test_a_watch_consumer_waiting_when_its_client_closes_is_woken(start_aggregator, start_agents):
    """Closing the client cancels its watch call: a consumer waiting for the next answer gets CancelledError,
    as iterating the call itself gives, instead of waiting forever (async and blocking)."""
    agg = await start_aggregator(dp_size=1, round_timeout_ms=500)
    await start_agents(agg, [[0]])
    target = f"127.0.0.1:{agg.port}"
    client = AsyncLoadClient(target)
    feed = client.watch_loads(interval_ms=5000)  # the next answer is seconds away: the consumer waits
    await anext(feed)
    waiting = asyncio.ensure_future(anext(feed))
    await asyncio.sleep(0.2)
    await client.close()
    done, _ = await asyncio.wait({waiting}, timeout=10)
    assert done and waiting.cancelled()

    def blocking() -> str:
        client = LoadClient(target)
        feed = client.watch_loads(interval_ms=5000)
        next(feed)
        threading.Timer(0.2, client.close).start()
        try:
            next(feed)
        except grpc.RpcError as error:
            return error.code().name
        return "another answer"

    assert await asyncio.wait_for(asyncio.to_thread(blocking), 10) == "CANCELLED"
    await wait_for(lambda: agg.watch.watchers == 0, what="both watchers to leave")


async def test_interval_bounds_and_bad_requests(start_aggregator, start_agents, channel_to):
    agg = await start_aggregator(dp_size=2, default_watch_interval_ms=50, min_watch_interval_ms=20)
    await start_agents(agg, [[0], [1]])
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    for request, words in (
        (pb.WatchLoadsRequest(interval_ms=5), "interval_ms 5 is outside 20.."),
        (pb.WatchLoadsRequest(interval_ms=10_000_000), "interval_ms 10000000 is outside 20.."),
        (pb.WatchLoadsRequest(dp_rank=2), "out of range"),
        (pb.WatchLoadsRequest(include=["gpus"]), "unknown section"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _take(stub.WatchLoads(request), 1)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in info.value.details()
    # 0 = the server's default interval; a single rank and sections are honoured.
    call = stub.WatchLoads(pb.WatchLoadsRequest(interval_ms=0, dp_rank=1, include=["queues"]))
    (answer,) = await _take(call, 1)
    assert [load.dp_rank for load in answer.loads] == [1] and answer.loads[0].HasField("queues")
    assert not answer.loads[0].HasField("memory")
    assert [s.interval_ms for s in agg.watch.subscriptions()] == [50]
    call.cancel()


async def test_disconnected_watchers_leave_nothing_behind(start_aggregator, start_agents, channel_to):
    agg = await start_aggregator(dp_size=1)
    await start_agents(agg, [[0]])
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{agg.port}")
    stub = pb_grpc.LoadAggregatorStub(channel)
    calls = [stub.WatchLoads(pb.WatchLoadsRequest(interval_ms=20 + 10 * (i % 3))) for i in range(60)]
    await asyncio.gather(*(_take(c, 1) for c in calls))
    assert agg.watch.watchers == 60 and agg.watch.tickers == 3
    await channel.close()  # the router goes away without cancelling anything
    await wait_for(lambda: agg.watch.watchers == 0 and agg.watch.tickers == 0, what="watchers to be dropped")
    assert agg.watch.stats.subscribed == agg.watch.stats.unsubscribed == 60
    ticks = agg.watch.stats.ticks
    await asyncio.sleep(0.2)
    assert agg.watch.stats.ticks == ticks  # no ticker left running


async def test_shutdown_ends_watch_streams_cleanly(start_aggregator, start_agents, channel_to):
    agg = await start_aggregator(dp_size=1)
    await start_agents(agg, [[0]])
    call = pb_grpc.LoadAggregatorStub(channel_to(agg.port)).WatchLoads(pb.WatchLoadsRequest(interval_ms=50))
    await _take(call, 1)
    await agg.stop(grace=10)
    rest = []
    while (response := await asyncio.wait_for(call.read(), 30)) is not grpc.aio.EOF:  # ends without an error
        rest.append(response)
    assert await call.code() == grpc.StatusCode.OK
    assert len(rest) <= 2
    assert agg.watch.watchers == 0


async def test_the_first_watcher_of_an_interval_is_answered_at_once(start_aggregator, start_agents, channel_to):
    """A watcher asking for one answer a minute gets its first one now, not at the next minute's tick."""
    agg = await start_aggregator(dp_size=2)
    await start_agents(agg, [[0], [1]])
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    call = stub.WatchLoads(pb.WatchLoadsRequest(interval_ms=60_000), timeout=30)
    first = await asyncio.wait_for(call.read(), 10)
    assert len(first.loads) == 2 and agg.watch.stats.ticks == 1
    call.cancel()
