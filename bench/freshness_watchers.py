"""Load-generator mode `freshness`: N routers or watchers, each noting how old every change is when it sees it.

A change's time rides in its rank's `num_used_tokens` (bench.freshness_engine). Each watcher remembers
the stamp it last saw per rank; a new one is a change seen, aged now - stamp (same machine clock). What
a watcher holds when it starts is not counted (it is not a change it saw happen). Ways:

* `poll`: routers polling every engine's sglang `/v1/loads` every `poll_ms` (each its own phase, as
  independent routers are), every engine GET of a poll in parallel;
* `watch`: loadagg WatchLoads, at `interval_ms` or `on_change` (`min_interval_ms`);
* `relay`: the bare relay's stream (bench.relay_proc): the agents' own push messages, forwarded.

`stamp_field` names the figure carrying the stamp (default num_used_tokens). With `stamps_file`, the figure
carries a change's sequence number instead (SMG's records have no figure wide enough for a time): each sighting
keeps (sequence, when seen), and the changes' times are looked up by sequence in the engine's file (a line
"sequence stamp_us" per change) once the watching ends. With `parsed` = K, only the
first K watchers parse their answers (and age them), the rest read them as bytes: a fleet's 100 watchers of
512 ranks would otherwise measure this process's parsing.

The harness's CPU window starts when every watcher is connected (`{"watching": true}`).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import grpc

from bench.child import emit
from bench.freshness_engine import STAMP_MOD_US, age_us, stamp_us
from bench.relay_proc import SUBSCRIBE_METHOD
from bench.stats import summary_ms
from loadagg.v1 import loadagg_pb2 as pb
from loadagg.v1 import loadagg_pb2_grpc as pb_grpc

WATCH_METHOD = "/loadagg.v1.LoadAggregator/WatchLoads"
GRPC_OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 << 20)]


class Seen:
    """One watcher's last stamp per rank; ages of the changes it saw (while counting)."""

    __slots__ = ("last", "ages", "counting", "age")

    def __init__(self, ages: list, age=lambda stamp: age_us(stamp) / 1e6) -> None:
        self.last: dict[int, int] = {}
        self.ages = ages
        self.counting = False
        self.age = age  # what is kept of a change seen: its age in s (or, by sequence, the sighting)

    def observe(self, rank: int, stamp: int) -> None:
        held = self.last.get(rank)
        if held != stamp:
            self.last[rank] = stamp
            if held is not None and self.counting:
                self.ages.append(self.age(stamp))


def sighting(sequence: int) -> tuple[int, int]:
    return sequence, stamp_us()


def ages_by_sequence(sightings: list[tuple[int, int]], stamps_file: str) -> list[float]:
    """Each sighting's age in s: when seen less when its change was made (the engine's line for its sequence)."""
    with open(stamps_file) as f:
        made = dict(map(int, line.split()) for line in f if line.count(" ") == 1)
    return [((seen - made[sequence]) % STAMP_MOD_US) / 1e6 for sequence, seen in sightings if sequence in made]


def _unparsed(message: bytes) -> tuple:
    return ()


async def freshness(spec: dict) -> dict:
    way, watchers, duration = spec["way"], spec["watchers"], spec["duration_s"]
    ages: list[float] = []
    errors: Counter[str] = Counter()
    messages = [0]
    stamps_file = spec.get("stamps_file", "")
    seen = [Seen(ages, sighting) if stamps_file else Seen(ages) for _ in range(watchers)]
    connected = asyncio.Event()
    ready = [0]
    stop_at = [float("inf")]

    def joined() -> None:
        ready[0] += 1
        if ready[0] == watchers:
            connected.set()

    async def stream(call, parse, watcher: Seen) -> None:
        first = True
        try:
            async for message in call:
                if first:
                    first = False
                    joined()
                messages[0] += 1
                for rank, stamp in parse(message):
                    watcher.observe(rank, stamp)
                if time.perf_counter() >= stop_at[0]:
                    return
        except grpc.aio.AioRpcError as error:
            if time.perf_counter() < stop_at[0]:
                errors[error.code().name] += 1
        finally:
            call.cancel()

    closers = []
    if way == "poll":
        import aiohttp

        sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
                    for _ in range(max(1, watchers // 50))]
        closers = [session.close for session in sessions]
        interval = spec["poll_ms"] / 1000

        async def get(session, url: str, watcher: Seen) -> None:
            async with session.get(url) as response:
                body = await response.json()
            messages[0] += 1
            for entry in body["loads"]:
                watcher.observe(entry["dp_rank"], entry["num_used_tokens"])

        async def router(i: int) -> None:
            session, watcher = sessions[i % len(sessions)], seen[i]
            loop = asyncio.get_running_loop()
            polled = False
            await asyncio.sleep(random.uniform(0, min(interval, 1.0)))  # each router its own phase
            due = loop.time()
            while time.perf_counter() < stop_at[0]:
                try:
                    await asyncio.gather(*(get(session, url, watcher) for url in spec["urls"]))
                except (aiohttp.ClientError, TimeoutError) as error:
                    errors[type(error).__name__] += 1
                if not polled:
                    polled = True
                    joined()
                due += interval
                now = loop.time()
                if due <= now:  # a poll that overran skips the ticks it missed
                    due += ((now - due) // interval + 1) * interval
                await asyncio.sleep(due - now)

        tasks = [asyncio.create_task(router(i)) for i in range(watchers)]
    else:
        channels = [grpc.aio.insecure_channel(spec["target"], options=GRPC_OPTIONS)
                    for _ in range(spec.get("channels", 8))]
        closers = [channel.close for channel in channels]
        if way == "relay":
            subscribers = [c.unary_stream(SUBSCRIBE_METHOD, request_serializer=None,
                                          response_deserializer=pb.AgentMessage.FromString) for c in channels]

            def parse(message: pb.AgentMessage):
                return ((load.dp_rank, load.num_used_tokens) for load in message.report.loads)

            calls = [subscribers[i % len(subscribers)](b"") for i in range(watchers)]
        else:
            stubs = [pb_grpc.LoadAggregatorStub(c) for c in channels]
            raw_watch = [c.unary_stream(WATCH_METHOD, request_serializer=pb.WatchLoadsRequest.SerializeToString,
                                        response_deserializer=None) for c in channels]
            request = pb.WatchLoadsRequest(include=["core"], interval_ms=spec.get("interval_ms", 0),
                                           on_change=spec.get("on_change", False),
                                           min_interval_ms=spec.get("min_interval_ms", 0))
            field = spec.get("stamp_field", "num_used_tokens")

            def parse(message: pb.GetLoadsResponse):
                return ((load.dp_rank, int(getattr(load, field))) for load in message.loads)

            parsed = spec.get("parsed", watchers)
            calls = [stubs[i % len(stubs)].WatchLoads(request) if i < parsed
                     else raw_watch[i % len(raw_watch)](request) for i in range(watchers)]
        tasks = [asyncio.create_task(stream(call, parse if i < spec.get("parsed", watchers) else _unparsed, seen[i]))
                 for i, call in enumerate(calls)]

    try:
        await asyncio.wait_for(connected.wait(), 120)
    except TimeoutError:
        errors["not_connected"] += watchers - ready[0]
    await asyncio.sleep(0.3)  # every watcher past its first answer
    if spec.get("announce_start"):
        emit({"watching": True})
    for watcher in seen:
        watcher.counting = True
    started = time.perf_counter()
    stop_at[0] = started + duration
    counted_from = messages[0]
    await asyncio.sleep(duration)
    wall = time.perf_counter() - started
    delivered = messages[0] - counted_from
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for close in closers:
        await close()
    if stamps_file:
        ages = ages_by_sequence(ages, stamps_file)
    return {"wall_s": round(wall, 3), "changes_seen": len(ages), "messages": delivered,
            "messages_per_s": round(delivered / wall, 1), "age": summary_ms(ages), "errors": dict(errors)}
