"""The sglang source on sglang 0.5.23's load feed: its own publisher on real ZMQ sockets, its own LoadSnapshots
behind /v1/loads and /server_info, a real agent process and a real aggregator."""

from __future__ import annotations

import asyncio
import logging

import msgspec
import pytest
import zmq
from agent_tasks import CACHED, cached_until, get_loads
from conftest import wait_for
from sglang_engine import Sglang0523Engine, free_port_range, load_publisher

from loadagg.v1 import loadagg_pb2 as pb
from scheduler_agent.sources.sglang_feed import SglangFeedSource, parse_endpoint
from scheduler_agent.sources.sglang_http import SglangHttpSource


@pytest.fixture
async def engine():
    started: list[Sglang0523Engine] = []

    async def start(dp_size: int = 2, **options) -> Sglang0523Engine:
        e = Sglang0523Engine(dp_size, **options)
        await e.start()
        started.append(e)
        return e

    yield start
    for e in started:
        await e.stop_all()


async def _source(url: str, endpoint: str = "", silence_s: float = 3.0, detail_s: float = 60.0) -> SglangFeedSource:
    source = SglangFeedSource(SglangHttpSource(url), endpoint, silence_s=silence_s, detail_interval_s=detail_s)
    await source.discover()
    return source


def _requests(e: Sglang0523Engine) -> int:
    return sum(e.hits.values())


async def test_feed_found_on_server_info_answers_from_memory_with_both_ages(engine):
    e = await engine(2)
    source = await _source(e.url)
    try:
        assert source.pushes and source.feed == ("127.0.0.1", e.feed_base, "load")  # "*": the engine URL's host
        await wait_for(lambda: all(source._feeding(r) for r in (0, 1)), what="first frames")
        await wait_for(lambda: all(source.held.ranks[r].detail is not None for r in (0, 1)), what="detail read")
        asked = _requests(e)
        changed = asyncio.Event()
        source.add_listener(changed.set)
        e.set(1, num_running_reqs=42, num_waiting_reqs=7, total_prefill_uncached_tokens=14_000,
              total_prefill_busy_us=3_000_000)
        await asyncio.wait_for(changed.wait(), 5)
        loads = await source.read([0, 1])
        assert _requests(e) == asked  # the change and the read cost the engine nothing
        one = loads[1]
        assert (one.num_running_reqs, one.num_waiting_reqs, one.num_total_reqs) == (42, 7, 49)
        assert one.total_prefill_uncached_tokens == 14_000 and one.prefill_throughput == pytest.approx(4000.0)
        # the figures the feed lacks come from /v1/loads, with their own (older) age
        assert one.token_usage == pytest.approx(0.0153) and one.memory.kv_cache_gb == 40.0
        assert (one.num_active_tokens, one.num_prealloc_ready_tokens, one.queues.prealloc_ready) == (4500, 12, 2)
        assert (one.accelerator, one.num_accelerators) == ("NVIDIA H100 80GB HBM3", 1)
        assert one.HasField("detail_age_ms") and one.detail_age_ms >= one.age_ms
    finally:
        await source.close()


async def test_no_advertised_feed_polls_like_before(engine):
    e = await engine(2, feed=False)
    source = await _source(e.url)
    try:
        assert not source.pushes
        before = e.hits["/v1/loads"]
        loads = await source.read([0, 1])
        assert e.hits["/v1/loads"] == before + 1 and loads[0].num_active_tokens == 4500
        assert not loads[0].HasField("detail_age_ms")  # one read gave every figure
    finally:
        await source.close()


async def test_silent_rank_falls_back_to_v1_loads_and_recovers(engine, caplog):
    e = await engine(2)
    source = await _source(e.url, silence_s=1.5)  # past sglang's 1 s heartbeat
    caplog.set_level(logging.INFO)
    try:
        await wait_for(lambda: all(source._feeding(r) for r in (0, 1)), what="first frames")
        e.publishing = False  # a wedged scheduler: no frame, not even the heartbeat
        await wait_for(lambda: not source._feeding(0) and not source._feeding(1), timeout=5, what="silence noticed")
        before = e.hits["/v1/loads"]
        e.set(0, num_running_reqs=9)
        loads = await source.read([0, 1])
        assert e.hits["/v1/loads"] == before + 1 and loads[0].num_running_reqs == 9 and loads[0].age_ms == 0
        e.publishing = True
        await wait_for(lambda: source._feeding(0) and source._feeding(1), timeout=5, what="frames resumed")
        before = e.hits["/v1/loads"]
        assert (await source.read([0, 1]))[0].num_running_reqs == 9
        assert e.hits["/v1/loads"] == before
        text = caplog.text
        assert text.count("rank 0 sent nothing") == 1 and text.count("rank 0 publishes again") == 1
    finally:
        await source.close()


async def test_sequence_going_back_is_a_restart_not_an_error(engine, caplog):
    e = await engine(1)
    source = await _source(e.url)
    caplog.set_level(logging.INFO)
    try:
        await wait_for(lambda: source._feeding(0), what="first frame")
        e.set(0, num_running_reqs=11)
        await wait_for(lambda: source.held.load(0).num_running_reqs == 11, what="frame 1")
        await e.restart_publisher(0)  # a new scheduler numbers from 0 again, with the same figures
        e.set(0, num_running_reqs=4)
        await wait_for(lambda: source.restarts == 1, timeout=5, what="restart seen")
        await wait_for(lambda: (source.held.load(0) or pb.RankLoad()).num_running_reqs == 4, what="new figures")
        assert (await source.read([0]))[0].num_running_reqs == 4
        assert "rank 0 restarted" in caplog.text
        assert not [r for r in caplog.records if r.name.startswith("scheduler_agent") and r.levelno >= logging.WARNING]
    finally:
        await source.close()


async def test_garbage_and_older_frames_fail_or_serve_only_their_rank(engine):
    """A hand-given feed (--sglang-load-endpoint) whose rank 1 is a publisher of the test's: garbage fails
    rank 1 with the reason while rank 0 (sglang's publisher) serves on; an older scheduler's 6-field LoadStat
    and a newer one's appended fields are read."""
    e = await engine(1, feed=False)
    base = free_port_range(2)
    context = zmq.Context()
    rogue = context.socket(zmq.PUB)
    rogue.bind(f"tcp://127.0.0.1:{base + 1}")
    e.feed_base = base  # rank 0: sglang's own publisher at base + 0
    e.publishers = {0: e._publisher(0)}
    e._loop = asyncio.create_task(e._publish())
    source = SglangFeedSource(SglangHttpSource(e.url), f"tcp://127.0.0.1:{base}", silence_s=5, detail_interval_s=60)
    await source.discover()
    source._listen_to([0, 1])
    try:
        stat = load_publisher.LoadStat(num_running_reqs=6, num_waiting_reqs=1, num_tokens=900,
                                       max_total_num_tokens=1000, attn_dp_rank=1, num_waiting_uncached_tokens=5)
        full = msgspec.msgpack.decode(load_publisher._encoder.encode(stat))  # the publisher's own encoding
        frames = {
            "garbage": [b"load", (1).to_bytes(8, "big"), b"\xc1\xff not msgpack"],
            "short": [b"load", b"\x01"],
            "older": [b"load", (2).to_bytes(8, "big"), msgspec.msgpack.encode(full[:7])],
            "newer": [b"load", (3).to_bytes(8, "big"), msgspec.msgpack.encode([*full, 17, "x"])],
        }

        async def send_until(kind: str, done) -> None:
            for _ in range(300):  # a SUB joins late: resend until it shows
                rogue.send_multipart(frames[kind])
                if done():
                    return
                await asyncio.sleep(0.02)
            raise AssertionError(f"{kind} frame never showed")

        await send_until("garbage", lambda: "not a LoadStat" in source.held.rank(1).problem)
        with pytest.raises(Exception, match="rank 1: a load frame that is not a LoadStat") as failed:
            await source.read([0, 1])
        assert failed.value.loads[0].num_running_reqs == 3  # the other rank keeps serving
        await send_until("short", lambda: "2 parts" in source.held.rank(1).problem)
        await send_until("older", lambda: source.held.load(1) is not None)
        older = source.held.load(1)
        assert (older.num_running_reqs, older.max_total_num_tokens, older.num_waiting_uncached_tokens) == (6, 1000, 5)
        assert not older.HasField("num_total_tokens") and not older.HasField("total_prefill_busy_us")
        await send_until("newer", lambda: source.held.load(1).HasField("total_prefill_busy_us"))
        assert source.held.load(1).num_total_tokens == 0  # (sent as 0: a figure, not a missing one)
        e.set(0, num_running_reqs=8)  # through all of rank 1's frames, rank 0 follows sglang's publisher
        await wait_for(lambda: getattr(source.held.load(0), "num_running_reqs", None) == 8,
                       what="rank 0's change over its feed")
        both = await source.read([0, 1])
        assert (both[0].num_running_reqs, both[1].num_running_reqs) == (8, 6)
    finally:
        await source.close()
        rogue.close(linger=0)
        context.term()


def test_endpoint_flag_is_checked():
    assert parse_endpoint("tcp://10.0.0.5:5600") == ("10.0.0.5", 5600)
    with pytest.raises(ValueError, match="tcp://HOST:BASEPORT"):
        parse_endpoint("10.0.0.5:5600")


async def test_agent_process_carries_a_feed_change_to_a_cached_answer_without_round_or_request(
        engine, start_aggregator, channel_to, processes):
    e = await engine(2)
    agg = await start_aggregator(dp_size=2, round_timeout_ms=1000)
    channel = channel_to(agg.port)
    processes.start("scheduler_agent", "--source", "sglang", "--engine-url", e.url, "--no-gpu",
                    "--aggregator", f"127.0.0.1:{agg.port}", "--detail-interval-ms", "60000",
                    env={"LOADAGG_INSTANCE_ID": "feed-agent"})
    await wait_for(lambda: agg.registry.live_ranks() == {0, 1}, timeout=30, what="agent linked")
    await wait_for(lambda: all((s := agg.registry.snapshot(r)) is not None and s.load.HasField("detail_age_ms")
                               for r in (0, 1)), timeout=10, what="pushes from the feed, with the detail read")
    first = await get_loads(channel, **CACHED)
    assert [load.num_running_reqs for load in first.loads] == [3, 3]
    rounds, asked = agg.communicator.stats.rounds_started, _requests(e)

    e.set(1, num_running_reqs=77)
    answer = await cached_until(channel, 1, 77)
    assert answer.loads[1].num_running_reqs == 77 and answer.source == pb.ANSWER_SOURCE_SNAPSHOTS
    assert agg.communicator.stats.rounds_started == rounds and _requests(e) == asked
    assert answer.loads[1].HasField("detail_age_ms") and answer.loads[1].token_usage == pytest.approx(0.0153)
    assert answer.loads[1].accelerator == "NVIDIA H100 80GB HBM3"


async def test_agent_process_polls_a_silent_feed_and_stops_when_it_resumes(engine, start_aggregator, channel_to,
                                                                           processes):
    e = await engine(2)
    agg = await start_aggregator(dp_size=2, round_timeout_ms=1000)
    channel = channel_to(agg.port)
    processes.start("scheduler_agent", "--source", "sglang", "--engine-url", e.url, "--no-gpu",
                    "--aggregator", f"127.0.0.1:{agg.port}", "--detail-interval-ms", "60000",
                    "--feed-silence-ms", "1500", env={"LOADAGG_INSTANCE_ID": "feed-fallback"})
    await wait_for(lambda: all((s := agg.registry.snapshot(r)) is not None and s.load.HasField("detail_age_ms")
                               for r in (0, 1)), timeout=30, what="pushes from the feed")
    e.publishing = False  # wedged schedulers: the feed goes silent
    asked = e.hits["/v1/loads"]
    e.set(0, num_running_reqs=12)
    await wait_for(lambda: agg.registry.snapshot(0).load.num_running_reqs == 12, timeout=10,
                   what="the change, read through /v1/loads")
    assert e.hits["/v1/loads"] > asked and not agg.registry.snapshot(0).load.HasField("detail_age_ms")
    e.publishing = True
    await wait_for(lambda: agg.registry.snapshot(0).load.HasField("detail_age_ms"), timeout=10,
                   what="the feed again")
    await asyncio.sleep(0.5)
    asked, rounds = e.hits["/v1/loads"], agg.communicator.stats.rounds_started
    e.set(0, num_running_reqs=13)
    await wait_for(lambda: agg.registry.snapshot(0).load.num_running_reqs == 13, what="a feed change")
    answer = await get_loads(channel, **CACHED)
    assert answer.loads[0].num_running_reqs == 13
    assert e.hits["/v1/loads"] == asked and agg.communicator.stats.rounds_started == rounds


async def test_a_detail_read_that_keeps_failing_a_rank_waits_for_the_interval(engine):
    """A rank `/v1/loads` does not list (or an engine whose /v1/loads fails) is asked again at the detail
    interval, not at every 50 ms check while its detail is missing."""
    e = await engine(2)
    source = await _source(e.url, detail_s=0.5)
    full = e.v1_body
    e.v1_body = lambda request: {**(body := full(request)), "loads": body["loads"][:1]}  # rank 1 left out
    try:
        await wait_for(lambda: all(source._feeding(r) for r in (0, 1)), what="first frames")
        await wait_for(lambda: source.held.ranks[0].detail is not None, what="rank 0's detail")
        before = e.hits["/v1/loads"]
        await asyncio.sleep(1.2)
        assert e.hits["/v1/loads"] - before <= 4  # every 0.5 s (was: every check, ~20 in this time)
        assert source.held.ranks[1].detail is None and (await source.read([1]))[1].num_running_reqs == 3
    finally:
        await source.close()


async def test_agent_process_pushes_a_busy_ranks_changes_without_polling_a_silent_one_each_time(
        engine, start_aggregator, processes):
    """Rank 1's scheduler goes silent (it is polled), rank 0's changes keep coming: each push carries rank 0
    from memory; rank 1 is read with /v1/loads at most once a refresh (1 s), not once per push."""
    e = await engine(2)
    agg = await start_aggregator(dp_size=2, round_timeout_ms=1000)
    processes.start("scheduler_agent", "--source", "sglang", "--engine-url", e.url, "--no-gpu",
                    "--aggregator", f"127.0.0.1:{agg.port}", "--detail-interval-ms", "60000",
                    "--feed-silence-ms", "1000", env={"LOADAGG_INSTANCE_ID": "feed-busy-silent"})
    await wait_for(lambda: all((s := agg.registry.snapshot(r)) is not None and s.load.HasField("detail_age_ms")
                               for r in (0, 1)), timeout=30, what="pushes from the feed")
    e.publishers.pop(1).close()  # rank 1's scheduler stops publishing
    e.set(1, num_running_reqs=8)
    await wait_for(lambda: agg.registry.snapshot(1).load.num_running_reqs == 8, timeout=10,
                   what="rank 1 read through /v1/loads")
    asked, pushes = e.hits["/v1/loads"], agg.registry.snapshot(0).received
    for running in range(10, 60):  # 50 changes on rank 0 in about 2 s
        e.set(0, num_running_reqs=running)
        await asyncio.sleep(0.04)
    await wait_for(lambda: agg.registry.snapshot(0).load.num_running_reqs == 59, what="rank 0's last change")
    assert agg.registry.snapshot(0).received > pushes
    assert e.hits["/v1/loads"] - asked <= 5  # about one a second (was: one per push, ~50)


async def test_an_engine_restarted_on_another_load_port_is_followed_at_the_next_rank_check(engine):
    """Every rank silent and /server_info advertising another range (an engine restarted with another
    --load-publish-endpoint): the agent's rank check (discover) subscribes there, not polling forever."""
    e = await engine(2)
    source = await _source(e.url, silence_s=0.5)
    try:
        await wait_for(lambda: all(source._feeding(r) for r in (0, 1)), what="first frames")
        for publisher in e.publishers.values():
            publisher.close()
        e.feed_base = free_port_range(2)  # the restarted engine publishes (and advertises) elsewhere
        e.publishers = {r: e._publisher(r) for r in range(2)}
        e.set(1, num_running_reqs=31)
        await wait_for(lambda: not source._feeding(0) and not source._feeding(1), timeout=5, what="silence")
        await source.discover()  # the agent's periodic rank check
        await wait_for(lambda: all(source._feeding(r) for r in (0, 1)), timeout=5, what="the new range's frames")
        assert source.feed[1] == e.feed_base and source.held.load(1).num_running_reqs == 31
    finally:
        await source.close()


async def test_a_slow_detail_read_is_aged_from_when_it_was_asked(engine):
    """The engine may have read its figures any time during a /v1/loads request: they are aged from its start,
    so a slow read never shows them younger than they may be."""
    e = await engine(1)
    source = await _source(e.url, detail_s=60)
    read = source.http.read

    async def slow(ranks):
        await asyncio.sleep(0.4)
        return await read(ranks)

    source.http.read = slow
    try:
        await wait_for(lambda: source.held.ranks.get(0) is not None and source.held.ranks[0].detail is not None,
                       what="the detail read")
        assert source.held.load(0).detail_age_ms >= 400
    finally:
        await source.close()
